//! Figure 6: silent failures across hosts. Four hosts (network namespaces on one bridge,
//! `e2e::hosts`): three run a release `fault-server` instance of each of three service
//! names, registered over mDNS; the fourth runs the load, from a runtime of this process
//! whose threads and sockets are on that host. One instance of each name misbehaves, the
//! one on the third host: it is partitioned mid-run (its packets vanish), it hangs
//! (`FAULT_HANG=1`: accepts calls, never answers, the connection stays healthy), or it
//! answers ten times slower than the others.
//!
//! The load is an open loop: FindAvailable calls started on a fixed schedule whatever the
//! earlier ones are doing, so a stuck call holds back no other and every one is counted.
//! Three clients take turns: the SDK as it ships (peak-EWMA power of two choices, adaptive
//! hedging, keepalive, outlier ejection), the SDK with round robin and hedging off, and
//! tonic's `Channel::balance_list` over the same three addresses with the same 5 s deadline
//! per call. The servers count the calls that reach them, so hedges are counted where they
//! arrive.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use e2e::{hosts::Network, process::Process};
use micro_core::{
    Client, Registry,
    config::{ClientConfig, Hedge},
    registry::MdnsRegistry,
    selector::StrategyKind,
};
use proto::{
    consignment::{GetRequest, shipping_service_client::ShippingServiceClient},
    vessel::vessel_service_client::VesselServiceClient,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::{
    load::{Caller, Timed, WithDeadline, paced},
    procs,
    report::{Figure, emit, note, quantile},
    wait_pickable,
};

/// Hosts that run instances; the load runs on the next one.
const SERVER_HOSTS: usize = 3;
const LOAD_HOST: usize = SERVER_HOSTS;
/// The host whose instance misbehaves.
const FAULTY_HOST: usize = 2;
/// Every instance sleeps this long before answering (a small backend call)...
const DELAY_MS: u64 = 5;
/// ...and the slow one this many times longer.
const SLOW_FACTOR: u64 = 10;
/// Calls started per second.
const RATE: u32 = 400;
/// How long a run starts calls; every call counts, from the client's first.
const LENGTH: Duration = Duration::from_millis(3_000);
/// The same for a partition run, which cuts the host this long into it.
const PARTITION_LENGTH: Duration = Duration::from_millis(4_000);
const PARTITION_AT: Duration = Duration::from_millis(1_500);
/// Each call's deadline: the SDK's default, and the baseline's per-call timeout.
const DEADLINE: Duration = Duration::from_secs(5);
/// The bench's own bound on a call, past any deadline.
const CALL_LIMIT: Duration = Duration::from_secs(7);
/// How long an instance gets to register.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A service name served by one instance on each server host.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Set {
    /// Three equal instances; the healthy and partition runs use them.
    Steady,
    /// The faulty host's instance hangs.
    Hung,
    /// The faulty host's instance is [`SLOW_FACTOR`] times slower.
    Slow,
}

impl Set {
    const ALL: [Set; 3] = [Set::Steady, Set::Hung, Set::Slow];

    fn name(self) -> String {
        let set = match self {
            Set::Steady => "steady",
            Set::Hung => "hung",
            Set::Slow => "slow",
        };
        format!("bench-silent-{set}-{}", std::process::id())
    }

    /// The port of its instances, the same on every host.
    fn port(self) -> u16 {
        match self {
            Set::Steady => 50061,
            Set::Hung => 50062,
            Set::Slow => 50063,
        }
    }

    /// The fault-server settings of its instance on `host`.
    fn faults(self, host: usize) -> Vec<(&'static str, String)> {
        match self {
            Set::Hung if host == FAULTY_HOST => vec![("FAULT_HANG", "1".into())],
            Set::Slow if host == FAULTY_HOST => {
                vec![("FAULT_DELAY_MS", (DELAY_MS * SLOW_FACTOR).to_string())]
            }
            _ => vec![("FAULT_DELAY_MS", DELAY_MS.to_string())],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Healthy,
    Slow,
    Hung,
    Partition,
}

impl Scenario {
    /// In the order they run: the partition last, as it disturbs the faulty host.
    const ALL: [Scenario; 4] = [Scenario::Healthy, Scenario::Slow, Scenario::Hung, Scenario::Partition];

    fn set(self) -> Set {
        match self {
            Scenario::Healthy | Scenario::Partition => Set::Steady,
            Scenario::Hung => Set::Hung,
            Scenario::Slow => Set::Slow,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Slow => "one slow",
            Scenario::Hung => "one hung",
            Scenario::Partition => "one partitioned",
        }
    }
}

/// The clients that take turns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    /// The SDK's defaults.
    Sdk,
    /// The SDK with round robin and hedging off.
    RoundRobin,
    /// tonic's `Channel::balance_list`.
    BalanceList,
}

impl Side {
    const ALL: [Side; 3] = [Side::Sdk, Side::RoundRobin, Side::BalanceList];

