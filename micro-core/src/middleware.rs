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
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use http::HeaderValue;
use tonic::body::Body;

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

/// Gives every incoming call a request id and logs it: method, gRPC status, duration.
#[derive(Debug, Clone, Default)]
pub struct ServerTraceLayer;

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner }
    }
}

/// The service [`ServerTraceLayer`] makes.
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
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
        let method = request.uri().path().to_owned();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(with_request_id(request_id.clone(), async move {
            let response = call.await?;
            let elapsed = started.elapsed();
            let request_id = request_id.to_str().unwrap_or("?");
            match response.headers().get("grpc-status").map(HeaderValue::as_bytes) {
                Some(b"0") | None => {
                    tracing::debug!(%method, request_id, ?elapsed, "served");
                }
                Some(code) => {
                    let code = String::from_utf8_lossy(code);
                    let message =
                        response.headers().get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
                    tracing::info!(%method, request_id, grpc_status = %code, grpc_message = message, ?elapsed, "call failed");
                }
            }
            Ok(response)
        }))
    }
}
