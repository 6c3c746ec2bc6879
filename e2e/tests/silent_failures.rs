//! Silent failures cost no call: hosts that vanish without a reset, instances that hang or
//! slow down, over real binaries on real hosts (`e2e::hosts`), with the client's defaults.
//!
//! | scenario | asserted |
//! | --- | --- |
//! | mDNS, a vessel host partitioned during a paced stream of creations | none fails, none over 1 s |
//! | mDNS, a vessel host partitioned while every connection to it was idle (no keepalive ping on idle connections) | none fails, none over 1 s |
//! | the same over a 3-server Consul cluster, the partitioned host its leader | none fails, none over 1 s, a new leader, the instance off the passing list |
//! | a hung instance | no idempotent call fails; it is ejected |
//! | one instance ten times slower | it gets under 5% of calls |
//! | every instance turns slow | a non-idempotent call arrives once; hedges and retries stay within the budget |
//! | a partitioned host healed | it gets calls again |
//!
//! The client runs on a host of its own. Scenarios run one at a time (their figures are
//! timings, on machines with few cores); each stream of calls is bounded by count and time.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use e2e::{
    calls::{CallStream, POLL_EVERY, Tally},
    discovery::{mdns, wait_for, wait_pickable},
    hosts::{Host, Network},
    process::{Process, workspace_root},
    shippy::fleet_file,
    unique_name,
};
use micro_core::{
    Client, NamedChannel, Node, Registry,
    config::{ClientConfig, RegistryConfig, RegistryKind},
};
use proto::{
    consignment::{Consignment, Container, GetRequest, shipping_service_client::ShippingServiceClient},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use tokio::time::Instant;
use tonic::Status;

/// The longest any call of a stream may take while a host vanishes.
const SLOWEST_CALL: Duration = Duration::from_secs(1);
/// Each call's deadline (the client's default, stated so the figures read plainly).
const DEADLINE: Duration = Duration::from_secs(5);
/// How long a stream goes on after a host is partitioned.
const AFTER_PARTITION: Duration = Duration::from_secs(10);
/// How soon Consul must elect a new leader when its leader's host vanishes.
const NEW_LEADER_WITHIN: Duration = Duration::from_secs(20);
/// How soon a vanished host's instance must leave Consul's passing list.
const LEAVES_PASSING_WITHIN: Duration = Duration::from_secs(20);
/// How soon a healed host must serve again.
const HEALED_SERVES_WITHIN: Duration = Duration::from_secs(20);
/// How long a stream runs beside a hung instance.
const HUNG_WATCH: Duration = Duration::from_secs(8);
/// The share of calls an instance ten times slower than the others may get.
const SLOW_SHARE: f64 = 0.05;
/// The most of all attempts, hedges included, that may reach an instance ten times slower:
/// half an even share of three.
const SLOW_REACHED: f64 = 0.17;
/// Fault-server settings of an instance that answers its first 100 calls of each method at
/// once and every later one after 300 ms: the client's latency history says fast, then
/// every instance is slow, so a hedge after the recent p95 would fire for nearly every call.
const TURNS_SLOW: &[(&str, &str)] = &[("FAULT_DELAY_AFTER", "100"), ("FAULT_DELAY_MS", "300")];
/// The fast calls of three [`TURNS_SLOW`] instances.
const FAST_CALLS: usize = 300;
/// The `GetConsignments` response metadata where fault-server lists arrivals per method.
const ARRIVALS_HEADER: &str = "fault-arrivals";

/// Scenarios run one at a time: their figures are timings.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("silent_failures=info,e2e=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---- the services ----

fn vessel_service(host: &Host, name: &str, fleet: &Path, env: &[(&str, &str)]) -> Process {
    let fleet = fleet.display().to_string();
    let mut all_env = vec![("MICRO_SERVER_NAME", name)];
    all_env.extend_from_slice(env);
    host.start("vessel-service", &["--fleet", &fleet], &all_env)
}

fn consignment_service(host: &Host, name: &str, vessel_name: &str, env: &[(&str, &str)]) -> Process {
    let mut all_env =
        vec![("MICRO_SERVER_NAME", name), ("VESSEL_SERVICE", vessel_name), ("CONSIGNMENT_DB", ":memory:")];
    all_env.extend_from_slice(env);
    host.start("consignment-service", &[], &all_env)
}

fn fault_server(host: &Host, name: &str, label: &str, faults: &[(&str, &str)]) -> Process {
    let mut env = vec![("FAULT_NAME", name), ("FAULT_LABEL", label)];
    env.extend_from_slice(faults);
    host.start("fault-server", &[], &env)
}

fn consignment() -> Consignment {
    let container = Container { customer_id: "c1".into(), origin: "Derby".into(), ..Default::default() };
    Consignment {
        description: "one crate".into(),
        weight: 10,
        containers: vec![container],
        ..Default::default()
    }
}

/// The client under test: the defaults, with the shippy idempotent methods.
fn client(registry: Arc<dyn Registry>) -> Client {
    Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS)
}

