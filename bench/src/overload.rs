//! Figure 10: overload. Release `fault-server`s with a fixed capacity (`FAULT_SLOTS` calls
//! at once, each holding its slot `FAULT_HOLD_MS`), so the overload is real and costs no
//! CPU, offered four times what they can serve by raw tonic callers (each call with a 1 s
//! deadline, as in issue 23), with the SDK's adaptive concurrency limit against the same
//! server with the limit off (today's behaviour without it), in the same run.
//!
//! Then two such instances, both kept overloaded by raw callers, called through the SDK's
//! named channel: the attempts per call with adaptive throttling against with it off.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use micro_core::{Client, Registry, config::ClientConfig};
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::{
    load::raw_channel,
    procs::{self, Service},
    report::{Figure, emit, quantile},
    wait_pickable,
};

/// Calls one instance serves at once.
const SLOTS: usize = 8;
/// How long each call holds its slot.
const HOLD: Duration = Duration::from_millis(20);
/// Callers offering four times the capacity.
const CALLERS: usize = 4 * SLOTS;
/// How long each side is loaded; its first half lets the limit settle.
const LENGTH: Duration = Duration::from_secs(3);
/// Each call's deadline.
const DEADLINE: Duration = Duration::from_secs(1);
/// A refused caller's pause before its next call, so refusals do not spin a core.
const PAUSE_AFTER_REFUSAL: Duration = Duration::from_millis(5);

/// What one side of the spike saw, over the second half of the run.
struct Spike {
    /// Calls served per second.
    goodput: f64,
    /// Served calls' latencies, ms, sorted.
    served: Vec<f64>,
    /// Refused calls' latencies, ms, sorted.
    refused: Vec<f64>,
}

/// Starts a fault server of `name` with [`SLOTS`] slots held [`HOLD`] and `env`; returns it
/// with its address, once registered (the first instance of `name` not in `known`).
async fn start(
    name: &str,
    env: &[(&str, &str)],
    registry: &Arc<dyn Registry>,
    known: &[SocketAddr],
) -> anyhow::Result<(Service, SocketAddr)> {
    let slots = SLOTS.to_string();
    let hold = HOLD.as_millis().to_string();
    let mut all =
        vec![("FAULT_NAME", name), ("FAULT_SLOTS", slots.as_str()), ("FAULT_HOLD_MS", hold.as_str())];
    all.extend_from_slice(env);
    let service = Service::start("fault-server", &all)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(node) = known_now(&registry.lookup(name).await.unwrap_or_default(), known) {
            return Ok((service, node.address));
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} did not register within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn known_now<'a>(nodes: &'a [micro_core::Node], known: &[SocketAddr]) -> Option<&'a micro_core::Node> {
    nodes.iter().find(|n| !known.contains(&n.address))
}

/// [`CALLERS`] raw callers back to back for [`LENGTH`]; what the second half saw.
async fn spike(channel: Channel) -> Spike {
    let started = Instant::now();
    let (half, until) = (started + LENGTH / 2, started + LENGTH);
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let mut vessels = VesselServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let (mut served, mut refused) = (Vec::new(), Vec::new());
                while Instant::now() < until && served.len() + refused.len() < 100_000 {
                    let mut request = tonic::Request::new(Specification { capacity: 1, max_weight: 1 });
                    request.set_timeout(DEADLINE);
                    let at = Instant::now();
                    let outcome = vessels.find_available(request).await;
                    let ms = at.elapsed().as_secs_f64() * 1e3;
                    let counted = at >= half;
                    match outcome {
                        Ok(_) if counted => served.push(ms),
                        Ok(_) => {}
                        Err(_) => {
                            if counted {
                                refused.push(ms);
                            }
                            tokio::time::sleep(PAUSE_AFTER_REFUSAL).await;
                        }
                    }
                }
                (served, refused)
            })
        })
        .collect();
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for task in tasks {
        if let Ok((s, r)) = task.await {
            served.extend(s);
            refused.extend(r);
        }
    }
    served.sort_by(f64::total_cmp);
    refused.sort_by(f64::total_cmp);
    let goodput = served.len() as f64 / (LENGTH / 2).as_secs_f64();
    Spike { goodput, served, refused }
}

