//! The SDK side of `make bench-peers`: everything `bench/peers` (micro's named client
//! against volo-grpc) takes from micro-core, vessel-service and shippy's protos. bench/peers
//! stays outside the workspace so volo-grpc never weighs on `make test`, and keeps only
//! what is volo's; this module is compiled by `make test` with the rest of `bench`, so an
//! SDK change that would break bench/peers breaks the workspace's build instead.
//!
//! - the handler both servers share ([`VesselHandler`]: vessel-service's own), which the
//!   volo-grpc server wraps;
//! - the vessel-service process and micro's named client to it ([`start_vessel_service`],
//!   [`micro_client`]);
//! - a round of calls through any [`Caller`] and the printed figures ([`round`], [`print`]).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use micro_core::{Client, NamedChannel, Node, Registry, registry::MemoryRegistry};
use proto::vessel::vessel_service_server::VesselService;
use proto::vessel::{Specification, Vessel, vessel_service_client::VesselServiceClient};
use tonic::Status;
use vessel_service::{Fleet, store::SqliteStore};

use crate::{
    load::{Caller, concurrent, sequential},
    report::{median, quantile},
};

/// Rounds per side; the sides alternate, and each figure is the median of its rounds.
pub const ROUNDS: usize = 5;
/// Calls one after the other in a round (latency, one caller's throughput).
pub const SEQUENTIAL_CALLS: usize = 2_000;
/// Calls each side makes before the first round.
pub const WARM_UP_CALLS: usize = 500;
/// Tasks calling at once in a round's throughput part.
pub const CALLERS: usize = 64;
/// How long the throughput part of a round lasts.
pub const LOAD: Duration = Duration::from_millis(1_000);
/// Name vessel-service registers under in the peers' memory registry.
const VESSEL_SERVICE: &str = "vessel-service";

/// vessel-service's own handler (its fleet, fit rule and booked loads, read from a
/// reservation store on every call), for a server other than the SDK's to wrap.
pub struct VesselHandler(vessel_service::VesselHandler);

impl VesselHandler {
    /// The default fleet with an empty in-memory SQLite store, as the bench runs vessel-service.
    pub fn in_memory() -> anyhow::Result<Self> {
        let store = SqliteStore::in_memory().context("an in-memory reservation store")?;
        Ok(VesselHandler(vessel_service::VesselHandler::new(Fleet::default(), Arc::new(store))))
    }

    /// The vessel that fits `spec`, or the status vessel-service answers.
    pub async fn find_available(&self, spec: Specification) -> Result<Vessel, Status> {
        let answer = self.0.find_available(tonic::Request::new(spec)).await?.into_inner();
        answer.vessel.ok_or_else(|| Status::internal("vessel-service answered without a vessel"))
    }
}

/// A child process that printed its address; killed when dropped.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` and waits for its `listening ADDR` line or the SDK's `registered` JSON
/// log line (`MICRO_LOG_FORMAT=json`), whichever names its address first.
pub fn start(program: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(Server, SocketAddr)> {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {}", program.display()))?;
    let mut lines = BufReader::new(child.stderr.take().context("the child's stderr")?).lines();
    let server = Server(child);
    for line in lines.by_ref() {
        let line = line.context("reading the child's log")?;
        if let Some(address) = crate::procs::ready_address(&line) {
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((server, address));
        }
    }
    bail!("{} exited before it was ready", program.display())
}

/// The release vessel-service to start: `VESSEL_SERVICE_BIN`, else the workspace's
/// `target/release/vessel-service`.
pub fn vessel_service_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("VESSEL_SERVICE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vessel-service"),
        PathBuf::from,
    );
    if !path.is_file() {
        bail!(
            "{} not found: `cargo build --release -p vessel-service` first (make bench-peers does)",
            path.display()
        );
    }
    Ok(path)
}

/// vessel-service on a free loopback port, on the memory registry (nothing to discover: the
/// client is told its address), and the address it serves on.
pub fn start_vessel_service() -> anyhow::Result<(Server, SocketAddr)> {
    start(&vessel_service_bin()?, &[], &VESSEL_SERVICE_ENV)
}

