//! micro-bench: the SDK against its baselines, measured side by side in one run. Prints one
//! `figure NAME sdk=V baseline=V ratio=V unit=U` line per figure on stdout (progress on
//! stderr) and, with `--results FILE`, writes the results as Markdown.
//!
//! Run it with `make bench`: it needs the release binaries next to it and a private network
//! namespace (`scripts/netns-run`) for mDNS. The whole run stops by itself within
//! [`TIME_LIMIT`].

mod discovery;
mod failover;
mod load;
mod memory;
mod procs;
mod report;
mod resolve;
mod unary;

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use micro_core::{NamedChannel, Registry, registry::MdnsRegistry};
use tokio::time::Instant;

/// The whole run's bound; the watchdog kills every child and exits past it.
const TIME_LIMIT: Duration = Duration::from_secs(170);

/// Waits up to 10 s until `channel` can pick `count` instances.
pub async fn wait_pickable(channel: &NamedChannel, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while channel.pickable().len() != count {
        if Instant::now() > deadline {
            bail!("{} has {} pickable instances, expected {count}", channel.name(), channel.pickable().len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn require_private_netns() -> anyhow::Result<()> {
    e2e::in_private_netns().map_err(|interfaces| {
        anyhow::anyhow!(
            "micro-bench uses mDNS and must run in a private network namespace with only loopback \
             (found {interfaces:?}): run `make bench`, or `scripts/netns-run target/release/micro-bench`"
        )
    })
}

const EXPLANATIONS: &str = include_str!("../EXPLAINED.md");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let results = match args.iter().position(|a| a == "--results") {
        Some(i) => Some(args.get(i + 1).context("--results needs a file")?.clone()),
        None => None,
    };
    require_private_netns()?;
    std::thread::spawn(|| {
        std::thread::sleep(TIME_LIMIT);
        eprintln!("micro-bench: over its {TIME_LIMIT:?} limit; stopping");
        procs::kill_all_children();
        std::process::exit(3);
    });
    let started = Instant::now();
    eprintln!("micro-bench on {}", report::machine());
    let outcome = run().await;
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

async fn run() -> anyhow::Result<()> {
    // One long-lived mDNS browse, as a running service has.
    let registry: Arc<dyn Registry> = Arc::new(MdnsRegistry::new(Duration::from_secs(3))?);
    unary::run(registry.clone()).await.context("figure 1 (unary)")?;
    resolve::run().await.context("figure 2 (resolution)")?;
    discovery::run_mdns(registry.clone()).await.context("figure 3 (mdns discovery)")?;
    discovery::run_consul().await.context("figure 3 (consul discovery)")?;
    failover::run(registry).await.context("figure 4 (failover)")?;
    memory::run().await.context("figure 5 (memory)")?;
    Ok(())
}
