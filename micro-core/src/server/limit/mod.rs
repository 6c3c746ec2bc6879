//! Concurrency limits: a server serves so many calls at once and refuses the others at
//! once with `RESOURCE_EXHAUSTED`, instead of queueing them until every caller waits out
//! its deadline.
//!
//! By default the limit of the whole server is adaptive ([`ConcurrencyLimit::Adaptive`],
//! learned from latency by a gradient on the sampled minimum latency, see `gradient.rs`),
//! never below `MICRO_SERVER_LIMIT_MIN` nor above `MICRO_SERVER_LIMIT_MAX`. It may be fixed
//! or off instead, and single methods may have fixed limits of their own
//! (`MICRO_SERVER_METHOD_LIMITS`). Health checks and reflection are never refused.
//!
//! A refusal carries the response metadata [`REFUSED_HEADER`]: the call was refused before
//! its handler ran, so the SDK's client sends it to another instance even when the method
//! is not idempotent. No other response carries it: the layer removes it from what handlers
//! answer, and the client from the statuses it hands on. A call holds its place from its arrival until its handler returns
//! (for a streaming call: until the handler returns its stream).
//!
//! Each limit is in the metrics: `micro_server_concurrency_limit`,
//! `micro_server_concurrency_in_flight` and `micro_server_refused_total`, labelled by
//! `service` and `scope` (`server`, or the path of a method with a limit of its own).
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{Server, config::{ConcurrencyLimit, ServerConfig}};
//! let config = ServerConfig {
//!     limit: ConcurrencyLimit::Adaptive { min: 20, max: 500 },
//!     method_limits: vec![("/vessel.VesselService/Create".into(), 4)],
//!     ..ServerConfig::default()
//! };
//! Server::builder("vessel-service").config(config).run().await
//! # }
//! ```

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Ready,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::Either;
use http::HeaderValue;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::time::Instant;
use tonic::body::Body;

use crate::{
    Error,
    config::ConcurrencyLimit,
    metrics::{LimitLabels, metrics},
};

mod gradient;

pub(crate) use gradient::Gradient;

/// The response metadata that marks a call refused by a server's concurrency limit before
/// its handler ran; its value is [`REFUSED_OVERLOADED`]. The SDK's client sends such a call
/// to another instance, idempotent or not.
pub const REFUSED_HEADER: &str = "micro-refused";
/// The value of [`REFUSED_HEADER`].
pub const REFUSED_OVERLOADED: &str = "overloaded";
/// The `scope` label of the limit of a whole server.
pub const SERVER_SCOPE: &str = "server";

/// Path prefixes of the services no limit ever refuses: health and reflection.
const EXEMPT: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Whether a call to `path` is served whatever the load.
pub fn is_exempt(path: &str) -> bool {
    EXEMPT.iter().any(|prefix| path.starts_with(prefix))
}

/// Whether `headers` (a response's, or a status's metadata as headers) mark a refusal by a
/// concurrency limit.
pub fn is_refusal(headers: &http::HeaderMap) -> bool {
    headers.get(REFUSED_HEADER).is_some_and(|value| value == REFUSED_OVERLOADED)
}

/// How one limit decides.
enum Kind {
    Adaptive(Gradient),
    Fixed(usize),
}

/// One limit: its rule, the calls it holds, its metric handles.
struct Limit {
    scope: String,
    kind: Kind,
    in_flight: AtomicUsize,
    limit_gauge: Gauge,
    in_flight_gauge: Gauge,
    refused: Counter,
}

impl Limit {
    fn new(service: &str, scope: &str, kind: Kind) -> Arc<Self> {
        let labels = LimitLabels { service: service.to_owned(), scope: scope.to_owned() };
        let m = metrics();
        let limit = Limit {
            scope: scope.to_owned(),
            kind,
            in_flight: AtomicUsize::new(0),
            limit_gauge: m.limit.get_or_create(&labels).clone(),
            in_flight_gauge: m.limit_in_flight.get_or_create(&labels).clone(),
            refused: m.limit_refused.get_or_create(&labels).clone(),
        };
        limit.limit_gauge.set(limit.current() as i64);
        limit.in_flight_gauge.set(0);
        Arc::new(limit)
    }

