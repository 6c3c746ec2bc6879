//! A real OTLP trace receiver for tests: the collector's gRPC `TraceService` (tonic) and its
//! HTTP `/v1/traces` endpoint (protobuf, axum), both on loopback, keeping every span they
//! are sent. It stops when dropped.
//!
//! # Examples
//! ```no_run
//! # async fn demo() {
//! let receiver = e2e::otlp::Receiver::start().await;
//! // Give a process OTEL_EXPORTER_OTLP_ENDPOINT=receiver.http_endpoint() …
//! let spans = receiver.wait_for(|spans| spans.len() >= 3, std::time::Duration::from_secs(10)).await;
//! # }
//! ```

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value},
};
use prost::Message;
use tokio::{net::TcpListener, task::JoinHandle};

/// One span as received.
#[derive(Debug, Clone)]
pub struct Span {
    /// The `service.name` of the process that sent it.
    pub service: String,
    /// The span name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// OpenTelemetry's span kind: 2 server, 3 client.
    pub kind: i32,
    /// The attributes, values as text.
    pub attributes: Vec<(String, String)>,
    /// How it was sent: `grpc` or `http`.
    pub via: &'static str,
}

impl Span {
    /// The attribute `key`, as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

type Store = Arc<Mutex<Vec<Span>>>;

/// The running receiver.
pub struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    spans: Store,
    tasks: Vec<JoinHandle<()>>,
}

impl Receiver {
    /// Binds both endpoints on `127.0.0.1` with free ports and serves them.
    pub async fn start() -> Receiver {
        let spans = Store::default();
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP gRPC port");
        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP HTTP port");
        let (grpc, http) = (grpc_listener.local_addr().unwrap(), http_listener.local_addr().unwrap());
        let service = TraceServiceServer::new(Collector { spans: spans.clone() });
        let grpc_task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            let _ =
                tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        let store = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let store = store.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            keep(&store, request, "http");
                            let reply = ExportTraceServiceResponse::default().encode_to_vec();
                            (
                                http::StatusCode::OK,
                                [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                                reply,
                            )
                        }
                        Err(_) => (
                            http::StatusCode::BAD_REQUEST,
                            [(http::header::CONTENT_TYPE, "text/plain")],
                            b"not an ExportTraceServiceRequest".to_vec(),
                        ),
                    }
                }
            }),
        );
        let http_task = tokio::spawn(async move {
            let _ = axum::serve(http_listener, app).await;
        });
        Receiver { grpc, http, spans, tasks: vec![grpc_task, http_task] }
    }

    /// The gRPC endpoint, for `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The HTTP base endpoint (`/v1/traces` is appended by exporters), for `http/protobuf`.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The spans received once `done` holds for them, polling every 50 ms; fails the test
    /// with what arrived when `timeout` passes first.
    pub async fn wait_for(&self, done: impl Fn(&[Span]) -> bool, timeout: Duration) -> Vec<Span> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::Instant::now() >= until {
                panic!("the OTLP receiver did not get the spans expected within {timeout:?}; got {spans:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Collector {
    spans: Store,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.spans, request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn keep(store: &Store, request: ExportTraceServiceRequest, via: &'static str) {
    let mut kept = store.lock().unwrap_or_else(|e| e.into_inner());
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                kept.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect(),
                    via,
                });
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
