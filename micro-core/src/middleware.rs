//! Middleware as tower layers. The server installs [`ServerTraceLayer`] on every service:
//! it continues the caller's trace (W3C `traceparent`/`tracestate`) in a `grpc.server` span
//! per call, takes the request id from `x-request-id` (or makes one: the trace id when
//! traces are on), keeps both current while the handler runs, so every call the handler
//! makes through a [`crate::NamedChannel`] carries them on, counts the call in
//! [`crate::metrics`] and logs each failed call. Copy it as a pattern for your own layers;
//! add them with [`crate::Server::layer`] or, on the client side, around a channel with
//! `tower::ServiceBuilder`.
//!
//! The library only makes `tracing` spans and moves the context between processes; a
//! binary decides where spans go (`micro_core::cli::LogArgs::init` exports them over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). With no exporter, an incoming `traceparent`
//! still travels on unchanged to the calls a handler makes.
//!
//! A task a handler spawns does not inherit the call's context by itself: spawn it with
//! [`spawn`] (or wrap its future in [`in_current_call`]) so that its calls belong to the
//! same trace and carry the same request id.
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
//! // Inside a handler: a background call in the same trace.
//! let mut background = vessels.clone();
//! micro_core::middleware::spawn(async move {
//!     let _ = background.find_available(proto::vessel::Specification::default()).await;
//! });
//! # }
//! ```

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, TraceContextExt},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use tonic::body::Body;
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{MethodLabels, RequestLabels, UNKNOWN_METHOD, code_name, metrics};

/// The header that carries the request id across hops.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The W3C Trace Context header naming the caller's trace and span.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C Trace Context header with vendor-specific trace state.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// At most this many methods of a server get a label of their own by answering (services
/// no descriptor set describes); the others count as [`UNKNOWN_METHOD`].
pub const MAX_LEARNED_METHODS: usize = 1024;

/// What a served call hands on to the calls its handler makes.
#[derive(Clone)]
struct CallContext {
    request_id: HeaderValue,
    /// The caller's span, as `traceparent` named it (invalid when none came).
    remote: opentelemetry::Context,
}

tokio::task_local! {
    static CALL: CallContext;
}

/// The id of the request being handled by this task, when inside a handler.
pub fn current_request_id() -> Option<HeaderValue> {
    CALL.try_with(|call| call.request_id.clone()).ok()
}

/// A fresh request id: 16 hex digits.
pub fn new_request_id() -> HeaderValue {
    HeaderValue::from_str(&format!("{:016x}", rand::random::<u64>())).expect("hex is a valid header")
}

/// Runs `future` with `request_id` current, as the server does for each handler.
pub async fn with_request_id<F: Future>(request_id: HeaderValue, future: F) -> F::Output {
    CALL.scope(CallContext { request_id, remote: opentelemetry::Context::new() }, future).await
}

/// `future` with the context of the call being handled (its span, trace and request id),
/// for a task the handler spawns: `tokio::spawn(in_current_call(work))`. Calls made in it
/// belong to the handler's trace. Outside a handler, only the current span is kept.
pub fn in_current_call<F>(future: F) -> impl Future<Output = F::Output> + Send
where
    F: Future + Send,
{
    let span = tracing::Span::current();
    let call = CALL.try_with(Clone::clone).ok();
    async move {
        match call {
            Some(call) => CALL.scope(call, future).await,
            None => future.await,
        }
    }
    .instrument(span)
}

/// Spawns `future` on the current runtime with the context of the call being handled
/// (see [`in_current_call`]).
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(in_current_call(future))
}