/// The instance of `nodes` on `host`.
fn node_on<'a>(nodes: &'a [Node], host: &Host) -> &'a Node {
    nodes.iter().find(|n| n.address.ip() == host.address()).unwrap_or_else(|| panic!("no instance on {host}"))
}

/// What reached the fault-server instance `node`, per method (see fault-server's docs).
async fn arrivals(node: &Node) -> HashMap<String, usize> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.address))
        .expect("an address")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("fault-server {} unreachable: {err}", node.address));
    let reply = ShippingServiceClient::new(channel).get_consignments(GetRequest {}).await.expect("arrivals");
    let listed =
        reply.metadata().get(ARRIVALS_HEADER).expect("fault-server lists arrivals").to_str().unwrap();
    listed
        .split(',')
        .filter_map(|entry| entry.split_once('='))
        .map(|(method, count)| (method.to_owned(), count.parse().expect("a count")))
        .collect()
}

/// `method` calls that reached any of `nodes`, each counted where it arrived.
async fn arrivals_of(nodes: &[Node], method: &str) -> Vec<usize> {
    let mut counts = Vec::new();
    for node in nodes {
        counts.push(arrivals(node).await.get(method).copied().unwrap_or(0));
    }
    counts
}

// ---- streams of calls ----

/// Calls one method; answers with who served it (the vessel id in the reply).
#[derive(Clone)]
enum Caller {
    /// `CreateConsignment`: not idempotent.
    Create(ShippingServiceClient<NamedChannel>),
    /// `FindAvailable`: idempotent.
    Find(VesselServiceClient<NamedChannel>),
}

impl Caller {
    async fn call(&mut self) -> Result<String, Status> {
        match self {
            Caller::Create(shipping) => {
                let mut request = tonic::Request::new(consignment());
                request.set_timeout(DEADLINE);
                let reply = shipping.create_consignment(request).await?.into_inner();
                Ok(reply.consignment.map(|c| c.vessel_id).unwrap_or_default())
            }
            Caller::Find(vessels) => {
                let mut request = tonic::Request::new(Specification { capacity: 1, max_weight: 1 });
                request.set_timeout(DEADLINE);
                let reply = vessels.find_available(request).await?.into_inner();
                Ok(reply.vessel.map(|v| v.id).unwrap_or_default())
            }
        }
    }

