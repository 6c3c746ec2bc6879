//! Finding the services a test started, through a real registry.

use std::{sync::Arc, time::Duration};

use micro_core::{NamedChannel, Node, Registry, registry::MdnsRegistry};
use tokio::time::Instant;

/// How long a started service may take to appear.
pub const STARTUP: Duration = Duration::from_secs(15);

/// An mDNS registry for the test process; fails unless inside the private namespace.
pub fn mdns() -> Arc<dyn Registry> {
    crate::require_private_netns();
    Arc::new(MdnsRegistry::new(Duration::from_secs(3)).expect("mdns daemon"))
}

/// Polls `registry` until `name` has at least `count` instances.
pub async fn wait_for(registry: &Arc<dyn Registry>, name: &str, count: usize) -> Vec<Node> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Ok(nodes) = registry.lookup(name).await
            && nodes.len() >= count
        {
            return nodes;
        }
        assert!(Instant::now() < deadline, "{name} did not reach {count} instance(s) within {STARTUP:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `channel` can pick exactly `count` instances.
pub async fn wait_pickable(channel: &NamedChannel, count: usize) {
    let deadline = Instant::now() + STARTUP;
    while channel.pickable().len() != count {
        assert!(
            Instant::now() < deadline,
            "{} has {} pickable instance(s), expected {count}",
            channel.name(),
            channel.pickable().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
