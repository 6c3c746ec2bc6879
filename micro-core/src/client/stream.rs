//! Streams after their response headers. A call's deadline covers it until its response
//! headers arrive: for a unary call or a client stream that is the whole call; a server or
//! bidirectional stream has its headers once the server takes it, and then runs until it
//! ends, unless [`ClientConfig::stream_timeout`] (the whole stream) or
//! [`ClientConfig::stream_idle_timeout`] (the longest wait for a message) ends it first with
//! `DEADLINE_EXCEEDED`.
//!
//! [`ClientConfig::stream_timeout`]: crate::config::ClientConfig::stream_timeout
//! [`ClientConfig::stream_idle_timeout`]: crate::config::ClientConfig::stream_idle_timeout

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::{Status, body::Body};

/// A response body ended with `DEADLINE_EXCEEDED` once the stream has run for `whole`, or
/// no message came for `idle`.
pub(crate) struct StreamDeadlineBody {
    inner: Body,
    service: String,
    whole: Option<(Duration, Pin<Box<Sleep>>)>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    ended: bool,
}

impl StreamDeadlineBody {
    /// `inner` with the limits that are not zero; `inner` itself when both are.
    pub(crate) fn wrap(inner: Body, service: &str, whole: Duration, idle: Duration) -> Body {
        let timer =
            |limit: Duration| (!limit.is_zero()).then(|| (limit, Box::pin(tokio::time::sleep(limit))));
        let (whole, idle) = (timer(whole), timer(idle));
        if whole.is_none() && idle.is_none() {
            return inner;
        }
        Body::new(StreamDeadlineBody { inner, service: service.to_owned(), whole, idle, ended: false })
    }
}

impl http_body::Body for StreamDeadlineBody {
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
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.is_data()
                && let Some((limit, timer)) = &mut self.idle
            {
                let next = Instant::now() + *limit;
                timer.as_mut().reset(next);
            }
            return polled;
        }
        if polled.is_ready() {
            return polled;
        }
        let expired = |timer: &mut Option<(Duration, Pin<Box<Sleep>>)>, cx: &mut Context<'_>| {
            timer.as_mut().is_some_and(|(_, sleep)| sleep.as_mut().poll(cx).is_ready())
        };
        let why = if expired(&mut self.whole, cx) {
            let limit = self.whole.as_ref().map(|(limit, _)| *limit).unwrap_or_default();
            format!("the stream from {} ran for {limit:?} (MICRO_CLIENT_STREAM_TIMEOUT)", self.service)
        } else if expired(&mut self.idle, cx) {
            let limit = self.idle.as_ref().map(|(limit, _)| *limit).unwrap_or_default();
            format!("no message came from {} for {limit:?} (MICRO_CLIENT_STREAM_IDLE_TIMEOUT)", self.service)
        } else {
            return Poll::Pending;
        };
        self.ended = true;
        Poll::Ready(Some(Err(Status::deadline_exceeded(why))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
