//! Selection strategies: which instance of a name serves the next call, and filters that
//! narrow the instances a channel may pick from.
//!
//! # Examples
//! ```
//! use micro_core::{registry::Node, selector::{Candidates, RoundRobin, Strategy}};
//! let nodes: Vec<Node> = (1..=3).map(|p| Node::new("svc", ([127, 0, 0, 1], p).into())).collect();
//! let strategy = RoundRobin::new();
//! let picks: Vec<usize> = (0..4).filter_map(|_| strategy.pick(&Candidates::of(&nodes))).collect();
//! assert_eq!(picks, [0, 1, 2, 0]);
//! ```

use std::{collections::BTreeMap, fmt, time::Duration};

use tokio::time::Instant;

use crate::registry::Node;

mod least_loaded;
mod peak_ewma;
mod random;
mod round_robin;

pub use least_loaded::PowerOfTwoChoices;
pub use peak_ewma::PeakEwma;
pub use random::Random;
pub use round_robin::RoundRobin;

/// Picks one of the candidate instances for a call.
pub trait Strategy: Send + Sync + 'static {
    /// The index, below `candidates.len()`, of the instance to call; `None` when empty.
    fn pick(&self, candidates: &Candidates<'_>) -> Option<usize>;
}

/// What a strategy may weigh of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Calls in flight to it from this channel.
    pub in_flight: usize,
    /// Its peak-EWMA latency estimate; `None` until it has answered once.
    pub latency: Option<Duration>,
}

/// One instance as a strategy sees it: its registration and its load as of a moment. The
/// client's endpoints implement it, so the selector, which sits below the client, needs
/// nothing of it.
pub(crate) trait Instance: Sync {
    /// Its registration.
    fn node(&self) -> &Node;
    /// What a strategy may weigh of it as of `now`.
    fn load(&self, now: Instant) -> Load;
}

/// Instances read by index (a client's `Vec` of endpoints), behind one `dyn`, so
/// [`Candidates`] stays one type whatever holds them.
pub(crate) trait Instances: Sync {
    fn count(&self) -> usize;
    fn node_at(&self, slot: usize) -> &Node;
    fn load_at(&self, slot: usize, now: Instant) -> Load;
}

impl<T: Instance> Instances for Vec<T> {
    fn count(&self) -> usize {
        self.len()
    }

    fn node_at(&self, slot: usize) -> &Node {
        self[slot].node()
    }

    fn load_at(&self, slot: usize, now: Instant) -> Load {
        self[slot].load(now)
    }
}

/// The instances a strategy may pick from, with their current load.
pub struct Candidates<'a> {
    source: Source<'a>,
    eligible: Option<&'a [usize]>,
}

enum Source<'a> {
    Nodes(&'a [Node], Option<&'a [Load]>),
    Instances(&'a dyn Instances, Instant),
}

impl<'a> Candidates<'a> {
    /// Every node of `nodes`, none of them loaded.
    pub fn of(nodes: &'a [Node]) -> Self {
        Candidates { source: Source::Nodes(nodes, None), eligible: None }
    }

    /// `nodes[eligible[i]]` for each `i`, `loads[j]` being the load of `nodes[j]`.
    pub fn with_loads(nodes: &'a [Node], loads: &'a [Load], eligible: &'a [usize]) -> Self {
        assert_eq!(nodes.len(), loads.len(), "one load per node");
        Candidates { source: Source::Nodes(nodes, Some(loads)), eligible: Some(eligible) }
    }

    /// `endpoints[eligible[i]]` for each `i` (a client's endpoints, or any [`Instance`]s),
    /// loads read as of `now`.
    pub(crate) fn of_endpoints(endpoints: &'a impl Instances, eligible: &'a [usize], now: Instant) -> Self {
        Candidates { source: Source::Instances(endpoints, now), eligible: Some(eligible) }
    }

    /// How many instances there are to pick from.
    pub fn len(&self) -> usize {
        match (self.eligible, &self.source) {
            (Some(eligible), _) => eligible.len(),
            (None, Source::Nodes(nodes, _)) => nodes.len(),
            (None, Source::Instances(instances, _)) => instances.count(),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, index: usize) -> usize {
        self.eligible.map_or(index, |eligible| eligible[index])
    }

    /// The `index`th candidate.
    pub fn node(&self, index: usize) -> &Node {
        match &self.source {
            Source::Nodes(nodes, _) => &nodes[self.slot(index)],
            Source::Instances(instances, _) => instances.node_at(self.slot(index)),
        }
    }

    /// The load of the `index`th candidate.
    pub fn load(&self, index: usize) -> Load {
        match &self.source {
            Source::Nodes(_, loads) => loads.map(|loads| loads[self.slot(index)]).unwrap_or_default(),
            Source::Instances(instances, now) => instances.load_at(self.slot(index), *now),
        }
    }

    /// Calls in flight to the `index`th candidate from this channel.
    pub fn in_flight(&self, index: usize) -> usize {
        self.load(index).in_flight
    }
}

/// The strategies a flag or `MICRO_CLIENT_SELECTOR` can name.
///
/// The default is [`StrategyKind::PeakEwma`]: it does as well as round robin when every
/// instance is alike (see `make bench`) and steers away from a slow one, which round robin
/// and in-flight counts cannot see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum StrategyKind {
    /// The cheaper of two random instances, cost being latency times calls in flight.
    #[default]
    PeakEwma,
    /// Each instance in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The less loaded of two random instances (fewest calls in flight).
    P2c,
}

impl StrategyKind {
    /// A fresh strategy of this kind.
    pub fn build(self) -> Box<dyn Strategy> {
        match self {
            StrategyKind::RoundRobin => Box::new(RoundRobin::new()),
            StrategyKind::Random => Box::new(Random::new()),
            StrategyKind::P2c => Box::new(PowerOfTwoChoices::new()),
            StrategyKind::PeakEwma => Box::new(PeakEwma::new()),
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrategyKind::RoundRobin => "round-robin",
            StrategyKind::Random => "random",
            StrategyKind::P2c => "p2c",
            StrategyKind::PeakEwma => "peak-ewma",
        })
    }
}

/// Which instances a channel may call, by version and metadata, as go-micro's selector
/// filters do. The default accepts every instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter {
    version: Option<String>,
    metadata: BTreeMap<String, String>,
}

impl Filter {
    /// Accepts every instance.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only instances of this version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Only instances whose metadata has `key` = `value`; several calls must all match.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Whether `node` passes.
    pub fn accepts(&self, node: &Node) -> bool {
        self.version.as_ref().is_none_or(|v| *v == node.version)
            && self.metadata.iter().all(|(k, v)| node.metadata.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_version_and_every_label() {
        let mut node = Node::new("svc", "127.0.0.1:1".parse().unwrap());
        node.version = "2".into();
        node.metadata.insert("zone".into(), "eu".into());
        assert!(Filter::new().accepts(&node));
        assert!(Filter::new().version("2").metadata("zone", "eu").accepts(&node));
        assert!(!Filter::new().version("1").accepts(&node));
        assert!(!Filter::new().metadata("zone", "us").accepts(&node));
        assert!(!Filter::new().metadata("rack", "a").accepts(&node));
    }
}
