//! Prometheus metrics with `prometheus-client`, served over HTTP at `/metrics` when a
//! server is given a metrics address (`MICRO_METRICS_ADDRESS`; off by default in the
//! library). Every process has one set, shared by its servers and clients.
//!
//! | metric | labels |
//! | --- | --- |
//! | `micro_server_requests_total` | `method`, `code` |
//! | `micro_server_request_duration_seconds` (histogram) | `method` |
//! | `micro_server_requests_in_flight` | `method` |
//! | `micro_server_stream_messages_total` (streaming methods) | `method`, `direction` (`received`, `sent`) |
//! | `micro_server_concurrency_limit` (the current limit) | `service`, `scope` |
//! | `micro_server_concurrency_in_flight` (calls held by the limit) | `service`, `scope` |
//! | `micro_server_refused_total` (calls refused over the limit) | `service`, `scope` |
//! | `micro_client_requests_total` | `service`, `method`, `code` |
//! | `micro_client_request_duration_seconds` (histogram) | `service`, `method` |
//! | `micro_client_attempts_total` | `service`, `node`, `result` |
//! | `micro_registry_events_total` | `registry`, `service`, `event` |
//! | `micro_broker_published_total` | `broker`, `topic`, `result` |
//! | `micro_broker_handled_total` | `broker`, `topic`, `result` |
//! | `micro_broker_handle_duration_seconds` (histogram) | `broker`, `topic` |
//!
//! No caller can grow the page: a `method` label is only ever a method the server serves
//! (or, on the client, one that has answered), every other path counts as
//! [`UNKNOWN_METHOD`]; a limit's `scope` is `server` or a method given a limit of its own
//! in the server's settings; a client's per-instance series go when the instance leaves; a
//! process labels at most [`MAX_BROKER_TOPICS`] topics, the others count as [`OTHER_TOPIC`].
//!
//! The page is Prometheus text (`text/plain; version=0.0.4`) unless the scraper's `Accept`
//! asks for OpenMetrics (`application/openmetrics-text`), which Prometheus does by default.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let endpoint = micro_core::metrics::serve("127.0.0.1:0".parse().unwrap()).await?;
//! println!("scrape http://{}/metrics", endpoint.address());
//! endpoint.stop().await; // or drop it
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, RwLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

mod broker;
mod page;

pub(crate) use self::broker::BrokerTopic;
use self::page::openmetrics_to_prometheus;
pub use self::{
    broker::{BrokerLabels, BrokerTopicLabels, MAX_BROKER_TOPICS, OTHER_TOPIC},
    page::{Format, MetricsEndpoint, serve},
};

/// Labels of a served method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`.
    pub method: String,
}

/// Labels of a streaming method's messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// `received` or `sent`.
    pub direction: String,
}

/// Labels of a served call's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code name, e.g. `OK`, `UNAVAILABLE`.
    pub code: String,
}

/// Labels of one concurrency limit of a server.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The service name the server serves under.
    pub service: String,
    /// `server` for the limit of the whole server, else the path of a method with a fixed
    /// limit of its own (from the server's settings, so the set is bounded).
    pub scope: String,
}

/// Labels of one client attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The service name called.
    pub service: String,
    /// The instance id called.
    pub node: String,
    /// `ok`, a gRPC code name, `transport_error` or `deadline`.
    pub result: String,
}

/// Labels of a client call's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientRequestLabels {
    /// The service name called.
    pub service: String,
    /// `/package.Service/Method`, or [`UNKNOWN_METHOD`].
    pub method: String,
    /// The gRPC status code name the caller got.
    pub code: String,
}

/// Labels of a client call's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientMethodLabels {
    /// The service name called.
    pub service: String,
    /// `/package.Service/Method`, or [`UNKNOWN_METHOD`].
    pub method: String,
}

/// The `method` label of every call to a path that is not a method served (or, on the
/// client, not yet answered), so made-up paths cannot add series.
pub const UNKNOWN_METHOD: &str = "unknown";

/// At most this many methods per client service get a label of their own; the others
/// count as [`UNKNOWN_METHOD`].
pub const MAX_CLIENT_METHODS: usize = 256;