/// The trace context `headers` carry (`traceparent`, `tracestate`); an empty context
/// when they carry none or an invalid one.
pub fn extract_trace_context(headers: &HeaderMap) -> opentelemetry::Context {
    if !headers.contains_key(TRACEPARENT_HEADER) {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `traceparent`/`tracestate` for a call made in `span`: `span`'s own context when
/// spans are exported, else the context of the call being handled, passed on unchanged.
pub(crate) fn inject_trace_context(headers: &mut HeaderMap, span: &tracing::Span) {
    let own = if span.is_disabled() { None } else { Some(span.context()) };
    let cx = match own {
        Some(cx) if cx.span().span_context().is_valid() => cx,
        _ => match CALL.try_with(|call| call.remote.clone()) {
            Ok(remote) if remote.span().span_context().is_valid() => remote,
            _ => return,
        },
    };
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// The methods a server serves, which alone get a `method` label of their own.
///
/// A method is known when an encoded descriptor set given to the server describes it, or,
/// for a served gRPC service no set describes, once it has answered with anything but
/// `UNIMPLEMENTED` (what tonic answers for a path it does not route), up to
/// [`MAX_LEARNED_METHODS`]. Every other path counts as [`UNKNOWN_METHOD`].
pub struct ServedMethods {
    /// Full names of the gRPC services served (`package.Service`).
    services: HashSet<String>,
    /// Services whose methods a descriptor set lists: nothing is learned for them.
    described: HashSet<String>,
    /// Known paths and their metric handles.
    known: RwLock<HashMap<String, Arc<MethodMetrics>>>,
    unknown: Arc<MethodMetrics>,
    /// Learn any path (a layer used on its own, with no service list).
    learn_any: bool,
}

impl std::fmt::Debug for ServedMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedMethods").field("services", &self.services).finish_non_exhaustive()
    }
}

impl Default for ServedMethods {
    /// Knows nothing in advance; learns any path that answers, up to [`MAX_LEARNED_METHODS`].
    fn default() -> Self {
        let mut methods = ServedMethods::new(std::iter::empty::<&str>(), &[]);
        methods.learn_any = true;
        methods
    }
}

impl ServedMethods {
    /// The methods of the gRPC `services` (full names) that the encoded descriptor sets
    /// describe, plus those of undescribed services as they answer.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>, descriptor_sets: &[&[u8]]) -> Self {
        let services: HashSet<String> = services.into_iter().map(str::to_owned).collect();
        let mut known = HashMap::new();
        let mut described = HashSet::new();
        for (service, method) in described_methods(descriptor_sets) {
            if services.contains(&service) {
                let path = format!("/{service}/{method}");
                known.insert(path.clone(), MethodMetrics::new(&path));
                described.insert(service);
            }
        }
        ServedMethods {
            services,
            described,
            known: RwLock::new(known),
            unknown: MethodMetrics::new(UNKNOWN_METHOD),
            learn_any: false,
        }
    }

    /// The handles for `path`: its own when known, else the unknown method's.
    fn lookup(&self, path: &str) -> Arc<MethodMetrics> {
        match self.known.read().expect("metrics cache lock").get(path) {
            Some(found) => found.clone(),
            None => self.unknown.clone(),
        }
    }

    /// The handles for `path`, which was not known when its call started and ended with
    /// `code`: its own when that answer shows it is served, else none.
    fn learn(&self, path: &str, code: tonic::Code) -> Option<Arc<MethodMetrics>> {
        if code == tonic::Code::Unimplemented {
            return None;
        }
        let service = path.strip_prefix('/')?.split_once('/')?.0;
        let learnable =
            self.learn_any || (self.services.contains(service) && !self.described.contains(service));
        if !learnable {
            return None;
        }
        let mut known = self.known.write().expect("metrics cache lock");
        if let Some(found) = known.get(path) {
            return Some(found.clone());
        }
        if known.len() >= MAX_LEARNED_METHODS {
            return None;
        }
        let entry = MethodMetrics::new(path);
        known.insert(path.to_owned(), entry.clone());
        Some(entry)
    }
}

/// `(package.Service, Method)` of every method in encoded `FileDescriptorSet`s.
pub(crate) fn described_methods(sets: &[&[u8]]) -> Vec<(String, String)> {
    use prost::Message;
    // The few fields of descriptor.proto needed here; prost skips the others.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FileSet {
        #[prost(message, repeated, tag = "1")]
        file: Vec<File>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct File {
        #[prost(string, optional, tag = "2")]
        package: Option<String>,
        #[prost(message, repeated, tag = "6")]
        service: Vec<GrpcService>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct GrpcService {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
        #[prost(message, repeated, tag = "2")]
        method: Vec<Method>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Method {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
    }
    let mut methods = Vec::new();
    for set in sets {
        let Ok(set) = FileSet::decode(*set) else { continue };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                let full = if package.is_empty() { name } else { format!("{package}.{name}") };
                for method in service.method {
                    methods.push((full.clone(), method.name.unwrap_or_default()));
                }
            }
        }
    }
    methods
}

/// Traces, counts and logs every incoming call: a `grpc.server` span continuing the
/// caller's trace, the request id, the call by method and status, its duration, calls in
/// flight, and one log line per failed call (method, status, request id, trace id).
#[derive(Debug, Clone, Default)]
pub struct ServerTraceLayer {
    methods: Arc<ServedMethods>,
}

