//! Calling services by name: [`Client::channel`] turns a name into a channel that every
//! tonic-generated client accepts. Each call picks an instance with the channel's strategy
//! among those registered, not draining and not ejected; a background task follows the
//! registry (its watch, plus a periodic full refresh) for as long as the channel lives.
//!
//! A failed attempt is retried on another instance, with exponential backoff, full jitter
//! and a retry budget, when that is safe: always when the request never reached a server
//! (its body was never sent: a refused connection), and after sending only for idempotent
//! methods (see [`Client::idempotent_methods`]) or requests carrying an `idempotency-key`
//! header. A non-idempotent call that may have reached a server fails with `UNKNOWN`, naming
//! the instance, and is never sent twice. An instance that fails repeatedly (a refused
//! connection at once) is ejected for a while and tried again later.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{client::Client, config::RegistryConfig, selector::Filter};
//! use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
//!
//! let registry = RegistryConfig::default().connect().await?;
//! let client = Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS);
//! let mut vessels = VesselServiceClient::new(client.channel("vessel-service"));
//! let reply = vessels.find_available(Specification { capacity: 3, max_weight: 55_000 }).await;
//! let v2_only = client.channel_with("vessel-service", Filter::new().version("2"));
//! # Ok(()) }
//! ```

mod replay;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tonic::{Code, Status, body::Body, transport::Channel};
use tower::{Service, ServiceExt, retry::budget::Budget, retry::budget::TpsBudget};

pub use self::replay::MAX_REPLAY_BYTES;
use self::replay::Replay;
use crate::{
    BoxError, Error,
    config::{ClientConfig, TlsConfig},
    error::error_chain,
    metrics::{AttemptLabels, code_name, metrics},
    middleware::{REQUEST_ID_HEADER, current_request_id},
    registry::{Change, Node, NodeId, Registry},
    selector::{Candidates, Filter, Strategy},
};

/// The request header that makes any call safe to retry: the server deduplicates by it.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The request header that carries a call's deadline to the server.
const GRPC_TIMEOUT_HEADER: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
/// Pause before a watch that ended is started again.
const REWATCH_DELAY: Duration = Duration::from_millis(500);
/// While a channel lives, a timer of its runtime is always due within this period. Each
/// call's deadline is a timer (tonic's, from `grpc-timeout`), and tokio wakes its parked
/// time driver (a syscall and a thread wake-up) whenever a new timer is due before every
/// other; with this one pending, a deadline longer than the period never is.
const TIMER_ANCHOR_PERIOD: Duration = Duration::from_secs(1);
/// The longest ejection.
const MAX_EJECT_TIME: Duration = Duration::from_secs(30);

/// Makes [`NamedChannel`]s over one registry. Cheap to clone; channels for the same name
/// and filter are shared.
#[derive(Clone)]
pub struct Client {
    registry: Arc<dyn Registry>,
    config: ClientConfig,
    make_strategy: Option<Arc<dyn Fn() -> Box<dyn Strategy> + Send + Sync>>,
    idempotent: Arc<HashSet<String>>,
    tls: Option<TlsConfig>,
    channels: Arc<Mutex<HashMap<(String, Filter), NamedChannel>>>,
}

