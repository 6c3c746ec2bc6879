//! Ending open streams when a server stops. A stopping server finishes the calls in flight
//! for up to the shutdown grace; a stream still open then (a watch never ends by itself)
//! is ended with `UNAVAILABLE` and a message saying to open it again, which sends the
//! client to another instance, rather than being cut off with a reset.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use tokio::sync::watch;
use tonic::{Status, body::Body};

use crate::middleware::ServedMethods;

/// Tells the responses of one server to end: `true` once the shutdown grace is over.
#[derive(Clone)]
pub(crate) struct StreamDrainLayer {
    closing: watch::Receiver<bool>,
    service: Arc<str>,
    /// The answers of methods described as unary are left alone: they end with their
    /// handler, which the grace waits for.
    methods: Arc<ServedMethods>,
}

impl StreamDrainLayer {
    /// A layer for `service`'s responses, and the switch that ends them.
    pub(crate) fn new(service: &str, methods: Arc<ServedMethods>) -> (Self, watch::Sender<bool>) {
        let (sender, closing) = watch::channel(false);
        (StreamDrainLayer { closing, service: service.into(), methods }, sender)
    }
}

impl<S> tower::Layer<S> for StreamDrainLayer {
    type Service = StreamDrain<S>;

    fn layer(&self, inner: S) -> StreamDrain<S> {
        StreamDrain { inner, layer: self.clone() }
    }
}

/// The service [`StreamDrainLayer`] makes.
#[derive(Clone)]
pub(crate) struct StreamDrain<S> {
    inner: S,
    layer: StreamDrainLayer,
}

impl<S> tower::Service<http::Request<Body>> for StreamDrain<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = DrainFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let unary = self.layer.methods.is_unary(request.uri().path());
        DrainFuture { inner: self.inner.call(request), layer: (!unary).then(|| self.layer.clone()) }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a [`StreamDrain`]: the inner service's, its body made to end on time
    /// unless the method is unary.
    pub(crate) struct DrainFuture<F> {
        #[pin]
        inner: F,
        layer: Option<StreamDrainLayer>,
    }
}

impl<F, E> Future for DrainFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(match this.layer.take() {
            // A trailers-only answer: nothing left to end.
            Some(layer) if !response.headers().contains_key("grpc-status") => {
                response.map(|body| Body::new(DrainBody { inner: body, layer, waiting: None, ended: false }))
            }
            _ => response,
        }))
    }
}

/// A response body that ends with `UNAVAILABLE` trailers once its server's grace is over.
struct DrainBody {
    inner: Body,
    layer: StreamDrainLayer,
    /// Made the first time the body has nothing ready: most unary answers never need it.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    ended: bool,
}

impl http_body::Body for DrainBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            return polled;
        }
        let closing = self.layer.closing.clone();
        let waiting = self.waiting.get_or_insert_with(|| {
            let mut closing = closing;
            Box::pin(async move {
                let _ = closing.wait_for(|closing| *closing).await;
            })
        });
        if waiting.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.ended = true;
        let status = Status::unavailable(format!(
            "{} is shutting down and ended this stream after its shutdown grace; open it again (another \
             instance will serve it)",
            self.layer.service
        ));
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            tracing::error!("could not write the trailers of a drained stream");
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
