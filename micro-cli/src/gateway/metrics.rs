//! The gateway's own Prometheus metrics, served at `/metrics` after the process's SDK
//! metrics (client attempts, registry events):
//!
//! | metric | labels |
//! | --- | --- |
//! | `micro_gateway_requests_total` | `service`, `method`, `status` |
//! | `micro_gateway_request_duration_seconds` (histogram) | `service`, `method` |
//! | `micro_gateway_auth_failures_total` | `reason` |
//! | `micro_gateway_open_streams` (gauge) | none: server-streaming responses being sent now |
//!
//! Labels are bounded: `service` and `method` are only names the registry listed and
//! reflection described, at most [`MAX_SERIES`] pairs; anything else is [`OTHER`]. An
//! authentication failure's `reason` is one of a fixed set (`missing`, `expired`, ...,
//! `denied` for a call the policy refused).

use std::{
    collections::HashSet,
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

/// The label value for a name that is not a known service or method, or past the bound.
pub const OTHER: &str = "other";
/// The most (service, method) pairs labelled by name.
pub const MAX_SERIES: usize = 256;

/// Labels of an answered request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    method: String,
    status: u16,
}

/// Labels of a request's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

/// Labels of a refused request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    reason: &'static str,
}

struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    auth_failures: Family<AuthLabels, Counter>,
    duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    open_streams: Gauge,
    named: Mutex<HashSet<(String, String)>>,
    registry: Registry,
}

fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

fn metrics() -> &'static GatewayMetrics {
    static METRICS: OnceLock<GatewayMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let requests = Family::default();
        let duration = Family::new_with_constructor(histogram as fn() -> Histogram);
        let mut registry = Registry::with_prefix("micro_gateway");
        registry.register("requests", "HTTP requests answered by the gateway", requests.clone());
        registry.register("request_duration_seconds", "Time to answer an HTTP request", duration.clone());
        let auth_failures = Family::default();
        registry.register(
            "auth_failures",
            "Requests refused for their credentials (401) or by the policy (403)",
            auth_failures.clone(),
        );
        let open_streams = Gauge::default();
        registry.register(
            "open_streams",
            "Server-streaming responses being sent now (SSE or NDJSON)",
            open_streams.clone(),
        );
        GatewayMetrics { requests, auth_failures, duration, open_streams, named: Mutex::default(), registry }
    })
}

/// Counts a request to a known `service` and `method` (or [`OTHER`]) answered with `status`.
pub fn record(service: &str, method: &str, status: u16, seconds: f64) {
    let metrics = metrics();
    let (service, method) = {
        let mut named = metrics.named.lock().expect("metrics lock");
        let pair = (service.to_owned(), method.to_owned());
        if named.contains(&pair) || (named.len() < MAX_SERIES && service != OTHER) {
            named.insert(pair.clone());
            pair
        } else {
            (OTHER.to_owned(), OTHER.to_owned())
        }
    };
    metrics
        .requests
        .get_or_create(&RequestLabels { service: service.clone(), method: method.clone(), status })
        .inc();
    metrics.duration.get_or_create(&MethodLabels { service, method }).observe(seconds);
}

/// One streaming response being sent: counted in `micro_gateway_open_streams` from
/// [`OpenStream::new`] until dropped.
pub struct OpenStream(());

impl OpenStream {
    /// Counts a stream as open.
    pub fn new() -> Self {
        metrics().open_streams.inc();
        OpenStream(())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics().open_streams.dec();
    }
}

/// Counts a request refused for `reason`, one of a fixed set.
pub fn auth_failure(reason: &'static str) {
    metrics().auth_failures.get_or_create(&AuthLabels { reason }).inc();
}

/// The SDK's metrics and the gateway's, as one OpenMetrics page.
pub fn render() -> String {
    let sdk = micro_core::metrics::metrics().render();
    let mut page = sdk.trim_end().strip_suffix("# EOF").unwrap_or(&sdk).to_owned();
    prometheus_client::encoding::text::encode(&mut page, &metrics().registry).expect("writing to a String");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded() {
        for i in 0..MAX_SERIES + 10 {
            record("svc", &format!("pkg.S/M{i}"), 200, 0.01);
        }
        let page = render();
        assert!(page.contains("micro_gateway_requests_total"), "{page}");
        let series = page.lines().filter(|l| l.starts_with("micro_gateway_requests_total{")).count();
        assert!(series <= MAX_SERIES + 1, "{series} series");
        assert!(page.contains(r#"method="other""#));
        assert_eq!(page.matches("# EOF").count(), 1);
    }
}
