//! Spans and trace context in one process, exported over OTLP to a real receiver: each
//! attempt of a call is a span of its own (a retry, a hedge), and a task a handler spawns
//! with `micro_core::middleware::spawn` stays in the handler's trace.
//!
//! The subscriber is global to this test binary (servers run on runtime threads), so every
//! test here finds its own spans by a service name of its own.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use e2e::otlp::{Receiver, Span};
use micro_core::{
    Client, NamedChannel, Server,
    config::{ClientConfig, Hedge, ServerConfig},
    registry::MemoryRegistry,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use test_proto::echo::{
    Message, Reply,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use tonic::{Request, Response, Status};
use tracing_subscriber::layer::SubscriberExt;

const SERVER: i32 = 2;

struct Telemetry {
    receiver: Receiver,
    provider: SdkTracerProvider,
}

/// The receiver (on a runtime of its own, so it outlives each test's) and the exporter.
fn telemetry() -> &'static Telemetry {
    static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let (sender, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                sender.send(Receiver::start().await).unwrap();
                std::future::pending::<()>().await
            });
        });
        let receiver = received.recv().unwrap();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", receiver.http_endpoint()))
            .build()
            .unwrap();
        use opentelemetry_otlp::WithExportConfig;
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).build();
        // The SDK's spans, and nothing below info from elsewhere: h2's per-frame spans
        // would fill the batch exporter's queue, which drops what overflows.
        use tracing_subscriber::Layer as _;
        let sdk_spans = || {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing::Level::INFO)
                .with_target("micro_core", tracing::Level::TRACE)
        };
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer().with_tracer(provider.tracer("test")).with_filter(sdk_spans()),
            )
            .with(tracing_subscriber::fmt::layer().with_test_writer().with_filter(sdk_spans()));
        tracing::subscriber::set_global_default(subscriber).unwrap();
        Telemetry { receiver, provider }
    })
}

/// The spans received once `done` holds.
async fn spans_when(done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let telemetry = telemetry();
    let provider = telemetry.provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush()).await.unwrap().unwrap();
    telemetry.receiver.wait_for(done, Duration::from_secs(10)).await
}

fn by_id<'a>(spans: &'a [Span], id: &str) -> &'a Span {
    spans.iter().find(|s| s.span_id == id).unwrap_or_else(|| panic!("no span {id} in {spans:#?}"))
}

/// An `Echo` instance that answers as told, and keeps the trace headers it was sent.
#[derive(Clone)]
enum Behaviour {
    Answer,
    Unavailable,
    Slow(Duration),
    /// Calls `Say` on the channel from a task spawned in the handler.
    CallOnInSpawnedTask(NamedChannel),
}

/// `traceparent` and `x-request-id` of one request, as the handler saw them.
type SeenHeaders = (Option<String>, Option<String>);

#[derive(Clone)]
struct Scripted {
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<SeenHeaders>>>,
}

impl Scripted {
    fn new(behaviour: Behaviour) -> Self {
        Scripted { behaviour, seen: Arc::default() }
    }
}

#[tonic::async_trait]
impl Echo for Scripted {
    async fn say(&self, request: Request<Message>) -> Result<Response<Reply>, Status> {
        let header =
            |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.seen.lock().unwrap().push((header("traceparent"), header("x-request-id")));
        let reply = Reply { text: request.into_inner().text, instance: String::new() };
        match &self.behaviour {
            Behaviour::Answer => Ok(Response::new(reply)),
            Behaviour::Unavailable => Err(Status::unavailable("going away")),
            Behaviour::Slow(delay) => {
                tokio::time::sleep(*delay).await;
                Ok(Response::new(reply))
            }
            Behaviour::CallOnInSpawnedTask(channel) => {
                let mut next = EchoClient::new(channel.clone());
                // The documented way: the spawned task keeps the call's context.
                let call = micro_core::middleware::spawn(async move { next.say(Message::default()).await });
                call.await.map_err(|_| Status::internal("task"))??;
                Ok(Response::new(reply))
            }
        }
    }

    async fn record(&self, request: Request<Message>) -> Result<Response<Reply>, Status> {
        self.say(request).await
    }
}

async fn serve(registry: &MemoryRegistry, name: &str, echo: Scripted) -> micro_core::RunningServer {
    Server::builder(name)
        .config(ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() })
        .registry(Arc::new(registry.clone()))
        .file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
        .add_service(EchoServer::new(echo))
        .start()
        .await
        .unwrap()
}

