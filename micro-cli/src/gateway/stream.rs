//! Server-streaming methods over HTTP: the one request message in, each reply out as it
//! comes, as server-sent events or as NDJSON, chosen by `Accept`:
//!
//! | `Accept` | response | each reply | the end |
//! | --- | --- | --- | --- |
//! | `text/event-stream` | `text/event-stream` | `data: <json>` and a blank line | `event: end` (or `event: error`) with `data: {"code", "message"}` |
//! | `application/x-ndjson`, `*/*`, none | `application/x-ndjson` | one JSON object per line | EOF, or a last line `{"error": {"code", "message"}}` |
//! | anything else | `406` naming the two types | | |
//!
//! A failure before the stream starts (no instance, an unknown method, bad JSON, the call
//! refused before its first reply) is an ordinary error answer with its HTTP status. The
//! body is pulled from the gRPC stream one reply at a time as the HTTP connection takes
//! it, so a slow reader slows the upstream stream (HTTP/2 flow control) and nothing is
//! buffered beyond one reply and the connection's write buffer; no task is spawned: when the client goes away the body is
//! dropped, and with it the gRPC stream, which is cancelled. A stream runs until the service
//! ends it, the client leaves, `X-Timeout` (when given, for the whole stream) passes, or the
//! gateway shuts down (`event: error`, `UNAVAILABLE`). Idle SSE streams get a comment line
//! every [`SSE_KEEPALIVE`], so proxies do not close them as idle.
//!
//! # Examples
//! ```sh
//! curl -N -H 'Accept: text/event-stream' localhost:8080/echo/echo.Echo/Count -d '{"count": 3}'
//! curl -N -H 'Accept: application/x-ndjson' localhost:8080/echo/echo.Echo/Count -d '{"count": 3}'
//! ```

use std::{convert::Infallible, time::Duration};

use axum::{body::Body, response::Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use micro_core::metrics::code_name;
use prost_reflect::DynamicMessage;
use tokio::{sync::watch, time::Instant};
use tonic::Code;

use super::{metrics, status::GatewayError};
use crate::dynamic;

/// The media type of server-sent events.
pub const EVENT_STREAM: &str = "text/event-stream";
/// The media type of newline-delimited JSON.
pub const NDJSON: &str = "application/x-ndjson";
/// How long an SSE stream may stay silent before a comment line is sent.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
/// The query parameter that carries a `GET` stream's request message (EventSource cannot POST).
pub const BODY_PARAM: &str = "body";

/// How a stream's replies are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Server-sent events.
    Sse,
    /// One JSON object per line.
    Ndjson,
}

/// The format `headers`' `Accept` asks for, the first acceptable range winning; NDJSON when
/// there is no `Accept`; `406` when it accepts neither type. `path` names the method.
pub fn negotiate(headers: &HeaderMap, path: &str) -> Result<Format, GatewayError> {
    let Some(accept) = headers.get(header::ACCEPT) else { return Ok(Format::Ndjson) };
    let accept = accept.to_str().unwrap_or_default();
    for range in accept.split(',') {
        let media = range.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match media.as_str() {
            EVENT_STREAM | "text/*" => return Ok(Format::Sse),
            NDJSON | "application/*" | "*/*" => return Ok(Format::Ndjson),
            _ => {}
        }
    }
    let mut err = GatewayError::new(
        Code::InvalidArgument,
        format!(
            "{path} is a server-streaming method: its replies come as {EVENT_STREAM} (server-sent events) \
             or {NDJSON} (a JSON object per line); Accept: {accept:?} takes neither"
        ),
    );
    err.status = Some(StatusCode::NOT_ACCEPTABLE);
    Err(err)
}

/// The request message of a `GET` stream: the `body` query parameter, percent-decoded, or
/// nothing (the empty message). Bounded by `limit` bytes, as a `POST` body is.
pub fn query_body(query: Option<&str>, limit: usize) -> Result<Vec<u8>, GatewayError> {
    let Some(query) = query else { return Ok(Vec::new()) };
    if query.len() > limit.saturating_mul(3) {
        return Err(GatewayError::too_large(limit));
    }
    let encoded = query
        .split('&')
        .find_map(|pair| pair.strip_prefix(BODY_PARAM).and_then(|rest| rest.strip_prefix('=')));
    let Some(encoded) = encoded else { return Ok(Vec::new()) };
    let decoded = percent_decode(encoded).ok_or_else(|| {
        GatewayError::new(
            Code::InvalidArgument,
            format!("query parameter {BODY_PARAM}: bad percent-encoding"),
        )
    })?;
    if decoded.len() > limit {
        return Err(GatewayError::too_large(limit));
    }
    Ok(decoded)
}

/// `text` with `%XX` escapes decoded and `+` as a space; `None` for a broken escape.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Some(out)
}

/// What the stream's end is recorded as in the gateway's metrics.
pub struct Recording {
    /// The `service` and `method` labels.
    pub labels: (String, String),
    /// When the request came.
    pub started: std::time::Instant,
}

/// Marks a response whose metrics its stream records when it ends.
#[derive(Clone, Copy)]
pub struct Recorded;

/// The stream's state between replies.
struct Pump {
    replies: tonic::Streaming<DynamicMessage>,
    format: Format,
    /// The end of the whole stream, from `X-Timeout`.
    deadline: Option<Instant>,
    stopping: watch::Receiver<bool>,
    /// `service package.Service/Method`, for error messages.
    what: String,
    recording: Recording,
    _open: metrics::OpenStream,
    /// The code the stream ended with; `CANCELLED` until it ends (a client that left).
    ended: Code,
}

