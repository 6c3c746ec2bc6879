//! The HTTP routes: `GET /` (services), `GET /healthz`, `GET /metrics`, `GET /{service}`
//! (methods and schemas), `POST /{service}/{package.Service}/{Method}` (a call; a
//! server-streaming method's replies stream, see `stream.rs`, and may also be asked with
//! `GET`, as `EventSource` does), and the optional CORS layer. Every route but `/healthz`
//! and `/metrics` goes through authentication (see `auth`).

use std::{sync::Arc, time::Instant};

use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::json;
use tonic::Code;

use super::{
    Gateway,
    auth::Subject,
    metrics,
    reflection::unknown_method,
    status::GatewayError,
    stream,
    transcode::{self, FORWARDED_HEADERS, TIMEOUT_HEADER},
};
use crate::dynamic;

/// The routes of `gateway`.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let authenticate = middleware::from_fn_with_state(gateway.auth.clone(), super::auth::authenticate);
    let browse = Router::new()
        .route("/", get(list))
        .route("/{service}", get(describe))
        .merge(super::dashboard::routes())
        .route_layer(authenticate.clone());
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_page))
        .merge(browse)
        .route(
            "/{service}/{grpc_service}/{method}",
            // The rate limit first, so refused credentials count against a client's rate too.
            post(call)
                .get(call)
                .fallback(use_post)
                .layer(authenticate)
                .layer(middleware::from_fn_with_state(gateway.limits.clone(), super::ratelimit::limit)),
        )
        .fallback(not_found)
        .with_state(gateway.clone());
    match gateway.cors_origin.clone() {
        Some(origin) => router.layer(middleware::from_fn_with_state(origin, cors)),
        None => router,
    }
}

fn json_response(status: StatusCode, headers: HeaderMap, body: String) -> Response {
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    response.headers_mut().extend(headers);
    response
}

async fn list(State(gateway): State<Arc<Gateway>>) -> Result<Response, GatewayError> {
    let names = gateway.cache.list().await?;
    Ok(json_response(StatusCode::OK, HeaderMap::new(), json!({ "services": &*names }).to_string()))
}

async fn healthz(State(gateway): State<Arc<Gateway>>) -> Response {
    let registry = gateway.cache.registry();
    let body = json!({ "status": "SERVING", "registry": registry.kind().as_str(), "registry_address": registry.address(),
        "cached_services": gateway.cache.held() });
    json_response(StatusCode::OK, HeaderMap::new(), body.to_string())
}

async fn metrics_page() -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], metrics::render()).into_response()
}

async fn describe(
    State(gateway): State<Arc<Gateway>>,
    Path(service): Path<String>,
) -> Result<Response, GatewayError> {
    let entry = gateway.cache.entry(&service).await?;
    let api = entry.api().await?;
    let methods: Vec<_> =
        api.services.iter().flat_map(|s| s.methods()).map(|m| transcode::describe_method(&m)).collect();
    let body = json!({ "service": service, "methods": methods });
    Ok(json_response(StatusCode::OK, HeaderMap::new(), serde_json::to_string_pretty(&body).expect("json")))
}

/// 405 for a method path asked with anything but POST: says how to call it and where its
/// request schema is, with `Allow: POST`.
async fn use_post(
    method: Method,
    Path((service, grpc_service, name)): Path<(String, String, String)>,
) -> Response {
    use_post_response(&method, &service, &grpc_service, &name)
}

fn use_post_response(method: &Method, service: &str, grpc_service: &str, name: &str) -> Response {
    let message = format!(
        "{method} /{service}/{grpc_service}/{name}: a method is called with POST and its request as a JSON \
         body (curl -d '{{...}}'); GET /{service} lists its methods with their request schemas"
    );
    let mut err = GatewayError::new(Code::Unimplemented, message);
    err.status = Some(StatusCode::METHOD_NOT_ALLOWED);
    let mut response = err.into_response();
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

async fn call(
    State(gateway): State<Arc<Gateway>>,
    Path((service, grpc_service, method)): Path<(String, String, String)>,
    subject: Option<Extension<Subject>>,
    (http_method, uri): (Method, http::Uri),
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut labels = (metrics::OTHER.to_owned(), metrics::OTHER.to_owned());
    let subject = subject.map(|Extension(subject)| subject);
    let call = (service.as_str(), grpc_service.as_str(), method.as_str());
    let request = Asked { method: http_method, query: uri.query(), headers: &headers, started };
    let result = forward(&gateway, call, subject.as_ref(), request, body, &mut labels).await;
    let mut response = match result {
        Ok(response) => response,
        Err(err) => {
            tracing::debug!(%service, %grpc_service, %method, code = ?err.code, message = %err.message, "call failed");
            err.into_response()
        }
    };
    if let Some((name, value)) = transcode::request_id(&headers) {
        response.headers_mut().insert(name, value);
    }
    // A stream records itself when it ends.
    if response.extensions().get::<stream::Recorded>().is_none() {
        metrics::record(&labels.0, &labels.1, response.status().as_u16(), started.elapsed().as_secs_f64());
    }
    response
}

/// What the HTTP request asked, besides its path and body.
struct Asked<'a> {
    method: Method,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    started: Instant,
}

