//! Overload, with real processes over real mDNS in the private namespace: a server's
//! concurrency limit refuses what it cannot serve at once (marked, so the SDK client sends
//! it elsewhere), health checks are never refused, a refused call goes to an idle instance,
//! and a fleet that is all overloaded gets fast refusals and no retry storm.
//!
//! The overloaded instances are `fault-server`s with a fixed capacity (`FAULT_SLOTS` slots,
//! each held `FAULT_HOLD_MS`) or hung behind a limit of one call, so the overload is real
//! and costs no CPU. Nothing here asserts a wall-clock window: speed is measured in
//! `make bench`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use e2e::{
    calls::{CallStream, Tally, poll_until},
    discovery::{STARTUP, mdns, wait_for, wait_pickable},
    process::Process,
    unique_name,
};
use micro_core::{Client, NamedChannel, Node, Registry, config::ClientConfig, server::REFUSED_HEADER};
use proto::{
    consignment::{Consignment, shipping_service_client::ShippingServiceClient},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use tokio::{task::JoinSet, time::Instant};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn fault_server(name: &str, label: &str, env: &[(&str, &str)]) -> Process {
    let mut all = vec![("FAULT_NAME", name), ("FAULT_LABEL", label)];
    all.extend_from_slice(env);
    Process::start("fault-server", &[], &all)
}

/// Starts a fault server and waits until `count` instances of `name` are registered;
/// returns it with its own node (the one not in `known`).
async fn start_instance(
    registry: &Arc<dyn Registry>,
    name: &str,
    label: &str,
    env: &[(&str, &str)],
    known: &[Node],
) -> (Process, Node) {
    let process = fault_server(name, label, env);
    let nodes = wait_for(registry, name, known.len() + 1).await;
    let node = nodes.into_iter().find(|n| known.iter().all(|k| k.id != n.id)).expect("a new instance");
    (process, node)
}

async fn raw_channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}")).unwrap().connect().await.expect("connect")
}

/// A call over a raw tonic channel (no SDK client: no retries, no throttling).
/// Returns how many calls were waiting for a slot when it reached the fault server.
async fn find_raw(vessels: &mut VesselServiceClient<Channel>) -> Result<usize, tonic::Status> {
    let response = vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await?;
    let queued = response.metadata().get("fault-queued").expect("the fault server reports its queue");
    Ok(queued.to_str().unwrap().parse().expect("a count"))
}

/// Fails unless `status` is a refusal by a concurrency limit: `RESOURCE_EXHAUSTED` with the
/// marker, naming the service.
fn assert_marked_refusal(status: &tonic::Status, service: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get(REFUSED_HEADER).is_some(), "no {REFUSED_HEADER} marker: {status:?}");
    assert!(status.message().contains(service), "the refusal names the service: {status:?}");
}

/// Fills a hung instance's only place with a call that never ends (tried again while it is
/// refused), until the returned set is dropped. Waits until the instance refuses a probe
/// (with a short deadline, should the probe take the place itself) with the marker.
async fn fill(address: SocketAddr, service: &str) -> JoinSet<()> {
    let mut hung = JoinSet::new();
    let channel = raw_channel(address).await;
    let mut holder = VesselServiceClient::new(channel.clone());
    hung.spawn(async move {
        while find_raw(&mut holder).await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut probe = VesselServiceClient::new(channel);
    let refusal = poll_until(format!("{address} refusing calls"), STARTUP, async || {
        let mut request = tonic::Request::new(Specification { capacity: 1, max_weight: 1 });
        request.set_timeout(Duration::from_millis(200));
        let status = probe.find_available(request).await.err()?;
        (status.code() == Code::ResourceExhausted).then_some(status)
    })
    .await;
    assert_marked_refusal(&refusal, service);
    hung
}

/// One health check of the whole server on `address`: `Ok` when it answers `SERVING`.
async fn health_checks(address: SocketAddr) -> Result<(), String> {
    let mut health = HealthClient::new(raw_channel(address).await);
    let reply = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|status| format!("health check failed: {status:?}"))?;
    match reply.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("health check answered {other:?}")),
    }
}

