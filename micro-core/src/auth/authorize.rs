//! Authorization asked of something outside the process (Consul Connect's intentions), per
//! caller, with the answers kept for a few seconds: [`Authorize`] is the question,
//! [`AuthorizeLayer`] the server layer that asks it.
//!
//! The layer decides every call but health and reflection by the caller's verified
//! certificate (its SPIFFE id and serial); a caller that may not call is answered
//! `PERMISSION_DENIED` naming itself, the method, the server and the reason, logged at warn
//! once per caller and method a minute, and counted in `micro_authz_denied_total`. An
//! answer is kept [`ANSWER_TTL`], so a changed rule applies within about that long; one
//! the authority could not give is `UNAVAILABLE` and kept not at all.
//!
//! # Examples
//! ```
//! use micro_core::auth::{Authorize, Decision};
//! struct Nobody;
//! #[async_trait::async_trait]
//! impl Authorize for Nobody {
//!     async fn authorize(&self, _caller: &str, _serial: &str) -> micro_core::Result<Decision> {
//!         Ok(Decision { allowed: false, reason: "nobody may".into() })
//!     }
//!     fn authority(&self) -> String { "nobody".into() }
//! }
//! ```

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tonic::{
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use super::{Decision, identity::spiffe_id_of};
use crate::{Result, server::HttpService};

/// How long an answer is kept: a changed rule applies to a caller within about this long.
pub const ANSWER_TTL: Duration = Duration::from_secs(3);
/// Callers whose answers are kept at most; past it, every answer is forgotten at once.
const MAX_ANSWERS: usize = 1024;
/// A denial of one caller and method is logged at most once in this long.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The gRPC services every server serves that no authority governs.
const ALWAYS_ALLOWED: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

/// Whether a caller may call this service, asked of an authority outside the process.
#[async_trait]
pub trait Authorize: Send + Sync + 'static {
    /// Whether the caller with the SPIFFE id `caller` and certificate serial `serial`
    /// (colon-separated hex) may call this service.
    async fn authorize(&self, caller: &str, serial: &str) -> Result<Decision>;

    /// Who decides, for messages, e.g. `Consul intentions`.
    fn authority(&self) -> String;
}

struct Shared {
    server: String,
    served: HashSet<String>,
    authorize: Arc<dyn Authorize>,
    answers: Mutex<HashMap<String, (Decision, Instant)>>,
    logged: Mutex<HashMap<(String, String), Instant>>,
}

/// Asks an [`Authorize`] about each caller; see the module docs. Cloning shares the answers.
#[derive(Clone)]
pub struct AuthorizeLayer {
    shared: Arc<Shared>,
}

impl AuthorizeLayer {
    /// For the server `server`, which serves the gRPC services `served`.
    pub fn new(server: &str, served: &[&str], authorize: Arc<dyn Authorize>) -> AuthorizeLayer {
        AuthorizeLayer {
            shared: Arc::new(Shared {
                server: server.to_owned(),
                served: served.iter().map(|s| (*s).to_owned()).collect(),
                authorize,
                answers: Mutex::default(),
                logged: Mutex::default(),
            }),
        }
    }
}

impl tower::Layer<HttpService> for AuthorizeLayer {
    type Service = AuthorizedByAuthority;

    fn layer(&self, inner: HttpService) -> AuthorizedByAuthority {
        AuthorizedByAuthority { inner, shared: self.shared.clone() }
    }
}

/// A service behind [`AuthorizeLayer`].
#[derive(Clone)]
pub struct AuthorizedByAuthority {
    inner: HttpService,
    shared: Arc<Shared>,
}

/// The SPIFFE id and serial of the certificate the caller of `request` presented.
fn caller_certificate<B>(request: &http::Request<B>) -> Option<(String, String)> {
    let certs = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    let der = certs.first()?;
    let id = spiffe_id_of(der.as_ref())?;
    let (_, certificate) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some((id.0, certificate.raw_serial_as_string()))
}

impl tower::Service<http::Request<Body>> for AuthorizedByAuthority {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = <HttpService as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if ALWAYS_ALLOWED.iter().any(|prefix| path.starts_with(prefix)) {
            return self.inner.call(request);
        }
        // The inner service was made ready for this call: it goes with the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some((caller, serial)) = caller_certificate(&request) else {
                let status = shared.denied("a caller without a Connect certificate", &path, "no SPIFFE id");
                return Ok(status.into_http());
            };
            match shared.decide(&caller, &serial).await {
                Ok(decision) if decision.allowed => inner.call(request).await,
                Ok(decision) => Ok(shared.denied(&caller, &path, &decision.reason).into_http()),
                Err(err) => {
                    let error = crate::error::error_chain(&err);
                    tracing::warn!(service = %shared.server, %caller, %error, "cannot authorize the caller");
                    Ok(tonic::Status::unavailable(format!(
                        "{} cannot authorize {caller} now: {error}",
                        shared.server
                    ))
                    .into_http())
                }
            }
        })
    }
}

impl Shared {
    /// The kept answer for `caller`, or a fresh one (kept for [`ANSWER_TTL`]).
    async fn decide(&self, caller: &str, serial: &str) -> Result<Decision> {
        let now = Instant::now();
        if let Some((decision, at)) = self.answers.lock().expect("answers lock").get(caller)
            && now.duration_since(*at) < ANSWER_TTL
        {
            return Ok(decision.clone());
        }
        let decision = self.authorize.authorize(caller, serial).await?;
        let mut answers = self.answers.lock().expect("answers lock");
        if answers.len() >= MAX_ANSWERS {
            answers.clear();
        }
        answers.insert(caller.to_owned(), (decision.clone(), now));
        Ok(decision)
    }

    /// Counts and logs a denial, and the status that answers it.
    fn denied(&self, caller: &str, path: &str, reason: &str) -> tonic::Status {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        let service = if self.served.contains(service) { service } else { crate::metrics::UNKNOWN_METHOD };
        crate::metrics::metrics().authz_denied(&self.server, service);
        let authority = self.authorize.authority();
        let now = Instant::now();
        {
            let mut logged = self.logged.lock().expect("log lock");
            let key = (caller.to_owned(), path.to_owned());
            if logged.get(&key).is_none_or(|at| now.duration_since(*at) >= LOG_EVERY) {
                if logged.len() >= MAX_ANSWERS {
                    logged.clear();
                }
                logged.insert(key, now);
                tracing::warn!(service = %self.server, caller, method = %path, reason, %authority, "call denied");
            }
        }
        tonic::Status::permission_denied(format!(
            "{caller} may not call {} on {}: {reason} ({authority})",
            path.trim_start_matches('/'),
            self.server,
        ))
    }
}
