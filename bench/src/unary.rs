//! Figure 1: unary FindAvailable through the SDK's named client and through a raw tonic
//! channel on the instance's fixed address, to the same release vessel-service process.

use std::{sync::Arc, time::Duration};

use micro_core::{Client, Registry};
use proto::vessel::vessel_service_client::VesselServiceClient;

use crate::{
    load::{Caller, RawConnections, WithSdkHeaders, concurrent, raw_channel, sequential},
    procs::{self, Service},
    report::{Figure, emit, median, quantile},
    wait_pickable,
};

const ROUNDS: usize = 5;
const SEQUENTIAL_CALLS: usize = 2_000;
const WARM_UP_CALLS: usize = 500;
const CONCURRENT_CALLERS: usize = 64;
const CONCURRENT_LENGTH: Duration = Duration::from_millis(1_000);
/// Connections of the raw client that shows what a pool of connections buys.
const RAW_CONNECTIONS: usize = 4;

#[derive(Default)]
struct Side {
    p50: Vec<f64>,
    p99: Vec<f64>,
    one: Vec<f64>,
    many: Vec<f64>,
    /// CPU time per call at 64 callers, in microseconds: the calling process's, the server's.
    client_cpu: Vec<f64>,
    server_cpu: Vec<f64>,
}

async fn round<C: Caller>(caller: &mut C, side: &mut Side, server: u32) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut latencies = sequential(caller, SEQUENTIAL_CALLS).await?;
    side.one.push(SEQUENTIAL_CALLS as f64 / started.elapsed().as_secs_f64());
    latencies.sort_by(f64::total_cmp);
    side.p50.push(quantile(&latencies, 0.50));
    side.p99.push(quantile(&latencies, 0.99));
    let cpu = || -> anyhow::Result<(f64, f64)> {
        Ok((procs::cpu_seconds(std::process::id())?, procs::cpu_seconds(server)?))
    };
    let before = cpu()?;
    let run = concurrent(caller, CONCURRENT_CALLERS, CONCURRENT_LENGTH).await;
    let after = cpu()?;
    anyhow::ensure!(run.failed == 0, "{} calls failed under load", run.failed);
    side.many.push(run.per_second());
    side.client_cpu.push(run.micros_per_call(after.0 - before.0));
    side.server_cpu.push(run.micros_per_call(after.1 - before.1));
    Ok(())
}

/// Figure 1: latency and throughput of the SDK's client against raw tonic.
pub async fn run(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    let name = format!("vessel-bench-unary-{}", std::process::id());
    let mut server = Service::start("vessel-service", &[("MICRO_SERVER_NAME", &name)])?;
    let (_, address) = server.ready(Duration::from_secs(10)).await?;
    let client = Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let channel = client.channel(&name);
    wait_pickable(&channel, 1).await?;
    let mut sdk = VesselServiceClient::new(channel);
    let mut raw = VesselServiceClient::new(raw_channel(address).await?);
    // Its own connection, so it shares nothing with `raw`.
    let mut headers = WithSdkHeaders(VesselServiceClient::new(raw_channel(address).await?));
    // What several connections buy on this machine: raw tonic over RAW_CONNECTIONS of them.
    let mut pooled = RawConnections::connect(address, RAW_CONNECTIONS).await?;
    sequential(&mut sdk, WARM_UP_CALLS).await?;
    sequential(&mut raw, WARM_UP_CALLS).await?;
    sequential(&mut headers, WARM_UP_CALLS).await?;
    sequential(&mut pooled, WARM_UP_CALLS).await?;

    let (mut s, mut b, mut h, mut p) = (Side::default(), Side::default(), Side::default(), Side::default());
    let server_pid = server.pid();
    for r in 0..ROUNDS {
        eprintln!("[1/6 unary] round {}/{ROUNDS}", r + 1);
        // Rotate which goes first, so a drift of the machine hits all alike.
        for turn in 0..4 {
            match (r + turn) % 4 {
                0 => round(&mut sdk, &mut s, server_pid).await?,
                1 => round(&mut raw, &mut b, server_pid).await?,
                2 => round(&mut headers, &mut h, server_pid).await?,
                _ => round(&mut pooled, &mut p, server_pid).await?,
            }
        }
    }
    server.kill().await;

    let raw_is = "raw tonic Channel to the same instance's address";
    let p50 = Figure::new("unary_latency_p50", median(&s.p50), median(&b.p50), "us").baseline_is(raw_is);
    let met = p50.sdk <= p50.baseline * 1.05;
    emit(p50.target("within 5% of raw", met));
    emit(Figure::new("unary_latency_p99", median(&s.p99), median(&b.p99), "us").baseline_is(raw_is));
    let one = Figure::new("unary_throughput_1_caller", median(&s.one), median(&b.one), "calls/s")
        .baseline_is(raw_is);
    let met = one.sdk >= one.baseline * 0.97;
    emit(one.target(">= 0.97x raw", met));
    let many = Figure::new("unary_throughput_64_callers", median(&s.many), median(&b.many), "calls/s")
        .baseline_is(raw_is);
    // The SDK may open several connections (MICRO_CLIENT_CONNECTIONS); raw has one.
    let met = many.sdk >= many.baseline * 1.3;
    emit(many.target(">= 1.3x one raw connection", met));
    // Where the difference goes: the same raw client sending the SDK's two headers.
    let headers_is = "raw tonic Channel (no headers)";
    emit(
        Figure::new("diag_raw_with_sdk_headers_latency_p50", median(&h.p50), median(&b.p50), "us")
            .baseline_is(headers_is),
    );
    emit(
        Figure::new(
            "diag_raw_with_sdk_headers_throughput_64_callers",
            median(&h.many),
            median(&b.many),
            "calls/s",
        )
        .baseline_is(headers_is),
    );
    emit(
        Figure::new(
            format!("diag_raw_{RAW_CONNECTIONS}_connections_throughput_64_callers"),
            median(&p.many),
            median(&b.many),
            "calls/s",
        )
        .baseline_is("raw tonic Channel (one connection)"),
    );
    // What a call costs each side in CPU: the calling process (this one), and the server it
    // calls. It tells which side a throughput gap comes from.
    emit(
        Figure::new(CLIENT_CPU, median(&s.client_cpu), median(&b.client_cpu), "us")
            .baseline_is(format!("{raw_is}; CPU time of the calling process per call, 64 callers")),
    );
    emit(
        Figure::new(
            "diag_server_cpu_per_call_64_callers",
            median(&s.server_cpu),
            median(&b.server_cpu),
            "us",
        )
        .baseline_is(
            "the same vessel-service called by a raw tonic Channel; its CPU time per call, 64 callers",
        ),
    );
    Ok(())
}