/// The attempts this process's SDK client made to `service`, by instance id.
fn attempts(service: &str) -> std::collections::HashMap<String, u64> {
    let page = micro_core::metrics::metrics().render();
    let mut by_node = std::collections::HashMap::new();
    for line in page.lines().filter(|l| l.starts_with("micro_client_attempts_total{")) {
        if !line.contains(&format!("service=\"{service}\"")) {
            continue;
        }
        let node = line.split("node=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("?");
        let count: u64 = line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        *by_node.entry(node.to_owned()).or_default() += count;
    }
    by_node
}

/// `workers` SDK callers, each pausing `pace`, up to `total` calls, alternating an
/// idempotent method (FindAvailable) and one that is not (CreateConsignment).
fn mixed_calls(channel: NamedChannel, workers: usize, pace: Duration, total: usize) -> CallStream {
    let vessels = VesselServiceClient::new(channel.clone());
    let shipping = ShippingServiceClient::new(channel);
    let turn = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    CallStream::start(workers, pace, total, move || {
        let (mut vessels, mut shipping) = (vessels.clone(), shipping.clone());
        let idempotent = turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(2);
        async move {
            if idempotent {
                let reply = vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await?;
                Ok(reply.into_inner().vessel.unwrap_or_default().id)
            } else {
                let reply = shipping.create_consignment(Consignment::default()).await?;
                Ok(reply.into_inner().consignment.unwrap_or_default().vessel_id)
            }
        }
    })
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// What `callers` raw callers saw, each pausing `pace` between calls, up to `total` calls.
struct Phase {
    /// Latency of each served call, in the order they ended.
    served: Vec<Duration>,
    /// How many calls each served call found waiting for a slot, in the order they ended.
    queued: Vec<usize>,
    /// Latency of each refused call.
    refused: Vec<Duration>,
}

async fn raw_phase(
    address: SocketAddr,
    service: &str,
    callers: usize,
    pace: Duration,
    total: usize,
) -> Phase {
    let channel = raw_channel(address).await;
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..callers {
        let (mut vessels, started) = (VesselServiceClient::new(channel.clone()), started.clone());
        let service = service.to_owned();
        set.spawn(async move {
            let mut seen = Vec::new();
            while started.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                let at = Instant::now();
                let outcome = find_raw(&mut vessels).await;
                let took = at.elapsed();
                if let Err(status) = &outcome {
                    assert_marked_refusal(status, &service);
                }
                seen.push((Instant::now(), took, outcome.ok()));
                tokio::time::sleep(pace).await;
            }
            seen
        });
    }
    let mut all = Vec::new();
    while let Some(seen) = set.join_next().await {
        all.extend(seen.expect("a caller panicked"));
    }
    all.sort_by_key(|(at, _, _)| *at);
    Phase {
        served: all.iter().filter(|(_, _, queued)| queued.is_some()).map(|(_, took, _)| *took).collect(),
        queued: all.iter().filter_map(|(_, _, queued)| *queued).collect(),
        refused: all.iter().filter(|(_, _, queued)| queued.is_none()).map(|(_, took, _)| *took).collect(),
    }
}

/// The spike's fault server serves this many calls at once.
const SLOTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_times_the_capacity_is_refused_at_once_and_admitted_calls_barely_queue() {
    let registry = mdns();
    let name = unique_name("overload-spike");
    // Capacity: 8 calls at once, each 20 ms. The limit may go as low as 4.
    let slots = SLOTS.to_string();
    let env = [
        ("FAULT_SLOTS", slots.as_str()),
        ("FAULT_HOLD_MS", "20"),
        ("MICRO_SERVER_LIMIT_MIN", "4"),
        ("MICRO_SERVER_LIMIT_MAX", "256"),
    ];
    let (_server, node) = start_instance(&registry, &name, "slots", &env, &[]).await;
    let address = node.address;

    let unloaded = raw_phase(address, &name, 4, Duration::ZERO, 400).await;
    assert!(unloaded.refused.is_empty(), "{} calls refused below capacity", unloaded.refused.len());
    assert_eq!(unloaded.queued.iter().max(), Some(&0), "calls queued below capacity");

    // The spike: 32 callers, four times what fits, while health is checked all along.
    let stop_health = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = tokio::spawn({
        let stop = stop_health.clone();
        async move {
            let mut checks = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                health_checks(address).await?;
                checks += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<usize, String>(checks)
        }
    });
    let spike = raw_phase(address, &name, 32, Duration::from_millis(20), 4_000).await;
    stop_health.store(true, std::sync::atomic::Ordering::Relaxed);
    let checks = health.await.unwrap().unwrap_or_else(|err| panic!("health during the spike: {err}"));
    assert!(checks > 0, "no health check ran during the spike");
    assert!(!spike.refused.is_empty(), "nothing refused at four times the capacity");
    assert!(spike.served.len() >= 400, "only {} of 4000 calls served", spike.served.len());

    // Once the limit settled (the second half of the spike), admitted calls queued only
    // within the limit's tolerance: on average fewer calls waited for a slot than the slots
    // serve at once (without a limit, about three times as many would). Counted by the
    // server, so a busy machine that slows every call does not change it.
    let settled = &spike.queued[spike.queued.len() / 2..];
    let mean = settled.iter().sum::<usize>() as f64 / settled.len() as f64;
    eprintln!(
        "spike: {} served, {} refused; calls found waiting for a slot in the settled half: mean {mean:.1}, most {}",
        spike.served.len(),
        spike.refused.len(),
        settled.iter().max().unwrap()
    );
    assert!(mean <= SLOTS as f64, "admitted calls found {mean:.1} waiting on average for {SLOTS} slots");
    // Refusals waited for no slot: faster than the calls that held one (which a machine
    // busy with other work slows alike).
    let mut refused = spike.refused.clone();
    refused.sort();
    let mut served = spike.served.clone();
    served.sort();
    let (refusal_p50, served_p50) = (quantile(&refused, 0.5), quantile(&served, 0.5));
    assert!(refusal_p50 < served_p50, "refusal p50 {refusal_p50:?}, served p50 {served_p50:?}");

    // After the spike: the limit let everything in again, and nothing waited.
    let after = raw_phase(address, &name, 4, Duration::ZERO, 200).await;
    assert!(after.refused.is_empty(), "{} calls refused after the spike", after.refused.len());
    assert_eq!(after.queued.iter().max(), Some(&0), "calls queued after the spike");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_by_an_overloaded_instance_go_to_the_idle_one_idempotent_or_not() {
    let registry = mdns();
    let name = unique_name("overload-one");
    // Busy: a limit of one call, taken by a call that never ends.
    let busy_env = [("FAULT_HANG", "1"), ("MICRO_SERVER_LIMIT", "1")];
    let (_busy, busy) = start_instance(&registry, &name, "busy", &busy_env, &[]).await;
    let _hung = fill(busy.address, &name).await;
    let (_idle, idle) = start_instance(&registry, &name, "idle", &[], std::slice::from_ref(&busy)).await;

    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let channel = client.channel(&name);
    wait_pickable(&channel, 2).await;
    let tally: Tally = mixed_calls(channel, 4, Duration::from_millis(2), 600).join().await;

    tally.assert_no_failures();
    assert!(tally.served.iter().all(|(label, _)| label == "idle"), "{:?}", tally.counts());
    let attempts = attempts(&name);
    let on_busy = attempts.get(&busy.id).copied().unwrap_or(0);
    assert!(on_busy > 0, "the busy instance was never tried, so nothing was refused: {attempts:?}");
    assert!(on_busy < 60, "the busy instance kept its share of picks: {attempts:?}");
    assert!(attempts.get(&idle.id).copied().unwrap_or(0) >= 600, "{attempts:?}");
    // Its health is answered all along: health is never refused.
    health_checks(busy.address).await.expect("the busy instance's health");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_that_is_all_overloaded_gets_fast_refusals_and_no_retry_storm() {
    let registry = mdns();
    let name = unique_name("overload-all");
    let env = [("FAULT_HANG", "1"), ("MICRO_SERVER_LIMIT", "1")];
    let (_a, a) = start_instance(&registry, &name, "a", &env, &[]).await;
    let (_b, b) = start_instance(&registry, &name, "b", &env, std::slice::from_ref(&a)).await;
    let (_hung_a, _hung_b) = (fill(a.address, &name).await, fill(b.address, &name).await);

    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let channel = client.channel(&name);
    wait_pickable(&channel, 2).await;
    let calls = 2_000;
    let tally = mixed_calls(channel.clone(), 4, Duration::from_millis(1), calls).join().await;

    assert!(tally.served.is_empty(), "{:?}", tally.counts());
    assert_eq!(tally.failures.len(), calls);
    for status in &tally.failures {
        // Fast: refused, never left to wait for its deadline on a hung instance.
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains(&name), "{status:?}");
    }
    assert!(
        tally.failures.iter().any(|s| s.message().contains("adaptive throttling")),
        "the client never throttled: {:?}",
        tally.failures.last()
    );
    let sent: u64 = attempts(&name).values().sum();
    let per_call = sent as f64 / calls as f64;
    assert!(per_call < 1.2, "{sent} attempts for {calls} calls: {per_call:.2} per call");
    // The instances were never ejected: refusing is not failing.
    assert_eq!(channel.pickable().len(), 2);

    // Without throttling, a call tries each instance once and says it was refused by all.
    let unthrottled = ClientConfig { throttle_ratio: 0.0, ..ClientConfig::default() };
    let client = Client::new(registry).config(unthrottled);
    let channel = client.channel(&name);
    wait_pickable(&channel, 2).await;
    let status = VesselServiceClient::new(channel)
        .find_available(Specification { capacity: 1, max_weight: 1 })
        .await
        .expect_err("every instance is full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let message = status.message();
    assert!(message.contains("every instance tried refused"), "{message}");
    assert!(message.contains(&a.id) && message.contains(&b.id), "names both instances: {message}");
}