impl Client {
    /// A client over `registry` with [`ClientConfig::default`].
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Client {
            registry,
            config: ClientConfig::default(),
            make_strategy: None,
            idempotent: Arc::default(),
            tls: None,
            channels: Arc::default(),
        }
    }

    /// Calls instances over TLS when `tls` has a CA, checking that each server's
    /// certificate names the service; presents its identity to servers that ask. Takes
    /// precedence over the config's. Default: plaintext.
    pub fn tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// All settings at once, e.g. from `cli::ClientArgs`. Default: [`ClientConfig::default`].
    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// A strategy of your own; each new channel gets one from `make`.
    /// Default: the config's [`crate::selector::StrategyKind`] (round robin).
    pub fn strategy<S: Strategy>(mut self, make: impl Fn() -> S + Send + Sync + 'static) -> Self {
        self.make_strategy = Some(Arc::new(move || Box::new(make())));
        self
    }

    /// gRPC paths (`/package.Service/Method`) safe to retry after the request was sent,
    /// e.g. `proto::IDEMPOTENT_METHODS`. Default: none.
    pub fn idempotent_methods(mut self, paths: &[&str]) -> Self {
        self.idempotent = Arc::new(paths.iter().map(|p| (*p).to_owned()).collect());
        self
    }

    /// How long a call waits for a first instance of its name. Default: 3 s.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.config.lookup_timeout = timeout;
        self
    }

    /// Deadline of each call, retries included, unless the caller sets a shorter one.
    /// Default: 5 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// The registry this client resolves names in.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// A channel to every instance of `name`. Needs a tokio runtime.
    pub fn channel(&self, name: &str) -> NamedChannel {
        self.channel_with(name, Filter::default())
    }

    /// A channel to the instances of `name` that `filter` accepts. Needs a tokio runtime.
    pub fn channel_with(&self, name: &str, filter: Filter) -> NamedChannel {
        let mut channels = self.channels.lock().expect("client channels lock");
        channels
            .entry((name.to_owned(), filter.clone()))
            .or_insert_with(|| self.new_channel(name, filter))
            .clone()
    }

    fn new_channel(&self, name: &str, filter: Filter) -> NamedChannel {
        let strategy = match &self.make_strategy {
            Some(make) => make(),
            None => self.config.strategy.build(),
        };
        let mut config = self.config.clone();
        if self.tls.is_some() {
            config.tls = self.tls.clone();
        }
        let config = &config;
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.min_retries_per_sec,
            config.retry_budget_percent / 100.0,
        );
        let (state, _) = watch::channel(Arc::new(Snapshot::default()));
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            registry_kind: self.registry.kind(),
            filter,
            strategy,
            config: config.clone(),
            idempotent: self.idempotent.clone(),
            state,
            stats: Mutex::default(),
            budget,
            follower: OnceLock::new(),
        });
        let follower = tokio::spawn(follow_registry(Arc::downgrade(&shared), self.registry.clone()));
        let _ = shared.follower.set(follower.abort_handle());
        NamedChannel { shared }
    }
}

/// A `tower::Service` for gRPC calls to the instances of one name; see the module docs.
#[derive(Clone)]
pub struct NamedChannel {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    registry_kind: &'static str,
    filter: Filter,
    strategy: Box<dyn Strategy>,
    config: ClientConfig,
    idempotent: Arc<HashSet<String>>,
    state: watch::Sender<Arc<Snapshot>>,
    stats: Mutex<HashMap<NodeId, Arc<NodeStats>>>,
    budget: TpsBudget,
    follower: OnceLock<AbortHandle>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(follower) = self.follower.get() {
            follower.abort();
        }
    }
}

/// What a channel knows of its instances at one moment.
#[derive(Default, Clone)]
struct Snapshot {
    nodes: Vec<Node>,
    channels: Vec<Channel>,
    stats: Vec<Arc<NodeStats>>,
    /// Indices of nodes the filter accepts and that are not draining.
    eligible: Vec<usize>,
    /// Eligible and not ejected.
    pickable: Vec<usize>,
}

impl Snapshot {
    fn with_pickable(mut self, now: Instant) -> Self {
        self.pickable = self.eligible.iter().copied().filter(|&i| !self.stats[i].is_ejected(now)).collect();
        self
    }
}

/// One instance's health as this channel sees it.
#[derive(Default)]
struct NodeStats {
    /// The `result="ok"` attempt counter of this instance, looked up once.
    ok_attempts: OnceLock<Counter>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl NodeStats {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.lock().expect("stats lock").is_some_and(|until| until > now)
    }
}

/// Keeps an in-flight count up while an attempt runs.
struct InFlight(Arc<NodeStats>);