    fn current(&self) -> usize {
        match &self.kind {
            Kind::Adaptive(gradient) => gradient.limit(),
            Kind::Fixed(limit) => *limit,
        }
    }

    /// A place for one call, or the limit and the calls in flight when there is none.
    fn try_acquire(self: &Arc<Self>) -> Result<Permit, (usize, usize)> {
        let limit = self.current();
        let mut in_flight = self.in_flight.load(Ordering::Relaxed);
        loop {
            if in_flight >= limit {
                self.refused.inc();
                return Err((limit, in_flight));
            }
            match self.in_flight.compare_exchange_weak(
                in_flight,
                in_flight + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => in_flight = now,
            }
        }
        self.in_flight_gauge.inc();
        if let Kind::Adaptive(gradient) = &self.kind {
            gradient.admitted(in_flight + 1);
        }
        Ok(Permit { limit: self.clone(), started: Instant::now() })
    }
}

/// A call's place within a limit; dropping it frees the place and samples the latency.
struct Permit {
    limit: Arc<Limit>,
    started: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.limit.in_flight_gauge.dec();
        if let Kind::Adaptive(gradient) = &self.limit.kind {
            let now = Instant::now();
            if let Some(limit) = gradient.sample(now.saturating_duration_since(self.started), now) {
                self.limit.limit_gauge.set(limit as i64);
            }
        }
    }
}

/// Every limit of one server.
struct Limits {
    service: String,
    address: SocketAddr,
    server: Option<Arc<Limit>>,
    methods: HashMap<String, Arc<Limit>>,
}

impl Limits {
    /// The limit a call to `path` is held to, if any.
    fn for_path(&self, path: &str) -> Option<&Arc<Limit>> {
        if is_exempt(path) {
            return None;
        }
        self.methods.get(path).or(self.server.as_ref())
    }

    fn refusal(&self, scope: &Limit, path: &str, (limit, in_flight): (usize, usize)) -> http::Response<Body> {
        let what = match scope.scope.as_str() {
            SERVER_SCOPE => "the server's concurrency limit".to_owned(),
            method => format!("the concurrency limit of {method}"),
        };
        tracing::debug!(service = %self.service, method = %path, limit, in_flight, "refused: over the concurrency limit");
        let status: tonic::Status = Error::Overloaded {
            service: self.service.clone(),
            reason: format!(
                "instance at {} refused {path}: {in_flight} calls in flight reached {what} ({limit}); \
                 the call was not started, so it is safe to send elsewhere. Add instances, or raise \
                 MICRO_SERVER_LIMIT_MIN / MICRO_SERVER_METHOD_LIMITS if the service has room",
                self.address
            ),
        }
        .into();
        let mut response = status.into_http::<Body>();
        response.headers_mut().insert(REFUSED_HEADER, HeaderValue::from_static(REFUSED_OVERLOADED));
        response
    }
}

/// The tower layer that holds a server's calls to its limits; [`crate::Server`] installs it
/// inside its trace layer, so refusals are counted and logged like any failed call.
#[derive(Clone)]
pub struct LimitLayer {
    limits: Arc<Limits>,
}

