//! One test body, [`conformance`], run against every registry backend: memory, mDNS (in the
//! private namespace `scripts/netns-run` makes), a real Consul dev agent and a real etcd.
//! The dns registry is discovery only (registration is the platform's), so its look-ups and
//! watches are tested against dnsmasq in `tests/dns.rs`.
//!
//! Run with `scripts/install-consul && scripts/netns-run cargo test -p micro-core`.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use e2e::{calls::poll_until, discovery::wait_for_exactly};
use futures::StreamExt;
use micro_core::{
    Error, Node, Registry,
    config::{RegistryConfig, RegistryKind},
    registry::{Change, MdnsRegistry, MemoryRegistry},
};
use tokio::time::timeout;

/// Bound on anything the registry should reflect "soon".
const SOON: Duration = Duration::from_secs(10);
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);

fn node(name: &str, port: u16, zone: &str) -> Node {
    let mut node = Node::new(name, ([127, 0, 0, 1], port).into());
    node.version = "1.2.3".into();
    node.metadata.insert("zone".into(), zone.into());
    node.metadata.insert("team".into(), "fleet".into());
    node
}

async fn conformance(registry: Arc<dyn Registry>) {
    let kind = registry.kind();
    let name = e2e::unique_name("conformance");
    let (a, b) = (node(&name, 41001, "eu-1"), node(&name, 41002, "us-1"));
    let mut watch = registry.watch(&name);

    registry.register(&a, Duration::from_secs(30)).await.expect("register a");
    registry.register(&b, Duration::from_secs(30)).await.expect("register b");

    let mut seen = wait_for_exactly(&*registry, &name, &[&a.id, &b.id]).await;
    seen.sort_by(|x, y| x.id.cmp(&y.id));
    let mut want = vec![a.clone(), b.clone()];
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(seen, want, "{kind}: lookup must give back id, name, version, address and metadata");

    // The watch reports both instances, as they were registered.
    let mut inserted = BTreeSet::new();
    while inserted.len() < 2 {
        match timeout(SOON, watch.next()).await {
            Ok(Some(Ok(Change::Insert(id, node)))) => {
                assert!(want.contains(&node), "{kind}: watch inserted {node:?}");
                inserted.insert(id);
            }
            other => panic!("{kind}: expected Inserts for both nodes, got {other:?}"),
        }
    }

    let names = poll_until(format!("{kind}: {name} listed"), SOON, async || {
        let names = registry.list_services().await.expect("list_services");
        names.contains(&name).then_some(names)
    })
    .await;
    assert!(names.is_sorted(), "{kind}: list_services must be sorted: {names:?}");

    registry.deregister(&a).await.expect("deregister a");
    loop {
        match timeout(SOON, watch.next()).await {
            Ok(Some(Ok(Change::Remove(id)))) => {
                assert_eq!(id, a.id, "{kind}: only a was deregistered");
                break;
            }
            Ok(Some(Ok(Change::Insert(id, _)))) if id == b.id || id == a.id => continue,
            other => panic!("{kind}: expected a's Remove, got {other:?}"),
        }
    }
    wait_for_exactly(&*registry, &name, &[&b.id]).await;
    registry.deregister(&b).await.expect("deregister b");

    let unknown = e2e::unique_name("nobody");
    match registry.lookup(&unknown).await {
        Err(err @ Error::NoInstance { .. }) => {
            let text = err.to_string();
            assert!(text.contains(&unknown) && text.contains(kind.as_str()), "{text}");
        }
        other => panic!("{kind}: lookup of an unknown name gave {other:?}"),
    }
}

#[tokio::test]
async fn memory_registry_conforms() {
    conformance(Arc::new(MemoryRegistry::new())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mdns_registry_conforms() {
    e2e::require_private_netns();
    conformance(Arc::new(MdnsRegistry::new(LOOKUP_TIMEOUT).expect("mdns daemon"))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_registry_conforms() {
    let agent = e2e::consul::ConsulAgent::start_async().await;
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(agent.http_address()),
        lookup_timeout: LOOKUP_TIMEOUT,
        ..RegistryConfig::default()
    };
    conformance(config.connect().await.expect("consul agent answers")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_registry_conforms() {
    let cluster = e2e::etcd::EtcdCluster::start(1);
    let config = RegistryConfig {
        kind: RegistryKind::Etcd,
        address: Some(cluster.endpoints()),
        lookup_timeout: LOOKUP_TIMEOUT,
        ..RegistryConfig::default()
    };
    conformance(config.connect().await.expect("etcd answers")).await;
}