impl Drop for Pump {
    fn drop(&mut self) {
        let (service, method) = &self.recording.labels;
        let status = super::status::http_status(self.ended).as_u16();
        metrics::record(service, method, status, self.recording.started.elapsed().as_secs_f64());
        tracing::debug!(stream = %self.what, code = ?self.ended, "stream closed");
    }
}

/// What the next poll of the stream gave.
enum Next {
    Reply(DynamicMessage),
    End,
    Failed(Code, String),
    Idle,
}

/// The `200` response that streams `replies` in `format`, with `headers` (the call's
/// response metadata) added.
pub fn response(
    replies: tonic::Streaming<DynamicMessage>,
    format: Format,
    (headers, deadline): (HeaderMap, Option<Duration>),
    stopping: watch::Receiver<bool>,
    what: String,
    recording: Recording,
) -> Response {
    let pump = Pump {
        replies,
        format,
        deadline: deadline.map(|limit| Instant::now() + limit),
        stopping,
        what,
        recording,
        _open: metrics::OpenStream::new(),
        ended: Code::Cancelled,
    };
    let chunks = futures::stream::unfold(Some(pump), |pump| async move {
        let mut pump = pump?;
        let (chunk, done) = match pump.next().await {
            Next::Idle => (Bytes::from_static(b": keep-alive\n\n"), false),
            Next::Reply(reply) => (pump.reply(&reply), false),
            Next::End => {
                pump.ended = Code::Ok;
                (pump.end(), true)
            }
            Next::Failed(code, message) => {
                pump.ended = code;
                (pump.failure(code, &message), true)
            }
        };
        Some((Ok::<_, Infallible>(chunk), (!done).then_some(pump)))
    });
    let content_type = match format {
        Format::Sse => EVENT_STREAM,
        Format::Ndjson => NDJSON,
    };
    let mut response = Response::new(Body::from_stream(chunks));
    let response_headers = response.headers_mut();
    response_headers.extend(headers);
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Asks reverse proxies (nginx) not to hold the replies back.
    response_headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.extensions_mut().insert(Recorded);
    response
}

impl Pump {
    async fn next(&mut self) -> Next {
        let (at, format) = (self.deadline, self.format);
        let deadline = async {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let keepalive = async {
            match format {
                Format::Sse => tokio::time::sleep(SSE_KEEPALIVE).await,
                Format::Ndjson => std::future::pending().await,
            }
        };
        let stopping = self.stopping.wait_for(|stopping| *stopping);
        tokio::select! {
            biased;
            _ = stopping => Next::Failed(Code::Unavailable, "the gateway is shutting down".into()),
            () = deadline => Next::Failed(Code::DeadlineExceeded, "the stream passed its X-Timeout".into()),
            message = self.replies.message() => match message {
                Ok(Some(reply)) => Next::Reply(reply),
                Ok(None) => Next::End,
                Err(status) => Next::Failed(status.code(), status.message().to_owned()),
            },
            () = keepalive => Next::Idle,
        }
    }

    fn reply(&self, reply: &DynamicMessage) -> Bytes {
        let json = dynamic::to_json_line(reply);
        match self.format {
            Format::Sse => format!("data: {json}\n\n").into(),
            Format::Ndjson => format!("{json}\n").into(),
        }
    }

    fn end(&self) -> Bytes {
        match self.format {
            Format::Sse => {
                let status = serde_json::json!({ "code": code_name(Code::Ok), "message": "" });
                format!("event: end\ndata: {status}\n\n").into()
            }
            Format::Ndjson => Bytes::new(),
        }
    }

    fn failure(&self, code: Code, message: &str) -> Bytes {
        tracing::debug!(stream = %self.what, ?code, message, "stream failed");
        let status =
            serde_json::json!({ "code": code_name(code), "message": format!("{}: {message}", self.what) });
        match self.format {
            Format::Sse => format!("event: error\ndata: {status}\n\n").into(),
            Format::Ndjson => format!("{}\n", serde_json::json!({ "error": status })).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepting(value: &str) -> HeaderMap {
        HeaderMap::from_iter([(header::ACCEPT, HeaderValue::from_str(value).unwrap())])
    }

    #[test]
    fn accept_picks_the_format() {
        assert_eq!(negotiate(&HeaderMap::new(), "p").unwrap(), Format::Ndjson);
        assert_eq!(negotiate(&accepting("text/event-stream"), "p").unwrap(), Format::Sse);
        assert_eq!(negotiate(&accepting("application/x-ndjson"), "p").unwrap(), Format::Ndjson);
        assert_eq!(negotiate(&accepting("*/*"), "p").unwrap(), Format::Ndjson);
        assert_eq!(
            negotiate(&accepting("application/json, text/event-stream;q=0.9"), "p").unwrap(),
            Format::Sse
        );
        let refused = negotiate(&accepting("application/json"), "echo.Echo/Count").unwrap_err();
        assert_eq!(refused.http_status(), StatusCode::NOT_ACCEPTABLE);
        assert!(
            refused.message.contains(EVENT_STREAM) && refused.message.contains(NDJSON),
            "{}",
            refused.message
        );
    }

    #[test]
    fn a_get_stream_takes_its_request_from_the_query() {
        assert_eq!(query_body(None, 100).unwrap(), b"");
        assert_eq!(query_body(Some("x=1"), 100).unwrap(), b"");
        assert_eq!(query_body(Some("body=%7B%22count%22%3A+3%7D"), 100).unwrap(), br#"{"count": 3}"#);
        assert_eq!(
            query_body(Some("body=%7B%7D"), 1).unwrap_err().http_status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(query_body(Some("body=%7"), 100).unwrap_err().code, Code::InvalidArgument);
    }
}
