//! Finding the instances a test started, through a real registry: the one copy of "wait
//! until it is registered" every test uses.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use micro_core::{NamedChannel, Node, Registry, registry::MdnsRegistry};

use crate::calls::poll_until;

/// How long a started service may take to appear.
pub const STARTUP: Duration = Duration::from_secs(15);

/// An mDNS registry for the test process; fails unless inside the private namespace.
pub fn mdns() -> Arc<dyn Registry> {
    crate::require_private_netns();
    Arc::new(MdnsRegistry::new(Duration::from_secs(3)).expect("mdns daemon"))
}

/// Polls `registry` until `name` has at least `count` instances, and returns them.
pub async fn wait_for(registry: &Arc<dyn Registry>, name: &str, count: usize) -> Vec<Node> {
    let what = format!("{name} reaching {count} instance(s) in {}", registry.kind());
    poll_until(what, STARTUP, async || registry.lookup(name).await.ok().filter(|nodes| nodes.len() >= count))
        .await
}

/// Polls `registry` until `name`'s instances are exactly `ids`, and returns them.
pub async fn wait_for_exactly(registry: &dyn Registry, name: &str, ids: &[&str]) -> Vec<Node> {
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    let what = format!("{name} having exactly {want:?} in {}", registry.kind());
    poll_until(what, STARTUP, async || {
        let nodes = registry.lookup(name).await.unwrap_or_default();
        (nodes.iter().map(|n| n.id.as_str()).collect::<BTreeSet<_>>() == want).then_some(nodes)
    })
    .await
}

/// Polls until `channel` can pick exactly `count` instances.
pub async fn wait_pickable(channel: &NamedChannel, count: usize) {
    let what = format!("{} having {count} pickable instance(s)", channel.name());
    poll_until(what, STARTUP, async || (channel.pickable().len() == count).then_some(())).await
}
