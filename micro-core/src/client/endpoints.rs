//! The instances a channel knows at one moment, one record each: the registry's node, the
//! connection to it and what this channel has seen of it (load, latency, ejection).

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::{latency::PeakEwma, outlier::OutlierState, pool::Connections};
use crate::{
    registry::Node,
    selector::{Instance, Load},
};

/// How many times its running time an unanswered attempt counts for: it would have taken
/// longer still, by how much nobody knows.
pub(crate) const UNANSWERED_PENALTY: u32 = 4;

/// One instance: its registration, its connection and its health as this channel sees it.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// Shared, so a pick clones no strings.
    pub(crate) node: Arc<Node>,
    /// Its connections; each attempt clones the one it sends on, and only that one.
    pub(crate) connections: Arc<Connections>,
    pub(crate) stats: Arc<EndpointStats>,
}

/// What a strategy sees of an endpoint: its node and its load.
impl Instance for Endpoint {
    fn node(&self) -> &Node {
        &self.node
    }

    fn load(&self, now: Instant) -> Load {
        self.stats.load(now)
    }
}

/// What a channel has seen of one instance; kept across snapshots while the instance stays.
#[derive(Default)]
pub(crate) struct EndpointStats {
    /// The `result="ok"` attempt counter of this instance, looked up once.
    pub(crate) ok_attempts: OnceLock<Counter>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) latency: PeakEwma,
    pub(crate) outlier: OutlierState,
}

impl EndpointStats {
    /// The load a strategy weighs: calls in flight and the latency estimate.
    pub(crate) fn load(&self, now: Instant) -> Load {
        Load { in_flight: self.in_flight.load(Ordering::Relaxed), latency: self.latency.estimate(now) }
    }
}

/// Every instance a channel knows at one moment, and which of them a call may go to.
#[derive(Default, Clone)]
pub(crate) struct EndpointSet {
    pub(crate) endpoints: Vec<Endpoint>,
    /// Indices of endpoints the filter accepts and that are not draining.
    pub(crate) eligible: Vec<usize>,
    /// Eligible and not ejected.
    pub(crate) pickable: Vec<usize>,
}

impl EndpointSet {
    /// The same set with `pickable` recomputed for `now`.
    pub(crate) fn with_pickable(mut self, now: Instant) -> Self {
        let endpoints = &self.endpoints;
        self.pickable =
            self.eligible.iter().copied().filter(|&i| !endpoints[i].stats.outlier.is_ejected(now)).collect();
        self
    }

    /// The endpoint of `node_id`, if known.
    pub(crate) fn find(&self, node_id: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|endpoint| endpoint.node.id == node_id)
    }
}

/// Counts an attempt in flight on an endpoint and feeds how long it took into the
/// endpoint's latency estimate: an answer as it is; a failure or a cancellation (an attempt
/// a hedge won over, a deadline) as [`UNANSWERED_PENALTY`] times as long, and only when
/// that raises the estimate, so an instance that fails fast never looks fast, and one that
/// keeps being outrun looks as slow as it is, not merely as slow as the hedge delay.
pub(crate) struct InFlight {
    stats: Arc<EndpointStats>,
    started: Instant,
    answered: bool,
}

impl InFlight {
    pub(crate) fn start(stats: &Arc<EndpointStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { stats: stats.clone(), started: Instant::now(), answered: false }
    }

    /// The instance answered; returns how long it took.
    pub(crate) fn answered(mut self) -> Duration {
        self.answered = true;
        self.started.elapsed()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let (now, elapsed) = (Instant::now(), self.started.elapsed());
        match self.answered {
            true => self.stats.latency.observe(now, elapsed),
            false => self.stats.latency.raise(now, elapsed * UNANSWERED_PENALTY),
        }
    }
}