    fn label(self) -> &'static str {
        match self {
            Side::Sdk => "SDK",
            Side::RoundRobin => "SDK, round robin, no hedging",
            Side::BalanceList => "tonic balance_list",
        }
    }
}

/// What one run of one client saw.
struct Stats {
    scenario: Scenario,
    side: Side,
    calls: usize,
    failed: usize,
    /// Over every call, in ms.
    p99_ms: f64,
    max_ms: f64,
    /// FindAvailable calls that reached each server host during the run; not read in
    /// partition runs.
    arrivals: Option<[u64; SERVER_HOSTS]>,
    first_error: Option<String>,
}

impl Stats {
    /// Attempts that reached a server beyond one per call, in percent of calls.
    fn extra_attempts_percent(&self) -> f64 {
        let arrived: u64 = self.arrivals.map_or(0, |a| a.iter().sum());
        (arrived as f64 - self.calls as f64).max(0.0) * 100.0 / self.calls.max(1) as f64
    }

    /// The faulty host's share of the attempts that reached a server, in percent.
    fn faulty_share_percent(&self) -> f64 {
        let arrivals = self.arrivals.unwrap_or_default();
        let arrived: u64 = arrivals.iter().sum();
        arrivals[FAULTY_HOST] as f64 * 100.0 / arrived.max(1) as f64
    }
}

/// Figure 6: failed calls and latency with one of three instances silently failing.
pub async fn run() -> anyhow::Result<()> {
    let fault_server = procs::binary("fault-server")?;
    let results = tokio::task::spawn_blocking(move || on_hosts(&fault_server))
        .await
        .map_err(|err| anyhow::anyhow!("the hosts' thread: {err}"))??;
    emit_figures(&results);
    Ok(())
}

/// Builds the hosts, starts the instances, runs every scenario from the load host, and
/// stops everything.
fn on_hosts(fault_server: &Path) -> anyhow::Result<Vec<Stats>> {
    let network = Network::new(SERVER_HOSTS + 1);
    let namespaces = network.namespace_ids();
    procs::track_namespaces(&namespaces);
    let outcome = start_servers(&network, fault_server).and_then(|servers| {
        let results = network.host(LOAD_HOST).block_on(|| scenarios(&network));
        for server in servers {
            procs::untrack(server.pid());
        }
        results
    });
    drop(network);
    procs::untrack_namespaces(&namespaces);
    outcome
}