impl ServerTraceLayer {
    /// A layer labelling metrics with `methods`; [`Default`] learns any path that answers.
    pub fn new(methods: ServedMethods) -> Self {
        ServerTraceLayer { methods: Arc::new(methods) }
    }
}

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner, methods: self.methods.clone() }
    }
}

/// The service [`ServerTraceLayer`] makes.
#[derive(Clone)]
pub struct ServerTrace<S> {
    inner: S,
    methods: Arc<ServedMethods>,
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

impl MethodMetrics {
    fn new(method: &str) -> Arc<Self> {
        let m = metrics();
        let labels = MethodLabels { method: method.to_owned() };
        let ok = RequestLabels { method: method.to_owned(), code: "OK".into() };
        Arc::new(MethodMetrics {
            method: method.to_owned(),
            in_flight: m.server_in_flight.get_or_create(&labels).clone(),
            duration: m.server_duration.get_or_create(&labels).clone(),
            ok: m.server_requests.get_or_create(&ok).clone(),
        })
    }
}

/// A span name for `path`: `package.Service/Method`.
pub(crate) fn span_name(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
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
        // A clone of the URI shares its bytes: no copy of the path per call.
        let uri = request.uri().clone();
        let path = uri.path();
        let metrics = self.methods.lookup(path);
        let known = !Arc::ptr_eq(&metrics, &self.methods.unknown);
        let remote = extract_trace_context(request.headers());
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = if known { span_name(path) } else { UNKNOWN_METHOD },
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %span_name(path),
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            request_id = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        let mut trace_id = None;
        if !span.is_disabled() {
            if remote.span().span_context().is_valid() {
                let _ = span.set_parent(remote.clone());
            }
            let own = span.context();
            let own = own.span().span_context().clone();
            if own.is_valid() {
                trace_id = Some(own.trace_id());
                span.record("trace_id", tracing::field::display(own.trace_id()));
                span.record("span_id", tracing::field::display(own.span_id()));
            } else if remote.span().span_context().is_valid() {
                trace_id = Some(remote.span().span_context().trace_id());
                span.record("trace_id", tracing::field::display(remote.span().span_context().trace_id()));
            }
        } else if remote.span().span_context().is_valid() {
            trace_id = Some(remote.span().span_context().trace_id());
        }
        let request_id = match request.headers().get(REQUEST_ID_HEADER) {
            Some(id) => id.clone(),
            None => {
                let id = match trace_id {
                    Some(trace_id) => {
                        HeaderValue::from_str(&trace_id.to_string()).unwrap_or_else(|_| new_request_id())
                    }
                    None => new_request_id(),
                };
                request.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
                id
            }
        };
        if !span.is_disabled() {
            span.record("request_id", request_id.to_str().unwrap_or("?"));
        }
        let unknown_path = (!known).then(|| path.to_owned());
        let finish =
            Finish::start(metrics, self.methods.clone(), unknown_path, request_id.clone(), span.clone());
        let call = self.inner.call(request);
        let context = CallContext { request_id, remote };
        Box::pin(
            CALL.scope(context, async move {
                let response = call.await?;
                Ok(match response.headers().get("grpc-status") {
                    // A trailers-only answer: the status is already known.
                    Some(_) => {
                        finish.complete(response.headers());
                        response
                    }
                    None => response.map(|body| Body::new(StatusBody::new(body, finish))),
                })
            })
            .instrument(span),
        )
    }
}

/// What happens when a call's status is known: from the response headers of a
/// trailers-only answer, or from the trailers; empty headers when the body ended without
/// any. Dropping it unfinished means the call was cut off.
pub(crate) trait OnStatus: Send + 'static {
    /// Records the call with the status in `headers`.
    fn complete(self, headers: &HeaderMap);
}

/// What is recorded when a served call ends.
struct Finish {
    metrics: Arc<MethodMetrics>,
    methods: Arc<ServedMethods>,
    /// The path, when it was not known as the call started.
    unknown_path: Option<String>,
    request_id: HeaderValue,
    span: tracing::Span,
    started: Instant,
    done: bool,
}

impl Finish {
    fn start(
        metrics: Arc<MethodMetrics>,
        methods: Arc<ServedMethods>,
        unknown_path: Option<String>,
        request_id: HeaderValue,
        span: tracing::Span,
    ) -> Self {
        metrics.in_flight.inc();
        Finish { metrics, methods, unknown_path, request_id, span, started: Instant::now(), done: false }
    }

