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
    report::{Figure, emit, median, quantile},
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
}

async fn round<C: Caller>(caller: &mut C, side: &mut Side) -> anyhow::Result<()> {
    let mut latencies = sequential(caller, SEQUENTIAL_CALLS).await?;
    latencies.sort_by(f64::total_cmp);
    side.p50.push(quantile(&latencies, 0.50));
    let run = concurrent(caller, CONCURRENT_CALLERS, CONCURRENT_LENGTH).await;
    anyhow::ensure!(run.failed == 0, "{} calls failed under load", run.failed);
    side.many.push(run.per_second());
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
    if let Some(pid) = gateway.id() {
        procs::track(pid);
    }
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
    for r in 0..ROUNDS {
        eprintln!("[8 gateway] round {}/{ROUNDS}", r + 1);
        if r % 2 == 0 {
            round(&mut through, &mut g).await?;
            round(&mut direct, &mut d).await?;
        } else {
            round(&mut direct, &mut d).await?;
            round(&mut through, &mut g).await?;
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
    Ok(())
}