impl InFlight {
    fn start(stats: &Arc<NodeStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl NamedChannel {
    /// The service name this channel calls.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The instances currently known for the name, draining and filtered-out ones included.
    pub fn instances(&self) -> Vec<Node> {
        self.shared.state.borrow().nodes.clone()
    }

    /// The instances a call may be sent to now: accepted by the filter, not draining, not
    /// ejected.
    pub fn pickable(&self) -> Vec<Node> {
        let snapshot = self.shared.state.borrow().clone();
        snapshot.pickable.iter().map(|&i| snapshot.nodes[i].clone()).collect()
    }
}

/// An instance chosen for one attempt.
struct Pick {
    snapshot: Arc<Snapshot>,
    slot: usize,
}

impl Pick {
    fn node(&self) -> &Node {
        &self.snapshot.nodes[self.slot]
    }

    fn stats(&self) -> &Arc<NodeStats> {
        &self.snapshot.stats[self.slot]
    }
}

/// How an attempt ended, when it did not succeed.
enum Failure {
    /// The transport failed; `sent` tells whether the request may have reached the server.
    Transport { source: BoxError, sent: bool },
    /// The server (or a proxy) answered with this status.
    Status(Status),
}

impl Shared {
    /// Picks an instance not in `tried` when there is one, waiting up to the look-up
    /// timeout (bounded by the deadline) when none is known yet.
    async fn pick(&self, tried: &[NodeId], deadline: Instant) -> Result<Pick, Status> {
        let snapshot = self.state.borrow().clone();
        if let Some(pick) = self.pick_from(&snapshot, tried) {
            return Ok(pick);
        }
        let mut state = self.state.subscribe();
        let wait_until = deadline.min(Instant::now() + self.config.lookup_timeout);
        loop {
            let snapshot = state.borrow_and_update().clone();
            if let Some(pick) = self.pick_from(&snapshot, tried) {
                return Ok(pick);
            }
            if tokio::time::timeout_at(wait_until, state.changed()).await.is_err() {
                return Err(self.no_instance(&snapshot));
            }
        }
    }

    fn pick_from(&self, snapshot: &Arc<Snapshot>, tried: &[NodeId]) -> Option<Pick> {
        // With every eligible instance ejected, ejection is ignored rather than failing.
        let pool = if snapshot.pickable.is_empty() { &snapshot.eligible } else { &snapshot.pickable };
        let load = |slot: usize| snapshot.stats[slot].in_flight.load(Ordering::Relaxed);
        let candidates = Candidates::with_load(&snapshot.nodes, &load, pool);
        let first = self.strategy.pick(&candidates)?;
        let untried = (0..candidates.len())
            .map(|offset| (first + offset) % candidates.len())
            .find(|&i| !tried.contains(&candidates.node(i).id))
            .unwrap_or(first);
        let slot = pool[untried];
        tracing::debug!(service = %self.name, node = %snapshot.nodes[slot].id, "picked");
        Some(Pick { snapshot: snapshot.clone(), slot })
    }

    fn no_instance(&self, snapshot: &Snapshot) -> Status {
        let registry = self.registry_kind;
        if snapshot.nodes.is_empty() {
            return Error::NoInstance { service: self.name.clone(), registry: registry.into() }.into();
        }
        let draining = snapshot.nodes.iter().filter(|n| n.draining).count();
        let filtered = snapshot.nodes.iter().filter(|n| !self.filter.accepts(n)).count();
        Status::unavailable(format!(
            "no usable instance of {} in registry {registry}: {} known, {filtered} rejected by the filter {:?}, {draining} draining",
            self.name,
            snapshot.nodes.len(),
            self.filter
        ))
    }

    fn record_success(&self, stats: &NodeStats) {
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        stats.ejections.store(0, Ordering::Relaxed);
    }

    /// Counts a failure against `pick`; ejects it after `eject_after` in a row, or at once
    /// when it refused the connection.
    fn record_failure(self: &Arc<Self>, pick: &Pick, refused: bool) {
        let failures = pick.stats().consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if !refused && failures < self.config.eject_after {
            return;
        }
        pick.stats().consecutive_failures.store(0, Ordering::Relaxed);
        let ejections = pick.stats().ejections.fetch_add(1, Ordering::Relaxed);
        let time = (self.config.eject_time * 2u32.saturating_pow(ejections.min(10))).min(MAX_EJECT_TIME);
        *pick.stats().ejected_until.lock().expect("stats lock") = Some(Instant::now() + time);
        tracing::warn!(service = %self.name, node = %pick.node().id, address = %pick.node().address, ?time, failures, refused, "instance ejected");
        self.republish();
        let channel = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            if let Some(channel) = channel.upgrade() {
                channel.republish();
            }
        });
    }

    /// Recomputes which instances are pickable now.
    fn republish(&self) {
        let now = Instant::now();
        self.state.send_modify(|snapshot| *snapshot = Arc::new(Snapshot::clone(snapshot).with_pickable(now)));
    }

