//! Following one name: blocking queries of its passing instances, turned into changes.

use std::{collections::BTreeMap, sync::Arc};

use tokio::time::Instant;

use super::{WATCH_MIN_INTERVAL, WATCH_WAIT, agent::Agent};
use crate::registry::{Backoff, Change, Node, NodeId};

/// The index to send with the next blocking query, following Consul's advice: an index that
/// went backwards (the agent's state was reset) starts over from 0, and a 0 answer becomes 1
/// so the next query blocks.
pub(super) fn next_index(previous: u64, answered: u64) -> u64 {
    if answered < previous { 0 } else { answered.max(1) }
}

/// The changes that turn `known` into `now`, applied to `known`: removals, then insertions
/// (new or changed instances), each in id order.
pub(super) fn diff(known: &mut BTreeMap<NodeId, Node>, now: Vec<Node>) -> Vec<Change<NodeId, Node>> {
    let now: BTreeMap<NodeId, Node> = now.into_iter().map(|n| (n.id.clone(), n)).collect();
    let mut changes: Vec<Change<NodeId, Node>> =
        known.keys().filter(|id| !now.contains_key(*id)).map(|id| Change::Remove(id.clone())).collect();
    for (id, node) in &now {
        if known.get(id) != Some(node) {
            changes.push(Change::Insert(id.clone(), node.clone()));
        }
    }
    *known = now;
    changes
}

pub(super) struct WatchState {
    pub(super) agent: Arc<Agent>,
    pub(super) name: String,
    pub(super) index: u64,
    pub(super) known: BTreeMap<NodeId, Node>,
    pub(super) last_query: Option<Instant>,
    pub(super) backoff: Backoff,
    pub(super) failing: bool,
}

impl WatchState {
    /// Queries until something changed.
    pub(super) async fn next_changes(&mut self) -> Vec<Change<NodeId, Node>> {
        loop {
            if let Some(last) = self.last_query {
                tokio::time::sleep_until(last + WATCH_MIN_INTERVAL).await;
            }
            self.last_query = Some(Instant::now());
            let index = (self.index > 0).then_some(self.index);
            let started = Instant::now();
            match self.agent.passing(&self.name, index, WATCH_WAIT).await {
                Ok((answered, nodes)) => {
                    if self.failing {
                        self.failing = false;
                        tracing::info!(service = %self.name, address = %self.agent.address, "consul: watch answered again");
                    }
                    let previous = self.index;
                    self.index = next_index(previous, answered);
                    let changes = diff(&mut self.known, nodes);
                    if !changes.is_empty() {
                        self.backoff.reset();
                        return changes;
                    }
                    let early = index.is_some() && answered == previous && started.elapsed() < WATCH_WAIT;
                    if early {
                        // An agent that shuts down answers its blocking queries at once, unchanged;
                        // its successor would hold the same index far longer than it should. So
                        // read afresh (index 0), pausing longer each time this repeats.
                        tracing::debug!(service = %self.name, index = answered, "consul: blocking query woke early without a change; reading afresh");
                        self.index = 0;
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    } else {
                        self.backoff.reset();
                        tracing::trace!(service = %self.name, index = self.index, "consul: watch poll, no change");
                    }
                }
                Err(failure) => {
                    let err = self.agent.error("watch", failure);
                    let retry_in = self.backoff.next_delay();
                    tracing::warn!(service = %self.name, error = %crate::error::error_chain(&err), ?retry_in, "consul: watch failed; keeping known instances");
                    self.failing = true;
                    // The agent may come back as a new process with a fresh index.
                    self.index = 0;
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }
}
