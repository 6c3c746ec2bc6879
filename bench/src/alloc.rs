//! Figure 14, `alloc_per_call`: heap allocations (and bytes) per unary FindAvailable call,
//! the SDK's client and server against raw tonic's client and server, in one process.
//!
//! It runs in `alloc-per-call`, a child process whose global allocator counts
//! (`stats_alloc`'s instrumented system allocator), so the count covers both ends of a call
//! and nothing else of `micro-bench` is slowed by the counting. Each side is an in-process
//! server on `127.0.0.1:0` with vessel-service's handler (bookings in SQLite in memory, as
//! figure 1 runs it), and a client to it: the SDK's `Server` on a memory registry and its
//! named channel, against `tonic::transport::Server` and a `Channel` to the address. Two
//! mixed pairs (the SDK's client to the raw server, found by name; a raw channel to the SDK's
//! server) split the SDK's cost between its ends: `alloc_per_call_client` and
//! `alloc_per_call_server`, each against raw client and raw server. The pairs take turns;
//! each round counts [`CALLS`] sequential calls, and each figure is the median of the rounds. micro-bench starts the child ([`run_in_child`]) and reports its
//! figures.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use micro_core::{
    Client, Server,
    config::ServerConfig,
    registry::{MemoryRegistry, Node, Registry},
};
use proto::vessel::{vessel_service_client::VesselServiceClient, vessel_service_server::VesselServiceServer};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region};
use tonic::transport::server::TcpIncoming;
use vessel_service::{Fleet, VesselHandler, store::SqliteStore};

use crate::{
    load::{Caller, raw_channel, sequential},
    procs,
    report::{Figure, emit, median},
    wait_pickable,
};

/// Rounds per side.
const ROUNDS: usize = 5;
/// Sequential calls counted in a round.
pub const CALLS: usize = 2_000;
/// Calls each side makes before the first round (connections, caches, the SQLite statement).
const WARM_UP_CALLS: usize = 500;

/// Allocations and bytes allocated per call over `calls` sequential calls of `caller`.
async fn per_call<C: Caller>(caller: &mut C, calls: usize) -> anyhow::Result<(f64, f64)> {
    // Counts only where `alloc-per-call` made it the global allocator.
    let region = Region::new(&INSTRUMENTED_SYSTEM);
    sequential(caller, calls).await?;
    let change = region.change();
    // A reallocation is an allocation too: a new block, the old one given back.
    let allocations = (change.allocations + change.reallocations) as f64;
    let bytes = change.bytes_allocated as f64 + change.bytes_reallocated.max(0) as f64;
    Ok((allocations / calls as f64, bytes / calls as f64))
}

fn handler() -> anyhow::Result<VesselServiceServer<VesselHandler>> {
    let store = SqliteStore::in_memory().context("an in-memory reservation store")?;
    Ok(VesselServiceServer::new(VesselHandler::new(Fleet::default(), Arc::new(store))))
}

/// Counts both sides and prints `figure alloc_per_call …` and `figure alloc_bytes_per_call
/// …` lines on stdout. Fails when the counting allocator is not the process's global one.
pub async fn run() -> anyhow::Result<()> {
    // The SDK: its server on a memory registry, its named client.
    let registry = Arc::new(MemoryRegistry::new());
    let name = format!("vessel-alloc-{}", std::process::id());
    let loopback = ServerConfig { address: "127.0.0.1:0".parse()?, ..ServerConfig::default() };
    let server = Server::builder(&name).config(loopback).registry(registry.clone()).add_service(handler()?);
    let server = server.start().await?;
    let channel = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS).channel(&name);
    wait_pickable(&channel, 1).await?;
    let mut sdk = VesselServiceClient::new(channel);

    // Raw tonic: its server with the same handler and socket option, a channel to the address.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let raw_server = tokio::spawn(
        tonic::transport::Server::builder().add_service(handler()?).serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stopped.await;
            },
        ),
    );
    let mut raw = VesselServiceClient::new(raw_channel(address).await?);
    // The two mixed pairs split the SDK's cost between its ends: its client against the raw
    // server (found by name in the same registry), raw tonic's client against its server.
    let raw_name = format!("vessel-alloc-raw-{}", std::process::id());
    registry.register(&Node::new(&raw_name, address), Duration::from_secs(600)).await?;
    let channel =
        Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS).channel(&raw_name);
    wait_pickable(&channel, 1).await?;
    let mut sdk_client = VesselServiceClient::new(channel);
    let mut sdk_server = VesselServiceClient::new(raw_channel(server.local_addr()).await?);

    // Pairings by index: the SDK at both ends, raw at both ends, the SDK's client alone, the
    // SDK's server alone.
    macro_rules! count {
        ($index:expr, $calls:expr) => {
            match $index {
                0 => per_call(&mut sdk, $calls).await?,
                1 => per_call(&mut raw, $calls).await?,
                2 => per_call(&mut sdk_client, $calls).await?,
                _ => per_call(&mut sdk_server, $calls).await?,
            }
        };
    }
    for index in 0..4 {
        count!(index, WARM_UP_CALLS);
    }
    anyhow::ensure!(
        count!(1, 10).0 > 0.0,
        "no allocation counted: run the alloc-per-call binary, whose global allocator counts"
    );
    let mut counts = [(); 4].map(|_| (Vec::new(), Vec::new()));
    for r in 0..ROUNDS {
        eprintln!("[alloc] round {}/{ROUNDS}", r + 1);
        // The pairings take turns, from a different one each round.
        for index in (0..4).map(|i| (i + r) % 4) {
            let (allocations, bytes) = count!(index, CALLS);
            counts[index].0.push(allocations);
            counts[index].1.push(bytes);
        }
    }
    let _ = stop.send(());
    let _ = raw_server.await;
    server.stop().await?;
    let [both, baseline, client, server] = counts.map(|(a, b)| (median(&a), median(&b)));
    for (name, sdk) in
        [("alloc_per_call", both), ("alloc_per_call_client", client), ("alloc_per_call_server", server)]
    {
        println!(
            "figure {name} sdk={:.1} baseline={:.1} ratio={:.3} unit=allocs",
            sdk.0,
            baseline.0,
            sdk.0 / baseline.0
        );
        let name = name.replace("alloc_per_call", "alloc_bytes_per_call");
        println!(
            "figure {name} sdk={:.0} baseline={:.0} ratio={:.3} unit=bytes",
            sdk.1,
            baseline.1,
            sdk.1 / baseline.1
        );
    }
    Ok(())
}

/// Figure 14 from `alloc-per-call`, a child process with the counting allocator; its lines
/// come back here as figures.
pub async fn run_in_child() -> anyhow::Result<()> {
    eprintln!("[alloc] allocations per call, in alloc-per-call");
    let child = tokio::process::Command::new(procs::binary("alloc-per-call")?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id();
    if let Some(pid) = pid {
        procs::track(pid);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .context("alloc-per-call did not end within 120 s")??;
    if let Some(pid) = pid {
        procs::untrack(pid);
    }
    anyhow::ensure!(output.status.success(), "alloc-per-call failed: {}", output.status);
    let baseline_is = "raw tonic client and server, same handler, same process";
    let mut found = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((name, sdk, baseline, unit)) = crate::unary::parse_figure(line) else { continue };
        emit(Figure::new(name, sdk, baseline, unit).baseline_is(baseline_is));
        found += 1;
    }
    anyhow::ensure!(found == 6, "alloc-per-call printed {found} figures, not 6");
    Ok(())
}