impl LimitLayer {
    /// The limits of the server `service` at `address` (named in refusals): `limit` for the
    /// whole server, `method_limits` for single methods.
    pub fn new(
        service: &str,
        address: SocketAddr,
        limit: ConcurrencyLimit,
        method_limits: &[(String, usize)],
    ) -> Self {
        let server = match limit {
            ConcurrencyLimit::Off => None,
            ConcurrencyLimit::Adaptive { min, max } => {
                Some(Limit::new(service, SERVER_SCOPE, Kind::Adaptive(Gradient::new(min, max))))
            }
            ConcurrencyLimit::Fixed(limit) => Some(Limit::new(service, SERVER_SCOPE, Kind::Fixed(limit))),
        };
        let methods = method_limits
            .iter()
            .map(|(path, limit)| (path.clone(), Limit::new(service, path, Kind::Fixed(*limit))))
            .collect();
        LimitLayer { limits: Arc::new(Limits { service: service.to_owned(), address, server, methods }) }
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = LimitService<S>;

    fn layer(&self, inner: S) -> LimitService<S> {
        LimitService { inner, limits: self.limits.clone() }
    }
}

/// The service [`LimitLayer`] makes.
#[derive(Clone)]
pub struct LimitService<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S> tower::Service<http::Request<Body>> for LimitService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let permit = match self.limits.for_path(request.uri().path()) {
            None => None,
            Some(limit) => match limit.try_acquire() {
                Ok(permit) => Some(permit),
                Err(full) => {
                    let refusal = self.limits.refusal(limit, request.uri().path(), full);
                    return LimitFuture::refused(refusal);
                }
            },
        };
        LimitFuture { answer: Either::Right(self.inner.call(request)), permit }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a [`LimitService`]: a refusal, or the call's answer once it holds a
    /// place within its limit.
    pub struct LimitFuture<F> {
        #[pin]
        answer: Either<Ready<Result<http::Response<Body>, Infallible>>, F>,
        permit: Option<Permit>,
    }
}

impl<F> LimitFuture<F> {
    fn refused(refusal: http::Response<Body>) -> Self {
        LimitFuture { answer: Either::Left(std::future::ready(Ok(refusal))), permit: None }
    }
}

impl<F> Future for LimitFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>>,
{
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let started = matches!(this.answer.as_ref().get_ref(), Either::Right(_));
        let mut response = std::task::ready!(this.answer.poll(cx))?;
        this.permit.take();
        if started {
            // Only this layer may say a call never started: a handler that passes on a
            // status it got from a refused call of its own did run.
            response.headers_mut().remove(REFUSED_HEADER);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(limit: ConcurrencyLimit, methods: &[(String, usize)]) -> LimitLayer {
        LimitLayer::new("limit-test", "127.0.0.1:1".parse().unwrap(), limit, methods)
    }

    #[test]
    fn health_and_reflection_are_never_held_and_methods_with_limits_use_their_own() {
        let layer = limits(ConcurrencyLimit::Fixed(1), &[("/a.B/C".into(), 2)]);
        let limits = &layer.limits;
        assert!(limits.for_path("/grpc.health.v1.Health/Check").is_none());
        assert!(limits.for_path("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").is_none());
        assert_eq!(limits.for_path("/a.B/C").unwrap().scope, "/a.B/C");
        assert_eq!(limits.for_path("/a.B/D").unwrap().scope, SERVER_SCOPE);
        assert!(self::limits(ConcurrencyLimit::Off, &[]).limits.for_path("/a.B/D").is_none());
    }

    #[tokio::test]
    async fn a_handler_cannot_pass_on_the_marker_of_a_refusal_it_got() {
        use tower::{Layer, ServiceExt};
        let handler = tower::service_fn(|_: http::Request<Body>| async {
            let mut passed_on = tonic::Status::resource_exhausted("downstream refused").into_http::<Body>();
            passed_on.headers_mut().insert(REFUSED_HEADER, HeaderValue::from_static(REFUSED_OVERLOADED));
            Ok::<_, Infallible>(passed_on)
        });
        let service = limits(ConcurrencyLimit::default(), &[]).layer(handler);
        let request = http::Request::builder().uri("/a.B/C").body(Body::empty()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert!(!is_refusal(response.headers()), "{:?}", response.headers());
    }

    #[test]
    fn a_fixed_limit_refuses_beyond_it_with_the_marker_and_frees_places() {
        let layer = limits(ConcurrencyLimit::Fixed(2), &[]);
        let limit = layer.limits.server.as_ref().unwrap();
        let first = limit.try_acquire().unwrap();
        let _second = limit.try_acquire().unwrap();
        let full = limit.try_acquire().err().unwrap();
        assert_eq!(full, (2, 2));
        let response = layer.limits.refusal(limit, "/a.B/C", full);
        assert!(is_refusal(response.headers()));
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("limit-test") && status.message().contains("127.0.0.1:1"));
        drop(first);
        assert!(limit.try_acquire().is_ok());
    }
}
