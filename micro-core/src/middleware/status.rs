//! Seeing a call's gRPC status as its response ends, for metrics and spans.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use tonic::body::Body;

/// The gRPC status code in `headers` (response headers or trailers), if there is one; read
/// without building a [`tonic::Status`], which copies the message and the metadata.
pub(crate) fn status_code(headers: &HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

/// What happens when a call's status is known: from the response headers of a
/// trailers-only answer, or from the trailers; empty headers when the body ended without
/// any. Dropping it unfinished means the call was cut off.
pub(crate) trait OnStatus: Send + 'static {
    /// Sees each chunk of the body's data as it passes.
    fn on_data(&mut self, _data: &[u8]) {}

    /// What the body's error says to the caller: `status` unless this side knows better.
    fn on_error(&self, status: tonic::Status) -> tonic::Status {
        status
    }

    /// Records the call with the status in `headers`.
    fn complete(self, headers: &HeaderMap);
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
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(on_status) = self.on_status.as_mut()
                {
                    on_status.on_data(data);
                }
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
            Poll::Ready(Some(Err(status))) => {
                // The body failed (a broken connection, a stream deadline): the call ends so.
                if let Some(on_status) = self.on_status.take() {
                    *status = on_status.on_error(std::mem::replace(status, tonic::Status::ok("")));
                    let mut headers = HeaderMap::new();
                    let _ = status.add_header(&mut headers);
                    on_status.complete(&headers);
                }
            }
            Poll::Pending => {}
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