    async fn call(self: Arc<Self>, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let started = Instant::now();
        let timeout = requested_timeout(&request)
            .map_or(self.config.request_timeout, |t| t.min(self.config.request_timeout));
        let deadline = started + timeout;
        let (mut parts, body) = request.into_parts();
        // Inside a handler the current request id travels on; otherwise the server assigns one.
        if !parts.headers.contains_key(REQUEST_ID_HEADER)
            && let Some(request_id) = current_request_id()
        {
            parts.headers.insert(REQUEST_ID_HEADER, request_id);
        }
        let method = parts.uri.path();
        let idempotent =
            self.idempotent.contains(method) || parts.headers.contains_key(IDEMPOTENCY_KEY_HEADER);
        let replay = Replay::new(body).await;
        self.budget.deposit();

        let mut tried: Vec<NodeId> = Vec::new();
        // What the last failed attempt ended with: when a retry then runs out of time, that
        // failure says more than the deadline does.
        let mut last_failure: Option<Status> = None;
        for attempt in 0.. {
            let pick = match self.pick(&tried, deadline).await {
                Ok(pick) => pick,
                Err(status) => return Err(Box::new(retried(last_failure, attempt).unwrap_or(status))),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (attempt_body, polled) = replay.attempt();
            let mut request = http::Request::from_parts(parts.clone(), attempt_body);
            request.headers_mut().insert(GRPC_TIMEOUT_HEADER, grpc_timeout(remaining));

            let failure = match self.attempt(&pick, request, &polled).await {
                Ok(response) => return Ok(response),
                Err(AttemptError::Deadline) => {
                    let expired = Status::deadline_exceeded(format!(
                        "{method} to {} instance {} at {} exceeded its {timeout:?} deadline",
                        self.name,
                        pick.node().id,
                        pick.node().address
                    ));
                    return Err(Box::new(retried(last_failure, attempt).unwrap_or(expired)));
                }
                Err(AttemptError::Failed(failure)) => failure,
            };
            // A transport failure that carries a gRPC status (a reset stream) keeps its code.
            let (sent, code) = match &failure {
                Failure::Transport { sent, source } => {
                    (*sent, source.downcast_ref::<Status>().map(Status::code))
                }
                Failure::Status(status) => (true, Some(status.code())),
            };
            let retry_allowed = !sent || (idempotent && code.is_none_or(|code| code == Code::Unavailable));
            let backoff = self.backoff(attempt);
            let retry = retry_allowed
                && attempt < self.config.retries
                && replay.replayable()
                && Instant::now() + backoff < deadline
                && self.budget.withdraw();
            let status = self.final_status(method, &pick, failure, sent, idempotent);
            if retry {
                tried.push(pick.node().id.clone());
                tracing::debug!(service = %self.name, node = %pick.node().id, %method, attempt, sent, "retrying on another instance");
                last_failure = Some(status);
                tokio::time::sleep(backoff).await;
                continue;
            }
            tracing::warn!(service = %self.name, node = %pick.node().id, %method, code = ?status.code(), message = status.message(), retries = attempt, "call failed");
            return Err(Box::new(retried(Some(status), attempt).expect("a status")));
        }
        unreachable!("the attempt loop returns")
    }

    async fn attempt(
        self: &Arc<Self>,
        pick: &Pick,
        request: http::Request<Body>,
        polled: &AtomicBool,
    ) -> Result<http::Response<Body>, AttemptError> {
        let _in_flight = InFlight::start(pick.stats());
        // Every attempt carries `grpc-timeout`, and tonic's channel ends the call there
        // (`TimeoutExpired`), so no timer of our own is needed per call.
        let result = pick.snapshot.channels[pick.slot].clone().oneshot(request).await;
        self.count_attempt(pick, &result);
        match result {
            Ok(response) => match Status::from_header_map(response.headers()) {
                Some(status) if status.code() == Code::Unavailable => {
                    self.record_failure(pick, false);
                    Err(AttemptError::Failed(Failure::Status(status)))
                }
                _ => {
                    self.record_success(pick.stats());
                    Ok(response)
                }
            },
            Err(err) => {
                let source: BoxError = err.into();
                if chain_has::<tonic::TimeoutExpired>(&*source) {
                    return Err(AttemptError::Deadline);
                }
                let sent = polled.load(Ordering::Acquire);
                self.record_failure(pick, !sent && is_connect_error(&*source));
                Err(AttemptError::Failed(Failure::Transport { source, sent }))
            }
        }
    }

    fn count_attempt<E: std::error::Error + 'static>(
        &self,
        pick: &Pick,
        result: &Result<http::Response<Body>, E>,
    ) {
        let result = match result {
            Err(err) if chain_has::<tonic::TimeoutExpired>(err) => "deadline",
            Err(_) => "transport_error",
            // No status in the headers: an answer whose status follows in the trailers.
            Ok(response) => match Status::from_header_map(response.headers()) {
                None => {
                    pick.stats().ok_attempts.get_or_init(|| self.attempt_counter(pick, "ok")).inc();
                    return;
                }
                Some(status) if status.code() == Code::Ok => "ok",
                Some(status) => code_name(status.code()),
            },
        };
        self.attempt_counter(pick, result).inc();
    }

