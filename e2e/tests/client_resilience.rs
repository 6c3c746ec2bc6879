//! The client under failure, with real processes over real mDNS in the private namespace:
//! failover under load, even spread and filters, deadlines, no resend of non-idempotent
//! calls, rolling restarts; and, over a real Consul agent, a registry that goes away.

use std::{path::Path, sync::Arc, time::Duration};

use e2e::{
    calls::CallStream,
    consul::ConsulAgent,
    discovery::{mdns, wait_for, wait_pickable},
    process::Process,
    require_private_netns,
    shippy::{find_vessel, fleet_file},
    unique_name,
};
use micro_core::{
    Client, Error, NamedChannel, Registry,
    config::{ClientConfig, Hedge},
    registry::ConsulRegistry,
    selector::{Filter, StrategyKind},
};
use proto::{
    consignment::{Consignment, Container, GetRequest, shipping_service_client::ShippingServiceClient},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use tokio::time::Instant;
use tonic::Code;

fn vessel(name: &str, fleet: &Path, extra_env: &[(&str, &str)]) -> Process {
    let fleet = fleet.display().to_string();
    let mut env = vec![("MICRO_SERVER_NAME", name)];
    env.extend_from_slice(extra_env);
    Process::start("vessel-service", &["--fleet", &fleet], &env)
}

fn fault_server(name: &str, label: &str, faults: &[(&str, &str)]) -> Process {
    let mut env = vec![("FAULT_NAME", name), ("FAULT_LABEL", label)];
    env.extend_from_slice(faults);
    Process::start("fault-server", &[], &env)
}

fn client(registry: Arc<dyn Registry>) -> Client {
    Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS)
}

