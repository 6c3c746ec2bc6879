//! micro-bench: the SDK against its baselines, measured side by side in one run. Prints one
//! `figure NAME sdk=V baseline=V ratio=V unit=U` line per figure on stdout (progress on
//! stderr) and, with `--results FILE`, writes the results as Markdown.
//!
//! Run it with `make bench`: it needs the release binaries next to it and a private network
//! namespace (`scripts/netns-run`) for mDNS. The whole run stops by itself within
//! [`TIME_LIMIT`]. `--only FIGURE` (unary, alloc, resolve, discovery, failover, memory, silent,
//! gateway, overload, broker, create, security, stream) measures one figure, e.g. while working on it; `--brokers LIST`
//! (comma-separated, default every one of [`broker::BACKENDS`]) narrows the broker figure
//! to some backends.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use bench::{
    alloc, broker, create, discovery, failover, gateway, memory, overload, procs, report,
    require_private_netns, resolve, security, silent, stream, unary,
};
use micro_core::{Registry, registry::MdnsRegistry};
use tokio::time::Instant;

/// The whole run's bound; the watchdog kills every child and exits past it.
const TIME_LIMIT: Duration = Duration::from_secs(360);

const EXPLANATIONS: &str = include_str!("../EXPLAINED.md");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let results = match args.iter().position(|a| a == "--results") {
        Some(i) => Some(args.get(i + 1).context("--results needs a file")?.clone()),
        None => None,
    };
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => {
            let figure = args.get(i + 1).context("--only needs a figure")?;
            anyhow::ensure!(FIGURES.contains(&figure.as_str()), "--only takes one of {FIGURES:?}");
            Some(figure.clone())
        }
        None => None,
    };
    let brokers: Vec<String> = match args.iter().position(|a| a == "--brokers") {
        Some(i) => {
            let list = args.get(i + 1).context("--brokers needs a list, e.g. memory,nats")?;
            let list: Vec<String> = list.split(',').map(str::to_owned).collect();
            for backend in &list {
                anyhow::ensure!(
                    broker::BACKENDS.contains(&backend.as_str()),
                    "--brokers takes some of {:?}, comma-separated",
                    broker::BACKENDS
                );
            }
            list
        }
        None => broker::BACKENDS.map(str::to_owned).to_vec(),
    };
    require_private_netns()?;
    procs::start_watchdog("micro-bench", TIME_LIMIT);
    let started = Instant::now();
    eprintln!("micro-bench on {}", report::machine());
    let outcome = run(only.as_deref(), &brokers).await;
    procs::kill_all_children();
    outcome?;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("micro-bench: done in {elapsed:.0} s");
    if let Some(path) = results {
        let command = "scripts/netns-run target/release/micro-bench --results bench/results.md";
        std::fs::write(&path, report::results_markdown(command, elapsed, EXPLANATIONS))
            .with_context(|| format!("could not write {path}"))?;
        eprintln!("micro-bench: wrote {path}");
    }
    Ok(())
}

/// The figures `--only` takes, in the order they run.
const FIGURES: [&str; 13] = [
    "unary",
    "alloc",
    "resolve",
    "discovery",
    "failover",
    "memory",
    "silent",
    "gateway",
    "overload",
    "broker",
    "create",
    "security",
    "stream",
];

/// Every figure, or only the one named; the broker figure for the backends in `brokers`.
async fn run(only: Option<&str>, brokers: &[String]) -> anyhow::Result<()> {
    let wanted = |figure: &str| only.is_none_or(|only| only == figure);
    // One long-lived mDNS browse, as a running service has.
    let registry: Arc<dyn Registry> = Arc::new(MdnsRegistry::new(Duration::from_secs(3))?);
    if wanted("unary") {
        unary::run(registry.clone()).await.context("figure 1 (unary)")?;
        unary::run_under_mimalloc().await.context("figure 1 again, under mimalloc")?;
        unary::run_logged().await.context("figure 1 again, logging as a service does")?;
    }
    if wanted("alloc") {
        alloc::run_in_child().await.context("figure 14 (allocations per call)")?;
    }
    if wanted("resolve") {
        resolve::run().await.context("figure 2 (resolution)")?;
    }
    if wanted("discovery") {
        discovery::run_mdns(registry.clone()).await.context("figure 3 (mdns discovery)")?;
        discovery::run_consul().await.context("figure 3 (consul discovery)")?;
    }
    if wanted("gateway") {
        gateway::run(registry.clone()).await.context("figure 8 (gateway)")?;
    }
    if wanted("failover") {
        failover::run(registry.clone()).await.context("figure 4 (failover)")?;
    }
    if wanted("memory") {
        memory::run().await.context("figure 5 (memory)")?;
    }
    if wanted("silent") {
        silent::run().await.context("figure 6 (silent failures across hosts)")?;
    }
    if wanted("overload") {
        overload::run(registry.clone()).await.context("figure 10 (overload)")?;
    }
    if wanted("broker") {
        broker::run(brokers).await?;
    }
    if wanted("create") {
        create::run().await.context("figure 11 (creations with reservations)")?;
    }
    if wanted("security") {
        security::run_authz().context("figure 12 (policy decisions)")?;
        security::run_mtls(registry.clone()).await.context("figure 12 (mutual TLS)")?;
    }
    if wanted("stream") {
        stream::run_throughput().await.context("figure 13 (stream throughput)")?;
        stream::run_resume(registry.clone()).await.context("figure 13 (stream resume)")?;
    }
    Ok(())
}
