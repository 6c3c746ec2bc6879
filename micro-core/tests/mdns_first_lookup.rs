//! A fresh process's first mDNS look-up returns every instance, not just the first to
//! answer: it asks by legacy unicast, which responders answer at once.

use std::{sync::Arc, time::Duration};

use micro_core::{Node, Registry, registry::MdnsRegistry};

#[tokio::test(flavor = "multi_thread")]
async fn first_lookup_of_a_fresh_registry_returns_every_instance() {
    e2e::require_private_netns();
    let name = e2e::unique_name("fleet");
    let announcers: Vec<Arc<dyn Registry>> = (0..3)
        .map(|_| Arc::new(MdnsRegistry::new(Duration::from_secs(3)).unwrap()) as Arc<dyn Registry>)
        .collect();
    let mut ids = Vec::new();
    for (port, announcer) in (41001..).zip(&announcers) {
        let node = Node::new(&name, ([127, 0, 0, 1], port).into());
        announcer.register(&node, Duration::from_secs(30)).await.unwrap();
        ids.push(node.id);
    }
    ids.sort();
    // Warm the responders' multicast rate limit, as a look-up by another process would.
    let earlier = MdnsRegistry::new(Duration::from_secs(3)).unwrap();
    assert!(!earlier.lookup(&name).await.unwrap().is_empty());

    for _ in 0..3 {
        let fresh = MdnsRegistry::new(Duration::from_secs(3)).unwrap();
        let mut found: Vec<String> = fresh.lookup(&name).await.unwrap().into_iter().map(|n| n.id).collect();
        found.sort();
        assert_eq!(found, ids, "a fresh look-up must see every instance");
    }
}