/// A `grpc.attempt` span of `kind` for calls to `service`, with its call span and the
/// server span it led to.
fn attempt_of_kind<'a>(
    spans: &'a [Span],
    service: &str,
    kind: &str,
) -> Option<(&'a Span, &'a Span, &'a Span)> {
    let attempt = spans.iter().find(|s| {
        s.attribute("micro.attempt_kind") == Some(kind)
            && spans
                .iter()
                .any(|c| c.span_id == s.parent_span_id && c.attribute("rpc.service") == Some(service))
    })?;
    let call = spans.iter().find(|s| s.span_id == attempt.parent_span_id)?;
    let served = spans.iter().find(|s| s.kind == SERVER && s.parent_span_id == attempt.span_id)?;
    Some((attempt, call, served))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_attempt_is_a_span_of_its_own_in_the_calls_trace() {
    telemetry();
    let registry = MemoryRegistry::new();
    let service = "traced-retry";
    let _down = serve(&registry, service, Scripted::new(Behaviour::Unavailable)).await;
    let _up = serve(&registry, service, Scripted::new(Behaviour::Answer)).await;
    let client = Client::new(Arc::new(registry)).idempotent_methods(test_proto::IDEMPOTENT_METHODS);
    let mut echo = EchoClient::new(client.channel(service));
    // Until a call's first attempt went to the failing instance (and was retried).
    for _ in 0..40 {
        echo.say(Message::default()).await.expect("the retry answers");
    }
    let spans = spans_when(|spans| attempt_of_kind(spans, service, "retry").is_some()).await;
    let (retry, call, served) = attempt_of_kind(&spans, service, "retry").unwrap();
    assert_eq!(retry.attribute("micro.attempt"), Some("2"));
    let first = spans
        .iter()
        .find(|s| s.parent_span_id == call.span_id && s.attribute("micro.attempt_kind") == Some("first"))
        .expect("the first attempt, beside the retry");
    assert_eq!(first.attribute("rpc.grpc.status_code"), Some("14"), "the first attempt got UNAVAILABLE");
    for span in [first, retry, served] {
        assert_eq!(span.trace_id, call.trace_id);
    }
    assert_eq!(call.attribute("rpc.grpc.status_code"), Some("0"), "the call succeeded");
    assert_eq!(served.attribute("rpc.grpc.status_code"), Some("0"), "the server span has its status");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hedged_attempt_is_a_span_of_its_own_in_the_calls_trace() {
    telemetry();
    let registry = MemoryRegistry::new();
    let service = "traced-hedge";
    let _slow = serve(&registry, service, Scripted::new(Behaviour::Slow(Duration::from_millis(400)))).await;
    let _fast = serve(&registry, service, Scripted::new(Behaviour::Answer)).await;
    let config = ClientConfig { hedge: Hedge::After(Duration::from_millis(30)), ..ClientConfig::default() };
    let client =
        Client::new(Arc::new(registry)).config(config).idempotent_methods(test_proto::IDEMPOTENT_METHODS);
    let mut echo = EchoClient::new(client.channel(service));
    for _ in 0..10 {
        echo.say(Message::default()).await.expect("answered");
    }
    let spans = spans_when(|spans| attempt_of_kind(spans, service, "hedge").is_some()).await;
    let (hedge, call, served) = attempt_of_kind(&spans, service, "hedge").unwrap();
    assert_eq!(hedge.trace_id, call.trace_id);
    assert_eq!(served.trace_id, call.trace_id);
    assert!(
        spans
            .iter()
            .any(|s| s.parent_span_id == call.span_id && s.attribute("micro.attempt_kind") == Some("first")),
        "the outrun first attempt is there too"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_spawned_by_a_handler_stays_in_the_handlers_trace() {
    telemetry();
    let registry = MemoryRegistry::new();
    let (front_name, back_name) = ("traced-front", "traced-back");
    let back = Scripted::new(Behaviour::Answer);
    let _back = serve(&registry, back_name, back.clone()).await;
    let client = Client::new(Arc::new(registry.clone()));
    let front = Scripted::new(Behaviour::CallOnInSpawnedTask(client.channel(back_name)));
    let front_server = serve(&registry, front_name, front.clone()).await;

    // The caller is outside the SDK: a plain tonic client naming its own trace.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", front_server.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let mut request = Request::new(Message::default());
    request.metadata_mut().insert("traceparent", format!("00-{trace}-{parent}-01").parse().unwrap());
    EchoClient::new(channel).say(request).await.unwrap();

    let spans = spans_when(|spans| {
        spans.iter().any(|s| s.kind == SERVER && s.trace_id == trace && s.parent_span_id != parent)
    })
    .await;
    let front_span = spans
        .iter()
        .find(|s| s.kind == SERVER && s.parent_span_id == parent)
        .expect("the front's server span continues the caller's trace");
    assert_eq!(front_span.trace_id, trace);
    let back_span =
        spans.iter().find(|s| s.kind == SERVER && s.trace_id == trace && s.parent_span_id != parent).unwrap();
    let attempt = by_id(&spans, &back_span.parent_span_id);
    let call = by_id(&spans, &attempt.parent_span_id);
    assert_eq!(call.attribute("rpc.service"), Some(back_name));
    assert_eq!(call.parent_span_id, front_span.span_id, "the spawned task's call is the handler's child");

    // The back end was sent the attempt's span as parent, and the front's request id.
    let (traceparent, request_id) = back.seen.lock().unwrap()[0].clone();
    assert_eq!(traceparent.unwrap(), format!("00-{trace}-{}-01", attempt.span_id));
    let (_, front_request_id) = front.seen.lock().unwrap()[0].clone();
    assert_eq!(request_id, front_request_id, "the request id travels on");
    assert_eq!(front_request_id.as_deref(), Some(trace), "the request id is the trace id");
}
