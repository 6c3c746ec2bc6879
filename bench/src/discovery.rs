//! Figure 3: from a fresh vessel-service process to the first successful call from this
//! process, over mDNS and over Consul.
//!
//! Times are taken from the spawn of the vessel-service process and from the moment its
//! `registered` log line reached this process (JSON logs on a pipe, read as they come).
//! The SDK side is a channel made before the spawn, as a running consumer has: its call
//! waits for the registry's watch. The baseline is what a program without the SDK does:
//! for mDNS a fresh mdns-sd daemon and a plain browse started at the spawn, waiting for
//! `ServiceResolved` of the name; for Consul a poll of `/v1/health/service/NAME?passing`
//! every 10 ms; then a raw tonic connect and call.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
use micro_core::{Client, Registry, registry::SERVICE_TYPE};
use proto::vessel::vessel_service_client::VesselServiceClient;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

use crate::{
    load::{Caller, raw_channel},
    procs::Service,
    report::{Figure, emit, median, note},
};

const TRIALS: usize = 5;
const COLD_TRIALS: usize = 3;
const LIMIT: Duration = Duration::from_secs(6);
/// How long a channel follows its name before the service starts.
const SETTLE: Duration = Duration::from_millis(200);
/// How long a service has been registered when a cold consumer starts: past the mDNS
/// announcements and their once-a-second rate limit.
const REGISTERED_FOR: Duration = Duration::from_millis(1_100);

