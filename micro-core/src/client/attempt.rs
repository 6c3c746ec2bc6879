//! One call: attempts on picked instances until one answers, within the call's deadline.
//!
//! A failed attempt is retried on another instance after a jittered backoff when
//! [`Failure::retry_allowed`] says so and the retry budget has room. A call that may be sent
//! twice (idempotent, with its whole body read ahead) is also hedged: when its attempt has
//! not answered within the hedge delay, the same request goes to another instance, and the
//! first answer wins; the others are cancelled. Hedges and retries share the attempt limit
//! (`1 + retries`) and the budget, so an overload never multiplies traffic.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use tokio::time::Instant;
use tonic::{Code, Status, body::Body};
use tower::{ServiceExt, retry::budget::Budget};

use super::{
    IDEMPOTENCY_KEY_HEADER,
    channel::ChannelCore,
    deadline::{GRPC_TIMEOUT_HEADER, grpc_timeout, requested_timeout},
    endpoints::{Endpoint, InFlight},
    failure::{CallSite, Failure, chain_has, retried},
    outlier::Verdict,
    replay::Replay,
};
use crate::{
    BoxError,
    config::Hedge,
    metrics::{AttemptLabels, code_name, metrics},
    middleware::{REQUEST_ID_HEADER, current_request_id},
    registry::NodeId,
};

type AttemptFuture = Pin<Box<dyn Future<Output = (usize, Result<http::Response<Body>, Failure>)> + Send>>;

/// The attempts of one call so far.
struct Attempts {
    /// Every attempt started, in order; an index is an attempt's number.
    endpoints: Vec<Endpoint>,
    /// Attempts not finished yet.
    running: FuturesUnordered<AttemptFuture>,
    /// Indices of the attempts still running.
    open: Vec<usize>,
}

impl Attempts {
    /// Instances already tried or being tried, which the next pick avoids.
    fn avoid(&self) -> Vec<NodeId> {
        self.endpoints.iter().map(|endpoint| endpoint.node.id.clone()).collect()
    }
}

