//! One call: attempts on picked instances until one answers, within the call's deadline.
//!
//! A failed attempt is retried on another instance after a jittered backoff when
//! [`Failure::retry_allowed`] says so and the retry budget has room. A call that may be sent
//! twice (idempotent, with its whole body read ahead) is also hedged: when its attempt has
//! not answered within the hedge delay, the same request goes to another instance, and the
//! first answer wins; the others are cancelled. Hedges and retries share the attempt limit
//! (`1 + retries`) and the budget, so an overload never multiplies traffic.
//!
//! Each call is a `grpc.client` span and each attempt a `grpc.attempt` span within it
//! (`micro.attempt` its number, `micro.attempt_kind` `first`, `retry` or `hedge`); every
//! attempt carries `traceparent`/`tracestate` naming its own span, or, when spans are not
//! exported, the trace of the call being handled, unchanged. Each call is counted by
//! service, method and status (`micro_client_requests_total`) and timed
//! (`micro_client_request_duration_seconds`).

mod refusal;
mod set;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rand::Rng;
use smallvec::SmallVec;
use tokio::time::Instant;
use tonic::{Code, Status, body::Body};
use tower::{ServiceExt, retry::budget::Budget};
use tracing::{Instrument, field::Empty};

use super::{
    IDEMPOTENCY_KEY_HEADER,
    channel::ChannelCore,
    deadline::{GRPC_TIMEOUT_HEADER, GRPC_TIMEOUT_RESOLUTION, grpc_timeout, requested_timeout},
    endpoints::{Endpoint, InFlight},
    failure::{CallSite, Failure, chain_has, go_away_reason, is_unprocessed, retried},
    finish::CallFinish,
    outlier::Verdict,
    replay::Replay,
    stream::StreamDeadlineBody,
};
use crate::{
    BoxError,
    config::Hedge,
    middleware::{
        OnStatus, REQUEST_ID, REQUEST_ID_HEADER, StatusBody, current_request_id, inject_trace_context,
        span_name,
    },
};

use self::set::{AttemptKind, Attempts, next_finished};