/// Milliseconds from spawn and from the registration log line to the first OK call.
struct Trial {
    from_spawn: f64,
    from_registered: f64,
    spawn_to_registered: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn finish(mut service: Service, first_ok: Instant) -> anyhow::Result<Trial> {
    let (registered, _) = service.ready(LIMIT).await?;
    let trial = Trial {
        from_spawn: ms(first_ok - service.spawned),
        from_registered: ms(first_ok.saturating_duration_since(registered)),
        spawn_to_registered: ms(registered - service.spawned),
    };
    service.kill().await;
    Ok(trial)
}

/// The SDK: a channel following the name before the process starts; calls until one is OK.
async fn sdk_trial(client: &Client, env: &[(&str, &str)], name: &str) -> anyhow::Result<Trial> {
    let mut vessels = VesselServiceClient::new(client.channel(name));
    // A running consumer's channel has been following the name for a while.
    tokio::time::sleep(SETTLE).await;
    let mut env = env.to_vec();
    env.push(("MICRO_SERVER_NAME", name));
    let service = Service::start("vessel-service", &env)?;
    let deadline = service.spawned + LIMIT;
    loop {
        match vessels.call().await {
            Ok(()) => break,
            Err(status) if Instant::now() > deadline => bail!("no successful call to {name}: {status}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    finish(service, Instant::now()).await
}

async fn raw_call(address: SocketAddr) -> anyhow::Result<()> {
    let mut raw = VesselServiceClient::new(raw_channel(address).await?);
    Ok(raw.call().await?)
}

/// mdns-sd on its own: a daemon and a browse started at the spawn, as a fresh program does.
async fn mdns_baseline_trial(name: &str) -> anyhow::Result<Trial> {
    let service =
        Service::start("vessel-service", &[("MICRO_REGISTRY", "mdns"), ("MICRO_SERVER_NAME", name)])?;
    plain_browse_and_call(name).await?;
    finish(service, Instant::now()).await
}

/// A fresh plain browse for `name`, then a raw call; milliseconds from its start.
async fn plain_browse_and_call(name: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let daemon = ServiceDaemon::new()?;
    daemon.enable_interface(vec![IfKind::LoopbackV4])?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let found = tokio::time::timeout(LIMIT, async {
        while let Ok(event) = events.recv_async().await {
            if let ServiceEvent::ServiceResolved(resolved) = event
                && resolved.get_property_val_str("name") == Some(name)
                && let Some(ip) = resolved.get_addresses_v4().into_iter().next()
            {
                return Some(SocketAddr::from((ip, resolved.port)));
            }
        }
        None
    })
    .await;
    let _ = daemon.shutdown();
    let address = found.ok().flatten().with_context(|| format!("a plain browse never resolved {name}"))?;
    raw_call(address).await?;
    Ok(ms(started.elapsed()))
}

/// A fresh SDK client (its own mDNS registry) calling `name`; milliseconds from its start.
async fn fresh_sdk_call(name: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let registry: Arc<dyn Registry> = Arc::new(micro_core::registry::MdnsRegistry::new(LIMIT)?);
    let client = Client::new(registry).lookup_timeout(LIMIT).request_timeout(LIMIT);
    VesselServiceClient::new(client.channel(name)).call().await?;
    Ok(ms(started.elapsed()))
}

/// A consumer that starts after the service has been registered for a while.
async fn cold_trial(name: &str, sdk: bool) -> anyhow::Result<f64> {
    let mut service =
        Service::start("vessel-service", &[("MICRO_REGISTRY", "mdns"), ("MICRO_SERVER_NAME", name)])?;
    service.ready(LIMIT).await?;
    tokio::time::sleep(REGISTERED_FOR).await;
    let took = if sdk { fresh_sdk_call(name).await } else { plain_browse_and_call(name).await };
    service.kill().await;
    took
}

/// The body of a plain HTTP/1.0 GET to `address`.
async fn http_get(address: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (_, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(body.to_owned())
}

/// Consul without the SDK: poll the health endpoint every 10 ms.
async fn consul_baseline_trial(agent: &str, name: &str) -> anyhow::Result<Trial> {
    let env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", agent), ("MICRO_SERVER_NAME", name)];
    let service = Service::start("vessel-service", &env)?;
    let deadline = service.spawned + LIMIT;
    let address = loop {
        let body = http_get(agent, &format!("/v1/health/service/{name}?passing=1")).await.unwrap_or_default();
        let entries: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let found = entries.as_array().and_then(|list| list.first()).and_then(|entry| {
            let service = entry.get("Service")?;
            let ip: std::net::IpAddr = service.get("Address")?.as_str()?.parse().ok()?;
            Some(SocketAddr::new(ip, u16::try_from(service.get("Port")?.as_u64()?).ok()?))
        });
        if let Some(address) = found {
            break address;
        }
        if Instant::now() > deadline {
            bail!("{name} never became passing in Consul");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    raw_call(address).await?;
    finish(service, Instant::now()).await
}

fn emit_trials(prefix: &str, sdk: &[Trial], baseline: &[Trial], baseline_is: &str, target_ms: Option<f64>) {
    let early = sdk.iter().chain(baseline).filter(|t| t.from_registered == 0.0).count();
    if early > 0 {
        note(format!(
            "{prefix}: in {early} trial(s) the first call succeeded before the `registered` log line reached the \
             bench (the registry knew the instance before the line was read), so registered-to-call counts 0 there"
        ));
    }
    let pick = |trials: &[Trial], f: fn(&Trial) -> f64| median(&trials.iter().map(f).collect::<Vec<_>>());
    let from_reg = Figure::new(
        format!("{prefix}_registered_to_first_call"),
        pick(sdk, |t| t.from_registered),
        pick(baseline, |t| t.from_registered),
        "ms",
    )
    .baseline_is(baseline_is);
    let from_reg = match target_ms {
        Some(target) => {
            let met = from_reg.sdk < target;
            from_reg.target(format!("< {target:.0} ms"), met)
        }
        None => from_reg,
    };
    emit(from_reg);
    emit(
        Figure::new(
            format!("{prefix}_spawn_to_first_call"),
            pick(sdk, |t| t.from_spawn),
            pick(baseline, |t| t.from_spawn),
            "ms",
        )
        .baseline_is(baseline_is),
    );
    emit(
        Figure::new(
            format!("{prefix}_spawn_to_registered"),
            pick(sdk, |t| t.spawn_to_registered),
            pick(baseline, |t| t.spawn_to_registered),
            "ms",
        )
        .baseline_is("the same, in the baseline's trials (process start-up, not discovery)"),
    );
}

/// Figure 3 for mDNS: a service's registration to another process's first call.
pub async fn run_mdns(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    let client = Client::new(registry)
        .idempotent_methods(proto::IDEMPOTENT_METHODS)
        .lookup_timeout(LIMIT)
        .request_timeout(LIMIT);
    let (mut sdk, mut baseline) = (Vec::new(), Vec::new());
    for t in 0..TRIALS {
        eprintln!("[3/6 discovery] mdns trial {}/{TRIALS}", t + 1);
        let name = format!("vessel-reg-{}-{t}", std::process::id());
        sdk.push(sdk_trial(&client, &[("MICRO_REGISTRY", "mdns")], &format!("{name}-sdk")).await?);
        baseline.push(mdns_baseline_trial(&format!("{name}-raw")).await?);
    }
    emit_trials("mdns", &sdk, &baseline, "fresh mdns-sd daemon + plain browse, then raw tonic", Some(200.0));

    let (mut sdk, mut baseline) = (Vec::new(), Vec::new());
    for t in 0..COLD_TRIALS {
        eprintln!("[3/6 discovery] mdns cold consumer trial {}/{COLD_TRIALS}", t + 1);
        let name = format!("vessel-cold-{}-{t}", std::process::id());
        sdk.push(cold_trial(&format!("{name}-sdk"), true).await?);
        baseline.push(cold_trial(&format!("{name}-raw"), false).await?);
    }
    emit(Figure::new("mdns_cold_consumer_to_first_call", median(&sdk), median(&baseline), "ms").baseline_is(
        "a fresh plain mdns-sd browse, then raw tonic (both start 1.1 s after the registration)",
    ));
    Ok(())
}

/// Figure 3 for Consul, against an agent it starts.
pub async fn run_consul() -> anyhow::Result<()> {
    let agent = match tokio::task::spawn_blocking(|| {
        std::panic::catch_unwind(e2e::consul::ConsulAgent::start).map_err(|panic| {
            panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "could not start Consul".into())
        })
    })
    .await?
    {
        Ok(agent) => agent,
        Err(why) => {
            note(format!("Consul figures skipped: {why}"));
            return Ok(());
        }
    };
    let address = agent.http_address();
    let registry: Arc<dyn Registry> =
        Arc::new(micro_core::registry::ConsulRegistry::builder().address(&address).build()?);
    let client = Client::new(registry)
        .idempotent_methods(proto::IDEMPOTENT_METHODS)
        .lookup_timeout(LIMIT)
        .request_timeout(LIMIT);
    let env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", address.as_str())];
    let (mut sdk, mut baseline) = (Vec::new(), Vec::new());
    for t in 0..TRIALS {
        eprintln!("[3/6 discovery] consul trial {}/{TRIALS}", t + 1);
        let name = format!("vessel-reg-{}-{t}", std::process::id());
        sdk.push(sdk_trial(&client, &env, &format!("{name}-sdk")).await?);
        baseline.push(consul_baseline_trial(&address, &format!("{name}-raw")).await?);
    }
    emit_trials("consul", &sdk, &baseline, "poll /v1/health/service every 10 ms, then raw tonic", None);
    drop(agent);
    Ok(())
}