    fn attempt_counter(&self, pick: &Pick, result: &str) -> Counter {
        let labels = AttemptLabels {
            service: self.name.clone(),
            node: pick.node().id.clone(),
            result: result.to_owned(),
        };
        metrics().client_attempts.get_or_create(&labels).clone()
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.config.backoff.saturating_mul(2u32.saturating_pow(attempt.min(16)));
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    fn final_status(
        &self,
        method: &str,
        pick: &Pick,
        failure: Failure,
        sent: bool,
        idempotent: bool,
    ) -> Status {
        let (service, node, address, registry) =
            (&self.name, &pick.node().id, pick.node().address, self.registry_kind);
        match failure {
            Failure::Status(status) => status,
            Failure::Transport { source, .. } if sent && !idempotent => {
                let message = format!(
                    "outcome unknown: {method} reached {service} instance {node} at {address} (registry {registry}), \
                     which failed before answering; not retried because the method is not idempotent: {}",
                    error_chain(&*source)
                );
                Status::unknown(message)
            }
            Failure::Transport { source, .. } => {
                let err = Error::Transport {
                    service: service.clone(),
                    node: node.clone(),
                    address,
                    registry: registry.into(),
                    source,
                };
                err.into()
            }
        }
    }
}

/// `failure`, saying how many retries came after the first attempt when there were any.
fn retried(failure: Option<Status>, retries: u32) -> Option<Status> {
    let failure = failure?;
    Some(match retries {
        0 => failure,
        n => Status::new(failure.code(), format!("{} (after {n} retries)", failure.message())),
    })
}

enum AttemptError {
    Deadline,
    Failed(Failure),
}

/// Whether the failure was a failed TCP connection: nothing reached a server.
fn is_connect_error(err: &(dyn std::error::Error + 'static)) -> bool {
    chain_has::<tonic::ConnectError>(err)
        || chain_has_io(err, |kind| {
            matches!(kind, std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::HostUnreachable)
        })
}

fn chain_has<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| e.is::<E>())
}

fn chain_has_io(err: &(dyn std::error::Error + 'static), kind: impl Fn(std::io::ErrorKind) -> bool) -> bool {
    std::iter::successors(Some(err), |e| e.source())
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| kind(io.kind())))
}

/// The deadline the caller put on the request as `grpc-timeout`, if any.
fn requested_timeout(request: &http::Request<Body>) -> Option<Duration> {
    let value = request.headers().get(GRPC_TIMEOUT_HEADER)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `remaining` in gRPC's `grpc-timeout` form: at most 8 digits and a unit.
fn grpc_timeout(remaining: Duration) -> HeaderValue {
    let millis = remaining.as_millis();
    let text = if millis < 100_000_000 {
        format!("{}m", millis.max(1))
    } else {
        format!("{}S", remaining.as_secs())
    };
    HeaderValue::from_str(&text).expect("digits and a unit")
}

impl Service<http::Request<Body>> for NamedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.shared.clone().call(request))
    }
}

