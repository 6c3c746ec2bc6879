//! The Consul backend against a real `consul agent -dev`: what lands in Consul, TTL expiry,
//! an agent restart, an agent that is not there, retrying at start, and ACL tokens.
//!
//! Run with `scripts/install-consul && scripts/netns-run cargo test -p micro-core`.

use std::{
    net::TcpListener,
    sync::Arc,
    time::{Duration, Instant},
};

use e2e::{
    calls::poll_until,
    consul::ConsulAgent,
    discovery::{wait_for, wait_for_exactly},
};
use futures::StreamExt;
use micro_core::{
    Error, Node, Registry,
    config::{RegistryConfig, RegistryKind},
    registry::{Change, ConsulRegistry},
};
use serde_json::Value;
use tokio::time::timeout;

const SOON: Duration = Duration::from_secs(10);

fn consul(agent: &ConsulAgent) -> ConsulRegistry {
    ConsulRegistry::builder()
        .address(agent.http_address())
        .lookup_timeout(Duration::from_millis(300))
        .build()
        .expect("valid address")
}

fn node(name: &str, port: u16) -> Node {
    let mut node = Node::new(name, ([127, 0, 0, 1], port).into());
    node.version = "2.0.1".into();
    node.metadata.insert("zone".into(), "eu-1".into());
    node
}

