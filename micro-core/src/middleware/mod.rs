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
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::TraceContextExt;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use tonic::body::Body;
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{MethodLabels, RequestLabels, StreamLabels, UNKNOWN_METHOD, code_name, metrics};

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

/// [`REQUEST_ID_HEADER`] as a name made once: a `&str` key is copied into a new name on
/// every insert.
pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static(REQUEST_ID_HEADER);

/// A fresh request id: 16 hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let random = rand::random::<u64>();
    let digits: [u8; 16] = std::array::from_fn(|i| HEX[((random >> (60 - 4 * i)) & 0xf) as usize]);
    HeaderValue::from_bytes(&digits).expect("hex is a valid header")
}

/// Runs `future` with `request_id` current, as the server does for each handler.
pub async fn with_request_id<F: Future>(request_id: HeaderValue, future: F) -> F::Output {
    CALL.scope(CallContext { request_id, remote: opentelemetry::Context::new() }, future).await
}

/// Runs `future` as if handling a call whose caller sent the trace context `remote`.
#[cfg(test)]
pub(crate) async fn with_remote_context<F: Future>(remote: opentelemetry::Context, future: F) -> F::Output {
    CALL.scope(CallContext { request_id: new_request_id(), remote }, future).await
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

mod frames;
mod methods;
mod propagation;
mod status;

#[cfg(feature = "cli")]
pub(crate) use self::methods::described_methods;
pub use self::{
    methods::ServedMethods,
    propagation::{extract_trace_context, span_context},
};
pub(crate) use self::{
    propagation::{inject_trace_context, is_exported, outgoing_context},
    status::{OnStatus, StatusBody, status_code},
};

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

impl ServerTraceLayer {
    /// The methods this layer labels metrics with.
    pub(crate) fn methods(&self) -> Arc<ServedMethods> {
        self.methods.clone()
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

/// What the descriptors say of a method's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Unary,
    Streaming,
    /// No descriptor describes it.
    Undescribed,
}

/// One method's metric handles, looked up once rather than on every call.
struct MethodMetrics {
    method: String,
    shape: Shape,
    in_flight: Gauge,
    duration: Histogram,
    ok: Counter,
    /// Messages received and sent, for a streaming method.
    messages: Option<(Counter, Counter)>,
}

impl MethodMetrics {
    fn new(method: &str, shape: Shape) -> Arc<Self> {
        let streaming = shape == Shape::Streaming;
        let m = metrics();
        let labels = MethodLabels { method: method.to_owned() };
        let ok = RequestLabels { method: method.to_owned(), code: "OK".into() };
        let direction = |direction: &str| {
            let labels = StreamLabels { method: method.to_owned(), direction: direction.to_owned() };
            m.server_stream_messages.get_or_create(&labels).clone()
        };
        Arc::new(MethodMetrics {
            method: method.to_owned(),
            shape,
            in_flight: m.server_in_flight.get_or_create(&labels).clone(),
            duration: m.server_duration.get_or_create(&labels).clone(),
            ok: m.server_requests.get_or_create(&ok).clone(),
            messages: streaming.then(|| (direction("received"), direction("sent"))),
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
        // A caller's request id (the SDK's client always sends one) is in the span from the
        // start: one record fewer per call.
        let asked_id = request.headers().get(REQUEST_ID_HEADER).cloned();
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = if known { span_name(path) } else { UNKNOWN_METHOD },
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %span_name(path),
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            request_id = asked_id.as_ref().map(|id| id.to_str().unwrap_or("?")),
            trace_id = Empty,
            span_id = Empty,
        );
        let mut trace_id = None;
        // Whether the span goes to a trace exporter, which wants its status.
        let mut exported = false;
        if !span.is_disabled() {
            if remote.span().span_context().is_valid() {
                let _ = span.set_parent(remote.clone());
            }
            let own = span.context();
            let own = own.span().span_context().clone();
            if own.is_valid() {
                exported = true;
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
        let request_id = match asked_id {
            Some(id) => id,
            None => {
                let id = match trace_id {
                    Some(trace_id) => {
                        HeaderValue::from_str(&trace_id.to_string()).unwrap_or_else(|_| new_request_id())
                    }
                    None => new_request_id(),
                };
                request.headers_mut().insert(REQUEST_ID, id.clone());
                if !span.is_disabled() {
                    span.record("request_id", id.to_str().unwrap_or("?"));
                }
                id
            }
        };
        let unknown_path = (!known).then(|| path.to_owned());
        let sent = match &metrics.messages {
            Some((received, sent)) => {
                let counted = frames::CountedBody::new(std::mem::take(request.body_mut()), received.clone());
                *request.body_mut() = Body::new(counted);
                Some((frames::MessageFrames::default(), sent.clone()))
            }
            None => None,
        };
        let mut finish =
            Finish::start(metrics, self.methods.clone(), unknown_path, request_id.clone(), span.clone());
        finish.sent = sent;
        finish.exported = exported;
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

/// What is recorded when a served call ends.
struct Finish {
    metrics: Arc<MethodMetrics>,
    methods: Arc<ServedMethods>,
    /// The path, when it was not known as the call started.
    unknown_path: Option<String>,
    request_id: HeaderValue,
    span: tracing::Span,
    /// Whether `span` goes to a trace exporter: only then is the status recorded on it (a
    /// failed call's log line names the status itself).
    exported: bool,
    started: Instant,
    done: bool,
    /// Counts the messages sent, for a streaming method.
    sent: Option<(frames::MessageFrames, Counter)>,
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
        Finish {
            metrics,
            methods,
            unknown_path,
            request_id,
            span,
            exported: false,
            started: Instant::now(),
            done: false,
            sent: None,
        }
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
        if self.exported {
            self.span.record("rpc.grpc.status_code", code as i64);
            if is_server_error(code) {
                self.span.record("otel.status_code", "ERROR");
            }
        }
    }
}

impl OnStatus for Finish {
    fn on_data(&mut self, data: &[u8]) {
        if let Some((frames, sent)) = &mut self.sent {
            let complete = frames.feed(data);
            if complete > 0 {
                sent.inc_by(complete);
            }
        }
    }

    fn complete(mut self, headers: &HeaderMap) {
        let code = status_code(headers).unwrap_or(tonic::Code::Ok);
        self.record(code);
        if code == tonic::Code::Ok {
            return;
        }
        // Refusals over a concurrency limit are counted, not logged: under a spike they come
        // by the thousand, when the server can least afford a line each.
        let refused = crate::server::is_refusal(headers);
        if let Some(status) = tonic::Status::from_header_map(headers).filter(|_| !refused) {
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

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::{propagation::HeaderInjector, *};

    /// The log lines a served call to `/x.Y/Z` writes from inside its handler, with the
    /// caller's `x-request-id` when `asked` is given.
    async fn handler_log(asked: Option<&'static str>) -> String {
        let handler = tower::service_fn(|_request: http::Request<Body>| async {
            tracing::info!("inside the handler");
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        });
        let mut service =
            tower::Layer::layer(&ServerTraceLayer::new(ServedMethods::new(["x.Y"], &[])), handler);
        let mut request = http::Request::builder().uri("/x.Y/Z").body(Body::empty()).unwrap();
        if let Some(id) = asked {
            request.headers_mut().insert(REQUEST_ID_HEADER, HeaderValue::from_static(id));
        }
        crate::test_log::logged(async {
            tower::Service::call(&mut service, request).await.unwrap();
        })
        .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_line_inside_a_call_names_the_callers_request_id_or_a_fresh_one() {
        let log = handler_log(Some("r-from-the-caller")).await;
        let line = log.lines().find(|l| l.contains("inside the handler")).unwrap_or_else(|| panic!("{log}"));
        assert!(line.contains("grpc.server{") && line.contains("r-from-the-caller"), "{line}");
        let log = handler_log(None).await;
        let line = log.lines().find(|l| l.contains("inside the handler")).unwrap_or_else(|| panic!("{log}"));
        assert!(line.contains("request_id="), "a fresh request id: {line}");
    }

    #[test]
    fn descriptor_sets_name_their_methods() {
        let methods = described_methods(&[tonic_health::pb::FILE_DESCRIPTOR_SET]);
        let check = |method: &str| {
            methods.iter().find(|d| d.service == "grpc.health.v1.Health" && d.method == method)
        };
        assert!(!check("Check").expect("Check described").streaming, "{methods:?}");
        assert!(check("Watch").expect("Watch described").streaming, "{methods:?}");
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
