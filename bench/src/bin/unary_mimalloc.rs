//! unary-mimalloc: figure 1 of micro-bench (the SDK's client against raw tonic, both to the
//! same vessel-service) in a process that allocates with mimalloc. micro-bench starts it and
//! reports its figures as `diag_mimalloc_*`; run alone, it prints them.

use std::{sync::Arc, time::Duration};

use bench::{procs, require_private_netns, unary};
use micro_core::registry::MdnsRegistry;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Figure 1 takes about 25 s here.
const TIME_LIMIT: Duration = Duration::from_secs(90);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    require_private_netns()?;
    procs::start_watchdog("unary-mimalloc", TIME_LIMIT);
    let registry = Arc::new(MdnsRegistry::new(Duration::from_secs(3))?);
    let outcome = unary::run(registry).await;
    procs::kill_all_children();
    outcome
}