/// Applies the registry's changes to the channel's instances until the channel is dropped.
/// A watch that ends or fails is started again; every refresh interval a full look-up
/// repairs missed events. While the registry cannot be reached the known instances are
/// kept (stale but usable), and this is logged.
async fn follow_registry(channel: Weak<Shared>, registry: Arc<dyn Registry>) {
    let Some(shared) = channel.upgrade() else { return };
    let (name, refresh_interval) = (shared.name.clone(), shared.config.refresh_interval);
    drop(shared);
    let mut known: HashMap<NodeId, Node> = HashMap::new();
    let mut refresh = tokio::time::interval(refresh_interval);
    refresh.tick().await;
    let mut anchor = tokio::time::interval(TIMER_ANCHOR_PERIOD);
    anchor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let mut changes = registry.watch(&name);
        loop {
            let changed = tokio::select! {
                change = changes.next() => match change {
                    Some(Ok(Change::Insert(id, node))) => {
                        metrics().registry_event(registry.kind(), &name, "insert");
                        known.insert(id, node.clone()).as_ref() != Some(&node)
                    }
                    Some(Ok(Change::Remove(id))) => {
                        metrics().registry_event(registry.kind(), &name, "remove");
                        known.remove(&id).is_some()
                    }
                    Some(Err(err)) => {
                        metrics().registry_event(registry.kind(), &name, "watch_error");
                        tracing::warn!(service = %name, registry = registry.kind(), error = %error_chain(&err), cached = known.len(), "watch failed; keeping known instances");
                        break;
                    }
                    None => break,
                },
                _ = refresh.tick() => refresh_from(&*registry, &name, &mut known).await,
                _ = anchor.tick() => false,
            };
            if changed {
                let Some(shared) = channel.upgrade() else { return };
                shared.publish(&known);
            }
        }
        tokio::time::sleep(REWATCH_DELAY).await;
        if refresh_from(&*registry, &name, &mut known).await {
            let Some(shared) = channel.upgrade() else { return };
            shared.publish(&known);
        }
        tracing::warn!(service = %name, registry = registry.kind(), "watch restarted");
    }
}

/// Replaces `known` with a full look-up; returns whether anything changed. On a registry
/// failure `known` is kept.
async fn refresh_from(registry: &dyn Registry, name: &str, known: &mut HashMap<NodeId, Node>) -> bool {
    let found = match registry.lookup(name).await {
        Ok(nodes) => nodes,
        Err(Error::NoInstance { .. }) => Vec::new(),
        Err(err) => {
            if !known.is_empty() {
                tracing::warn!(service = %name, registry = registry.kind(), error = %error_chain(&err), cached = known.len(), "registry unreachable; calls use the cached instances");
            }
            return false;
        }
    };
    let fresh: HashMap<NodeId, Node> = found.into_iter().map(|n| (n.id.clone(), n)).collect();
    if fresh == *known {
        return false;
    }
    tracing::info!(service = %name, before = known.len(), after = fresh.len(), "refresh repaired the instance list");
    metrics().registry_event(registry.kind(), name, "refresh_repair");
    *known = fresh;
    true
}

impl Shared {
    /// Publishes `known` as the new snapshot, reusing connections and health of instances
    /// already known.
    fn publish(&self, known: &HashMap<NodeId, Node>) {
        let mut nodes: Vec<Node> = known.values().cloned().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let previous = self.state.borrow().clone();
        let mut stats = self.stats.lock().expect("stats lock");
        stats.retain(|id, _| known.contains_key(id));
        let mut snapshot = Snapshot::default();
        for node in nodes {
            let reused = previous
                .nodes
                .iter()
                .position(|old| old.id == node.id && old.address == node.address)
                .map(|i| previous.channels[i].clone());
            let connect = || connect_lazily(&node, self.config.connect_timeout, self.config.tls.as_ref());
            let channel = match reused.map_or_else(connect, Ok) {
                Ok(channel) => channel,
                Err(err) => {
                    tracing::warn!(service = %self.name, node = %node.id, error = %err, "unusable address");
                    continue;
                }
            };
            let index = snapshot.nodes.len();
            if self.filter.accepts(&node) && !node.draining {
                snapshot.eligible.push(index);
            }
            snapshot.stats.push(stats.entry(node.id.clone()).or_default().clone());
            snapshot.channels.push(channel);
            snapshot.nodes.push(node);
        }
        let snapshot = snapshot.with_pickable(Instant::now());
        tracing::debug!(service = %self.name, known = snapshot.nodes.len(), pickable = snapshot.pickable.len(), "instances changed");
        self.state.send_replace(Arc::new(snapshot));
    }
}

/// A lazily connected channel to `node`; over TLS when `tls` has a CA, checking that the
/// server's certificate names the service (not its address).
pub fn connect_lazily(
    node: &Node,
    connect_timeout: Duration,
    tls: Option<&TlsConfig>,
) -> Result<Channel, BoxError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let Some((tls, ca)) = tls.and_then(|tls| Some((tls, tls.ca.as_ref()?))) else {
        let endpoint = Endpoint::from_shared(format!("http://{}", node.address))?;
        return Ok(endpoint.connect_timeout(connect_timeout).tcp_nodelay(true).connect_lazy());
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(node.name.clone());
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", node.address))?.tls_config(config)?;
    Ok(endpoint.connect_timeout(connect_timeout).tcp_nodelay(true).connect_lazy())
}

#[cfg(test)]
mod tests;
