//! The server layer that enforces a [`Policy`] on every call.
//!
//! Health (`grpc.health.v1.Health`) and reflection (`grpc.reflection.*`) are always
//! allowed: probes and tooling carry no service certificate, and they reveal no data. Every
//! other call is decided by the policy on the caller's certificate (see
//! [`crate::auth::caller_of`]) and the subject it vouches for in `x-micro-subject`, which
//! only rules with `subjects` read (see [`crate::auth::subject`]); a denied call is answered `PERMISSION_DENIED` naming the
//! method and the caller, logged once per caller and method per minute, and counted in
//! `micro_authz_denied_total` (labels: the server's name and the gRPC service, which is one
//! this server serves or `unknown`). The policy file is read again within about a second of
//! a change; a file that no longer parses keeps the rules in force, with an error log.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::auth::AuthzLayer;
//! let layer = AuthzLayer::watch("vessel-service", "policy.yaml".as_ref(), &["vessel.VesselService"])?;
//! # Ok(()) }
//! ```

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use tonic::body::Body;

use super::{Policy, caller_of};
use crate::{Result, server::HttpService};

/// How often the policy file is checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// A denial of one caller and method is logged at most once in this long.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Caller and method pairs remembered for [`LOG_EVERY`] at most; past it, forgotten at once.
const MAX_LOGGED: usize = 1024;
/// The gRPC services every server serves that no policy governs.
const ALWAYS_ALLOWED: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

struct Shared {
    server: String,
    path: PathBuf,
    served: HashSet<String>,
    policy: RwLock<Arc<Policy>>,
    logged: Mutex<HashMap<(String, String), Instant>>,
    reload: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.reload.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// Enforces a policy file on a server; see the module docs. Cloning shares the policy.
#[derive(Clone)]
pub struct AuthzLayer {
    shared: Arc<Shared>,
}

impl AuthzLayer {
    /// Reads the policy at `path` (an error names the file and what is wrong) for the server
    /// `server`, which serves the gRPC services `served`, and watches the file for changes
    /// (a task that stops when the last clone of the layer is dropped). Needs a tokio runtime.
    pub fn watch(server: &str, path: &Path, served: &[&str]) -> Result<AuthzLayer> {
        let policy = Policy::from_file(path)?;
        tracing::info!(service = %server, policy = %path.display(), rules = policy.rules.len(), "authorization policy loaded");
        let shared = Arc::new(Shared {
            server: server.to_owned(),
            path: path.to_owned(),
            served: served.iter().map(|s| (*s).to_owned()).collect(),
            policy: RwLock::new(Arc::new(policy)),
            logged: Mutex::new(HashMap::new()),
            reload: Mutex::new(None),
        });
        let task = tokio::spawn(reload(Arc::downgrade(&shared), modified(path)));
        *shared.reload.lock().expect("reload lock") = Some(task);
        Ok(AuthzLayer { shared })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.policy.read().expect("policy lock").clone()
    }
}

/// When the file was last changed, and its length, to notice an edit.
fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

async fn reload(shared: std::sync::Weak<Shared>, mut seen: Option<(SystemTime, u64)>) {
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Some(shared) = shared.upgrade() else { return };
        let now = modified(&shared.path);
        if now == seen {
            continue;
        }
        seen = now;
        match Policy::from_file(&shared.path) {
            Ok(policy) => {
                tracing::info!(service = %shared.server, policy = %shared.path.display(), rules = policy.rules.len(), "authorization policy reloaded");
                *shared.policy.write().expect("policy lock") = Arc::new(policy);
            }
            Err(err) => tracing::error!(
                service = %shared.server,
                error = %crate::error::error_chain(&err),
                "authorization policy not reloaded: the rules in force stay"
            ),
        }
    }
}

impl tower::Layer<HttpService> for AuthzLayer {
    type Service = Authorized;

    fn layer(&self, inner: HttpService) -> Authorized {
        Authorized { inner, shared: self.shared.clone() }
    }
}

/// A service behind [`AuthzLayer`].
#[derive(Clone)]
pub struct Authorized {
    inner: HttpService,
    shared: Arc<Shared>,
}

impl tower::Service<http::Request<Body>> for Authorized {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = <HttpService as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if ALWAYS_ALLOWED.iter().any(|prefix| path.starts_with(prefix)) {
            return self.inner.call(request);
        }
        let caller = caller_of(&request);
        let caller = caller.as_ref().map(|identity| identity.0.as_str());
        let subject = super::subject_of(&request);
        let decision = self.shared.policy.read().expect("policy lock").decide_vouched(caller, subject, path);
        if decision.allowed {
            return self.inner.call(request);
        }
        let shown = caller.unwrap_or("a caller without a certificate");
        self.denied(shown, path, &decision.reason);
        let status = tonic::Status::permission_denied(format!(
            "{shown} may not call {} on {}: {} (the server's authorization policy)",
            path.trim_start_matches('/'),
            self.shared.server,
            decision.reason
        ));
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

impl Authorized {
    /// Counts a denial, and logs it unless this caller and method were logged lately.
    fn denied(&self, caller: &str, path: &str, reason: &str) {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        let service =
            if self.shared.served.contains(service) { service } else { crate::metrics::UNKNOWN_METHOD };
        crate::metrics::metrics().authz_denied(&self.shared.server, service);
        let now = Instant::now();
        let mut logged = self.shared.logged.lock().expect("log lock");
        let key = (caller.to_owned(), path.to_owned());
        if logged.get(&key).is_some_and(|at| now.duration_since(*at) < LOG_EVERY) {
            return;
        }
        if logged.len() >= MAX_LOGGED {
            logged.clear();
        }
        logged.insert(key, now);
        tracing::warn!(service = %self.shared.server, caller, method = %path, reason, "call denied by the authorization policy");
    }
}