async fn forward(
    gateway: &Gateway,
    (service, grpc_service, method): (&str, &str, &str),
    subject: Option<&Subject>,
    asked: Asked<'_>,
    body: Body,
    labels: &mut (String, String),
) -> Result<Response, GatewayError> {
    let headers = asked.headers;
    let path = format!("{grpc_service}/{method}");
    // Before anything is looked up, so a denied subject learns nothing of what exists.
    gateway.auth.authorize(subject, &path)?;
    let body = match asked.method {
        Method::GET => stream::query_body(asked.query, gateway.max_body)?.into(),
        _ => transcode::read_body(headers, body, gateway.max_body).await?,
    };
    let entry = gateway.cache.entry(service).await?;
    let api = entry.api().await?;
    let descriptor = api.method(grpc_service, method).ok_or_else(|| unknown_method(service, &path, &api))?;
    *labels = (service.to_owned(), path.clone());
    if descriptor.is_client_streaming() {
        return Err(GatewayError::new(
            Code::Unimplemented,
            format!(
                "{path} is a client-streaming method: the gateway sends one request message per HTTP \
                 request; call it with `micro call {service} {path}` (requests as JSON lines on stdin) \
                 or a gRPC client"
            ),
        ));
    }
    if descriptor.is_server_streaming() {
        let call = (entry.channel.clone(), &descriptor);
        return forward_stream(gateway, (service, &path), subject, &asked, &body, labels, call).await;
    }
    if asked.method == Method::GET {
        return Ok(use_post_response(&asked.method, service, grpc_service, method));
    }
    let message = transcode::request(&descriptor, &body)?;
    let request = transcode::call_request(headers, subject.map(|s| s.0.as_str()), message)?;
    let deadline = transcode::timeout(headers)?;
    let call = dynamic::unary(entry.channel.clone(), &descriptor, request);
    let outcome = match deadline {
        // The client ends the call at its deadline; this is the backstop.
        Some(limit) => tokio::time::timeout(limit + limit / 10, call).await.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!("no reply within X-Timeout {limit:?}")))
        }),
        None => call.await,
    };
    match outcome {
        Ok(reply) => Ok(json_response(
            StatusCode::OK,
            transcode::headers_of(reply.metadata()),
            dynamic::to_json(reply.get_ref()),
        )),
        Err(status) => Err(GatewayError {
            headers: Box::new(transcode::headers_of(status.metadata())),
            ..GatewayError::new(status.code(), format!("{service} {path}: {}", status.message()))
        }),
    }
}

/// A server-streaming call: the reply stream as SSE or NDJSON, after the call's headers came.
async fn forward_stream(
    gateway: &Gateway,
    (service, path): (&str, &str),
    subject: Option<&Subject>,
    asked: &Asked<'_>,
    body: &[u8],
    labels: &(String, String),
    (channel, descriptor): (micro_core::NamedChannel, &prost_reflect::MethodDescriptor),
) -> Result<Response, GatewayError> {
    let headers = asked.headers;
    let format = stream::negotiate(headers, path)?;
    let message = transcode::request(descriptor, body)?;
    let request = transcode::call_request(headers, subject.map(|s| s.0.as_str()), message)?
        .map(|message| futures::stream::once(std::future::ready(message)));
    // X-Timeout, when given, bounds the whole stream; the SDK's request timeout bounds the
    // call only until its response headers.
    let limit = transcode::timeout(headers)?;
    let call = dynamic::streaming(channel, descriptor, request);
    let outcome = match limit {
        Some(limit) => tokio::time::timeout(limit + limit / 10, call).await.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!("no reply within X-Timeout {limit:?}")))
        }),
        None => call.await,
    };
    let response = outcome.map_err(|status| GatewayError {
        headers: Box::new(transcode::headers_of(status.metadata())),
        ..GatewayError::new(status.code(), format!("{service} {path}: {}", status.message()))
    })?;
    let metadata = transcode::headers_of(response.metadata());
    let remaining = limit.map(|limit| limit.saturating_sub(asked.started.elapsed()));
    tracing::debug!(%service, %path, ?format, "stream opened");
    Ok(stream::response(
        response.into_inner(),
        format,
        (metadata, remaining),
        gateway.stopping.clone(),
        format!("{service} {path}"),
        stream::Recording { labels: labels.clone(), started: asked.started },
    ))
}

async fn not_found(method: Method, uri: http::Uri) -> GatewayError {
    GatewayError::new(
        Code::NotFound,
        format!(
            "no route for {method} {}: use GET / (services), GET /{{service}} (methods), \
             POST /{{service}}/{{package.Service}}/{{Method}} (a call), GET /ui, /healthz, /metrics",
            uri.path()
        ),
    )
}

/// Answers preflight requests and lets `origin` read every response.
async fn cors(State(origin): State<HeaderValue>, request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS && request.headers().contains_key(header::ORIGIN);
    let mut response =
        if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(request).await };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("*"));
    if preflight {
        let allowed = ["content-type", TIMEOUT_HEADER]
            .into_iter()
            .chain(FORWARDED_HEADERS)
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_str(&allowed).expect("ASCII names"),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    response
}
