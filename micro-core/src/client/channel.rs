//! [`NamedChannel`]: the `tower::Service` that tonic clients call, and the state one name's
//! channel shares between its clones: the endpoint set, the strategy that picks from it,
//! the retry budget, the latency window and the tasks it owns.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tonic::{Status, body::Body};
use tower::{Service, retry::budget::TpsBudget};

use super::{
    endpoints::{Endpoint, EndpointSet},
    latency::LatencyWindow,
    outlier::{EjectPolicy, EjectReason, Verdict},
    throttle::Throttle,
};
use crate::{
    BoxError, Error,
    config::{ClientConfig, HEDGE_QUANTILE},
    registry::{Node, NodeId},
    selector::{Candidates, Filter, Load, Strategy},
};

/// A `tower::Service` for gRPC calls to the instances of one name; see the module docs of
/// [`crate::client`]. Cheap to clone; the last clone dropped stops its registry follower.
#[derive(Clone)]
pub struct NamedChannel {
    pub(crate) core: Arc<ChannelCore>,
}

/// What every clone of one channel shares.
pub(crate) struct ChannelCore {
    pub(crate) name: String,
    pub(crate) registry_kind: String,
    pub(crate) filter: Filter,
    pub(crate) strategy: Box<dyn Strategy>,
    pub(crate) strategy_name: String,
    pub(crate) config: ClientConfig,
    pub(crate) idempotent: Arc<HashSet<String>>,
    pub(crate) endpoints: watch::Sender<Arc<EndpointSet>>,
    pub(crate) budget: TpsBudget,
    pub(crate) latencies: LatencyWindow,
    /// Adaptive throttling of this name's calls while its instances refuse them.
    pub(crate) throttle: Throttle,
    /// The registry follower and ejection timers; a `JoinSet` aborts them when dropped,
    /// with the channel.
    pub(crate) tasks: Mutex<JoinSet<()>>,
}

impl ChannelCore {
    pub(crate) fn new(
        name: &str,
        registry_kind: String,
        filter: Filter,
        strategy: Box<dyn Strategy>,
        strategy_name: String,
        config: ClientConfig,
        idempotent: Arc<HashSet<String>>,
    ) -> Self {
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.min_retries_per_sec,
            config.retry_budget_percent / 100.0,
        );
        let throttle = Throttle::new(config.throttle_ratio);
        ChannelCore {
            name: name.to_owned(),
            registry_kind,
            filter,
            strategy,
            strategy_name,
            config,
            idempotent,
            endpoints: watch::channel(Arc::new(EndpointSet::default())).0,
            budget,
            latencies: LatencyWindow::new(HEDGE_QUANTILE),
            throttle,
            tasks: Mutex::default(),
        }
    }

    /// Runs `task` for as long as the channel lives.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().expect("channel tasks lock");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Picks an instance not in `avoid` when there is one, waiting up to the look-up
    /// timeout (bounded by the deadline) when none is known yet.
    pub(crate) async fn pick(&self, avoid: &[NodeId], deadline: Instant) -> Result<Endpoint, Status> {
        let set = self.endpoints.borrow().clone();
        if let Some(endpoint) = self.pick_from(&set, avoid) {
            return Ok(endpoint);
        }
        let mut endpoints = self.endpoints.subscribe();
        let wait_until = deadline.min(Instant::now() + self.config.lookup_timeout);
        loop {
            let set = endpoints.borrow_and_update().clone();
            if let Some(endpoint) = self.pick_from(&set, avoid) {
                return Ok(endpoint);
            }
            if tokio::time::timeout_at(wait_until, endpoints.changed()).await.is_err() {
                return Err(self.no_instance(&set));
            }
        }
    }

    /// The strategy's pick among the pickable instances, or the next one after it that is
    /// not in `avoid`. With every eligible instance ejected, ejection is ignored rather
    /// than failing.
    pub(crate) fn pick_from(&self, set: &EndpointSet, avoid: &[NodeId]) -> Option<Endpoint> {
        let pool = if set.pickable.is_empty() { &set.eligible } else { &set.pickable };
        let candidates = Candidates::of_endpoints(&set.endpoints, pool, Instant::now());
        let first = self.strategy.pick(&candidates)?;
        let untried = (0..candidates.len())
            .map(|offset| (first + offset) % candidates.len())
            .find(|&i| !avoid.contains(&candidates.node(i).id))
            .unwrap_or(first);
        let endpoint = set.endpoints[pool[untried]].clone();
        tracing::debug!(service = %self.name, node = %endpoint.node.id, "picked");
        Some(endpoint)
    }

    fn no_instance(&self, set: &EndpointSet) -> Status {
        let registry = &self.registry_kind;
        if set.endpoints.is_empty() {
            return Error::NoInstance { service: self.name.clone(), registry: registry.clone() }.into();
        }
        let draining = set.endpoints.iter().filter(|e| e.node.draining).count();
        let filtered = set.endpoints.iter().filter(|e| !self.filter.accepts(&e.node)).count();
        Status::unavailable(format!(
            "no usable instance of {} in registry {registry}: {} known, {filtered} rejected by the filter {:?}, {draining} draining",
            self.name,
            set.endpoints.len(),
            self.filter
        ))
    }

    /// Takes an attempt's verdict on `endpoint`; ejects it when that is the last straw, and
    /// lets it back in when the ejection ends, measured afresh.
    pub(crate) fn judge(self: &Arc<Self>, endpoint: &Endpoint, verdict: Verdict) {
        let policy = EjectPolicy { after: self.config.eject_after, first_time: self.config.eject_time };
        let Some(time) = endpoint.stats.outlier.record(verdict, policy, Instant::now()) else { return };
        tracing::warn!(service = %self.name, node = %endpoint.node.id, address = %endpoint.node.address, ?time, ?verdict, "instance ejected");
        self.republish();
        let (channel, stats) = (Arc::downgrade(self), endpoint.stats.clone());
        self.spawn(async move {
            tokio::time::sleep(time).await;
            stats.latency.reset();
            if let Some(channel) = channel.upgrade() {
                channel.republish();
            }
        });
    }

    /// Recomputes which instances are pickable now.
    pub(crate) fn republish(&self) {
        let now = Instant::now();
        self.endpoints.send_modify(|set| *set = Arc::new(EndpointSet::clone(set).with_pickable(now)));
    }
}

