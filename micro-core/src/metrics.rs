//! Prometheus metrics with `prometheus-client`, served over HTTP at `/metrics` when a
//! server is given a metrics address (`MICRO_METRICS_ADDRESS`; off by default in the
//! library). Every process has one set, shared by its servers and clients.
//!
//! | metric | labels |
//! | --- | --- |
//! | `micro_server_requests_total` | `method`, `code` |
//! | `micro_server_request_duration_seconds` (histogram) | `method` |
//! | `micro_server_requests_in_flight` | `method` |
//! | `micro_client_attempts_total` | `service`, `node`, `result` |
//! | `micro_registry_events_total` | `registry`, `service`, `event` |
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
    net::SocketAddr,
    sync::{Mutex, OnceLock},
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

/// Labels of a served method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`.
    pub method: String,
}

/// Labels of a served call's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code name, e.g. `OK`, `UNAVAILABLE`.
    pub code: String,
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

/// Labels of a registry event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// The registry kind.
    pub registry: String,
    /// The service name.
    pub service: String,
    /// `insert`, `remove`, `refresh_repair`, `watch_error`, `register`, `deregister`, `heartbeat_failed`.
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
    /// Client attempts, by service, instance and result.
    pub client_attempts: Family<AttemptLabels, Counter>,
    /// Registry events seen or made.
    pub registry_events: Family<RegistryLabels, Counter>,
    registry: Mutex<Registry>,
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
            client_attempts: Family::default(),
            registry_events: Family::default(),
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
                "client_attempts",
                "Client attempts per target instance",
                metrics.client_attempts.clone(),
            );
            registry.register(
                "registry_events",
                "Registry changes seen or made",
                metrics.registry_events.clone(),
            );
        }
        metrics
    })
}

impl Metrics {
    /// Counts a registry event.
    pub fn registry_event(&self, registry: &str, service: &str, event: &str) {
        let labels = RegistryLabels {
            registry: registry.to_owned(),
            service: service.to_owned(),
            event: event.to_owned(),
        };
        self.registry_events.get_or_create(&labels).inc();
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("metrics lock");
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String");
        text
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

/// Serves `GET /metrics` on `address` in the background until the returned endpoint is
/// stopped or dropped. A server given a metrics address owns one and stops it with itself.
pub async fn serve(address: SocketAddr) -> std::io::Result<MetricsEndpoint> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics().render())
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::warn!(error = %err, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "metrics at /metrics");
    Ok(MetricsEndpoint { address: bound, task: Some(task) })
}

/// A running `/metrics` endpoint; it stops when [stopped](MetricsEndpoint::stop) or dropped.
#[derive(Debug)]
pub struct MetricsEndpoint {
    address: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// The address the endpoint is bound to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