/// One instance of every [`Set`] on every server host, each registered.
fn start_servers(network: &Network, fault_server: &Path) -> anyhow::Result<Vec<Process>> {
    let mut servers = Vec::new();
    for set in Set::ALL {
        for host in 0..SERVER_HOSTS {
            let address = SocketAddr::new(network.host(host).address().into(), set.port());
            let (name, address) = (set.name(), address.to_string());
            let faults = set.faults(host);
            let mut env: Vec<(&str, &str)> = vec![
                ("FAULT_NAME", &name),
                ("FAULT_LABEL", "bench"),
                ("MICRO_REGISTRY", "mdns"),
                ("MICRO_SERVER_ADDRESS", &address),
                ("RUST_LOG", "info"),
                ("NO_COLOR", "1"),
            ];
            env.extend(faults.iter().map(|(k, v)| (*k, v.as_str())));
            let command = network.host(host).command(fault_server);
            let server = Process::spawn(&format!("bench-fault-server-{set:?}"), command, &[], &env);
            procs::track(server.pid());
            servers.push(server);
        }
    }
    let deadline = std::time::Instant::now() + READY_WITHIN;
    for server in &mut servers {
        while !server.log().contains(" registered ") {
            if let Some(status) = server.exit_status() {
                bail!("a fault-server exited ({status}) before it registered; its log:\n{}", server.log());
            }
            if std::time::Instant::now() > deadline {
                bail!("a fault-server did not register within {READY_WITHIN:?}; its log:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(servers)
}

/// Every scenario with every client, the order of the clients rotated per scenario.
async fn scenarios(network: &Network) -> anyhow::Result<Vec<Stats>> {
    let registry: Arc<dyn Registry> = Arc::new(MdnsRegistry::new(Duration::from_secs(3))?);
    let mut counters = Vec::new();
    for set in Set::ALL {
        let mut clients = Vec::new();
        for host in 0..SERVER_HOSTS {
            let address = SocketAddr::new(network.host(host).address().into(), set.port());
            let channel = Endpoint::from_shared(format!("http://{address}"))?.connect_lazy();
            clients.push(ShippingServiceClient::new(channel));
        }
        counters.push(clients);
    }
    let mut results = Vec::new();
    for (turn, scenario) in Scenario::ALL.into_iter().enumerate() {
        for i in 0..Side::ALL.len() {
            let side = Side::ALL[(turn + i) % Side::ALL.len()];
            eprintln!("[6/6 silent failures] {}: {}", scenario.label(), side.label());
            let set = scenario.set();
            let counters = &counters[Set::ALL.iter().position(|s| *s == set).expect("a set")];
            let stats = measure(network, &registry, scenario, side, counters)
                .await
                .with_context(|| format!("{}, {}", scenario.label(), side.label()))?;
            results.push(stats);
        }
    }
    Ok(results)
}

/// One run of one client in one scenario.
async fn measure(
    network: &Network,
    registry: &Arc<dyn Registry>,
    scenario: Scenario,
    side: Side,
    counters: &[ShippingServiceClient<Channel>],
) -> anyhow::Result<Stats> {
    let set = scenario.set();
    let count_arrivals = scenario != Scenario::Partition;
    let before = if count_arrivals { Some(arrivals(counters).await?) } else { None };
    let calls = match side {
        Side::Sdk | Side::RoundRobin => {
            let mut client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
            if side == Side::RoundRobin {
                client = client.config(ClientConfig {
                    strategy: StrategyKind::RoundRobin,
                    hedge: Hedge::Off,
                    ..ClientConfig::default()
                });
            }
            let channel = client.channel(&set.name());
            wait_pickable(&channel, SERVER_HOSTS).await?;
            drive(network, scenario, VesselServiceClient::new(channel)).await
        }
        Side::BalanceList => {
            let endpoints: Vec<Endpoint> = (0..SERVER_HOSTS)
                .map(|host| {
                    let address = SocketAddr::new(network.host(host).address().into(), set.port());
                    Endpoint::from_shared(format!("http://{address}")).map(|e| e.tcp_nodelay(true))
                })
                .collect::<Result<_, _>>()?;
            let channel = Channel::balance_list(endpoints.into_iter());
            drive(network, scenario, WithDeadline(VesselServiceClient::new(channel), DEADLINE)).await
        }
    };
    let arrivals = match before {
        Some(before) => {
            // Cancelled hedges may still be on their way to a server.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = arrivals(counters).await?;
            Some(std::array::from_fn(|i| after[i] - before[i]))
        }
        None => None,
    };
    let mut latencies: Vec<f64> = calls.iter().map(|c| c.latency.as_secs_f64() * 1e3).collect();
    latencies.sort_by(f64::total_cmp);
    let failed: Vec<&Timed> = calls.iter().filter(|c| c.error.is_some()).collect();
    let first_error = failed.first().and_then(|c| c.error.as_ref()).map(|status| {
        format!("{:?}: {}", status.code(), status.message().chars().take(200).collect::<String>())
    });
    Ok(Stats {
        scenario,
        side,
        calls: calls.len(),
        failed: failed.len(),
        p99_ms: quantile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        arrivals,
        first_error,
    })
}

/// The paced load through `caller`; in a partition run the faulty host is cut off
/// [`PARTITION_AT`] into it and healed once every call has ended. Returns every call.
async fn drive<C: Caller>(network: &Network, scenario: Scenario, caller: C) -> Vec<Timed> {
    let partition = scenario == Scenario::Partition;
    let length = if partition { PARTITION_LENGTH } else { LENGTH };
    let started = Instant::now();
    let load = tokio::spawn(async move { paced(caller, RATE, length, CALL_LIMIT).await });
    if partition {
        tokio::time::sleep_until(started + PARTITION_AT).await;
        tokio::task::block_in_place(|| network.partition(FAULTY_HOST));
    }
    let calls = load.await.unwrap_or_default();
    if partition {
        tokio::task::block_in_place(|| network.heal(FAULTY_HOST));
        // The next client starts on a network that has settled.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    calls
}

/// The FindAvailable calls that reached each instance so far, as each counts them.
async fn arrivals(counters: &[ShippingServiceClient<Channel>]) -> anyhow::Result<[u64; SERVER_HOSTS]> {
    let mut counts = [0; SERVER_HOSTS];
    for (host, counter) in counters.iter().enumerate() {
        let mut request = tonic::Request::new(GetRequest::default());
        request.set_timeout(Duration::from_secs(2));
        let response = counter.clone().get_consignments(request).await.context("reading arrivals")?;
        let header = response
            .metadata()
            .get("fault-arrivals")
            .and_then(|v| v.to_str().ok())
            .context("no fault-arrivals in the answer")?;
        counts[host] = header
            .split(',')
            .find_map(|pair| pair.strip_prefix("FindAvailable="))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no FindAvailable count in {header:?}"))?;
    }
    Ok(counts)
}

fn emit_figures(results: &[Stats]) {
    let get = |scenario: Scenario, side: Side| {
        results.iter().find(|s| s.scenario == scenario && s.side == side).expect("every run measured")
    };
    for stats in results.iter().filter(|s| s.side != Side::BalanceList && s.failed > 0) {
        note(format!(
            "silent failures, {}, {}: {} of {} calls failed; the first: {}",
            stats.scenario.label(),
            stats.side.label(),
            stats.failed,
            stats.calls,
            stats.first_error.as_deref().unwrap_or("?")
        ));
    }
    let healthy_p99 = get(Scenario::Healthy, Side::Sdk).p99_ms;
    let within_3x = format!("<= 3x the healthy p99 (3 x {healthy_p99:.1} ms)");
    // Each figure against tonic's balancer, then again against the SDK's round robin.
    let pair = |name: &str, unit: &'static str, scenario: Scenario, value: fn(&Stats) -> f64| {
        let sdk = value(get(scenario, Side::Sdk));
        (
            Figure::new(name, sdk, value(get(scenario, Side::BalanceList)), unit)
                .baseline_is("tonic Channel::balance_list over the same 3 addresses, 5 s deadline"),
            Figure::new(format!("{name}_vs_rr_no_hedge"), sdk, value(get(scenario, Side::RoundRobin)), unit)
                .baseline_is("the SDK with round robin and hedging off"),
        )
    };
    let both = |(main, other): (Figure, Figure), target: Option<(String, bool)>| {
        emit(match target {
            Some((what, met)) => main.target(what, met),
            None => main,
        });
        emit(other);
    };
    let failed = |s: &Stats| s.failed as f64;
    let p99 = |s: &Stats| s.p99_ms;

    both(pair("healthy_latency_p99", "ms", Scenario::Healthy, p99), None);
    let extra = pair("hedge_extra_attempts_percent", "%", Scenario::Healthy, Stats::extra_attempts_percent);
    let met = extra.0.sdk < 5.0;
    both(extra, Some(("< 5% more attempts than calls, all healthy".into(), met)));

    let figure = pair("partition_failed_calls", "calls", Scenario::Partition, failed);
    let met = figure.0.sdk == 0.0;
    both(figure, Some(("0 failed".into(), met)));
    let figure = pair("partition_latency_p99", "ms", Scenario::Partition, p99);
    let met = figure.0.sdk <= 3.0 * healthy_p99;
    both(figure, Some((within_3x.clone(), met)));
    let figure = pair("partition_latency_max", "ms", Scenario::Partition, |s| s.max_ms);
    let met = figure.0.sdk < 1_000.0;
    both(figure, Some(("< 1 s (issue 12)".into(), met)));

    let figure = pair("hung_failed_calls", "calls", Scenario::Hung, failed);
    let met = figure.0.sdk == 0.0;
    both(figure, Some(("0 failed".into(), met)));
    let figure = pair("hung_latency_p99", "ms", Scenario::Hung, p99);
    let met = figure.0.sdk <= 3.0 * healthy_p99;
    both(figure, Some((within_3x.clone(), met)));
    both(pair("hung_latency_max", "ms", Scenario::Hung, |s| s.max_ms), None);

    let figure = pair("slow_instance_latency_p99", "ms", Scenario::Slow, p99);
    let met = figure.0.sdk <= 3.0 * healthy_p99;
    both(figure, Some((within_3x, met)));
    let figure = pair("slow_instance_share_percent", "%", Scenario::Slow, Stats::faulty_share_percent);
    let met = figure.0.sdk < 5.0;
    both(figure, Some(("< 5% of attempts to the slow instance".into(), met)));
}