/// vessel-service's settings here: events through the in-process broker (so no
/// subscriber's server registers before the service's own), bookings in memory, as in
/// `make bench`.
const VESSEL_SERVICE_ENV: [(&str, &str); 6] = [
    ("MICRO_REGISTRY", "memory"),
    ("MICRO_BROKER", "memory"),
    ("VESSEL_DB", ":memory:"),
    ("MICRO_SERVER_ADDRESS", "127.0.0.1:0"),
    ("MICRO_LOG_FORMAT", "json"),
    ("RUST_LOG", "info"),
];

/// micro's named client to the vessel-service at `address`: a memory registry that lists
/// it, and a channel by name with shippy's idempotent methods.
pub async fn micro_client(address: SocketAddr) -> anyhow::Result<VesselServiceClient<NamedChannel>> {
    let registry = Arc::new(MemoryRegistry::new());
    registry.register(&Node::new(VESSEL_SERVICE, address), Duration::from_secs(600)).await?;
    let registry: Arc<dyn Registry> = registry;
    let client = Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS);
    Ok(VesselServiceClient::new(client.channel(VESSEL_SERVICE)))
}

/// What one side measured, a value per round.
#[derive(Default)]
pub struct Side {
    /// Median latency of the sequential calls, µs.
    pub p50: Vec<f64>,
    /// 99th percentile latency of the sequential calls, µs.
    pub p99: Vec<f64>,
    /// Sequential calls per second.
    pub one: Vec<f64>,
    /// Successful calls per second from [`CALLERS`] tasks.
    pub many: Vec<f64>,
}

/// One round for one side: [`SEQUENTIAL_CALLS`] calls one after the other, then
/// [`CALLERS`] tasks calling for [`LOAD`].
pub async fn round<C: Caller>(caller: &mut C, side: &mut Side) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut latencies = sequential(caller, SEQUENTIAL_CALLS).await?;
    side.one.push(SEQUENTIAL_CALLS as f64 / started.elapsed().as_secs_f64());
    latencies.sort_by(f64::total_cmp);
    side.p50.push(quantile(&latencies, 0.5));
    side.p99.push(quantile(&latencies, 0.99));
    side.many.push(concurrent(caller, CALLERS, LOAD).await.per_second());
    Ok(())
}

/// Prints the four figures of the SDK against `peer` (e.g. `volo`), one line each:
/// `figure peer_volo_latency_p50 sdk=… baseline=… ratio=… unit=us`.
pub fn print(peer: &str, sdk: &Side, baseline: &Side) {
    let figures: [(&str, &Vec<f64>, &Vec<f64>, &str); 4] = [
        ("latency_p50", &sdk.p50, &baseline.p50, "us"),
        ("latency_p99", &sdk.p99, &baseline.p99, "us"),
        ("throughput_1_caller", &sdk.one, &baseline.one, "calls/s"),
        ("throughput_64_callers", &sdk.many, &baseline.many, "calls/s"),
    ];
    for (name, sdk, baseline, unit) in figures {
        let (sdk, baseline) = (median(sdk), median(baseline));
        println!(
            "figure peer_{peer}_{name} sdk={sdk:.1} baseline={baseline:.1} ratio={:.3} unit={unit}",
            sdk / baseline
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `make bench-peers` runs on the SDK's side, with the debug vessel-service, so a
    /// change that breaks it is seen by `make test` (volo-grpc's side is built only there).
    #[tokio::test]
    async fn the_sdk_side_starts_vessel_service_and_calls_it_by_name() {
        let (_server, address) = start(&e2e::process::binary("vessel-service"), &[], &VESSEL_SERVICE_ENV)
            .expect("vessel-service starts");
        let mut client = micro_client(address).await.expect("a client");
        client.call().await.expect("a call by name");
    }

    #[tokio::test]
    async fn the_shared_handler_answers_as_vessel_service_does() {
        let handler = VesselHandler::in_memory().expect("a store");
        let vessel = handler.find_available(crate::load::spec()).await.expect("the default fleet fits");
        assert!(vessel.capacity >= 3 && vessel.max_weight >= 55_000, "{vessel:?}");
        let bad = Specification { capacity: 0, max_weight: 1 };
        assert_eq!(handler.find_available(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