/// Labels of a registry event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// The registry kind.
    pub registry: String,
    /// The service name.
    pub service: String,
    /// `insert`, `remove`, `refresh_repair`, `watch_error`, `register`, `deregister`, `heartbeat_failed`,
    /// `refused` (mDNS: an instance past the cache limit; service `*`).
    pub event: String,
}

/// The process's metrics.
pub struct Metrics {
    /// Calls served, by method and status.
    pub server_requests: Family<RequestLabels, Counter>,
    /// Time to the end of each served call, by method.
    pub server_duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Calls being served, by method.
    pub server_in_flight: Family<MethodLabels, Gauge>,
    /// Messages of streaming methods, by method and direction.
    pub server_stream_messages: Family<StreamLabels, Counter>,
    /// Each concurrency limit's current value.
    pub limit: Family<LimitLabels, Gauge>,
    /// Calls each concurrency limit holds.
    pub limit_in_flight: Family<LimitLabels, Gauge>,
    /// Calls refused by each concurrency limit.
    pub limit_refused: Family<LimitLabels, Counter>,
    /// Client calls (all attempts together), by service, method and status.
    pub client_requests: Family<ClientRequestLabels, Counter>,
    /// Time to the end of each client call, by service and method.
    pub client_duration: Family<ClientMethodLabels, Histogram, fn() -> Histogram>,
    /// Client attempts, by service, instance and result.
    pub client_attempts: Family<AttemptLabels, Counter>,
    /// Registry events seen or made.
    pub registry_events: Family<RegistryLabels, Counter>,
    /// Messages published, by broker, topic and result.
    pub broker_published: Family<BrokerLabels, Counter>,
    /// Messages handed to a subscriber's handler, by broker, topic and result.
    pub broker_handled: Family<BrokerLabels, Counter>,
    /// Time a subscriber's handler took, by broker and topic.
    pub broker_handle_duration: Family<BrokerTopicLabels, Histogram, fn() -> Histogram>,
    /// Per broker, the topics that have a label of their own, with their handles.
    broker_topics: RwLock<HashMap<&'static str, HashMap<String, Arc<BrokerTopic>>>>,
    /// Calls an authorization policy refused, by server and gRPC service.
    pub authz_denied: Family<AuthzLabels, Counter>,
    /// Per service, the methods that have answered a client call, with their handles.
    client_methods: RwLock<HashMap<String, HashMap<String, Arc<ClientMethod>>>>,
    registry: Mutex<Registry>,
}

/// One client method's metric handles, looked up once rather than on every call.
pub struct ClientMethod {
    /// Time to the end of each call.
    pub duration: Histogram,
    /// Calls that ended `OK`.
    pub ok: Counter,
    labels: ClientMethodLabels,
}

