//! The attempts of one call: which were started, which still run, and how each is counted
//! and judged when the call ends.

use std::{pin::Pin, sync::Arc};

use futures::{StreamExt, stream::FuturesUnordered};
use prometheus_client::metrics::counter::Counter;
use smallvec::SmallVec;
use tonic::{Code, Status, body::Body};

use crate::{
    BoxError,
    client::{
        channel::ChannelCore,
        endpoints::Endpoint,
        failure::{Failure, chain_has},
        outlier::Verdict,
    },
    metrics::{AttemptLabels, code_name, metrics},
    registry::NodeId,
};

type AttemptFuture = Pin<Box<dyn Future<Output = (usize, Result<http::Response<Body>, Failure>)> + Send>>;

/// The attempts of one call so far.
pub(super) struct Attempts {
    /// Every attempt started, in order; an index is an attempt's number.
    pub(super) endpoints: SmallVec<[Endpoint; INLINE_ATTEMPTS]>,
    /// Retries and hedges not finished yet (the first attempt runs on its own, unboxed);
    /// made with the first of them.
    pub(super) running: Option<FuturesUnordered<AttemptFuture>>,
    /// Indices of the attempts still running.
    pub(super) open: SmallVec<[usize; INLINE_ATTEMPTS]>,
}

/// Attempts a call keeps without allocating: the first, a retry and a hedge.
pub(super) const INLINE_ATTEMPTS: usize = 3;

impl Attempts {
    /// Runs a retry or a hedge alongside the attempts still running.
    pub(super) fn run_alongside(
        &mut self,
        attempt: impl Future<Output = (usize, Result<http::Response<Body>, Failure>)> + Send + 'static,
    ) {
        self.running.get_or_insert_with(FuturesUnordered::new).push(Box::pin(attempt));
    }

    /// Instances already tried or being tried, which the next pick avoids.
    pub(super) fn avoid(&self) -> Vec<NodeId> {
        self.endpoints.iter().map(|endpoint| endpoint.node.id.clone()).collect()
    }
}

/// Why an attempt was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AttemptKind {
    First,
    Retry,
    Hedge,
}

impl AttemptKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            AttemptKind::First => "first",
            AttemptKind::Retry => "retry",
            AttemptKind::Hedge => "hedge",
        }
    }
}

impl ChannelCore {
    /// The attempts still running when the call ends are cancelled, and judged: one still
    /// unanswered at the deadline failed; one `outrun` by a later attempt failed only if its
    /// instance has never answered (since it joined or came back from an ejection): that
    /// one is taken for hung and ejected at once. An instance that answers but was slower
    /// this time is not held to account here: its latency estimate rises instead, so an
    /// overload that makes every instance slow ejects none of them.
    pub(super) fn give_up(self: &Arc<Self>, attempts: &Attempts, outrun: impl Fn(usize) -> bool) {
        for &index in &attempts.open {
            let endpoint = &attempts.endpoints[index];
            self.attempt_counter(endpoint, "cancelled").inc();
            let answered = endpoint.stats.latency.has_answered();
            let verdict = match outrun(index) {
                true if answered => continue,
                true => Verdict::Dead,
                false => Verdict::Failed,
            };
            tracing::debug!(service = %self.name, node = %endpoint.node.id, answered, ?verdict, "unanswered attempt cancelled");
            self.judge(endpoint, verdict);
        }
    }

    /// Whether an instance not in `avoid` could be picked now.
    pub(super) fn has_untried(&self, avoid: &[NodeId]) -> bool {
        let set = self.endpoints.borrow().clone();
        let pool = if set.pickable.is_empty() { &set.eligible } else { &set.pickable };
        pool.iter().any(|&i| !avoid.contains(&set.endpoints[i].node.id))
    }

    pub(super) fn count_attempt(&self, endpoint: &Endpoint, result: &Result<http::Response<Body>, BoxError>) {
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

    pub(super) fn attempt_counter(&self, endpoint: &Endpoint, result: &str) -> Counter {
        let labels = AttemptLabels {
            service: self.name.clone(),
            node: endpoint.node.id.clone(),
            result: result.to_owned(),
        };
        metrics().client_attempts.get_or_create(&labels).clone()
    }
}

/// The next retry or hedge to finish; none while none was started.
pub(super) async fn next_finished(
    running: &mut Option<FuturesUnordered<AttemptFuture>>,
) -> Option<(usize, Result<http::Response<Body>, Failure>)> {
    match running {
        Some(running) => running.next().await,
        None => None,
    }
}
