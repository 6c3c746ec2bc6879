//! The pieces of `make bench`: each figure's module, the processes it starts, and the report.
//! The binaries are `micro-bench` (every figure), `unary-mimalloc` (figure 1 again, in a
//! process that allocates with mimalloc) and `alloc-per-call` (figure 14, in a process whose
//! allocator counts). [`peers`] is the SDK side of `make bench-peers`,
//! which bench/peers (outside the workspace) uses through a path dependency.

pub mod alloc;
pub mod broker;
pub mod create;
pub mod discovery;
pub mod failover;
pub mod gateway;
pub mod load;
pub mod memory;
pub mod overload;
pub mod peers;
pub mod procs;
pub mod report;
pub mod resolve;
pub mod security;
pub mod silent;
pub mod stream;
pub mod unary;

use anyhow::bail;
use micro_core::NamedChannel;
use std::time::Duration;
use tokio::time::Instant;

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

/// Fails unless this process is in a private network namespace with only loopback.
pub fn require_private_netns() -> anyhow::Result<()> {
    e2e::in_private_netns().map_err(|interfaces| {
        anyhow::anyhow!(
            "micro-bench uses mDNS and must run in a private network namespace with only loopback \
             (found {interfaces:?}): run `make bench`, or `scripts/netns-run target/release/micro-bench`"
        )
    })
}