    /// Calls, 10 ms apart, until every one of `labels` has served a call (at most 20 s: a
    /// caller that missed an instance's announcement finds it at the registry's next query).
    async fn until_all_served(&mut self, labels: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen: Vec<String> = Vec::new();
        while Instant::now() < deadline {
            if labels.iter().all(|label| seen.iter().any(|s| s == label)) {
                return;
            }
            match self.call().await {
                Ok(label) => seen.push(label),
                Err(status) => tracing::warn!(?status, "warm-up call failed"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.dedup();
        panic!("warm-up: not every one of {labels:?} served; served: {seen:?}");
    }
}

/// What [`stream`] records beside the [`Tally`]: each call's latency, and when each label
/// last served.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    latencies: Vec<Duration>,
    last_served: HashMap<String, Instant>,
}

impl Recorder {
    /// Whether `label` served a call that ended after `after`.
    fn served_since(&self, label: &str, after: Instant) -> bool {
        self.0.lock().unwrap().last_served.get(label).is_some_and(|&at| at > after)
    }

    /// The latency below which `quantile` of the calls finished (1.0: the slowest).
    fn latency(&self, quantile: f64) -> Duration {
        let mut latencies = self.0.lock().unwrap().latencies.clone();
        latencies.sort();
        let last = latencies.len().saturating_sub(1);
        latencies.get((last as f64 * quantile).round() as usize).copied().unwrap_or_default()
    }

    /// Logs the figures of `tally` and returns them as one line, for assertion messages.
    fn report(&self, scenario: &str, tally: &Tally) -> String {
        let line = format!(
            "{scenario}: {} calls, {} failed (first: {:?}), latency p50 {:?} p99 {:?} max {:?}, served {:?}",
            tally.served.len() + tally.failures.len(),
            tally.failures.len(),
            tally.failures.first(),
            self.latency(0.5),
            self.latency(0.99),
            self.latency(1.0),
            tally.counts(),
        );
        tracing::info!("{line}");
        line
    }
}

/// A paced stream of `caller`'s calls (see [`CallStream`]), each recorded.
fn stream(caller: &Caller, workers: usize, pace: Duration, total: usize) -> (CallStream, Recorder) {
    let recorder = Recorder::default();
    let (caller, recording) = (caller.clone(), recorder.clone());
    let stream = CallStream::start(workers, pace, total, move || {
        let (mut caller, recording) = (caller.clone(), recording.clone());
        async move {
            let started = Instant::now();
            let result = caller.call().await;
            let mut recorded = recording.0.lock().unwrap();
            recorded.latencies.push(started.elapsed());
            if let Ok(label) = &result {
                recorded.last_served.insert(label.clone(), Instant::now());
            }
            result
        }
    });
    (stream, recorder)
}

fn calls(tally: &Tally) -> usize {
    tally.served.len() + tally.failures.len()
}

/// Partitions host `index` from inside a runtime (the `ip` command blocks briefly).
fn partition(network: &Network, index: usize) {
    tokio::task::block_in_place(|| network.partition(index));
}

fn heal(network: &Network, index: usize) {
    tokio::task::block_in_place(|| network.heal(index));
}

// ---- mDNS ----

/// Three vessel-service hosts (fleets `v0` to `v2`), consignment-service on host 3, the
/// client on host 4; `extra` is given to every service.
struct Shippy {
    vessel_name: String,
    consignment_name: String,
    _services: Vec<Process>,
    _fleets: tempfile::TempDir,
}

impl Shippy {
    fn start(network: &Network, extra: &[(&str, &str)]) -> Shippy {
        let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
        let fleets = tempfile::tempdir().expect("a temporary folder");
        let mut services: Vec<Process> = (0..3)
            .map(|i| {
                vessel_service(
                    network.host(i),
                    &vessel_name,
                    &fleet_file(fleets.path(), &format!("v{i}")),
                    extra,
                )
            })
            .collect();
        services.push(consignment_service(network.host(3), &consignment_name, &vessel_name, extra));
        Shippy { vessel_name, consignment_name, _services: services, _fleets: fleets }
    }
}

#[test]
fn mdns_a_vessel_host_that_vanishes_fails_no_creation_and_slows_none_past_1s() {
    let _serial = one_at_a_time();
    let network = Network::new(5);
    let shippy = Shippy::start(&network, &[]);
    let (tally, recorder) = network.host(4).block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &shippy.vessel_name, 3).await;
        wait_for(&registry, &shippy.consignment_name, 1).await;
        let channel = client(registry).channel(&shippy.consignment_name);
        wait_pickable(&channel, 1).await;
        let mut caller = Caller::Create(ShippingServiceClient::new(channel));
        caller.until_all_served(&["v0", "v1", "v2"]).await;

        let (stream, recorder) = stream(&caller, 2, Duration::from_millis(20), 2_000);
        tokio::time::sleep(Duration::from_secs(2)).await;
        partition(&network, 0);
        let at_partition = stream.done();
        tokio::time::sleep(AFTER_PARTITION).await;
        let tally = stream.finish().await;
        tracing::info!(at_partition, after = calls(&tally) - at_partition, "mdns stream");
        (tally, recorder)
    });
    let line = recorder.report("mdns, vessel host partitioned", &tally);
    assert!(tally.failures.is_empty(), "{line}");
    assert!(recorder.latency(1.0) <= SLOWEST_CALL, "{line}");
}

