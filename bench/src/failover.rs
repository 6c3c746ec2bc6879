//! Figure 4: three release vessel-service instances under load over mDNS; one is
//! SIGKILLed. The SDK's named channel (FindAvailable marked idempotent) against tonic's own
//! balancer over the same three addresses (`Channel::balance_list`, static).
//!
//! Recovery: the outcomes are cut into 100 ms windows; a window after the kill is unhealthy
//! when a call in it failed or it completed fewer than 80% of the calls of a median window
//! before the kill. Recovery time is from the kill to the end of the last unhealthy window.

use std::{sync::Arc, time::Duration};

use micro_core::{Client, Registry};
use proto::vessel::vessel_service_client::VesselServiceClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::{
    load::{Outcome, timeline},
    procs::Service,
    report::{Figure, emit, median},
    wait_pickable,
};

const ROUNDS: usize = 3;
const CALLERS: usize = 16;
const BEFORE_KILL: Duration = Duration::from_millis(1_200);
const AFTER_KILL: Duration = Duration::from_millis(3_000);
const WINDOW: Duration = Duration::from_millis(100);

struct Result {
    failed: f64,
    recovery_ms: f64,
    /// The slowest 100 ms window after the kill, as a share of a normal one.
    worst_window: f64,
}

fn analyse(outcomes: &[Outcome], started: Instant, killed: Instant) -> Result {
    let window_of =
        |at: Instant| (at.saturating_duration_since(started).as_nanos() / WINDOW.as_nanos()) as usize;
    let windows = window_of(killed + AFTER_KILL) + 1;
    let (mut done, mut failed) = (vec![0u32; windows], vec![0u32; windows]);
    for o in outcomes {
        let w = window_of(o.at).min(windows - 1);
        done[w] += 1;
        if !o.ok {
            failed[w] += 1;
        }
    }
    let kill_window = window_of(killed);
    // Skip the first 300 ms (connections warming) when taking the normal rate.
    let normal: Vec<f64> = (3..kill_window).map(|w| done[w] as f64).collect();
    let normal = median(&normal);
    let last_full = window_of(killed + AFTER_KILL).saturating_sub(1);
    let unhealthy =
        (kill_window..last_full).filter(|&w| failed[w] > 0 || (done[w] as f64) < 0.8 * normal).max();
    let recovery_ms = unhealthy.map_or(0.0, |w| {
        let end = started + WINDOW * (w as u32 + 1);
        end.saturating_duration_since(killed).as_secs_f64() * 1e3
    });
    let worst_window =
        (kill_window..last_full).map(|w| done[w] as f64 / normal).fold(f64::INFINITY, f64::min);
    Result { failed: failed.iter().sum::<u32>() as f64, recovery_ms, worst_window: worst_window * 100.0 }
}

async fn round(registry: &Arc<dyn Registry>, sdk: bool, tag: &str) -> anyhow::Result<Result> {
    let name = format!("vessel-failover-{}-{tag}", std::process::id());
    let mut instances = Vec::new();
    let mut addresses = Vec::new();
    for _ in 0..3 {
        let mut service =
            Service::start("vessel-service", &[("MICRO_REGISTRY", "mdns"), ("MICRO_SERVER_NAME", &name)])?;
        addresses.push(service.ready(Duration::from_secs(10)).await?.1);
        instances.push(service);
    }
    let (started, load) = if sdk {
        let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
        let channel = client.channel(&name);
        wait_pickable(&channel, 3).await?;
        let started = Instant::now();
        let load = tokio::spawn({
            let vessels = VesselServiceClient::new(channel);
            async move { timeline(&vessels, CALLERS, started + BEFORE_KILL + AFTER_KILL).await }
        });
        (started, load)
    } else {
        let endpoints: Vec<Endpoint> = addresses
            .iter()
            .map(|a| Endpoint::from_shared(format!("http://{a}")).map(|e| e.tcp_nodelay(true)))
            .collect::<std::result::Result<_, _>>()?;
        let vessels = VesselServiceClient::new(Channel::balance_list(endpoints.into_iter()));
        let started = Instant::now();
        let load =
            tokio::spawn(
                async move { timeline(&vessels, CALLERS, started + BEFORE_KILL + AFTER_KILL).await },
            );
        (started, load)
    };
    tokio::time::sleep_until(started + BEFORE_KILL).await;
    instances[0].start_kill();
    let killed = Instant::now();
    let outcomes = load.await?;
    for service in instances {
        service.kill().await;
    }
    Ok(analyse(&outcomes, started, killed))
}

/// Figure 4: calls failed and time to recover after a SIGKILL under load.
pub async fn run(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        eprintln!("[4/6 failover] round {}/{ROUNDS}", r + 1);
        for sdk in if r % 2 == 0 { [true, false] } else { [false, true] } {
            let result = round(&registry, sdk, &format!("{r}-{}", if sdk { "sdk" } else { "raw" })).await?;
            if sdk { s.push(result) } else { b.push(result) }
        }
    }
    let baseline_is = "tonic Channel::balance_list over the same 3 addresses";
    let failed = Figure::new(
        "failover_failed_calls",
        s.iter().map(|r| r.failed).sum(),
        b.iter().map(|r| r.failed).sum(),
        "calls",
    )
    .baseline_is(baseline_is);
    let met = s.iter().all(|r| r.failed == 0.0);
    emit(failed.target(format!("0 failed idempotent calls (total of {ROUNDS} kills)"), met));
    emit(
        Figure::new(
            "failover_recovery",
            median(&s.iter().map(|r| r.recovery_ms).collect::<Vec<_>>()),
            median(&b.iter().map(|r| r.recovery_ms).collect::<Vec<_>>()),
            "ms",
        )
        .baseline_is(baseline_is),
    );
    emit(
        Figure::new(
            "failover_throughput_worst_100ms",
            median(&s.iter().map(|r| r.worst_window).collect::<Vec<_>>()),
            median(&b.iter().map(|r| r.worst_window).collect::<Vec<_>>()),
            "%_of_normal",
        )
        .baseline_is(baseline_is),
    );
    Ok(())
}