/// How one instance looks from a channel: what `micro why` shows.
#[derive(Debug, Clone)]
pub struct InstanceView {
    /// The registered instance.
    pub node: Node,
    /// Accepted by the channel's filter and not draining.
    pub eligible: bool,
    /// Until when and why it is ejected, if it is.
    pub ejected: Option<(Duration, EjectReason)>,
    /// Calls in flight and the latency estimate.
    pub load: Load,
}

impl NamedChannel {
    /// The service name this channel calls.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The strategy this channel picks with, by name (`peak-ewma`, `round-robin`, ...).
    pub fn strategy(&self) -> &str {
        &self.core.strategy_name
    }

    /// The instances currently known for the name, draining and filtered-out ones included.
    pub fn instances(&self) -> Vec<Node> {
        self.core.endpoints.borrow().endpoints.iter().map(|e| Node::clone(&e.node)).collect()
    }

    /// The instances a call may be sent to now: accepted by the filter, not draining, not
    /// ejected.
    pub fn pickable(&self) -> Vec<Node> {
        let set = self.core.endpoints.borrow().clone();
        set.pickable.iter().map(|&i| Node::clone(&set.endpoints[i].node)).collect()
    }

    /// Every known instance with what this channel has seen of it.
    pub fn inspect(&self) -> Vec<InstanceView> {
        let set = self.core.endpoints.borrow().clone();
        let now = Instant::now();
        set.endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoint)| InstanceView {
                node: Node::clone(&endpoint.node),
                eligible: set.eligible.contains(&index),
                ejected: endpoint
                    .stats
                    .outlier
                    .ejection(now)
                    .map(|(until, why)| (until.saturating_duration_since(now), why)),
                load: endpoint.stats.load(now),
            })
            .collect()
    }

    /// The instances the next `count` calls would go to, as the channel's strategy picks
    /// them now (for a strategy that draws at random, one possible sequence).
    pub fn next_picks(&self, count: usize) -> Vec<Node> {
        let set = self.core.endpoints.borrow().clone();
        (0..count)
            .filter_map(|_| self.core.pick_from(&set, &[]))
            .map(|endpoint| Node::clone(&endpoint.node))
            .collect()
    }
}

impl Service<http::Request<Body>> for NamedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.core.clone().call(request))
    }
}