/// GET `path` on the agent's HTTP API, as JSON.
async fn get(agent: &ConsulAgent, path: &str) -> Value {
    let url = format!("http://{}{path}", agent.http_address());
    let response = reqwest::get(&url).await.unwrap_or_else(|err| panic!("GET {url}: {err}"));
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.json().await.expect("JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_lands_in_consul_with_meta_and_a_passing_ttl_check() {
    let agent = ConsulAgent::start_async().await;
    let registry = consul(&agent);
    let name = e2e::unique_name("visible");
    let node = node(&name, 42001);
    registry.register(&node, Duration::from_secs(30)).await.unwrap();

    let entries = get(&agent, &format!("/v1/health/service/{name}?passing")).await;
    let entries = entries.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let service = &entries[0]["Service"];
    assert_eq!(service["ID"], node.id.as_str());
    assert_eq!(service["Service"], name.as_str());
    assert_eq!(service["Address"], "127.0.0.1");
    assert_eq!(service["Port"], 42001);
    assert_eq!(service["Meta"]["version"], "2.0.1");
    assert_eq!(service["Meta"]["zone"], "eu-1");
    assert!(service["Tags"].as_array().unwrap().contains(&Value::from("version=2.0.1")), "{service}");
    let check = entries[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == format!("service:{}", node.id).as_str())
        .unwrap_or_else(|| panic!("no TTL check in {}", entries[0]));
    assert_eq!((check["Status"].as_str(), check["Type"].as_str()), (Some("passing"), Some("ttl")));

    // The datacenter setting reaches Consul: the dev agent's own works, another does not.
    let in_dc = |dc: &str| {
        ConsulRegistry::builder().address(agent.http_address()).datacenter(Some(dc.into())).build().unwrap()
    };
    assert_eq!(in_dc("dc1").lookup(&name).await.unwrap(), vec![node.clone()]);
    let err = in_dc("nowhere").lookup(&name).await.unwrap_err().to_string();
    assert!(err.contains("consul") && err.contains("datacenter"), "{err}");

    registry.deregister(&node).await.unwrap();
    let left = get(&agent, &format!("/v1/health/service/{name}")).await;
    assert_eq!(left, Value::Array(vec![]), "deregistration removes it from the catalog at once");
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_without_heartbeats_leaves_the_passing_list_within_its_ttl() {
    let agent = ConsulAgent::start_async().await;
    let registry = consul(&agent);
    let name = e2e::unique_name("ttl");
    let ttl = Duration::from_secs(2);
    let (lapsing, kept) = (node(&name, 42011), node(&name, 42012));
    registry.register(&lapsing, ttl).await.unwrap();
    registry.register(&kept, ttl).await.unwrap();
    let registered = Instant::now();
    wait_for_exactly(&registry, &name, &[&lapsing.id, &kept.id]).await;

    let mut watch = registry.watch(&name);
    for _ in 0..2 {
        assert!(matches!(timeout(SOON, watch.next()).await, Ok(Some(Ok(Change::Insert(..))))));
    }
    // Only `kept` keeps its heartbeat; `lapsing` falls silent.
    let removed = loop {
        let waited = registered.elapsed();
        assert!(waited < ttl + Duration::from_secs(15), "the silent node is still there after {waited:?}");
        tokio::select! {
            change = timeout(SOON, watch.next()) => break change,
            _ = tokio::time::sleep(Duration::from_millis(500)) => registry.register(&kept, ttl).await.unwrap(),
        }
    };
    let elapsed = registered.elapsed();
    match removed {
        Ok(Some(Ok(Change::Remove(id)))) => assert_eq!(id, lapsing.id),
        other => panic!("expected the silent node's removal, got {other:?}"),
    }
    assert!(elapsed >= ttl - Duration::from_millis(100), "removed after {elapsed:?}, before the TTL");
    // A generous bound: it tells a lapsed node that is removed from one never removed.
    assert!(elapsed < ttl + Duration::from_secs(15), "removed only after {elapsed:?}");
    let ids: Vec<String> = registry.lookup(&name).await.unwrap().into_iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![kept.id.clone()]);

    // Consul keeps the silent one in its catalog as critical until it reaps it.
    let all = get(&agent, &format!("/v1/health/service/{name}")).await;
    let critical = all.as_array().unwrap().iter().find(|e| e["Service"]["ID"] == lapsing.id.as_str());
    let statuses: Vec<&str> = critical.expect("still in the catalog")["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["Status"].as_str())
        .collect();
    assert!(statuses.contains(&"critical"), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_after_an_agent_restart_registers_again() {
    let agent = ConsulAgent::start_async().await;
    let registry = consul(&agent);
    let name = e2e::unique_name("restart");
    let node = node(&name, 42021);
    let ttl = Duration::from_secs(10);
    registry.register(&node, ttl).await.unwrap();
    // Followed all along, as a client's background task does, so a query is in flight when
    // the agent stops.
    let (changes, mut watch) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = registry.watch(&name);
    let follower = tokio::spawn(async move {
        while let Some(change) = stream.next().await {
            if changes.send(change).is_err() {
                return;
            }
        }
    });
    assert!(matches!(timeout(SOON, watch.recv()).await, Ok(Some(Ok(Change::Insert(..))))));

    let agent = agent.restarted().await;
    // A dev agent forgets everything; the watch rides out the restart and reports the loss.
    match timeout(SOON, watch.recv()).await {
        Ok(Some(Ok(Change::Remove(id)))) => assert_eq!(id, node.id),
        other => panic!("expected a Remove after the restart, got {other:?}"),
    }
    assert!(matches!(registry.lookup(&name).await, Err(Error::NoInstance { .. })));

    registry.register(&node, ttl).await.expect("the heartbeat registers again");
    assert_eq!(registry.lookup(&name).await.unwrap(), vec![node.clone()]);
    match timeout(SOON, watch.recv()).await {
        Ok(Some(Ok(Change::Insert(id, _)))) => assert_eq!(id, node.id),
        other => panic!("expected the Insert after re-registration, got {other:?}"),
    }
    follower.abort();
    let entries = get(&agent, &format!("/v1/health/service/{name}?passing")).await;
    assert_eq!(entries.as_array().map(Vec::len), Some(1));
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn missing_agent_is_a_fast_error_naming_consul_and_the_address() {
    let address = format!("127.0.0.1:{}", closed_port());
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(address.clone()),
        ..RegistryConfig::default()
    };
    let started = Instant::now();
    let err = match config.connect().await {
        Ok(_) => panic!("nothing listens at {address}"),
        Err(err) => err,
    };
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let text = err.to_string();
    for part in ["consul", address.as_str(), "MICRO_REGISTRY_ADDRESS"] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }

    let registry = ConsulRegistry::builder().address(&address).build().unwrap();
    let started = Instant::now();
    let err = registry.register(&node("svc", 1), Duration::from_secs(5)).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(err.contains("consul") && err.contains(&address), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_retry_connect_waits_for_the_agent_to_come_up() {
    let agent = ConsulAgent::start_async().await;
    let address = agent.http_address();
    let agent = agent.stopped().await;
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(address),
        retry: true,
        ..RegistryConfig::default()
    };
    let connecting = tokio::spawn(async move { config.connect().await.map(|r| r.kind()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!connecting.is_finished(), "connect gave up although retry is set");

    let _agent = agent.restarted().await;
    let connected = timeout(Duration::from_secs(15), connecting).await;
    assert!(matches!(connected, Ok(Ok(Ok(RegistryKind::Consul)))), "{connected:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_runs_its_native_grpc_check_against_the_health_service() {
    // The server serves only what the builder always adds: health and reflection.
    let agent = ConsulAgent::start_async().await;
    let registry = Arc::new(consul(&agent));
    let name = e2e::unique_name("checked");
    let config = micro_core::config::ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        ..micro_core::config::ServerConfig::default()
    };
    let server = micro_core::Server::builder(&name).config(config).registry(registry).start().await.unwrap();

    // The agent's own view: the catalog gets output-only changes every few minutes.
    let grpc_check = poll_until("Consul's gRPC check succeeding", Duration::from_secs(15), async || {
        let checks = get(&agent, "/v1/agent/checks").await;
        let ours: Vec<Value> = checks
            .as_object()
            .unwrap()
            .values()
            .filter(|c| c["ServiceName"] == name.as_str())
            .cloned()
            .collect();
        assert_eq!(ours.len(), 2, "a TTL check and a gRPC check: {ours:?}");
        let grpc = ours.iter().find(|c| c["Type"] == "grpc").cloned();
        grpc.filter(|c| c["Output"].as_str().is_some_and(|o| o.contains("success")))
    })
    .await;
    assert_eq!(grpc_check["Status"], "passing", "{grpc_check}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_acls_the_token_is_sent_and_a_missing_one_is_named_in_the_error() {
    const TOKEN: &str = "3f1c0c1e-micro-test-management";
    let agent = ConsulAgent::start_with_acls_async(TOKEN).await;
    let builder =
        || ConsulRegistry::builder().address(agent.http_address()).lookup_timeout(Duration::from_millis(300));

    let anonymous = builder().build().expect("valid address");
    let refused = anonymous.register(&node("acl-svc", 4101), Duration::from_secs(30)).await.unwrap_err();
    let message = refused.to_string();
    for expected in ["consul", &agent.http_address(), "CONSUL_HTTP_TOKEN"] {
        assert!(message.contains(expected), "{message:?} should name {expected:?}");
    }

    let trusted: Arc<dyn Registry> =
        Arc::new(builder().token(Some(TOKEN.into())).build().expect("valid address"));
    trusted
        .register(&node("acl-svc", 4102), Duration::from_secs(30))
        .await
        .expect("registered with the token");
    wait_for(&trusted, "acl-svc", 1).await;
    let found = trusted.lookup("acl-svc").await.expect("lookup with the token");
    assert_eq!(found[0].address.port(), 4102);
    assert!(
        anonymous.lookup("acl-svc").await.map_or(true, |nodes| nodes.is_empty()),
        "without a token the deny policy hides the instance"
    );
}

/// As a process that unsubscribes and then exits: the runtime is gone right after
/// `unsubscribe()` returns, so nothing left to a background task gets done.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_broker_subscriber_is_out_of_consul_once_unsubscribe_returns() {
    use micro_core::{
        Client,
        broker::{Broker, RegistryBroker, SubscribeOptions, handler, topic_service_name},
        config::ServerConfig,
    };
    let agent = ConsulAgent::start_async().await;
    let topic = e2e::unique_name("topic");
    let catalog = format!("/v1/catalog/service/{}", topic_service_name(&topic));
    let (registered_tx, registered) = tokio::sync::oneshot::channel();
    let (check_done_tx, check_done) = tokio::sync::oneshot::channel::<()>();
    let process = {
        let (address, topic) = (agent.http_address(), topic.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let registry: Arc<dyn Registry> =
                    Arc::new(ConsulRegistry::builder().address(address).build().expect("valid address"));
                let server = ServerConfig {
                    address: "127.0.0.1:0".parse().unwrap(),
                    drain_delay: Duration::ZERO,
                    ..ServerConfig::default()
                };
                let broker = RegistryBroker::new(Client::new(registry)).server_config(server);
                let subscription = broker
                    .subscribe(&topic, SubscribeOptions::default(), handler(|_m| async { Ok(()) }))
                    .await
                    .expect("subscribe");
                registered_tx.send(()).unwrap();
                // The test checks the registration before it goes.
                let _ = check_done.await;
                subscription.unsubscribe().await;
            });
            drop(runtime);
        })
    };
    registered.await.expect("subscribed");
    let entries = get(&agent, &catalog).await;
    assert_eq!(entries.as_array().map(Vec::len), Some(1), "registered while subscribed: {entries}");
    check_done_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || process.join()).await.unwrap().expect("the process thread");
    let entries = get(&agent, &catalog).await;
    assert_eq!(entries, Value::Array(vec![]), "deregistered by the time unsubscribe returned");
}
