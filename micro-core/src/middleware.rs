//! Middleware as tower layers. The server installs [`ServerTraceLayer`] on every service: it
//! takes the request id from `x-request-id` (or makes one), keeps it current while the
//! handler runs, so every call the handler makes through a [`crate::NamedChannel`] carries
//! it on, and logs each call. Copy it as a pattern for your own layers; add them with
//! [`crate::Server::layer`] or, on the client side, around a channel with
//! `tower::ServiceBuilder`.
//!
//! # Examples
//! ```no_run
//! # async fn demo(client: micro_core::Client) {
//! use proto::vessel::vessel_service_client::VesselServiceClient;
//! let channel = tower::ServiceBuilder::new()
//!     .map_request(|mut request: http::Request<tonic::body::Body>| {
//!         request.headers_mut().insert("x-team", http::HeaderValue::from_static("fleet"));
//!         request
//!     })
//!     .service(client.channel("vessel-service"));
//! let vessels = VesselServiceClient::new(channel);
//! # }
//! ```

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tonic::body::Body;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

use crate::metrics::{MethodLabels, RequestLabels, code_name, metrics};

/// The header that carries the request id across hops.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: HeaderValue;
}

/// The id of the request being handled by this task, when inside a handler.
pub fn current_request_id() -> Option<HeaderValue> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// A fresh request id: 16 hex digits.
pub fn new_request_id() -> HeaderValue {
    HeaderValue::from_str(&format!("{:016x}", rand::random::<u64>())).expect("hex is a valid header")
}

/// Runs `future` with `request_id` current, as the server does for each handler.
pub async fn with_request_id<F: Future>(request_id: HeaderValue, future: F) -> F::Output {
    REQUEST_ID.scope(request_id, future).await
}

/// Gives every incoming call a request id, logs each failed call (method, status, request
/// id), and counts every call in [`crate::metrics`]: by method and status, its duration,
/// and calls in flight.
#[derive(Debug, Clone, Default)]
pub struct ServerTraceLayer;

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner, methods: Arc::default() }
    }
}

/// The service [`ServerTraceLayer`] makes.
#[derive(Clone)]
pub struct ServerTrace<S> {
    inner: S,
    methods: Arc<RwLock<HashMap<String, Arc<MethodMetrics>>>>,
}

impl<S> std::fmt::Debug for ServerTrace<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTrace").finish_non_exhaustive()
    }
}

/// One method's metric handles, looked up once rather than on every call.
struct MethodMetrics {
    method: String,
    in_flight: Gauge,
    duration: Histogram,
    ok: Counter,
}

impl<S> ServerTrace<S> {
    fn method_metrics(&self, method: &str) -> Arc<MethodMetrics> {
        if let Some(found) = self.methods.read().expect("metrics cache lock").get(method) {
            return found.clone();
        }
        let m = metrics();
        let labels = MethodLabels { method: method.to_owned() };
        let ok = RequestLabels { method: method.to_owned(), code: "OK".into() };
        let entry = Arc::new(MethodMetrics {
            method: method.to_owned(),
            in_flight: m.server_in_flight.get_or_create(&labels).clone(),
            duration: m.server_duration.get_or_create(&labels).clone(),
            ok: m.server_requests.get_or_create(&ok).clone(),
        });
        self.methods.write().expect("metrics cache lock").insert(method.to_owned(), entry.clone());
        entry
    }
}

impl<S> tower::Service<http::Request<Body>> for ServerTrace<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let request_id = match request.headers().get(REQUEST_ID_HEADER) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                request.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
                id
            }
        };
        let finish = Finish::start(self.method_metrics(request.uri().path()), request_id.clone());
        let call = self.inner.call(request);
        Box::pin(with_request_id(request_id, async move {
            let response = call.await?;
            Ok(match response.headers().get("grpc-status") {
                // A trailers-only answer: the status is already known.
                Some(_) => {
                    finish.complete(response.headers());
                    response
                }
                None => response.map(|body| Body::new(ObservedBody { inner: body, finish: Some(finish) })),
            })
        }))
    }
}

/// What is recorded when a served call ends.
struct Finish {
    metrics: Arc<MethodMetrics>,
    request_id: HeaderValue,
    started: Instant,
    done: bool,
}

impl Finish {
    fn start(metrics: Arc<MethodMetrics>, request_id: HeaderValue) -> Self {
        metrics.in_flight.inc();
        Finish { metrics, request_id, started: Instant::now(), done: false }
    }

    /// Records the call with the status in `headers` (response headers or trailers).
    fn complete(mut self, headers: &HeaderMap) {
        let status = tonic::Status::from_header_map(headers);
        let code = status.as_ref().map_or(tonic::Code::Ok, tonic::Status::code);
        self.record(code_name(code));
        if let Some(status) = status.filter(|s| s.code() != tonic::Code::Ok) {
            tracing::info!(method = %self.metrics.method, request_id = self.request_id.to_str().unwrap_or("?"),
                grpc_status = code_name(status.code()), grpc_message = status.message(),
                elapsed = ?self.started.elapsed(), "call failed");
        }
    }

    fn record(&mut self, code: &str) {
        self.done = true;
        let method = &self.metrics;
        method.in_flight.dec();
        method.duration.observe(self.started.elapsed().as_secs_f64());
        if code == "OK" {
            method.ok.inc();
        } else {
            let labels = RequestLabels { method: method.method.clone(), code: code.to_owned() };
            metrics().server_requests.get_or_create(&labels).inc();
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            // The response ended without a status: the caller went away.
            self.record("CANCELLED");
        }
    }
}

/// A response body that records its call when the trailers (with the status) go out.
struct ObservedBody {
    inner: Body,
    finish: Option<Finish>,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(finish) = self.finish.take()
                {
                    finish.complete(trailers);
                }
            }
            Poll::Ready(None) => {
                if let Some(finish) = self.finish.take() {
                    finish.complete(&HeaderMap::new());
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
