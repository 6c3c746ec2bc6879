//! Following the registry: a channel's task applies the registry's changes to its endpoint
//! set until the channel is dropped. A watch that ends or fails is started again; every
//! refresh interval a full look-up repairs missed events. While the registry cannot be
//! reached the known instances are kept (stale but usable), and this is logged.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use futures::StreamExt;
use tokio::time::Instant;

use super::{
    channel::ChannelCore,
    deadline::TIMER_ANCHOR_PERIOD,
    endpoints::{Endpoint, EndpointSet},
    pool::Connections,
};
use crate::{
    Error,
    error::error_chain,
    metrics::{AttemptLabels, code_name, metrics},
    registry::{Change, Node, NodeId, Registry},
};

/// Pause before a watch that ended is started again.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// Follows `registry` for `channel` until the channel is dropped.
pub(crate) async fn follow_registry(channel: Weak<ChannelCore>, registry: Arc<dyn Registry>) {
    let Some(core) = channel.upgrade() else { return };
    let (name, refresh_interval) = (core.name.clone(), core.config.refresh_interval);
    drop(core);
    let kind = registry.kind().to_string();
    let mut known: HashMap<NodeId, Node> = HashMap::new();
    let mut refresh = tokio::time::interval(refresh_interval);
    refresh.tick().await;
    let mut anchor = tokio::time::interval(TIMER_ANCHOR_PERIOD);
    anchor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let mut changes = registry.watch(&name);
        loop {
            let changed = tokio::select! {
                change = changes.next() => match change {
                    Some(Ok(Change::Insert(id, node))) => {
                        metrics().registry_event(&kind, &name, "insert");
                        known.insert(id, node.clone()).as_ref() != Some(&node)
                    }
                    Some(Ok(Change::Remove(id))) => {
                        metrics().registry_event(&kind, &name, "remove");
                        known.remove(&id).is_some()
                    }
                    Some(Err(err)) => {
                        metrics().registry_event(&kind, &name, "watch_error");
                        tracing::warn!(service = %name, registry = %kind, error = %error_chain(&err), cached = known.len(), "watch failed; keeping known instances");
                        break;
                    }
                    None => break,
                },
                _ = refresh.tick() => refresh_from(&*registry, &name, &mut known).await,
                _ = anchor.tick() => false,
            };
            if changed {
                let Some(core) = channel.upgrade() else { return };
                core.publish(&known);
            }
        }
        tokio::time::sleep(REWATCH_DELAY).await;
        if refresh_from(&*registry, &name, &mut known).await {
            let Some(core) = channel.upgrade() else { return };
            core.publish(&known);
        }
        tracing::warn!(service = %name, registry = %kind, "watch restarted");
    }
}

/// Replaces `known` with a full look-up; returns whether anything changed. On a registry
/// failure `known` is kept.
pub(crate) async fn refresh_from(
    registry: &dyn Registry,
    name: &str,
    known: &mut HashMap<NodeId, Node>,
) -> bool {
    let kind = registry.kind().to_string();
    let found = match registry.lookup(name).await {
        Ok(nodes) => nodes,
        Err(Error::NoInstance { .. }) => Vec::new(),
        Err(err) => {
            if !known.is_empty() {
                tracing::warn!(service = %name, registry = %kind, error = %error_chain(&err), cached = known.len(), "registry unreachable; calls use the cached instances");
            }
            return false;
        }
    };
    let fresh: HashMap<NodeId, Node> = found.into_iter().map(|n| (n.id.clone(), n)).collect();
    if fresh == *known {
        return false;
    }
    tracing::info!(service = %name, before = known.len(), after = fresh.len(), "refresh repaired the instance list");
    metrics().registry_event(&kind, name, "refresh_repair");
    *known = fresh;
    true
}

impl ChannelCore {
    /// Publishes `known` as the new endpoint set, keeping the connection and what was seen
    /// of every instance already known at the same address.
    pub(crate) fn publish(&self, known: &HashMap<NodeId, Node>) {
        let mut nodes: Vec<&Node> = known.values().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let previous = self.endpoints.borrow().clone();
        let mut set = EndpointSet::default();
        for node in nodes {
            let kept = previous.find(&node.id).filter(|old| old.node.address == node.address);
            let (connections, stats) = match kept {
                Some(old) => (old.connections.clone(), old.stats.clone()),
                None => match Connections::new(node, &self.config) {
                    Ok(connections) => (Arc::new(connections), Arc::default()),
                    Err(err) => {
                        tracing::warn!(service = %self.name, node = %node.id, error = %err, "unusable address");
                        continue;
                    }
                },
            };
            if self.filter.accepts(node) && !node.draining {
                set.eligible.push(set.endpoints.len());
            }
            set.endpoints.push(Endpoint { node: Arc::new(node.clone()), connections, stats });
        }
        for gone in previous.endpoints.iter().filter(|old| !known.contains_key(&old.node.id)) {
            forget_attempt_series(&self.name, &gone.node.id);
        }
        let set = set.with_pickable(Instant::now());
        tracing::debug!(service = %self.name, known = set.endpoints.len(), pickable = set.pickable.len(), "instances changed");
        self.endpoints.send_replace(Arc::new(set));
    }
}

/// Every `result` a client attempt is counted under.
fn attempt_results() -> impl Iterator<Item = &'static str> {
    let codes = (0..=16).map(|code| code_name(tonic::Code::from_i32(code)));
    ["ok", "deadline", "transport_error", "cancelled"].into_iter().chain(codes)
}

/// Drops the attempt series of an instance that left the registry, so instances that come
/// and go (every deploy) do not grow the metrics page without bound.
fn forget_attempt_series(service: &str, node: &str) {
    for result in attempt_results() {
        let labels =
            AttemptLabels { service: service.to_owned(), node: node.to_owned(), result: result.to_owned() };
        metrics().client_attempts.remove(&labels);
    }
}