/// `workers` callers of FindAvailable, each pausing `pace` between calls, up to `total`.
fn call_stream(channel: NamedChannel, workers: usize, pace: Duration, total: usize) -> CallStream {
    let vessels = VesselServiceClient::new(channel);
    CallStream::start(workers, pace, total, move || {
        let mut vessels = vessels.clone();
        async move { find_vessel(&mut vessels).await }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_instance_fails_no_call_and_a_new_one_is_used_within_2s() {
    let registry = mdns();
    let (name, dir) = (unique_name("vessel"), tempfile::tempdir().unwrap());
    let doomed = vessel(&name, &fleet_file(dir.path(), "v1"), &[]);
    let _v2 = vessel(&name, &fleet_file(dir.path(), "v2"), &[]);
    let _v3 = vessel(&name, &fleet_file(dir.path(), "v3"), &[]);
    wait_for(&registry, &name, 3).await;
    let channel = client(registry).channel(&name);
    wait_pickable(&channel, 3).await;

    let stream = call_stream(channel, 4, Duration::from_millis(8), 2_000);
    stream.until_done(500).await;
    doomed.signal("KILL");
    stream.until_done(800).await;
    let _v4 = vessel(&name, &fleet_file(dir.path(), "v4"), &[]);
    let v4_started = Instant::now();
    let tally = stream.join().await;

    tally.assert_no_failures();
    let served = &tally.served;
    assert_eq!(served.len(), 2_000);
    let first_v4 = served.iter().find(|(label, _)| label == "v4").map(|(_, at)| *at - v4_started);
    assert!(
        first_v4.is_some_and(|delay| delay <= Duration::from_secs(2)),
        "first call to v4 after {first_v4:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_even_and_the_version_filter_is_strict() {
    let registry = mdns();
    let (name, dir) = (unique_name("vessel"), tempfile::tempdir().unwrap());
    let v1 = [("MICRO_SERVER_VERSION", "1")];
    let _a = vessel(&name, &fleet_file(dir.path(), "a"), &v1);
    let _b = vessel(&name, &fleet_file(dir.path(), "b"), &v1);
    let _c = vessel(&name, &fleet_file(dir.path(), "c"), &v1);
    let _z = vessel(&name, &fleet_file(dir.path(), "z"), &[("MICRO_SERVER_VERSION", "2")]);
    wait_for(&registry, &name, 4).await;
    // No hedges: on a busy machine one would send a call on to the next instance.
    let round_robin =
        ClientConfig { strategy: StrategyKind::RoundRobin, hedge: Hedge::Off, ..ClientConfig::default() };
    let channel = client(registry).config(round_robin).channel_with(&name, Filter::new().version("1"));
    wait_pickable(&channel, 3).await;
    assert_eq!(channel.instances().len(), 4);

    let tally = call_stream(channel, 6, Duration::ZERO, 3_000).join().await;
    tally.assert_no_failures();
    let counts = tally.counts();
    assert_eq!(counts.get("z"), None, "version 2 got calls: {counts:?}");
    for label in ["a", "b", "c"] {
        let count = counts.get(label).copied().unwrap_or(0);
        assert!((900..=1_100).contains(&count), "{label} got {count} of 3000: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_slow_server_ends_at_its_deadline() {
    let registry = mdns();
    let name = unique_name("slow");
    let _slow = fault_server(&name, "slow", &[("FAULT_DELAY_MS", "5000")]);
    wait_for(&registry, &name, 1).await;
    let channel = client(registry).channel(&name);
    wait_pickable(&channel, 1).await;
    let mut vessels = VesselServiceClient::new(channel);

    let mut request = tonic::Request::new(Specification { capacity: 1, max_weight: 1 });
    request.set_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let status = vessels.find_available(request).await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(480) && elapsed < Duration::from_millis(900),
        "ended after {elapsed:?}"
    );
}

fn consignment() -> Consignment {
    Consignment {
        description: "one crate".into(),
        weight: 10,
        containers: vec![Container {
            customer_id: "c1".into(),
            origin: "Derby".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn created_on(registry: &Arc<dyn Registry>, name: &str) -> usize {
    let channel = client(registry.clone()).channel(name);
    let reply = ShippingServiceClient::new(channel).get_consignments(GetRequest {}).await.unwrap();
    reply.into_inner().consignments.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_idempotent_call_that_reached_a_dying_server_is_not_sent_again() {
    let registry = mdns();
    let name = unique_name("shipping");
    let mut dying = fault_server(&name, "dying", &[("FAULT_EXIT_ON_CALL", "1")]);
    let _healthy = fault_server(&name, "healthy", &[]);
    let nodes = wait_for(&registry, &name, 2).await;
    // Round robin: of the two calls, one reaches each instance (the default balancer may
    // send both to the same one).
    let round_robin = ClientConfig { strategy: StrategyKind::RoundRobin, ..ClientConfig::default() };
    let channel = client(registry.clone()).config(round_robin).channel(&name);
    wait_pickable(&channel, 2).await;
    let mut shipping = ShippingServiceClient::new(channel);

    let (mut created, mut failure) = (0, None);
    for _ in 0..2 {
        match shipping.create_consignment(consignment()).await {
            Ok(_) => created += 1,
            Err(status) => failure = Some(status),
        }
    }
    let status = failure.expect("the call that reached the dying instance must fail");
    assert!(matches!(status.code(), Code::Unknown | Code::Unavailable), "{status:?}");
    assert!(status.message().contains("outcome unknown"), "{status:?}");
    assert!(
        !dying.wait(Duration::from_secs(5)).await.success(),
        "the dying instance should have exited on the call"
    );
    assert!(nodes.iter().any(|n| status.message().contains(&n.id)), "the instance must be named: {status:?}");
    assert_eq!(
        created_on(&registry, &name).await,
        created,
        "the failed call was resent to the healthy instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_idempotent_call_refused_before_sending_is_retried_elsewhere() {
    let registry = mdns();
    let name = unique_name("shipping");
    let mut gone = fault_server(&name, "gone", &[]);
    let _healthy = fault_server(&name, "healthy", &[]);
    wait_for(&registry, &name, 2).await;
    gone.signal("KILL"); // no goodbye: the registry still lists it
    gone.wait(Duration::from_secs(5)).await;
    let channel = client(registry.clone()).channel(&name);
    wait_pickable(&channel, 2).await;
    let mut shipping = ShippingServiceClient::new(channel);
    for _ in 0..4 {
        shipping.create_consignment(consignment()).await.expect("refused before sending, so retried");
    }
    assert_eq!(created_on(&registry, &name).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_instance_fails_no_call() {
    let registry = mdns();
    let (name, dir) = (unique_name("vessel"), tempfile::tempdir().unwrap());
    let mut instances: Vec<Process> =
        (0..3).map(|i| vessel(&name, &fleet_file(dir.path(), &format!("old{i}")), &[])).collect();
    wait_for(&registry, &name, 3).await;
    let channel = client(registry).channel(&name);
    wait_pickable(&channel, 3).await;

    let stream = call_stream(channel.clone(), 4, Duration::from_millis(5), usize::MAX);
    for (i, instance) in instances.iter_mut().enumerate() {
        let mut old =
            std::mem::replace(instance, vessel(&name, &fleet_file(dir.path(), &format!("new{i}")), &[]));
        assert!(old.terminate(Duration::from_secs(15)).await.success(), "{}", old.log());
        wait_pickable(&channel, 3).await;
    }
    let settled = stream.done() + 40;
    stream.until_done(settled).await;
    let tally = stream.finish().await;
    tally.assert_no_failures();
    let served = &tally.served;
    assert!(served.iter().any(|(label, _)| label.starts_with("new")), "no call reached a new instance");
    assert!(served.len() > 100, "only {} calls made", served.len());
}

/// The registry goes away and every look-up fails, while the instance still serves: the
/// client keeps the instances it knows (its keep-on-error path) and calls go on.
///
/// This runs on Consul, not mDNS. A SIGKILLed mDNS responder sends no goodbye, so every
/// mDNS cache, the client's own included, keeps its records for their 120 s TTL: the
/// client's look-ups kept answering with the instance and its keep-on-error path was never
/// taken. A stopped Consul agent makes each look-up fail with a registry error, so the
/// client's refresh (every second here) meets that error on every tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_keep_succeeding_from_the_cache_while_the_registry_is_gone() {
    require_private_netns();
    let agent = ConsulAgent::start_async().await;
    let (name, dir) = (unique_name("vessel"), tempfile::tempdir().unwrap());
    let address = agent.http_address();
    let consul = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", address.as_str())];
    let _server = vessel(&name, &fleet_file(dir.path(), "cached"), &consul);
    let registry: Arc<dyn Registry> = Arc::new(
        ConsulRegistry::builder()
            .address(&address)
            .lookup_timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
    );
    wait_for(&registry, &name, 1).await;
    let refresh = Duration::from_secs(1);
    let config = ClientConfig { refresh_interval: refresh, ..ClientConfig::default() };
    let channel = client(registry.clone()).config(config).channel(&name);
    wait_pickable(&channel, 1).await;
    let stream = call_stream(channel.clone(), 1, Duration::from_millis(50), usize::MAX);
    stream.until_done(5).await;

    let agent = agent.stopped().await;
    let before = stream.served();
    // Four refreshes, each a look-up that fails (not one that finds nothing).
    tokio::time::sleep(4 * refresh).await;
    match registry.lookup(&name).await {
        Err(Error::Registry { .. }) => {}
        other => panic!("the registry should fail while the agent is down, got {other:?}"),
    }
    assert_eq!(channel.instances().len(), 1, "the channel dropped its instance on a registry error");
    let during_outage = stream.served() - before;
    let tally = stream.finish().await;
    tally.assert_no_failures();
    assert!(tally.served.iter().all(|(label, _)| label == "cached"));
    assert!(during_outage > 20, "only {during_outage} calls while the registry was gone");
    drop(agent);
}