impl ChannelCore {
    /// One call in its `grpc.client` span, counted when its status is known.
    pub(crate) async fn call(
        self: Arc<Self>,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let uri = request.uri().clone();
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = span_name(uri.path()),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %self.name,
            rpc.method = span_name(uri.path()),
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
        );
        let started = std::time::Instant::now();
        let result = match self.throttle.admit() {
            true => {
                let mut refused = false;
                let result = self.clone().attempts(request, &mut refused).instrument(span.clone()).await;
                self.throttle.finished(!(refused && result.is_err()));
                result
            }
            false => Err(Box::new(self.throttled(uri.path())) as BoxError),
        };
        let finish = CallFinish::new(self, uri, span, started, result.is_ok());
        match result {
            Ok(response) if response.headers().contains_key("grpc-status") => {
                finish.complete(response.headers());
                Ok(response)
            }
            Ok(response) => Ok(response.map(|body| {
                let config = &finish.core.config;
                let (whole, idle) = (config.stream_timeout, config.stream_idle_timeout);
                let body = StreamDeadlineBody::wrap(body, &finish.core.name, whole, idle);
                Body::new(StatusBody::new(body, finish))
            })),
            Err(err) => {
                let code = err.downcast_ref::<Status>().map_or(Code::Unknown, Status::code);
                finish.finish(code);
                Err(err)
            }
        }
    }

    /// The call's attempts; `refused` tells, once it has failed, whether its last failed
    /// attempt was refused over a server's concurrency limit (what throttling counts).
    async fn attempts(
        self: Arc<Self>,
        request: http::Request<Body>,
        refused_last: &mut bool,
    ) -> Result<http::Response<Body>, BoxError> {
        // The caller's own deadline, else the configured one.
        let timeout = requested_timeout(&request).unwrap_or(self.config.request_timeout);
        let deadline = Instant::now() + timeout;
        let (mut parts, body) = request.into_parts();
        // Inside a handler the current request id travels on; otherwise the server assigns one.
        if !parts.headers.contains_key(REQUEST_ID_HEADER)
            && let Some(request_id) = current_request_id()
        {
            parts.headers.insert(REQUEST_ID, request_id);
        }
        let uri = parts.uri.clone();
        let method = uri.path();
        let idempotent =
            self.idempotent.contains(method) || parts.headers.contains_key(IDEMPOTENCY_KEY_HEADER);
        let replay = Replay::new(body).await;
        self.budget.deposit();
        let site = CallSite { method, service: &self.name, registry: &self.registry_kind, timeout };
        let hedge_delay = if idempotent && replay.is_whole() { self.hedge_delay() } else { None };

        let mut attempts = Attempts { endpoints: SmallVec::new(), running: None, open: SmallVec::new() };
        let max_attempts = 1 + self.config.retries as usize;
        let first = self.pick(&[], deadline).await.map_err(|status| -> BoxError { Box::new(status) })?;
        let first = self.prepare(&mut attempts, first, &parts, &replay, deadline, AttemptKind::First);
        let mut first = std::pin::pin!(first);
        let mut first_running = true;
        let mut hedge_at = hedge_delay.map(|delay| Instant::now() + delay).filter(|at| *at < deadline);
        let mut retry_at: Option<Instant> = None;
        // What the last failed attempt ended with: when a retry then runs out of time or
        // instances, that failure says more than the deadline does.
        let mut last_failure: Option<Status> = None;
        loop {
            let retries = attempts.endpoints.len().saturating_sub(1) as u32;
            if attempts.open.is_empty() && retry_at.is_none() {
                let failure = last_failure.expect("a failed attempt");
                tracing::warn!(service = %self.name, %method, code = ?failure.code(), message = failure.message(), retries, "call failed");
                return Err(Box::new(retried(failure, retries)));
            }
            let event = tokio::select! {
                (index, outcome) = &mut first, if first_running => {
                    first_running = false;
                    Event::Finished(index, outcome)
                }
                Some((index, outcome)) = next_finished(&mut attempts.running) => Event::Finished(index, outcome),
                _ = sleep_until(retry_at) => Event::Retry,
                _ = sleep_until(hedge_at) => Event::Hedge,
            };
            match event {
                Event::Retry => {
                    retry_at = None;
                    match self.pick(&attempts.avoid(), deadline).await {
                        Ok(endpoint) => {
                            tracing::debug!(service = %self.name, node = %endpoint.node.id, %method, retries, "retrying");
                            let retry = self.prepare(
                                &mut attempts,
                                endpoint,
                                &parts,
                                &replay,
                                deadline,
                                AttemptKind::Retry,
                            );
                            attempts.run_alongside(retry);
                        }
                        Err(status) if attempts.open.is_empty() => {
                            return Err(Box::new(retried(last_failure.unwrap_or(status), retries)));
                        }
                        Err(_) => {}
                    }
                }
                Event::Hedge => {
                    hedge_at = None;
                    let avoid = attempts.avoid();
                    // A hedge goes to another instance or nowhere.
                    let Some(endpoint) = self.pick_from(&self.endpoints.borrow().clone(), &avoid) else {
                        continue;
                    };
                    if avoid.contains(&endpoint.node.id)
                        || attempts.endpoints.len() >= max_attempts
                        || !self.budget.withdraw()
                    {
                        continue;
                    }
                    tracing::debug!(service = %self.name, node = %endpoint.node.id, %method, "hedging");
                    let hedge =
                        self.prepare(&mut attempts, endpoint, &parts, &replay, deadline, AttemptKind::Hedge);
                    attempts.run_alongside(hedge);
                    hedge_at = hedge_delay.map(|delay| Instant::now() + delay).filter(|at| *at < deadline);
                }
                Event::Finished(index, Ok(response)) => {
                    attempts.open.retain(|open| *open != index);
                    // Attempts started before this one were outrun by it.
                    self.give_up(&attempts, |open| open < index);
                    return Ok(response);
                }
                Event::Finished(index, Err(failure)) => {
                    attempts.open.retain(|open| *open != index);
                    let endpoint = &attempts.endpoints[index];
                    // A refused call goes only to an instance not tried yet, and at once.
                    let refused = failure.is_refusal();
                    *refused_last = refused;
                    let untried = !refused || self.has_untried(&attempts.avoid());
                    let retry = failure.retry_allowed(idempotent)
                        && untried
                        && attempts.endpoints.len() < max_attempts
                        && replay.replayable()
                        && retry_at.is_none();
                    let deadline_passed = matches!(failure, Failure::Deadline);
                    let mut status = failure.into_status(&site, &endpoint.node, idempotent);
                    // The marker says this attempt never started; it must not travel on with
                    // the status (a handler passing it back to its own caller would make that
                    // caller resend a call that did run).
                    status.metadata_mut().remove(crate::server::REFUSED_HEADER);
                    if deadline_passed {
                        self.give_up(&attempts, |_| false);
                        return Err(Box::new(retried(last_failure.unwrap_or(status), retries)));
                    }
                    let backoff = if refused { Duration::ZERO } else { self.backoff(retries) };
                    if retry && Instant::now() + backoff < deadline && self.budget.withdraw() {
                        tracing::debug!(service = %self.name, node = %endpoint.node.id, %method, attempt = index, refused, "retrying on another instance");
                        retry_at = Some(Instant::now() + backoff);
                    }
                    last_failure = Some(match refused && !untried && attempts.open.is_empty() {
                        true => self.refused_everywhere(&attempts, method),
                        false => status,
                    });
                }
            }
        }
    }

    /// Sends one attempt; judges the instance by how it went.
    async fn attempt(
        self: Arc<Self>,
        index: usize,
        endpoint: Endpoint,
        (request, polled): (http::Request<Body>, Arc<std::sync::atomic::AtomicBool>),
        deadline: Instant,
    ) -> (usize, Result<http::Response<Body>, Failure>) {
        let in_flight = InFlight::start(&endpoint.stats);
        // Every attempt carries `grpc-timeout`, and tonic's channel ends the call there
        // (`TimeoutExpired`), so no timer of our own is needed per call.
        let (channel, _busy) = endpoint.connections.pick(&endpoint.node, &self.config);
        let result = channel.oneshot(request).await.map_err(BoxError::from);
        self.count_attempt(&endpoint, &result);
        let outcome = match result {
            Ok(response) => match Status::from_header_map(response.headers()) {
                Some(status) if status.code() == Code::Unavailable => Err(Failure::Status(status)),
                Some(status) if crate::server::is_refusal(response.headers()) => {
                    self.refused_by(&endpoint);
                    Err(Failure::Status(status))
                }
                Some(status) if is_server_timeout(&status, deadline) => Err(Failure::Deadline),
                _ => {
                    self.latencies.record(in_flight.answered());
                    Ok(response)
                }
            },
            Err(err) if chain_has::<tonic::TimeoutExpired>(&*err) => Err(Failure::Deadline),
            Err(err) if is_unprocessed(&*err) => {
                let reason = go_away_reason(&*err);
                if reason == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                    tracing::warn!(service = %self.name, node = %endpoint.node.id, address = %endpoint.node.address, "the server closed the connection for too many pings (GOAWAY ENHANCE_YOUR_CALM): raise MICRO_CLIENT_KEEPALIVE_INTERVAL, or the server's permitted ping interval");
                } else {
                    tracing::debug!(service = %self.name, node = %endpoint.node.id, ?reason, "not processed by the server; sent again on a new connection");
                }
                Err(Failure::Unprocessed(err))
            }
            Err(err) => Err(Failure::Transport { source: err, sent: polled.load(Ordering::Acquire) }),
        };
        let verdict = match &outcome {
            Ok(_) => Verdict::Answered,
            Err(failure) => failure.verdict(),
        };
        let span = tracing::Span::current();
        if crate::middleware::is_exported(&span) {
            match &outcome {
                Ok(response) => match Status::from_header_map(response.headers()) {
                    Some(status) => span.record("rpc.grpc.status_code", status.code() as i64),
                    None => span.record("micro.result", "answered"),
                },
                Err(Failure::Deadline) => span.record("micro.result", "deadline"),
                Err(Failure::Transport { .. }) => span.record("micro.result", "transport_error"),
                Err(Failure::Unprocessed(_)) => span.record("micro.result", "unprocessed"),
                Err(Failure::Status(status)) => span.record("rpc.grpc.status_code", status.code() as i64),
            };
        }
        self.judge(&endpoint, verdict);
        (index, outcome)
    }

    /// An attempt on `endpoint`, counted in `attempts`, in a `grpc.attempt` span of its own
    /// whose context the request carries.
    fn prepare(
        self: &Arc<Self>,
        attempts: &mut Attempts,
        endpoint: Endpoint,
        parts: &http::request::Parts,
        replay: &Replay,
        deadline: Instant,
        kind: AttemptKind,
    ) -> impl Future<Output = (usize, Result<http::Response<Body>, Failure>)> + Send + use<> {
        let index = attempts.endpoints.len();
        let span = tracing::info_span!(
            "grpc.attempt",
            otel.name = format_args!("{} attempt {}", span_name(parts.uri.path()), index + 1),
            otel.kind = "client",
            micro.attempt = index + 1,
            micro.attempt_kind = kind.as_str(),
            micro.node = %endpoint.node.id,
            server.address = %endpoint.node.address,
            rpc.grpc.status_code = Empty,
            micro.result = Empty,
        );
        let mut request = attempt_request(parts, replay, deadline);
        inject_trace_context(request.0.headers_mut(), &span);
        let attempt = self.clone().attempt(index, endpoint.clone(), request, deadline).instrument(span);
        attempts.endpoints.push(endpoint);
        attempts.open.push(index);
        attempt
    }

    /// How long an attempt may go unanswered before the call is hedged.
    fn hedge_delay(&self) -> Option<Duration> {
        match self.config.hedge {
            Hedge::Off => None,
            Hedge::After(delay) => Some(delay),
            Hedge::Adaptive { min, max } => Some(self.latencies.quantile().unwrap_or(max).clamp(min, max)),
        }
    }

    fn backoff(&self, retries: u32) -> Duration {
        let ceiling = self.config.backoff.saturating_mul(2u32.saturating_pow(retries.min(16)));
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

/// What woke the call up.
enum Event {
    Finished(usize, Result<http::Response<Body>, Failure>),
    Retry,
    Hedge,
}

/// The request of one attempt: the call's head with the time left as `grpc-timeout`, and
/// a replay of its body with the flag that tells whether the transport ever polled it.
fn attempt_request(
    parts: &http::request::Parts,
    replay: &Replay,
    deadline: Instant,
) -> (http::Request<Body>, Arc<std::sync::atomic::AtomicBool>) {
    let (body, polled) = replay.attempt();
    let mut request = http::Request::from_parts(parts.clone(), body);
    let remaining = deadline.saturating_duration_since(Instant::now());
    request.headers_mut().insert(GRPC_TIMEOUT_HEADER, grpc_timeout(remaining));
    (request, polled)
}

/// Whether the server ended the call because its `grpc-timeout` passed: the SDK's server
/// says so with `DEADLINE_EXCEEDED`, a plain tonic server with `CANCELLED`. Told by the
/// clock, not the text: the server's timer started after the attempt left, so it fires no
/// sooner than the call's deadline, less the millisecond `grpc-timeout` rounds down. A
/// handler's own answer before then is the handler's, whatever it says. The caller then
/// sees the client's own deadline status, which names the method and the instance.
fn is_server_timeout(status: &Status, deadline: Instant) -> bool {
    matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
        && Instant::now() + GRPC_TIMEOUT_RESOLUTION >= deadline
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
