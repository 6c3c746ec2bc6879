//! Figure 5: resident memory of a release vessel-service (mDNS registry, SDK server) and of
//! raw-vessel (the same handler on plain tonic), idle and under 64 callers; idle, also its
//! private part (`RssAnon`: heap and stacks, not the executable's shared clean pages). The load comes
//! from raw tonic channels in this process, the same for both, so the server-side
//! throughput is compared too.

use std::time::Duration;

use proto::vessel::vessel_service_client::VesselServiceClient;
use tokio::time::Instant;

use crate::{
    load::{Caller, concurrent, raw_channel, sequential},
    procs::{self, Service},
    report::{Figure, emit, median},
};

const ROUNDS: usize = 3;
const IDLE: Duration = Duration::from_millis(1_500);
const LOAD: Duration = Duration::from_millis(1_500);
const CALLERS: usize = 64;

/// Megabytes (10^6 bytes), the unit of the target.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// Loads `service` for [`LOAD`]; the highest RSS seen (MB), the calls per second and the
/// service's CPU time per call (microseconds).
async fn loaded(service: &Service, address: std::net::SocketAddr) -> anyhow::Result<(f64, f64, f64)> {
    let mut vessels = VesselServiceClient::new(raw_channel(address).await?);
    vessels.call().await?;
    let cpu_before = procs::cpu_seconds(service.pid())?;
    let load = tokio::spawn(async move { concurrent(&vessels, CALLERS, LOAD).await });
    let mut highest = 0;
    let until = Instant::now() + LOAD;
    while Instant::now() < until {
        highest = highest.max(service.memory_kib()?.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = load.await?;
    let cpu = run.micros_per_call(procs::cpu_seconds(service.pid())? - cpu_before);
    anyhow::ensure!(run.failed == 0, "{} calls failed under load", run.failed);
    highest = highest.max(service.memory_kib()?.0);
    Ok((mb(highest), run.per_second(), cpu))
}

/// Figure 5: the RSS of an idle vessel-service and under load.
pub async fn run() -> anyhow::Result<()> {
    let (mut idle, mut busy, mut rate) = ((vec![], vec![]), (vec![], vec![]), (vec![], vec![]));
    let mut private = (vec![], vec![]);
    let mut cpu = (vec![], vec![]);
    for r in 0..ROUNDS {
        eprintln!("[5/6 memory] round {}/{ROUNDS}", r + 1);
        let name = format!("vessel-memory-{}-{r}", std::process::id());
        let mut sdk =
            Service::start("vessel-service", &[("MICRO_REGISTRY", "mdns"), ("MICRO_SERVER_NAME", &name)])?;
        let mut raw = Service::start("raw-vessel", &[])?;
        let sdk_address = sdk.ready(Duration::from_secs(10)).await?.1;
        let raw_address = raw.ready(Duration::from_secs(10)).await?.1;
        // Idle: started, registered, one call served, then left alone.
        sequential(&mut VesselServiceClient::new(raw_channel(sdk_address).await?), 1).await?;
        sequential(&mut VesselServiceClient::new(raw_channel(raw_address).await?), 1).await?;
        tokio::time::sleep(IDLE).await;
        let (sdk_memory, raw_memory) = (sdk.memory_kib()?, raw.memory_kib()?);
        idle.0.push(mb(sdk_memory.0));
        idle.1.push(mb(raw_memory.0));
        private.0.push(mb(sdk_memory.1));
        private.1.push(mb(raw_memory.1));
        let order = if r % 2 == 0 { [true, false] } else { [false, true] };
        for is_sdk in order {
            let (service, address) = if is_sdk { (&sdk, sdk_address) } else { (&raw, raw_address) };
            let (highest, per_second, per_call) = loaded(service, address).await?;
            if is_sdk {
                busy.0.push(highest);
                rate.0.push(per_second);
                cpu.0.push(per_call);
            } else {
                busy.1.push(highest);
                rate.1.push(per_second);
                cpu.1.push(per_call);
            }
        }
        sdk.kill().await;
        raw.kill().await;
    }
    let raw_is = "raw-vessel: the same handler on plain tonic";
    let idle = Figure::new("memory_rss_idle", median(&idle.0), median(&idle.1), "MB").baseline_is(raw_is);
    let met = idle.sdk < 10.0;
    emit(idle.target("< 10 MB idle", met));
    emit(
        Figure::new("memory_private_idle", median(&private.0), median(&private.1), "MB").baseline_is(raw_is),
    );
    emit(Figure::new("memory_rss_under_load", median(&busy.0), median(&busy.1), "MB").baseline_is(raw_is));
    emit(
        Figure::new("server_throughput_64_callers", median(&rate.0), median(&rate.1), "calls/s")
            .baseline_is(format!("{raw_is} (load from raw tonic clients)")),
    );
    emit(
        Figure::new("diag_server_cpu_per_call_raw_callers", median(&cpu.0), median(&cpu.1), "us")
            .baseline_is(format!("{raw_is}; the server's CPU time per call under the same load")),
    );
    Ok(())
}