/// How long the connections stay idle before and after the partition: longer than a
/// keepalive interval and timeout, which an idle connection no longer spends on pings.
const IDLE: Duration = Duration::from_secs(4);

#[test]
fn mdns_a_vessel_host_that_vanishes_while_idle_fails_no_creation_and_slows_none_past_1s() {
    let _serial = one_at_a_time();
    let network = Network::new(5);
    let shippy = Shippy::start(&network, &[]);
    let (tally, recorder) = network.host(4).block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &shippy.vessel_name, 3).await;
        wait_for(&registry, &shippy.consignment_name, 1).await;
        let channel = client(registry).channel(&shippy.consignment_name);
        wait_pickable(&channel, 1).await;
        let mut caller = Caller::Create(ShippingServiceClient::new(channel));
        caller.until_all_served(&["v0", "v1", "v2"]).await;

        // Every connection idle; the vessel host vanishes; still idle: nothing notices.
        tokio::time::sleep(IDLE).await;
        partition(&network, 0);
        tokio::time::sleep(IDLE).await;
        let (stream, recorder) = stream(&caller, 2, Duration::from_millis(20), 500);
        let tally = stream.join().await;
        (tally, recorder)
    });
    let line = recorder.report("mdns, vessel host partitioned while idle", &tally);
    assert_eq!(calls(&tally), 500, "{line}");
    assert!(tally.failures.is_empty(), "{line}");
    assert!(recorder.latency(1.0) <= SLOWEST_CALL, "{line}");
}

#[test]
fn mdns_a_healed_host_gets_calls_again() {
    let _serial = one_at_a_time();
    let network = Network::new(4);
    let name = unique_name("vessel");
    let fleets = tempfile::tempdir().unwrap();
    let _vessels: Vec<Process> = (0..3)
        .map(|i| vessel_service(network.host(i), &name, &fleet_file(fleets.path(), &format!("v{i}")), &[]))
        .collect();
    let (tally, recorder, back_after) = network.host(3).block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &name, 3).await;
        let channel = client(registry).channel(&name);
        wait_pickable(&channel, 3).await;
        let mut caller = Caller::Find(VesselServiceClient::new(channel));
        caller.until_all_served(&["v0", "v1", "v2"]).await;

        let (stream, recorder) = stream(&caller, 2, Duration::from_millis(20), 3_000);
        tokio::time::sleep(Duration::from_secs(1)).await;
        partition(&network, 0);
        tokio::time::sleep(Duration::from_secs(4)).await;
        heal(&network, 0);
        let healed = Instant::now();
        let deadline = healed + HEALED_SERVES_WITHIN;
        while !recorder.served_since("v0", healed) && Instant::now() < deadline {
            tokio::time::sleep(POLL_EVERY).await;
        }
        let back_after = recorder.served_since("v0", healed).then(|| healed.elapsed());
        (stream.finish().await, recorder, back_after)
    });
    let line = recorder.report("mdns, host healed", &tally);
    tracing::info!(?back_after, "the healed host served again");
    assert!(back_after.is_some(), "the healed host got no call within {HEALED_SERVES_WITHIN:?}; {line}");
}

// ---- Consul ----

/// The Consul binary: `CONSUL_BIN`, else what `scripts/install-consul` unpacks.
fn consul_binary() -> PathBuf {
    let path = std::env::var_os("CONSUL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/consul/usr/bin/consul"));
    assert!(
        path.is_file(),
        "no consul at {}: run `scripts/install-consul` or set CONSUL_BIN",
        path.display()
    );
    path
}

