//! alloc-per-call: figure 14 of micro-bench, heap allocations and bytes per unary call, the
//! SDK's client and server against raw tonic's, in a process whose global allocator counts
//! (the system allocator, counted by `stats_alloc`). micro-bench starts it and reports its
//! figures; run alone (inside `scripts/netns-run`), it prints them.

use std::time::Duration;

use bench::{alloc, procs, require_private_netns};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static COUNTING: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// The figure takes a few seconds.
const TIME_LIMIT: Duration = Duration::from_secs(90);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    require_private_netns()?;
    procs::start_watchdog("alloc-per-call", TIME_LIMIT);
    alloc::run().await
}
