//! The etcd registry against real etcd servers started by each test (Debian's `etcd-server`;
//! `make test-deps` installs it): a killed process's key goes when its lease expires, a
//! watch misses nothing between its read and its watch, one dead member of three stops
//! nothing, and go-micro's JSON is read and written as go-micro does, checked from outside
//! the SDK with `etcdctl`.
//!
//! Run with `scripts/netns-run cargo test -p micro-core --test etcd`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use e2e::{
    calls::poll_until,
    etcd::{EtcdCluster, etcdctl},
    process::Process,
    unique_name,
};
use futures::StreamExt;
use micro_core::{
    Client, Node, Registry,
    registry::{Change, EtcdRegistry, etcd_key},
};
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
use serde::Deserialize;
use tokio::time::{Instant, timeout};

/// Bound on anything that should happen "soon".
const SOON: Duration = Duration::from_secs(10);

async fn registry(endpoints: &str) -> Arc<EtcdRegistry> {
    let etcd = EtcdRegistry::builder()
        .endpoints(endpoints)
        .lookup_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("valid endpoints");
    etcd.ping().await.expect("etcd answers");
    Arc::new(etcd)
}

fn node(name: &str, port: u16) -> Node {
    let mut node = Node::new(name, ([127, 0, 0, 1], port).into());
    node.version = "1.0.0".into();
    node.metadata.insert("zone".into(), "eu-1".into());
    node
}