/// A Consul agent on every host: servers on hosts 0 to 2 (`-bootstrap-expect 3`), clients
/// elsewhere; each host's services use their own `127.0.0.1:8500`.
fn consul_cluster(network: &Network, data: &Path) -> Vec<Process> {
    let binary = consul_binary();
    let servers: Vec<String> = (0..3).map(|i| network.host(i).address().to_string()).collect();
    network
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let (node, bind, dir) = (
                format!("host{i}"),
                host.address().to_string(),
                data.join(format!("host{i}")).display().to_string(),
            );
            let mut args =
                vec!["agent", "-node", &node, "-bind", &bind, "-client", "127.0.0.1", "-data-dir", &dir];
            args.extend(["-dns-port", "-1", "-grpc-port", "-1", "-retry-interval", "1s"]);
            // Elections and failure detection at the pace of a LAN, not of a cloud.
            args.extend(["-hcl", "performance { raft_multiplier = 1 }"]);
            for server in &servers {
                args.extend(["-retry-join", server.as_str()]);
            }
            if i < 3 {
                args.extend(["-server", "-bootstrap-expect", "3"]);
            }
            host.start_program("consul", &binary, &args, &[])
        })
        .collect()
}

/// The agent on this host's HTTP API, `path` (from `/v1/`), as JSON; `None` on any failure.
async fn consul_get(path: &str) -> Option<serde_json::Value> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    let response = http.get(format!("http://127.0.0.1:8500/v1/{path}")).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// The leader's raft address as this host's agent knows it (empty: none).
async fn consul_leader() -> String {
    consul_get("status/leader").await.and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Polls this host's agent until it knows a leader; returns its raft address.
async fn wait_for_leader(limit: Duration, unlike: Option<&str>) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let leader = consul_leader().await;
        if !leader.is_empty() && unlike.is_none_or(|old| !leader.starts_with(old)) {
            return leader;
        }
        assert!(Instant::now() < deadline, "no Consul leader (besides {unlike:?}) within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The addresses of `name`'s instances on Consul's passing list.
async fn passing(name: &str) -> Option<Vec<String>> {
    let entries = consul_get(&format!("health/service/{name}?passing")).await?;
    let addresses = entries
        .as_array()?
        .iter()
        .filter_map(|entry| entry["Service"]["Address"].as_str().map(str::to_owned))
        .collect();
    Some(addresses)
}

#[test]
fn consul_a_host_running_the_leader_and_a_vessel_vanishes_and_no_creation_fails() {
    let _serial = one_at_a_time();
    let network = Network::new(5);
    let data = tempfile::tempdir().expect("a temporary folder");
    let _consul = consul_cluster(&network, data.path());
    let client_host = network.host(4);
    let started = std::time::Instant::now();
    let leader = client_host.block_on(|| wait_for_leader(Duration::from_secs(60), None));
    tracing::info!(%leader, after = ?started.elapsed(), "consul cluster has a leader");
    // Partition the leader's host: the hardest case for the cluster.
    let doomed =
        (0..3).find(|&i| leader.starts_with(&format!("{}:", network.host(i).address()))).expect("a server");
    let doomed_address = network.host(doomed).address().to_string();

    let consul_env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_RETRY", "true")];
    let shippy = Shippy::start(&network, &consul_env);
    tracing::info!(after = ?started.elapsed(), "services started");
    let (tally, recorder, new_leader, left_after) = client_host.block_on(|| async {
        let registry_config = RegistryConfig { kind: RegistryKind::Consul, ..RegistryConfig::default() };
        let registry = registry_config.connect().await.expect("the local consul agent");
        wait_for(&registry, &shippy.vessel_name, 3).await;
        wait_for(&registry, &shippy.consignment_name, 1).await;
        let channel = client(registry).channel(&shippy.consignment_name);
        wait_pickable(&channel, 1).await;
        let mut caller = Caller::Create(ShippingServiceClient::new(channel));
        caller.until_all_served(&["v0", "v1", "v2"]).await;
        tracing::info!(after = ?started.elapsed(), "every vessel served a creation");

        let (stream, recorder) = stream(&caller, 2, Duration::from_millis(20), 2_000);
        tokio::time::sleep(Duration::from_secs(2)).await;
        partition(&network, doomed);
        let partitioned = Instant::now();
        let old_leader = format!("{doomed_address}:");
        let new_leader = async {
            let leader = wait_for_leader(NEW_LEADER_WITHIN, Some(&old_leader)).await;
            tracing::info!(%leader, after = ?partitioned.elapsed(), "consul elected a new leader");
            leader
        };
        let leaves_passing = async {
            while partitioned.elapsed() < LEAVES_PASSING_WITHIN {
                if passing(&shippy.vessel_name).await.is_some_and(|list| !list.contains(&doomed_address)) {
                    return Some(partitioned.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        };
        let calls = async {
            tokio::time::sleep(AFTER_PARTITION).await;
            stream.finish().await
        };
        let (new_leader, left_after, tally) = tokio::join!(new_leader, leaves_passing, calls);
        assert!(!consul_leader().await.is_empty(), "the cluster lost its leader by the end");
        (tally, recorder, new_leader, left_after)
    });
    let line = recorder.report("consul, leader and vessel host partitioned", &tally);
    tracing::info!(%new_leader, ?left_after, "consul");
    assert!(
        left_after.is_some(),
        "the partitioned instance stayed on the passing list for {AFTER_PARTITION:?}"
    );
    assert!(tally.failures.is_empty(), "{line}");
    assert!(recorder.latency(1.0) <= SLOWEST_CALL, "{line}");
}

// ---- hung and slow instances ----

/// Fault-servers registered as one name on hosts 0 to `faults.len() - 1`, each with its
/// faults and the label `f<i>`; the client runs on the last host.
struct Faulty {
    name: String,
    network: Network,
    _servers: Vec<Process>,
}

impl Faulty {
    fn start(faults: &[&[(&str, &str)]]) -> Faulty {
        let network = Network::new(faults.len() + 1);
        let name = unique_name("faulty");
        let servers = faults
            .iter()
            .enumerate()
            .map(|(i, f)| fault_server(network.host(i), &name, &format!("f{i}"), f))
            .collect();
        Faulty { name, network, _servers: servers }
    }

    fn client_host(&self) -> &Host {
        self.network.hosts().last().expect("a client host")
    }

    /// The registry, a channel that can pick every server, and the servers' nodes in host order.
    async fn connect(&self, configure: impl FnOnce(Client) -> Client) -> (NamedChannel, Vec<Node>) {
        let registry = mdns();
        let servers = self.network.hosts().len() - 1;
        let found = wait_for(&registry, &self.name, servers).await;
        let nodes = (0..servers).map(|i| node_on(&found, self.network.host(i)).clone()).collect();
        let channel = configure(client(registry)).channel(&self.name);
        wait_pickable(&channel, servers).await;
        (channel, nodes)
    }
}

#[test]
fn a_hung_instance_fails_no_idempotent_call_and_is_ejected() {
    let _serial = one_at_a_time();
    let faulty = Faulty::start(&[&[("FAULT_HANG", "1")], &[], &[]]);
    let (tally, recorder, ejected_after, hung_arrivals) = faulty.client_host().block_on(|| async {
        let (channel, nodes) = faulty.connect(|c| c).await;
        let hung = nodes[0].id.clone();
        let caller = Caller::Find(VesselServiceClient::new(channel.clone()));
        let started = Instant::now();
        let (stream, recorder) = stream(&caller, 2, Duration::from_millis(20), 1_000);
        let mut ejected_after = None;
        while started.elapsed() < HUNG_WATCH {
            if ejected_after.is_none() && !channel.pickable().iter().any(|n| n.id == hung) {
                ejected_after = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tally = stream.finish().await;
        (tally, recorder, ejected_after, arrivals_of(&nodes[..1], "FindAvailable").await[0])
    });
    let line = recorder.report("a hung instance", &tally);
    tracing::info!(?ejected_after, hung_arrivals, "the hung instance");
    assert!(tally.failures.is_empty(), "{line}");
    assert!(
        ejected_after.is_some(),
        "the hung instance was never ejected ({hung_arrivals} calls reached it); {line}"
    );
}

/// The slow instance answers few calls (what callers feel), and the attempts that reach it
/// at all, hedges included, stay well below an even share: hedges fan out to it when the
/// fast instances' latencies jump on a busy machine, so arrivals alone read higher there.
#[test]
fn one_instance_ten_times_slower_answers_under_5_percent_of_calls() {
    let _serial = one_at_a_time();
    let faulty = Faulty::start(&[
        &[("FAULT_DELAY_MS", "200")],
        &[("FAULT_DELAY_MS", "20")],
        &[("FAULT_DELAY_MS", "20")],
    ]);
    let total = 600;
    let (tally, recorder, counts) = faulty.client_host().block_on(|| async {
        let (channel, nodes) = faulty.connect(|c| c).await;
        let before = arrivals_of(&nodes, "FindAvailable").await;
        let (stream, recorder) =
            stream(&Caller::Find(VesselServiceClient::new(channel)), 4, Duration::ZERO, total);
        stream.until_done(total).await;
        let tally = stream.finish().await;
        let after = arrivals_of(&nodes, "FindAvailable").await;
        (tally, recorder, after.iter().zip(&before).map(|(a, b)| a - b).collect::<Vec<_>>())
    });
    let line = recorder.report("one instance ten times slower", &tally);
    let answered = tally.counts().get("f0").copied().unwrap_or(0) as f64 / calls(&tally) as f64;
    let reached = counts[0] as f64 / counts.iter().sum::<usize>().max(1) as f64;
    tracing::info!(
        ?counts,
        answered,
        reached,
        "the slow instance's share (arrivals per instance, the slow one first)"
    );
    assert!(tally.failures.is_empty(), "{line}");
    assert!(
        answered < SLOW_SHARE,
        "the slow instance answered {:.1}% of calls ({counts:?} arrivals); {line}",
        answered * 100.0
    );
    assert!(
        reached < SLOW_REACHED,
        "{:.1}% of the attempts reached the slow instance ({counts:?}); {line}",
        reached * 100.0
    );
}

#[test]
fn a_call_that_may_not_be_sent_twice_is_never_hedged() {
    let _serial = one_at_a_time();
    let faulty = Faulty::start(&[TURNS_SLOW, TURNS_SLOW, TURNS_SLOW]);
    let total = FAST_CALLS + 80;
    let (tally, recorder, counts) = faulty.client_host().block_on(|| async {
        let (channel, nodes) = faulty.connect(|c| c).await;
        let caller = Caller::Create(ShippingServiceClient::new(channel));
        let (stream, recorder) = stream(&caller, 8, Duration::ZERO, total);
        stream.until_done(total).await;
        let tally = stream.finish().await;
        (tally, recorder, arrivals_of(&nodes, "CreateConsignment").await)
    });
    let line = recorder.report("every instance turns slow, CreateConsignment", &tally);
    let arrived: usize = counts.iter().sum();
    tracing::info!(?counts, arrived, "CreateConsignment arrivals per instance");
    assert!(tally.failures.is_empty(), "{line}");
    assert_eq!(arrived, calls(&tally), "a non-idempotent call arrived twice ({counts:?}); {line}");
}

#[test]
fn with_every_instance_slow_hedges_stay_within_the_retry_budget() {
    let _serial = one_at_a_time();
    let faulty = Faulty::start(&[TURNS_SLOW, TURNS_SLOW, TURNS_SLOW]);
    let config = ClientConfig { min_retries_per_sec: 1, ..ClientConfig::default() };
    let (percent, per_sec) = (f64::from(config.retry_budget_percent), config.min_retries_per_sec);
    let total = FAST_CALLS + 320;
    let (tally, recorder, arrived, elapsed) = faulty.client_host().block_on(|| async {
        let (channel, nodes) = faulty.connect(|c| c.config(config)).await;
        let started = Instant::now();
        let (stream, recorder) =
            stream(&Caller::Find(VesselServiceClient::new(channel)), 16, Duration::ZERO, total);
        stream.until_done(total).await;
        let tally = stream.finish().await;
        let arrived: usize = arrivals_of(&nodes, "FindAvailable").await.iter().sum();
        (tally, recorder, arrived, started.elapsed())
    });
    let line = recorder.report("every instance turns slow, FindAvailable", &tally);
    let extra = arrived.saturating_sub(calls(&tally));
    // The budget: a share of calls, plus a floor per second over its 10 s window.
    let budget = calls(&tally) as f64 * percent / 100.0 + f64::from(per_sec) * (elapsed.as_secs_f64() + 10.0);
    tracing::info!(arrived, extra, budget, "FindAvailable arrivals beyond one per call");
    assert!(tally.failures.is_empty(), "{line}");
    assert!(extra as f64 <= budget, "{extra} extra attempts, budget {budget:.0}; {line}");
}