/// The client's CPU time per call: a diagnostic that the runs in child processes report too.
const CLIENT_CPU: &str = "diag_client_cpu_per_call_64_callers";

/// Figure 1 again in `unary-mimalloc`, a child process that allocates with mimalloc (the
/// server keeps glibc's malloc); its figures come back here as `diag_mimalloc_*`. At 64
/// callers the calling process's allocator weighs on the ratio: glibc's malloc contends
/// between the worker threads, and the SDK allocates a few blocks per call more than raw
/// tonic does.
pub async fn run_under_mimalloc() -> anyhow::Result<()> {
    run_in_child(
        "unary-mimalloc",
        "diag_mimalloc",
        "raw tonic Channel; the calling process allocates with mimalloc",
    )
    .await
}

/// Figure 1 again in `unary-logged`, a child process that logs as a service does (JSON lines
/// at info): what the SDK client's spans cost, as `diag_logged_*`. Figure 1 itself runs
/// with no log subscriber, so the client makes no spans there.
pub async fn run_logged() -> anyhow::Result<()> {
    run_in_child(
        "unary-logged",
        "diag_logged",
        "raw tonic Channel; the calling process logs JSON lines at info",
    )
    .await
}

/// Runs `binary`, which prints figure 1's lines, and reports them as `PREFIX_NAME`.
async fn run_in_child(binary: &str, prefix: &str, baseline_is: &str) -> anyhow::Result<()> {
    eprintln!("[1/6 unary] again in {binary}");
    let child = tokio::process::Command::new(procs::binary(binary)?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // Its own progress lines, and its log lines when it logs.
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(pid) = child.id() {
        procs::track(pid);
    }
    let output = child.wait_with_output().await?;
    anyhow::ensure!(output.status.success(), "{binary} failed: {}", output.status);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((name, sdk, baseline, unit)) = parse_figure(line) else { continue };
        if name.starts_with("diag_") && name != CLIENT_CPU {
            continue;
        }
        let name = name.strip_prefix("diag_").unwrap_or(name);
        emit(Figure::new(format!("{prefix}_{name}"), sdk, baseline, unit).baseline_is(baseline_is));
    }
    Ok(())
}

/// NAME, sdk, baseline and unit of a `figure NAME sdk=V baseline=V ratio=V unit=U` line.
pub(crate) fn parse_figure(line: &str) -> Option<(&str, f64, f64, &'static str)> {
    let mut words = line.strip_prefix("figure ")?.split(' ');
    let name = words.next()?;
    let mut value = |key: &str| words.next()?.strip_prefix(key);
    let sdk = value("sdk=")?.parse().ok()?;
    let baseline = value("baseline=")?.parse().ok()?;
    value("ratio=")?;
    let unit = match value("unit=")? {
        "us" => "us",
        "calls/s" => "calls/s",
        "allocs" => "allocs",
        "bytes" => "bytes",
        _ => return None,
    };
    Some((name, sdk, baseline, unit))
}