impl ChannelCore {
    pub(crate) async fn call(
        self: Arc<Self>,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let timeout = requested_timeout(&request)
            .map_or(self.config.request_timeout, |t| t.min(self.config.request_timeout));
        let deadline = Instant::now() + timeout;
        let (mut parts, body) = request.into_parts();
        // Inside a handler the current request id travels on; otherwise the server assigns one.
        if !parts.headers.contains_key(REQUEST_ID_HEADER)
            && let Some(request_id) = current_request_id()
        {
            parts.headers.insert(REQUEST_ID_HEADER, request_id);
        }
        let method = parts.uri.path().to_owned();
        let idempotent =
            self.idempotent.contains(&method) || parts.headers.contains_key(IDEMPOTENCY_KEY_HEADER);
        let replay = Replay::new(body).await;
        self.budget.deposit();
        let site = CallSite { method: &method, service: &self.name, registry: &self.registry_kind, timeout };
        let hedge_delay = if idempotent && replay.is_whole() { self.hedge_delay() } else { None };

        let mut attempts =
            Attempts { endpoints: Vec::new(), running: FuturesUnordered::new(), open: Vec::new() };
        let max_attempts = 1 + self.config.retries as usize;
        let first = self.pick(&[], deadline).await.map_err(|status| -> BoxError { Box::new(status) })?;
        self.start(&mut attempts, first, &parts, &replay, deadline);
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
                Some((index, outcome)) = attempts.running.next() => Event::Finished(index, outcome),
                _ = sleep_until(retry_at) => Event::Retry,
                _ = sleep_until(hedge_at) => Event::Hedge,
            };
            match event {
                Event::Retry => {
                    retry_at = None;
                    match self.pick(&attempts.avoid(), deadline).await {
                        Ok(endpoint) => {
                            tracing::debug!(service = %self.name, node = %endpoint.node.id, %method, retries, "retrying");
                            self.start(&mut attempts, endpoint, &parts, &replay, deadline);
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
                    self.start(&mut attempts, endpoint, &parts, &replay, deadline);
                    hedge_at = hedge_delay.map(|delay| Instant::now() + delay).filter(|at| *at < deadline);
                }
                Event::Finished(index, Ok(response)) => {
                    attempts.open.retain(|&open| open != index);
                    // Attempts started before this one were slower than it.
                    self.give_up(&attempts, |open| open < index);
                    return Ok(response);
                }
                Event::Finished(index, Err(failure)) => {
                    attempts.open.retain(|&open| open != index);
                    let endpoint = &attempts.endpoints[index];
                    let retry = failure.retry_allowed(idempotent)
                        && attempts.endpoints.len() < max_attempts
                        && replay.replayable()
                        && retry_at.is_none();
                    let deadline_passed = matches!(failure, Failure::Deadline);
                    let status = failure.into_status(&site, &endpoint.node, idempotent);
                    if deadline_passed {
                        self.give_up(&attempts, |_| true);
                        return Err(Box::new(retried(last_failure.unwrap_or(status), retries)));
                    }
                    let backoff = self.backoff(retries);
                    if retry && Instant::now() + backoff < deadline && self.budget.withdraw() {
                        tracing::debug!(service = %self.name, node = %endpoint.node.id, %method, attempt = index, "retrying on another instance");
                        retry_at = Some(Instant::now() + backoff);
                    }
                    last_failure = Some(status);
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
    ) -> (usize, Result<http::Response<Body>, Failure>) {
        let in_flight = InFlight::start(&endpoint.stats);
        // Every attempt carries `grpc-timeout`, and tonic's channel ends the call there
        // (`TimeoutExpired`), so no timer of our own is needed per call.
        let result = endpoint.channel.clone().oneshot(request).await.map_err(BoxError::from);
        self.count_attempt(&endpoint, &result);
        let outcome = match result {
            Ok(response) => match Status::from_header_map(response.headers()) {
                Some(status) if status.code() == Code::Unavailable => Err(Failure::Status(status)),
                // tonic's server ends a call past its `grpc-timeout` with CANCELLED.
                Some(status) if is_server_timeout(&status) => Err(Failure::Deadline),
                _ => {
                    self.latencies.record(in_flight.answered());
                    Ok(response)
                }
            },
            Err(err) if chain_has::<tonic::TimeoutExpired>(&*err) => Err(Failure::Deadline),
            Err(err) => Err(Failure::Transport { source: err, sent: polled.load(Ordering::Acquire) }),
        };
        let verdict = match &outcome {
            Ok(_) => Verdict::Answered,
            Err(failure) => failure.verdict(),
        };
        self.judge(&endpoint, verdict);
        (index, outcome)
    }

    /// Starts an attempt on `endpoint`.
    fn start(
        self: &Arc<Self>,
        attempts: &mut Attempts,
        endpoint: Endpoint,
        parts: &http::request::Parts,
        replay: &Replay,
        deadline: Instant,
    ) {
        let index = attempts.endpoints.len();
        let request = attempt_request(parts, replay, deadline);
        attempts.running.push(Box::pin(self.clone().attempt(index, endpoint.clone(), request)));
        attempts.endpoints.push(endpoint);
        attempts.open.push(index);
    }

    /// The attempts still running when the call ends are cancelled. Those `slower` says
    /// were outrun (by a later attempt, or by the deadline) count as failures of their
    /// instance; an instance that has not answered once since it joined (or came back from
    /// an ejection) is taken for hung and ejected at once.
    fn give_up(self: &Arc<Self>, attempts: &Attempts, slower: impl Fn(usize) -> bool) {
        for &index in &attempts.open {
            let endpoint = &attempts.endpoints[index];
            self.attempt_counter(endpoint, "cancelled").inc();
            if slower(index) {
                let answered = endpoint.stats.latency.has_answered();
                tracing::debug!(service = %self.name, node = %endpoint.node.id, answered, "outrun attempt cancelled");
                self.judge(endpoint, if answered { Verdict::Failed } else { Verdict::Dead });
            }
        }
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

    fn count_attempt(&self, endpoint: &Endpoint, result: &Result<http::Response<Body>, BoxError>) {
        let result = match result {
            Err(err) if chain_has::<tonic::TimeoutExpired>(&**err) => "deadline",
            Err(_) => "transport_error",
            // No status in the headers: an answer whose status follows in the trailers.
            Ok(response) => match Status::from_header_map(response.headers()) {
                None => {
                    endpoint.stats.ok_attempts.get_or_init(|| self.attempt_counter(endpoint, "ok")).inc();
                    return;
                }
                Some(status) if status.code() == Code::Ok => "ok",
                Some(status) => code_name(status.code()),
            },
        };
        self.attempt_counter(endpoint, result).inc();
    }

    fn attempt_counter(&self, endpoint: &Endpoint, result: &str) -> Counter {
        let labels = AttemptLabels {
            service: self.name.clone(),
            node: endpoint.node.id.clone(),
            result: result.to_owned(),
        };
        metrics().client_attempts.get_or_create(&labels).clone()
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

/// Whether the server ended the call because its `grpc-timeout` passed: tonic says so
/// with `CANCELLED` and this message, where gRPC means `DEADLINE_EXCEEDED`.
fn is_server_timeout(status: &Status) -> bool {
    status.code() == Code::Cancelled && status.message() == "Timeout expired"
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
