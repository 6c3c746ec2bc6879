//! `micro call` on a streaming method. Each reply is printed as one line of JSON (proto3
//! JSON mapping), flushed as it arrives, until the stream ends; a client-streaming reply
//! (one message) is printed the same way. A server-streaming method takes its one request
//! as the JSON argument (`{}` when left out); a client-streaming or bidirectional method
//! reads its requests from stdin, one JSON message per non-empty line, sending each as it
//! is read and ending the request stream at end of input. A line that is not valid JSON for
//! the request type fails the command (exit 1) naming the line number; nothing more is
//! sent and the call is cancelled, so the server never takes the input as complete.
//!
//! A failure after some replies were printed exits with the call's code (64 + N), as a
//! unary call's does. The SDK's request timeout covers a call until the server's response
//! headers only: a server-streaming call runs as long as the server streams; a
//! client-streaming call, whose reply headers usually come after the last request, gets
//! [`CLIENT_STREAM_TIMEOUT`] unless `--client-request-timeout` is set (see `main.rs`).
//!
//! # Examples
//! ```sh
//! micro call echo echo.Echo/Count '{"count": 3}'          # three lines, then exit 0
//! printf '{"text":"a"}\n{"text":"b"}\n' | micro call echo echo.Echo/Collect
//! ```

use std::{io::BufRead, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use micro_core::NamedChannel;
use prost_reflect::{DynamicMessage, MethodDescriptor};
use tokio::sync::{mpsc, oneshot};

use crate::{dynamic, exit::Failure, out};

/// The longest stdin line read as one request message: gRPC's default message limit.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;
/// How long a client-streaming call may take until the server answers (its response
/// headers), when `--client-request-timeout` is not set: the input may be typed by hand.
pub const CLIENT_STREAM_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// One line of input: its number (from 1) and its bytes, or why it could not be read.
type Line = Result<(usize, Vec<u8>), String>;

/// Calls streaming `method` on `channel`: the request is `json` (server streaming) or the
/// lines of `input` (client streaming, bidirectional); prints each reply as a JSON line.
pub async fn call<R>(
    channel: NamedChannel,
    method: &MethodDescriptor,
    json: Option<&str>,
    input: R,
) -> Result<(), Failure>
where
    R: BufRead + Send + 'static,
{
    let path = format!("{}/{}", method.parent_service().full_name(), method.name());
    let (requests, input_failed) = if method.is_client_streaming() {
        if json.is_some() {
            return Err(Failure::Other(format!(
                "{path} is client-streaming: its requests are read from stdin, one JSON {} per line; \
                 give no JSON argument",
                method.input().full_name()
            )));
        }
        let (failed_tx, failed_rx) = oneshot::channel();
        (requests_from_lines(read_lines(input), method.clone(), path.clone(), failed_tx), Some(failed_rx))
    } else {
        let json = json.unwrap_or("{}");
        let request = dynamic::request_from_json(method, json.as_bytes()).map_err(|err| {
            Failure::Other(format!("request JSON for {}: {err}", method.input().full_name()))
        })?;
        (futures::stream::once(std::future::ready(request)).boxed(), None)
    };
    let status_failure = |status: tonic::Status| Failure::CallFailed {
        code: status.code(),
        message: format!("{}: {}", micro_core::metrics::code_name(status.code()), status.message()),
    };
    let replies = async {
        let response = dynamic::streaming(channel, method, tonic::Request::new(requests))
            .await
            .map_err(status_failure)?;
        let mut replies = response.into_inner();
        let mut printed = 0u64;
        while let Some(reply) = replies.message().await.map_err(status_failure)? {
            out::line(dynamic::to_json_line(&reply));
            printed += 1;
        }
        tracing::debug!(method = %path, printed, "stream ended");
        Ok(())
    };
    let input_failed = async {
        match input_failed {
            // A sender dropped without a failure: the input ended well.
            Some(failed) => match failed.await {
                Ok(failure) => failure,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    // Bad input wins: dropping the call cancels it (RST_STREAM), so the server does not
    // take what was sent as the whole input.
    tokio::select! {
        biased;
        failure = input_failed => Err(failure),
        result = replies => result,
    }
}

/// Reads `input` line by line on a thread of its own (a blocking read of stdin cannot be
/// cancelled, and must not hold up the runtime's shutdown), at most one line ahead of the
/// call. The thread ends at end of input, on a read error, or when the receiver is gone.
fn read_lines<R: BufRead + Send + 'static>(mut input: R) -> mpsc::Receiver<Line> {
    let (lines, receiver) = mpsc::channel(1);
    std::thread::spawn(move || {
        let mut number = 0;
        loop {
            number += 1;
            let mut line = Vec::new();
            let read =
                std::io::Read::take(&mut input, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line);
            let item = match read {
                Ok(0) => return,
                Ok(_) if line.len() > MAX_LINE_BYTES => {
                    Err(format!("stdin line {number}: longer than {MAX_LINE_BYTES} bytes"))
                }
                Ok(_) => Ok((number, line)),
                Err(err) => Err(format!("reading stdin line {number}: {err}")),
            };
            let last = item.is_err();
            if lines.blocking_send(item).is_err() || last {
                return;
            }
        }
    });
    receiver
}

/// The request stream: one message per non-empty line. At the first line that does not
/// parse (or cannot be read) the failure goes to `failed` and the stream neither yields nor
/// ends again, so nothing more is sent and the request is never half-closed.
fn requests_from_lines(
    lines: mpsc::Receiver<Line>,
    method: MethodDescriptor,
    path: String,
    failed: oneshot::Sender<Failure>,
) -> BoxStream<'static, DynamicMessage> {
    futures::stream::unfold((lines, failed), move |(mut lines, failed)| {
        let (method, path) = (method.clone(), path.clone());
        async move {
            let failure = loop {
                match lines.recv().await {
                    None => return None,
                    Some(Err(why)) => {
                        break format!("{why}; nothing more was sent to {path}, the call was cancelled");
                    }
                    Some(Ok((number, line))) => {
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        match dynamic::request_from_json(&method, &line) {
                            Ok(message) => return Some((message, (lines, failed))),
                            Err(err) => {
                                break format!(
                                    "stdin line {number} is not a valid {} for {path}: {err}; nothing more \
                                     was sent, the call was cancelled",
                                    method.input().full_name()
                                );
                            }
                        }
                    }
                }
            };
            let _ = failed.send(Failure::Other(failure));
            std::future::pending().await
        }
    })
    .boxed()
}
