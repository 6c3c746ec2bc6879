//! The shippy binaries over a real Consul agent (`consul agent -dev`, one per test, on
//! loopback ports of its own), inside the private network namespace `make test` runs in:
//! the flow end to end, what Consul itself shows, SIGTERM and SIGKILL, two instances, an
//! agent restart under load, and an agent that is not there.
//!
//! The agent comes from `scripts/install-consul`; services get `MICRO_REGISTER_TTL=2` and
//! `MICRO_REGISTER_INTERVAL=1` so expiry is observable in seconds.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Duration};

use e2e::{
    calls::{CallStream, poll_until},
    consul::ConsulAgent,
    discovery::{wait_for, wait_pickable},
    process::{Process, binary},
    require_private_netns,
    shippy::{self, CliRun, find_vessel, fleet_file, sample_consignment},
    unique_name,
};
use micro_core::{Client, NamedChannel, Registry, registry::ConsulRegistry};
use proto::vessel::vessel_service_client::VesselServiceClient;
use serde_json::Value;
use tokio::time::Instant;

/// TTL and heartbeat interval (seconds) every service in these tests gets.
const TTL: &str = "2";
const INTERVAL: &str = "1";
/// Bound on anything that should happen "soon" (a start, a registration).
const SOON: Duration = Duration::from_secs(10);

/// A dev agent on free loopback ports; only inside the private namespace.
async fn agent() -> ConsulAgent {
    require_private_netns();
    ConsulAgent::start_async().await
}

/// Environment that points a binary at the Consul agent at `address`, with a short TTL.
fn consul_env(address: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MICRO_REGISTRY", "consul".into()),
        ("MICRO_REGISTRY_ADDRESS", address.into()),
        ("MICRO_REGISTER_TTL", TTL.into()),
        ("MICRO_REGISTER_INTERVAL", INTERVAL.into()),
    ]
}

/// Starts `binary` registered as `name` on the Consul agent at `address`, with `extra`
/// environment (later entries win) and `args`.
fn service(binary: &str, address: &str, name: &str, args: &[&str], extra: &[(&str, &str)]) -> Process {
    let mut env = consul_env(address);
    env.push(("MICRO_SERVER_NAME", name.into()));
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Process::start(binary, args, &env)
}

/// vessel-service as `name`, with the fleet in `fleet` (default: the built-in one).
fn vessel(agent: &ConsulAgent, name: &str, fleet: Option<&PathBuf>, extra: &[(&str, &str)]) -> Process {
    let fleet = fleet.map(|p| p.display().to_string());
    let args: Vec<&str> = fleet.as_deref().map(|f| vec!["--fleet", f]).unwrap_or_default();
    service("vessel-service", &agent.http_address(), name, &args, extra)
}

/// consignment-service as `name`, finding vessels under `vessel_name`, storing in memory.
fn consignment(agent: &ConsulAgent, name: &str, vessel_name: &str) -> Process {
    let extra = [("VESSEL_SERVICE", vessel_name), ("CONSIGNMENT_DB", ":memory:")];
    service("consignment-service", &agent.http_address(), name, &[], &extra)
}

/// The test process's own view of the agent, through micro-core.
fn registry(agent: &ConsulAgent) -> Arc<dyn Registry> {
    let consul = ConsulRegistry::builder()
        .address(agent.http_address())
        .lookup_timeout(Duration::from_millis(500))
        .build()
        .expect("a valid address");
    Arc::new(consul)
}

fn client(registry: Arc<dyn Registry>) -> Client {
    Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS)
}

/// GET `path` on the agent's HTTP API as JSON; `None` while the agent does not answer.
async fn consul_get(address: &str, path: &str) -> Option<Value> {
    let url = format!("http://{address}{path}");
    let response = reqwest::get(&url).await.ok()?;
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.json().await.ok()
}

/// Consul's own list of passing instances of `name` (`/v1/health/service/<name>?passing`).
async fn passing(address: &str, name: &str) -> Option<Vec<Value>> {
    let entries = consul_get(address, &format!("/v1/health/service/{name}?passing")).await?;
    Some(entries.as_array().expect("a list").clone())
}

/// The service ids in Consul's passing list of `name`; empty while the agent does not answer.
async fn passing_ids(address: &str, name: &str) -> BTreeSet<String> {
    let entries = passing(address, name).await.unwrap_or_default();
    entries.iter().map(|e| e["Service"]["ID"].as_str().expect("an ID").to_owned()).collect()
}

/// Polls Consul until `done` holds for the passing ids of `name`.
async fn until_passing(address: &str, name: &str, limit: Duration, done: impl Fn(&BTreeSet<String>) -> bool) {
    let what = format!("{name} passing in Consul as wanted");
    poll_until(what, limit, async || done(&passing_ids(address, name).await).then_some(())).await
}