/// The next change of `watch` within [`SOON`], skipping `Insert`s of ids in `skip`.
async fn next_change(
    watch: &mut futures::stream::BoxStream<'static, micro_core::Result<Change<String, Node>>>,
) -> Change<String, Node> {
    match timeout(SOON, watch.next()).await {
        Ok(Some(Ok(change))) => change,
        other => panic!("expected a change, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_process_key_is_gone_when_its_lease_expires() {
    let cluster = EtcdCluster::start(1);
    let name = unique_name("lease");
    let endpoints = cluster.endpoints();
    let mut vessel = Process::start(
        "vessel-service",
        &[],
        &[
            ("MICRO_REGISTRY", "etcd"),
            ("MICRO_REGISTRY_ADDRESS", &endpoints),
            ("MICRO_SERVER_NAME", &name),
            ("MICRO_REGISTER_TTL", "3"),
            ("MICRO_REGISTER_INTERVAL", "1"),
        ],
    );
    let etcd = registry(&endpoints).await;
    let nodes = poll_until(format!("{name} registered"), SOON, async || etcd.lookup(&name).await.ok()).await;
    let key = etcd_key(&name, &nodes[0].id);
    let lease = etcdctl(&endpoints, &["get", &key, "-w", "json"]);
    assert!(lease.contains("\"lease\""), "the key is held by a lease: {lease}");
    // Heartbeats keep it past its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(etcd.lookup(&name).await.expect("still registered").len(), 1);

    let mut watch = etcd.watch(&name);
    assert!(matches!(next_change(&mut watch).await, Change::Insert(..)));
    vessel.signal("KILL");
    vessel.wait(SOON).await;
    let killed = Instant::now();
    match next_change(&mut watch).await {
        Change::Remove(id) => assert_eq!(id, nodes[0].id),
        other => panic!("expected the Remove, got {other:?}"),
    }
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= Duration::from_millis(500) && gone_after <= Duration::from_secs(5),
        "the key went {gone_after:?} after SIGKILL; its lease (TTL 3 s, renewed every 1 s) should take 2 to 3 s"
    );
    assert_eq!(etcdctl(&endpoints, &["get", &key]).trim(), "", "nothing left under {key}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_misses_no_change_made_while_it_starts() {
    let cluster = EtcdCluster::start(1);
    let etcd = registry(&cluster.endpoints()).await;
    let name = unique_name("revision");
    let first = node(&name, 40000);
    etcd.register(&first, Duration::from_secs(30)).await.expect("register");

    // Register 40 more while the watch reads and then opens its etcd watch.
    let writer = {
        let etcd = etcd.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 1..=40 {
                let node = node(&name, 40000 + i);
                etcd.register(&node, Duration::from_secs(30)).await.expect("register");
                ids.push(node.id);
            }
            ids
        })
    };
    let mut watch = etcd.watch(&name);
    let mut seen = BTreeSet::new();
    while seen.len() < 41 {
        match next_change(&mut watch).await {
            Change::Insert(id, _) => {
                seen.insert(id);
            }
            Change::Remove(id) => panic!("nothing was removed, yet {id} was"),
        }
    }
    let mut want: BTreeSet<String> = writer.await.expect("writer").into_iter().collect();
    want.insert(first.id.clone());
    assert_eq!(seen, want);
    // And later changes still arrive, in order.
    etcd.deregister(&first).await.expect("deregister");
    assert!(matches!(next_change(&mut watch).await, Change::Remove(id) if id == first.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_leader_of_three_stops_no_registration_heartbeat_or_watch() {
    let mut cluster = EtcdCluster::start(3);
    let etcd = registry(&cluster.endpoints()).await;
    // The member to die is the leader, the case where the others must elect a new one.
    let leader = cluster.leader();
    // A second view that only ever talks to a member that stays up.
    let observer = registry(&cluster.endpoint((leader + 1) % 3)).await;
    let name = unique_name("failover");
    let ttl = Duration::from_secs(3);
    let a = node(&name, 40100);
    etcd.register(&a, ttl).await.expect("register a");
    let mut watch = etcd.watch(&name);
    assert!(matches!(next_change(&mut watch).await, Change::Insert(id, _) if id == a.id));

    cluster.kill(leader);
    // Heartbeats for twice the TTL, through the election: none fails (a heartbeat waits for
    // the new leader) and the lease never lapses.
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        etcd.register(&a, ttl).await.expect("heartbeat with the leader dead");
        assert_eq!(observer.lookup(&name).await.expect("a still registered").len(), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b = node(&name, 40101);
    etcd.register(&b, ttl).await.expect("register b with the leader dead");
    assert!(
        matches!(next_change(&mut watch).await, Change::Insert(id, _) if id == b.id),
        "the watch goes on"
    );
    etcd.deregister(&a).await.expect("deregister a");
    assert!(matches!(next_change(&mut watch).await, Change::Remove(id) if id == a.id));
}

/// go-micro's `registry.Service`, as its Go struct decodes JSON: nothing more is allowed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GoService {
    name: String,
    version: String,
    metadata: Option<BTreeMap<String, String>>,
    endpoints: Option<Vec<serde_json::Value>>,
    nodes: Vec<GoNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoNode {
    id: String,
    address: String,
    metadata: Option<BTreeMap<String, String>>,
}

#[tokio::test(flavor = "multi_thread")]
async fn go_micro_json_is_found_and_called_and_the_sdk_writes_go_micros_shape() {
    let cluster = EtcdCluster::start(1);
    let endpoints = cluster.endpoints();
    let name = unique_name("gomicro");
    // An instance the test runs, registered nowhere by itself (memory registry).
    let address = format!("127.0.0.1:{}", e2e::free_port());
    let _vessel = Process::start(
        "vessel-service",
        &[],
        &[("MICRO_REGISTRY", "memory"), ("MICRO_SERVER_ADDRESS", &address), ("MICRO_SERVER_NAME", &name)],
    );
    // Written by hand, as go-micro v2+'s etcd registry writes it, with a lease.
    let id = format!("{name}-5c1e0f62-6c5b-4b8e-9d2c-1f0e3a7b9c11");
    let value = format!(
        r#"{{"name":"{name}","version":"2.3.0","metadata":null,"endpoints":[{{"name":"VesselService.FindAvailable","request":{{"name":"Specification","type":"Specification","values":null}},"response":null,"metadata":{{}}}}],"nodes":[{{"id":"{id}","address":"{address}","metadata":{{"broker":"http","protocol":"grpc","registry":"etcd","server":"grpc","transport":"grpc","zone":"eu-2"}}}}]}}"#
    );
    let lease = etcdctl(&endpoints, &["lease", "grant", "60"]);
    let lease = lease.split_whitespace().nth(1).expect("lease id");
    let key = format!("/micro/registry/{name}/{id}");
    etcdctl(&endpoints, &["put", "--lease", lease, &key, &value]);
    // A value that is not go-micro's JSON, under the same prefix: skipped, with one warning.
    etcdctl(&endpoints, &["put", &format!("/micro/registry/{name}/garbage"), "{not json"]);

    let etcd = registry(&endpoints).await;
    let found = etcd.lookup(&name).await.expect("the go-micro instance is found");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].id, id);
    assert_eq!(found[0].address.to_string(), address);
    assert_eq!(found[0].version, "2.3.0");
    assert_eq!(found[0].metadata.get("zone").map(String::as_str), Some("eu-2"));
    assert!(!found[0].draining);
    assert!(etcd.list_services().await.expect("list").contains(&name));

    let client = Client::new(etcd.clone());
    let mut vessels = VesselServiceClient::new(client.channel(&name));
    let reply = poll_until(format!("a call to {name} through etcd"), Duration::from_secs(15), async || {
        vessels.find_available(Specification { capacity: 1, max_weight: 10 }).await.ok()
    })
    .await;
    assert!(reply.into_inner().vessel.is_some());

    // What the SDK writes parses as go-micro's registry.Service.
    let mut ours = node(&name, 40200);
    ours.metadata.insert("health".into(), "grpc".into());
    ours.draining = true;
    etcd.register(&ours, Duration::from_secs(30)).await.expect("register");
    let written = etcdctl(&endpoints, &["get", "--print-value-only", &etcd_key(&name, &ours.id)]);
    let service: GoService = serde_json::from_str(written.trim()).expect("go-micro's shape");
    assert_eq!((service.name.as_str(), service.version.as_str()), (name.as_str(), "1.0.0"));
    assert_eq!(service.nodes.len(), 1);
    assert_eq!(service.nodes[0].id, ours.id);
    assert_eq!(service.nodes[0].address, "127.0.0.1:40200");
    let labels = service.nodes[0].metadata.clone().unwrap_or_default();
    assert_eq!(labels.get("zone").map(String::as_str), Some("eu-1"));
    assert_eq!(labels.get("health").map(String::as_str), Some("grpc"));
    assert_eq!(labels.get("draining").map(String::as_str), Some("1"));

    // The garbage key never took the watch down: a change after it still arrives.
    let mut watch = etcd.watch(&name);
    let mut inserted = BTreeSet::new();
    while inserted.len() < 2 {
        if let Change::Insert(id, _) = next_change(&mut watch).await {
            inserted.insert(id);
        }
    }
    etcdctl(&endpoints, &["put", &format!("/micro/registry/{name}/garbage"), "still not json"]);
    etcdctl(&endpoints, &["del", &key]);
    assert!(matches!(next_change(&mut watch).await, Change::Remove(removed) if removed == id));
}
