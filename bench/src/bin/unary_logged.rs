//! unary-logged: figure 1 of micro-bench (the SDK's client against raw tonic, both to the
//! same vessel-service) in a process that logs as a service does: micro-core's log set-up,
//! JSON lines at info (`LogArgs::init`). The SDK's client then makes its call and attempt
//! spans, which raw tonic does not. micro-bench starts it and reports its figures as
//! `diag_logged_*`; run alone, it prints them.

use std::{sync::Arc, time::Duration};

use bench::{procs, require_private_netns, unary};
use micro_core::{
    cli::{LogArgs, LogFormat, TelemetryArgs},
    registry::MdnsRegistry,
};

/// Figure 1 takes about 25 s here.
const TIME_LIMIT: Duration = Duration::from_secs(90);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    require_private_netns()?;
    LogArgs { log_format: LogFormat::Json, telemetry: TelemetryArgs::default() }.init("info");
    procs::start_watchdog("unary-logged", TIME_LIMIT);
    let registry = Arc::new(MdnsRegistry::new(Duration::from_secs(3))?);
    let outcome = unary::run(registry).await;
    procs::kill_all_children();
    outcome
}