/// Polls `check` until it holds, and returns how long that took; panics with `what` after
/// `limit`.
async fn until(what: &str, limit: Duration, check: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    poll_until(what, limit, async || check().then_some(())).await;
    started.elapsed()
}

/// A paced stream of FindAvailable calls (idempotent) from one task, until finished.
fn call_stream(channel: NamedChannel, pace: Duration) -> CallStream {
    let vessels = VesselServiceClient::new(channel);
    CallStream::start(1, pace, usize::MAX, move || {
        let mut vessels = vessels.clone();
        async move { find_vessel(&mut vessels).await }
    })
}

/// Stops the stream and returns who answered when; panics if any call failed.
async fn finish(stream: CallStream) -> Vec<(String, Instant)> {
    let tally = stream.finish().await;
    tally.assert_no_failures();
    tally.served
}

async fn run_cli(address: &str, consignment_name: &str) -> CliRun {
    let env = consul_env(address);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    shippy::run_cli(consignment_name, &sample_consignment(), &[], &env).await
}

#[tokio::test(flavor = "multi_thread")]
async fn shippy_flow_over_consul_and_consul_shows_the_instance_with_its_metadata() {
    let agent = agent().await;
    let address = agent.http_address();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let _vessel = vessel(&agent, &vessel_name, None, &[("MICRO_SERVER_METADATA", "zone=test,rack=r7")]);
    let _consignment = consignment(&agent, &consignment_name, &vessel_name);
    let registry = registry(&agent);
    let node = wait_for(&registry, &vessel_name, 1).await.remove(0);
    wait_for(&registry, &consignment_name, 1).await;

    let run = run_cli(&address, &consignment_name).await;
    assert!(run.success, "CLI failed: {}", run.stderr);
    assert!(run.stdout.contains("on vessel vessel001"), "{}", run.stdout);

    let entries = passing(&address, &vessel_name).await.expect("the agent answers");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let service = &entries[0]["Service"];
    assert_eq!(service["ID"], node.id.as_str());
    assert_eq!(service["Service"], vessel_name.as_str());
    assert_eq!(service["Address"], "127.0.0.1");
    assert_eq!(service["Port"], node.address.port());
    assert_eq!(service["Meta"]["zone"], "test", "{service}");
    assert_eq!(service["Meta"]["rack"], "r7", "{service}");
    assert_eq!(service["Meta"]["version"], env!("CARGO_PKG_VERSION"), "{service}");
    let checks = entries[0]["Checks"].as_array().expect("checks");
    let ttl_check = checks.iter().find(|c| c["CheckID"] == format!("service:{}", node.id).as_str());
    assert!(ttl_check.is_some_and(|c| c["Status"] == "passing"), "no passing TTL check: {checks:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_deregisters_from_consul_at_once() {
    let agent = agent().await;
    let address = agent.http_address();
    let name = unique_name("vessel");
    let mut vessel = vessel(&agent, &name, None, &[]);
    let node = wait_for(&registry(&agent), &name, 1).await.remove(0);

    let stopped_at = Instant::now();
    vessel.signal("TERM");
    // While it drains, Consul's gRPC check may already see NOT_SERVING and take it off the
    // passing list; what must follow within 2 s is its removal from the catalog.
    let catalog_path = format!("/v1/catalog/service/{name}");
    let deadline = stopped_at + Duration::from_secs(2);
    loop {
        let catalog = consul_get(&address, &catalog_path).await.expect("answers");
        if catalog == Value::Array(vec![]) {
            break;
        }
        assert!(Instant::now() < deadline, "deregistered, not merely critical, within 2 s: {catalog}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let gone_after = stopped_at.elapsed();
    assert!(passing_ids(&address, &name).await.is_empty(), "out of the catalog, so not passing");
    let status = vessel.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "clean exit expected:\n{}", vessel.log());
    assert!(vessel.log().contains("deregistered"), "{}", vessel.log());
    eprintln!("{} left Consul {gone_after:?} after SIGTERM", node.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_turns_the_check_critical_within_the_ttl_and_clients_stop_calling_it() {
    let agent = agent().await;
    let address = agent.http_address();
    let (name, dir) = (unique_name("vessel"), tempfile::tempdir().unwrap());
    let doomed = vessel(
        &agent,
        &name,
        Some(&fleet_file(dir.path(), "doomed")),
        &[("MICRO_SERVER_METADATA", "label=doomed")],
    );
    let _survivor = vessel(&agent, &name, Some(&fleet_file(dir.path(), "survivor")), &[]);
    let registry = registry(&agent);
    let nodes = wait_for(&registry, &name, 2).await;
    let doomed_id =
        nodes.iter().find(|n| n.metadata.get("label").is_some_and(|l| l == "doomed")).unwrap().id.clone();
    let channel = client(registry).channel(&name);
    wait_pickable(&channel, 2).await;
    let stream = call_stream(channel.clone(), Duration::from_millis(20));
    until("calls to both", SOON, || stream.served() >= 10).await;

    let killed_at = Instant::now();
    doomed.signal("KILL");
    let ttl = Duration::from_secs(TTL.parse().unwrap());
    let check_path = format!("/v1/health/checks/{name}");
    let critical_after = loop {
        let checks = consul_get(&address, &check_path).await.expect("the agent answers");
        let status = checks
            .as_array()
            .expect("a list")
            .iter()
            .find(|c| c["ServiceID"] == doomed_id.as_str())
            .map(|c| c["Status"].clone());
        if status.as_ref().is_some_and(|s| s == "critical") {
            break killed_at.elapsed();
        }
        assert!(status.is_some(), "the check vanished before turning critical: {checks}");
        assert!(
            killed_at.elapsed() < ttl + Duration::from_secs(2),
            "check still {status:?} {:?} after SIGKILL",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(critical_after <= ttl + Duration::from_millis(1500), "critical only after {critical_after:?}");
    assert!(!passing_ids(&address, &name).await.contains(&doomed_id), "a critical instance is still passing");

    // The channel's watch (a blocking query) drops it; calls meanwhile went to the survivor.
    until("the channel forgets the killed instance", Duration::from_secs(2), || {
        channel.instances().iter().all(|n| n.id != doomed_id)
    })
    .await;
    assert!(channel.pickable().iter().all(|n| n.id != doomed_id));
    let removed_at = Instant::now();
    until("more calls", SOON, || stream.served() >= 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = finish(stream).await;
    assert!(
        served.iter().any(|(label, at)| label == "doomed" && *at < killed_at),
        "the doomed instance never served"
    );
    let late: Vec<&String> =
        served.iter().filter(|(_, at)| *at > removed_at).map(|(label, _)| label).collect();
    assert!(!late.is_empty() && late.iter().all(|l| *l == "survivor"), "after removal: {late:?}");
    eprintln!("check critical {critical_after:?} after SIGKILL (TTL {ttl:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_both_serve_and_a_stopped_one_leaves_the_client_within_1s() {
    let agent = agent().await;
    let address = agent.http_address();
    let (name, dir) = (unique_name("vessel"), tempfile::tempdir().unwrap());
    let _a =
        vessel(&agent, &name, Some(&fleet_file(dir.path(), "a")), &[("MICRO_SERVER_METADATA", "label=a")]);
    let mut b =
        vessel(&agent, &name, Some(&fleet_file(dir.path(), "b")), &[("MICRO_SERVER_METADATA", "label=b")]);
    let registry = registry(&agent);
    let nodes = wait_for(&registry, &name, 2).await;
    until_passing(&address, &name, SOON, |ids| ids.len() == 2).await;
    let b_id = nodes.iter().find(|n| n.metadata.get("label").is_some_and(|l| l == "b")).unwrap().id.clone();

    let channel = client(registry).channel(&name);
    wait_pickable(&channel, 2).await;
    let mut vessels = VesselServiceClient::new(channel.clone());
    let mut served_by = BTreeSet::new();
    for _ in 0..10 {
        served_by.insert(find_vessel(&mut vessels).await.unwrap());
    }
    assert_eq!(served_by, BTreeSet::from(["a".to_owned(), "b".to_owned()]));

    let stream = call_stream(channel.clone(), Duration::from_millis(10));
    until("calls before the stop", SOON, || stream.served() >= 20).await;
    let stopped_at = Instant::now();
    b.signal("TERM");
    let unpickable_after = until("b stops being picked", Duration::from_secs(1), || {
        channel.pickable().iter().all(|n| n.id != b_id)
    })
    .await;
    until_passing(&address, &name, Duration::from_secs(2), |ids| !ids.contains(&b_id)).await;
    let left_consul = Instant::now();
    let forgotten_after = until("the channel forgets b", Duration::from_secs(1), || {
        channel.instances().iter().all(|n| n.id != b_id)
    })
    .await;
    assert!(b.wait(Duration::from_secs(10)).await.success(), "{}", b.log());
    let count = stream.served();
    until("calls after the stop", SOON, || stream.served() >= count + 20).await;
    let served = finish(stream).await;
    let after: Vec<&String> = served.iter().filter(|(_, at)| *at > left_consul).map(|(l, _)| l).collect();
    assert!(after.iter().all(|l| *l == "a"), "b answered after it left: {after:?}");
    eprintln!(
        "b unpickable {unpickable_after:?} after SIGTERM, out of Consul {:?}, out of the channel {forgotten_after:?} later",
        left_consul - stopped_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_register_again_after_an_agent_restart_and_calls_go_on_meanwhile() {
    let agent = agent().await;
    let address = agent.http_address();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let vessel = vessel(&agent, &vessel_name, None, &[]);
    let consignment = consignment(&agent, &consignment_name, &vessel_name);
    let registry = registry(&agent);
    let vessel_id = wait_for(&registry, &vessel_name, 1).await.remove(0).id;
    let consignment_id = wait_for(&registry, &consignment_name, 1).await.remove(0).id;
    let channel = client(registry).channel(&vessel_name);
    wait_pickable(&channel, 1).await;
    let stream = call_stream(channel, Duration::from_millis(20));
    until("first calls", SOON, || stream.served() >= 5).await;

    let before = stream.served();
    let agent = agent.stopped().await;
    let during_outage = stream.served();
    assert!(passing(&address, &vessel_name).await.is_none(), "the agent should be gone");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted_at = Instant::now();
    let _agent = agent.restarted().await;
    let back_after = restarted_at.elapsed();
    let calls_while_down = stream.served() - before;

    until_passing(&address, &vessel_name, Duration::from_secs(5), |ids| ids.contains(&vessel_id)).await;
    until_passing(&address, &consignment_name, Duration::from_secs(5), |ids| ids.contains(&consignment_id))
        .await;
    let registered_again = restarted_at.elapsed();
    // Consul may show the registration passing a moment before the service logs it.
    until("vessel logs its registration again", SOON, || vessel.log().contains("registered again")).await;
    let count = stream.served();
    until("calls after the restart", SOON, || stream.served() >= count + 10).await;
    finish(stream).await;
    assert!(calls_while_down >= 20, "only {calls_while_down} calls while the agent was down");
    assert!(during_outage >= before);

    let run = run_cli(&address, &consignment_name).await;
    assert!(run.success, "CLI failed after the restart: {}\n{}", run.stderr, consignment.log());
    assert!(run.stdout.contains("on vessel vessel001"), "{}", run.stdout);
    eprintln!(
        "agent back {back_after:?} after restart; services registered again {registered_again:?} after it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_agent_address_fails_fast_naming_it_and_consul() {
    require_private_netns();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    // Built (or found up to date) before the clock starts.
    binary("vessel-service");
    binary("consignment-cli");

    let started = Instant::now();
    let mut service = service("vessel-service", &address, &unique_name("vessel"), &[], &[]);
    let status = service.wait(Duration::from_secs(10)).await;
    let service_took = started.elapsed();
    assert!(!status.success(), "vessel-service must fail without an agent:\n{}", service.log());
    let log = service.log();
    assert!(
        log.contains(&address) && log.contains("consul"),
        "the error must name {address} and consul:\n{log}"
    );

    let started = Instant::now();
    let run = run_cli(&address, "consignment-service").await;
    let cli_took = started.elapsed();
    assert!(!run.success, "the CLI must fail without an agent: {}", run.stdout);
    assert!(
        run.stderr.contains(&address) && run.stderr.contains("consul"),
        "the error must name {address} and consul: {}",
        run.stderr
    );
    for took in [service_took, cli_took] {
        assert!(
            took < Duration::from_secs(10),
            "took {took:?}: an unreachable agent must fail fast, not hang"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_registry_retry_a_service_waits_for_the_agent_and_then_registers() {
    let agent = agent().await;
    let address = agent.http_address();
    let agent = agent.stopped().await;
    let name = unique_name("vessel");
    let mut vessel = service("vessel-service", &address, &name, &["--registry-retry"], &[]);
    until("a retry warning", SOON, || vessel.log().contains("trying again")).await;
    assert!(vessel.exit_status().is_none(), "it should wait for the agent, not exit:\n{}", vessel.log());

    let agent_started = Instant::now();
    let agent = agent.restarted().await;
    let node = wait_for(&registry(&agent), &name, 1).await.remove(0);
    let registered_after = agent_started.elapsed();
    assert!(registered_after < SOON, "registered {registered_after:?} after the agent started");
    let mut vessels = VesselServiceClient::new(client(registry(&agent)).channel(&name));
    assert_eq!(find_vessel(&mut vessels).await.unwrap(), "vessel001");
    until("vessel logs its node id", SOON, || vessel.log().contains(&node.id)).await;
    eprintln!("registered {registered_after:?} after the agent started");
}