impl ClientMethod {
    /// Counts a call that ended with `code` after `seconds`.
    pub fn record(&self, code: tonic::Code, seconds: f64) {
        self.duration.observe(seconds);
        if code == tonic::Code::Ok {
            self.ok.inc();
        } else {
            let labels = ClientRequestLabels {
                service: self.labels.service.clone(),
                method: self.labels.method.clone(),
                code: code_name(code).to_owned(),
            };
            metrics().client_requests.get_or_create(&labels).inc();
        }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// The metrics of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics {
            server_requests: Family::default(),
            server_duration: Family::new_with_constructor(latency_histogram),
            server_in_flight: Family::default(),
            server_stream_messages: Family::default(),
            limit: Family::default(),
            limit_in_flight: Family::default(),
            limit_refused: Family::default(),
            client_requests: Family::default(),
            client_duration: Family::new_with_constructor(latency_histogram),
            client_attempts: Family::default(),
            registry_events: Family::default(),
            broker_published: Family::default(),
            broker_handled: Family::default(),
            broker_handle_duration: Family::new_with_constructor(latency_histogram),
            broker_topics: RwLock::default(),
            authz_denied: Family::default(),
            client_methods: RwLock::default(),
            registry: Mutex::new(Registry::with_prefix("micro")),
        };
        {
            let mut registry = metrics.registry.lock().expect("metrics lock");
            registry.register("server_requests", "gRPC calls served", metrics.server_requests.clone());
            registry.register(
                "server_request_duration_seconds",
                "Time from request to the end of the response",
                metrics.server_duration.clone(),
            );
            registry.register(
                "server_requests_in_flight",
                "gRPC calls being served",
                metrics.server_in_flight.clone(),
            );
            registry.register(
                "server_stream_messages",
                "Messages of streaming calls served, received and sent",
                metrics.server_stream_messages.clone(),
            );
            registry.register(
                "server_concurrency_limit",
                "Calls a server serves at once before refusing more",
                metrics.limit.clone(),
            );
            registry.register(
                "server_concurrency_in_flight",
                "Calls held by a server's concurrency limit",
                metrics.limit_in_flight.clone(),
            );
            registry.register(
                "server_refused",
                "Calls refused with RESOURCE_EXHAUSTED over a server's concurrency limit",
                metrics.limit_refused.clone(),
            );
            registry.register(
                "client_requests",
                "gRPC calls made, all attempts of a call together, by the status the caller got",
                metrics.client_requests.clone(),
            );
            registry.register(
                "client_request_duration_seconds",
                "Time from a client call to the end of its response, retries and hedges included",
                metrics.client_duration.clone(),
            );
            registry.register(
                "client_attempts",
                "Client attempts per target instance",
                metrics.client_attempts.clone(),
            );
            registry.register(
                "registry_events",
                "Registry changes seen or made",
                metrics.registry_events.clone(),
            );
            registry.register(
                "broker_published",
                "Messages published, by whether the broker took them",
                metrics.broker_published.clone(),
            );
            registry.register(
                "broker_handled",
                "Messages handed to a subscriber, by whether its handler succeeded",
                metrics.broker_handled.clone(),
            );
            registry.register(
                "broker_handle_duration_seconds",
                "Time a subscriber's handler took",
                metrics.broker_handle_duration.clone(),
            );
            registry.register(
                "authz_denied",
                "Calls refused by the server's authorization policy",
                metrics.authz_denied.clone(),
            );
        }
        metrics
    })
}

/// Labels of `micro_authz_denied_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// The server's registered name.
    pub service: String,
    /// The gRPC service called: one the server serves, or [`UNKNOWN_METHOD`].
    pub grpc_service: String,
}

impl Metrics {
    /// Counts a call refused by `service`'s authorization policy.
    pub fn authz_denied(&self, service: &str, grpc_service: &str) {
        let labels = AuthzLabels { service: service.to_owned(), grpc_service: grpc_service.to_owned() };
        self.authz_denied.get_or_create(&labels).inc();
    }

    /// Counts a registry event.
    pub fn registry_event(&self, registry: &str, service: &str, event: &str) {
        let labels = RegistryLabels {
            registry: registry.to_owned(),
            service: service.to_owned(),
            event: event.to_owned(),
        };
        self.registry_events.get_or_create(&labels).inc();
    }

    /// The handles of a client's calls to `method` of `service`. `method` has a label of
    /// its own once `answered` says a server answered it (anything but `UNIMPLEMENTED`),
    /// for at most [`MAX_CLIENT_METHODS`] methods per service; until then, and beyond
    /// that, it counts as [`UNKNOWN_METHOD`].
    pub fn client_method(&self, service: &str, method: &str, answered: bool) -> Arc<ClientMethod> {
        if let Some(found) =
            self.client_methods.read().expect("metrics lock").get(service).and_then(|m| m.get(method))
        {
            return found.clone();
        }
        let mut known = self.client_methods.write().expect("metrics lock");
        let methods = known.entry(service.to_owned()).or_default();
        // Paths start with '/', so no method is keyed like the unknown one.
        let key = if answered && methods.len() < MAX_CLIENT_METHODS { method } else { UNKNOWN_METHOD };
        methods
            .entry(key.to_owned())
            .or_insert_with(|| {
                let labels = ClientMethodLabels { service: service.to_owned(), method: key.to_owned() };
                let ok = ClientRequestLabels {
                    service: service.to_owned(),
                    method: key.to_owned(),
                    code: "OK".into(),
                };
                Arc::new(ClientMethod {
                    duration: self.client_duration.get_or_create(&labels).clone(),
                    ok: self.client_requests.get_or_create(&ok).clone(),
                    labels,
                })
            })
            .clone()
    }

    /// The metrics in OpenMetrics text format, ending `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("metrics lock");
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String");
        text
    }

    /// The metrics in `format`.
    pub fn render_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.render(),
            Format::Prometheus => openmetrics_to_prometheus(&self.render()),
        }
    }
}

/// The canonical upper-case name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