/// Unloaded latency of one instance: a few callers, fewer than its slots, ms sorted.
async fn unloaded(channel: Channel) -> Vec<f64> {
    let tasks: Vec<_> = (0..SLOTS / 2)
        .map(|_| {
            let mut vessels = VesselServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for _ in 0..50 {
                    let at = Instant::now();
                    if vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await.is_ok() {
                        latencies.push(at.elapsed().as_secs_f64() * 1e3);
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all.sort_by(f64::total_cmp);
    all
}

/// Attempts per call through the SDK to two instances that raw callers keep overloaded.
async fn attempts_per_call(registry: &Arc<dyn Registry>, throttle: bool) -> anyhow::Result<f64> {
    let name = format!("bench-overload-fleet-{}-{throttle}", std::process::id());
    let env = [("MICRO_SERVER_LIMIT", "4")];
    let (_a, a) = start(&name, &env, registry, &[]).await?;
    let (_b, b) = start(&name, &env, registry, &[a]).await?;
    // Keep both full: raw callers on each, back to back.
    let until = Instant::now() + LENGTH;
    let mut load = Vec::new();
    for address in [a, b] {
        let channel = raw_channel(address).await?;
        for _ in 0..CALLERS / 2 {
            let mut vessels = VesselServiceClient::new(channel.clone());
            load.push(tokio::spawn(async move {
                let mut calls = 0;
                while Instant::now() < until && calls < 100_000 {
                    calls += 1;
                    if vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await.is_err() {
                        tokio::time::sleep(PAUSE_AFTER_REFUSAL).await;
                    }
                }
            }));
        }
    }
    let config = ClientConfig { throttle_ratio: if throttle { 2.0 } else { 0.0 }, ..ClientConfig::default() };
    let channel = Client::new(registry.clone()).config(config).channel(&name);
    wait_pickable(&channel, 2).await?;
    let before = attempts(&name);
    let mut calls = 0u64;
    let tasks: Vec<_> = (0..SLOTS)
        .map(|_| {
            let mut vessels = VesselServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while Instant::now() < until && calls < 100_000 {
                    calls += 1;
                    if vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await.is_err() {
                        tokio::time::sleep(PAUSE_AFTER_REFUSAL).await;
                    }
                }
                calls
            })
        })
        .collect();
    for task in tasks {
        calls += task.await.unwrap_or(0);
    }
    for task in load {
        let _ = task.await;
    }
    Ok((attempts(&name) - before) as f64 / calls.max(1) as f64)
}

/// This process's SDK attempts to `service`, every instance and result together.
fn attempts(service: &str) -> u64 {
    let page = micro_core::metrics::metrics().render();
    let label = format!("service=\"{service}\"");
    page.lines()
        .filter(|l| l.starts_with("micro_client_attempts_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Figure 10: the limit against no limit at four times the capacity; attempts per call.
pub async fn run(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    procs::binary("fault-server")?;
    let capacity = SLOTS as f64 / HOLD.as_secs_f64();
    let name = format!("bench-overload-{}", std::process::id());
    let (limited, limited_at) =
        start(&format!("{name}-limited"), &[("MICRO_SERVER_LIMIT_MIN", "4")], &registry, &[]).await?;
    let (unlimited, unlimited_at) =
        start(&format!("{name}-off"), &[("MICRO_SERVER_LIMIT", "off")], &registry, &[]).await?;
    let limited_channel = raw_channel(limited_at).await?;
    let calm = unloaded(limited_channel.clone()).await;
    let with_limit = spike(limited_channel).await;
    let without = spike(raw_channel(unlimited_at).await?).await;
    drop((limited, unlimited));

    let goodput = with_limit.goodput / capacity;
    emit(
        Figure::new("overload_goodput_ratio", goodput, without.goodput / capacity, "x capacity")
            .baseline_is("the same server with MICRO_SERVER_LIMIT=off")
            .target(">= 0.9 of capacity at 4x offered", goodput >= 0.9),
    );
    let (p99, p99_off, calm_p99) =
        (quantile(&with_limit.served, 0.99), quantile(&without.served, 0.99), quantile(&calm, 0.99));
    emit(
        Figure::new("overload_admitted_p99", p99, p99_off, "ms")
            .baseline_is("the same server with MICRO_SERVER_LIMIT=off")
            .target(format!("<= 3x the unloaded p99 ({calm_p99:.1} ms)"), p99 <= 3.0 * calm_p99),
    );
    let refusal_p50 = if with_limit.refused.is_empty() { 0.0 } else { quantile(&with_limit.refused, 0.5) };
    emit(
        Figure::new("overload_refusal_p50", refusal_p50, quantile(&calm, 0.5), "ms")
            .baseline_is("an admitted call's p50, unloaded")
            .target("<= 10 ms", refusal_p50 <= 10.0),
    );
    let throttled = attempts_per_call(&registry, true).await?;
    let unthrottled = attempts_per_call(&registry, false).await?;
    emit(
        Figure::new("overload_attempts_per_call", throttled, unthrottled, "attempts")
            .baseline_is("the same client with MICRO_CLIENT_THROTTLE=off")
            .target("< 1.2 with every instance overloaded", throttled < 1.2),
    );
    Ok(())
}
