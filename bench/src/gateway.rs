//! Figure 8: unary FindAvailable through `micro gateway` (HTTP/1.1 + JSON, a keep-alive
//! connection per caller) against the same calls made directly with the SDK's named
//! client, to the same release vessel-service process, in the same run.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use micro_core::{Client, Registry};
use proto::vessel::vessel_service_client::VesselServiceClient;
use tokio::time::Instant;
use tonic::Status;

use crate::{
    load::{Caller, concurrent, sequential},
    procs::{self, Service},
    report::{Figure, emit, median, note, quantile},
    wait_pickable,
};

const ROUNDS: usize = 3;
const SEQUENTIAL_CALLS: usize = 1_000;
const WARM_UP_CALLS: usize = 200;
const CONCURRENT_CALLERS: usize = 32;
const CONCURRENT_LENGTH: Duration = Duration::from_millis(1_000);
/// The gateway's request body: the same specification [`crate::load::spec`] sends.
const BODY: &str = r#"{"capacity": 3, "maxWeight": 55000}"#;

/// One FindAvailable through the gateway.
#[derive(Clone)]
struct ThroughGateway {
    http: reqwest::Client,
    url: String,
}

impl Caller for ThroughGateway {
    async fn call(&mut self) -> Result<(), Status> {
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|err| Status::unavailable(err.to_string()))?;
        if !status.is_success() {
            return Err(Status::unknown(format!("{status}: {}", String::from_utf8_lossy(&body))));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Side {
    p50: Vec<f64>,
    many: Vec<f64>,
    /// CPU time per call under load, of every process taking part, in microseconds.
    cpu: Vec<f64>,
    /// The same, process by process (in the order of the round's `pids`).
    cpu_by_process: Vec<Vec<f64>>,
}

/// The CPU time each of `pids` has used so far.
fn cpu_seconds(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter().map(|&pid| procs::cpu_seconds(pid)).collect()
}

/// One round of `caller`; `pids` are the processes its calls run through (this one, the
/// service, and the gateway when it is on the way), whose CPU time is shared out per call.
async fn round<C: Caller>(caller: &mut C, side: &mut Side, pids: &[u32]) -> anyhow::Result<()> {
    let mut latencies = sequential(caller, SEQUENTIAL_CALLS).await?;
    latencies.sort_by(f64::total_cmp);
    side.p50.push(quantile(&latencies, 0.50));
    let before = cpu_seconds(pids)?;
    let run = concurrent(caller, CONCURRENT_CALLERS, CONCURRENT_LENGTH).await;
    let after = cpu_seconds(pids)?;
    anyhow::ensure!(run.failed == 0, "{} calls failed under load", run.failed);
    side.many.push(run.per_second());
    let per_call: Vec<f64> =
        after.iter().zip(&before).map(|(after, before)| run.micros_per_call(after - before)).collect();
    side.cpu.push(per_call.iter().sum());
    side.cpu_by_process.resize(per_call.len(), Vec::new());
    for (process, cpu) in side.cpu_by_process.iter_mut().zip(per_call) {
        process.push(cpu);
    }
    Ok(())
}

/// A loopback port free a moment ago, for the gateway to bind.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Figure 8: the gateway's latency and throughput against the SDK client's.
pub async fn run(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    let name = format!("vessel-bench-gateway-{}", std::process::id());
    let mut server = Service::start("vessel-service", &[("MICRO_SERVER_NAME", &name)])?;
    server.ready(Duration::from_secs(10)).await?;
    let address = format!("127.0.0.1:{}", free_port()?);
    let mut gateway = tokio::process::Command::new(procs::binary("micro")?)
        .arg("gateway")
        .env("MICRO_GATEWAY_ADDRESS", &address)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("could not start micro gateway")?;
    let gateway_pid = gateway.id().context("micro gateway's pid")?;
    procs::track(gateway_pid);
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENT_CALLERS).build()?;
    let mut through =
        ThroughGateway { http, url: format!("http://{address}/{name}/vessel.VesselService/FindAvailable") };
    let deadline = Instant::now() + Duration::from_secs(15);
    while through.call().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "micro gateway on {address} did not answer within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let channel = client.channel(&name);
    wait_pickable(&channel, 1).await?;
    let mut direct = VesselServiceClient::new(channel);
    sequential(&mut direct, WARM_UP_CALLS).await?;
    sequential(&mut through, WARM_UP_CALLS).await?;

    let (mut g, mut d) = (Side::default(), Side::default());
    let direct_pids = [std::process::id(), server.pid()];
    let gateway_pids = [std::process::id(), server.pid(), gateway_pid];
    for r in 0..ROUNDS {
        eprintln!("[8 gateway] round {}/{ROUNDS}", r + 1);
        if r % 2 == 0 {
            round(&mut through, &mut g, &gateway_pids).await?;
            round(&mut direct, &mut d, &direct_pids).await?;
        } else {
            round(&mut direct, &mut d, &direct_pids).await?;
            round(&mut through, &mut g, &gateway_pids).await?;
        }
    }
    let _ = gateway.kill().await;
    server.kill().await;

    let direct_is = "the SDK's named client calling the same instance directly (gRPC)";
    emit(Figure::new("gateway_latency_p50", median(&g.p50), median(&d.p50), "us").baseline_is(direct_is));
    emit(
        Figure::new("gateway_throughput_32_callers", median(&g.many), median(&d.many), "calls/s")
            .baseline_is(direct_is),
    );
    // With every core busy, throughput is at most the inverse of the CPU a call costs: the
    // gateway's share of the direct figure cannot pass direct / gateway here.
    let cpu = Figure::new("diag_gateway_cpu_per_call", median(&g.cpu), median(&d.cpu), "us");
    emit(cpu.baseline_is(format!(
        "{direct_is}; CPU time of this process, the service and the gateway under load, per call"
    )));
    let by_process =
        |side: &Side| side.cpu_by_process.iter().map(|cpu| format!("{:.0}", median(cpu))).collect::<Vec<_>>();
    let (gateway, direct) = (by_process(&g), by_process(&d));
    note(format!(
        "gateway CPU per call (us): through the gateway, caller {} + service {} + gateway {}; \
         direct, caller {} + service {}",
        gateway[0], gateway[1], gateway[2], direct[0], direct[1]
    ));
    Ok(())
}
