//! What a call records once its status is known: its count and duration by service,
//! method and status, and its span's status; a connection that broke under the response
//! is reported as `UNAVAILABLE`.

use std::sync::Arc;

use http::HeaderMap;
use tonic::{Code, Status};

use super::{channel::ChannelCore, failure::chain_has};
use crate::{
    metrics::{ClientMethod, metrics},
    middleware::{OnStatus, status_code},
};

/// What is recorded when a call's status is known.
pub(super) struct CallFinish {
    pub(super) core: Arc<ChannelCore>,
    path: http::Uri,
    span: tracing::Span,
    started: std::time::Instant,
    /// Whether a server answered (the call did not fail in the client).
    answered: bool,
    done: bool,
}

impl CallFinish {
    /// A call to `path` that started at `started`, in `span`; `answered` when a server
    /// answered it (it did not fail in the client).
    pub(super) fn new(
        core: Arc<ChannelCore>,
        path: http::Uri,
        span: tracing::Span,
        started: std::time::Instant,
        answered: bool,
    ) -> Self {
        CallFinish { core, path, span, started, answered, done: false }
    }

    pub(super) fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        self.done = true;
        let answered = self.answered && code != Code::Unimplemented;
        let method: Arc<ClientMethod> = metrics().client_method(&self.core.name, self.path.path(), answered);
        method.record(code, self.started.elapsed().as_secs_f64());
        if crate::middleware::is_exported(&self.span) {
            self.span.record("rpc.grpc.status_code", code as i64);
            if code != Code::Ok {
                self.span.record("otel.status_code", "ERROR");
            }
        }
    }
}

impl OnStatus for CallFinish {
    /// A connection that broke under a response (the instance died, vanished behind a
    /// partition and missed its keepalive pings, or reset the stream) is `UNAVAILABLE`: the
    /// caller may open the call again, and the channel picks another instance.
    fn on_error(&self, status: Status) -> Status {
        let broken = chain_has::<h2::Error>(&status)
            || chain_has::<hyper::Error>(&status)
            || chain_has::<std::io::Error>(&status);
        if !broken || !matches!(status.code(), Code::Unknown | Code::Internal | Code::Cancelled) {
            return status;
        }
        Status::unavailable(format!(
            "the connection to {} broke under the response ({}); open the call again (another instance \
             will take it)",
            self.core.name,
            status.message()
        ))
    }

    fn complete(mut self, headers: &HeaderMap) {
        let code = status_code(headers).unwrap_or(Code::Ok);
        self.record(code);
    }
}

impl Drop for CallFinish {
    fn drop(&mut self) {
        if !self.done {
            // The caller dropped the response before its status came.
            self.record(Code::Cancelled);
        }
    }
}