    fn record(&mut self, code: tonic::Code) {
        self.done = true;
        self.metrics.in_flight.dec();
        // A path not known at the start may prove to be served by its answer.
        let method = match &self.unknown_path {
            Some(path) => self.methods.learn(path, code).unwrap_or_else(|| self.metrics.clone()),
            None => self.metrics.clone(),
        };
        method.duration.observe(self.started.elapsed().as_secs_f64());
        if code == tonic::Code::Ok {
            method.ok.inc();
        } else {
            let labels = RequestLabels { method: method.method.clone(), code: code_name(code).to_owned() };
            metrics().server_requests.get_or_create(&labels).inc();
        }
        if !self.span.is_disabled() {
            self.span.record("rpc.grpc.status_code", code as i64);
            if is_server_error(code) {
                self.span.record("otel.status_code", "ERROR");
            }
        }
    }
}

impl OnStatus for Finish {
    fn complete(mut self, headers: &HeaderMap) {
        let status = tonic::Status::from_header_map(headers);
        let code = status.as_ref().map_or(tonic::Code::Ok, tonic::Status::code);
        self.record(code);
        if let Some(status) = status.filter(|s| s.code() != tonic::Code::Ok) {
            let method = self.unknown_path.as_deref().unwrap_or(&self.metrics.method);
            tracing::info!(parent: &self.span, %method, request_id = self.request_id.to_str().unwrap_or("?"),
                grpc_status = code_name(status.code()), grpc_message = status.message(),
                elapsed = ?self.started.elapsed(), "call failed");
        }
    }
}

/// The codes a server reports as its own error on its span (OpenTelemetry's gRPC
/// conventions); the others are the caller's.
fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss)
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            // The response ended without a status: the caller went away.
            self.record(tonic::Code::Cancelled);
        }
    }
}

/// A response body that hands the status to its [`OnStatus`] when the trailers go by.
pub(crate) struct StatusBody<T: OnStatus> {
    inner: Body,
    on_status: Option<T>,
}

impl<T: OnStatus> StatusBody<T> {
    pub(crate) fn new(inner: Body, on_status: T) -> Self {
        StatusBody { inner, on_status: Some(on_status) }
    }
}

impl<T: OnStatus + Unpin> http_body::Body for StatusBody<T> {
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
                    && let Some(on_status) = self.on_status.take()
                {
                    on_status.complete(trailers);
                }
            }
            Poll::Ready(None) => {
                if let Some(on_status) = self.on_status.take() {
                    on_status.complete(&HeaderMap::new());
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

/// The span context of `cx`, for tests and logs.
pub fn span_context(cx: &opentelemetry::Context) -> SpanContext {
    cx.span().span_context().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_sets_name_their_methods() {
        let methods = described_methods(&[tonic_health::pb::FILE_DESCRIPTOR_SET]);
        assert!(methods.contains(&("grpc.health.v1.Health".into(), "Check".into())), "{methods:?}");
    }

    #[test]
    fn unknown_paths_share_one_label_and_served_ones_are_learned_once_answered() {
        let methods =
            ServedMethods::new(["grpc.health.v1.Health", "x.Y"], &[tonic_health::pb::FILE_DESCRIPTOR_SET]);
        assert_eq!(methods.lookup("/grpc.health.v1.Health/Check").method, "/grpc.health.v1.Health/Check");
        assert_eq!(methods.lookup("/evil.Svc/M").method, UNKNOWN_METHOD);
        assert!(methods.learn("/evil.Svc/M", tonic::Code::Ok).is_none(), "not served");
        assert!(methods.learn("/grpc.health.v1.Health/Made", tonic::Code::Ok).is_none(), "described");
        assert!(methods.learn("/x.Y/Z", tonic::Code::Unimplemented).is_none(), "not routed");
        assert_eq!(methods.learn("/x.Y/Z", tonic::Code::NotFound).unwrap().method, "/x.Y/Z");
        assert_eq!(methods.lookup("/x.Y/Z").method, "/x.Y/Z");
    }

    #[test]
    fn traceparent_round_trips() {
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT_HEADER,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let cx = extract_trace_context(&headers);
        assert_eq!(span_context(&cx).trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut out = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut out));
        assert_eq!(out[TRACEPARENT_HEADER], headers[TRACEPARENT_HEADER]);
        assert!(!extract_trace_context(&HeaderMap::new()).span().span_context().is_valid());
    }
}
