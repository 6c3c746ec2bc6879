//! Figure 13: streams.
//!
//! - `stream_messages_per_s`: messages of one server stream (echo.proto's `Count`, 50,000
//!   messages) through the SDK's named channel, against a raw tonic channel to the same
//!   instance's address, served in this process on loopback; target at least 0.95 of raw.
//! - `stream_resume_gap_ms`: a watcher of shippy's `WatchConsignments` on two release
//!   consignment-service replicas sharing one SQLite file, while a consignment is stored
//!   every 20 ms: the time from SIGKILLing the replica serving it to the first consignment
//!   it gets on the other (reopened from its cursor), against the median time from a
//!   creation's answer to its arrival at the watcher while nothing fails.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use micro_core::{Client, Registry, Server, config::ServerConfig, registry::MemoryRegistry};
use proto::consignment::{
    Consignment, Container, WatchRequest, shipping_service_client::ShippingServiceClient,
};
use test_proto::echo::{CountRequest, echo_client::EchoClient, echo_server::EchoServer};
use tokio::time::Instant;

use crate::{
    load::raw_channel,
    procs::Service,
    report::{Figure, emit, median},
    wait_pickable,
};

const ROUNDS: usize = 5;
const MESSAGES: u32 = 50_000;
const KILLS: usize = 3;
const CREATE_EVERY: Duration = Duration::from_millis(20);

/// Messages per second of one `Count` stream of [`MESSAGES`].
async fn messages_per_second<C>(echo: &mut EchoClient<C>) -> anyhow::Result<f64>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<micro_core::BoxError>,
    C::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as http_body::Body>::Error: Into<micro_core::BoxError> + Send,
{
    let started = Instant::now();
    let mut stream = echo.count(CountRequest { count: MESSAGES, interval_ms: 0 }).await?.into_inner();
    let mut received = 0u32;
    while stream.message().await?.is_some() {
        received += 1;
    }
    anyhow::ensure!(received == MESSAGES, "{received} of {MESSAGES} messages came");
    Ok(f64::from(MESSAGES) / started.elapsed().as_secs_f64())
}

/// `stream_messages_per_s`.
pub async fn run_throughput() -> anyhow::Result<()> {
    let registry = MemoryRegistry::new();
    let server = Server::builder("echo-bench-stream")
        .config(ServerConfig { address: "127.0.0.1:0".parse()?, ..ServerConfig::default() })
        .registry(Arc::new(registry.clone()))
        .file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
        .add_service(EchoServer::new(test_proto::Labelled::new("bench")))
        .start()
        .await?;
    let channel = Client::new(Arc::new(registry)).channel("echo-bench-stream");
    wait_pickable(&channel, 1).await?;
    let mut sdk = EchoClient::new(channel);
    let mut raw = EchoClient::new(raw_channel(server.local_addr()).await?);
    messages_per_second(&mut sdk).await?;
    messages_per_second(&mut raw).await?;
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        eprintln!("[13 streams] throughput round {}/{ROUNDS}", round + 1);
        if round % 2 == 0 {
            s.push(messages_per_second(&mut sdk).await?);
            b.push(messages_per_second(&mut raw).await?);
        } else {
            b.push(messages_per_second(&mut raw).await?);
            s.push(messages_per_second(&mut sdk).await?);
        }
    }
    server.stop().await?;
    let figure = Figure::new("stream_messages_per_s", median(&s), median(&b), "msg/s")
        .baseline_is("raw tonic Channel to the same instance's address");
    let met = figure.sdk >= figure.baseline * 0.95;
    emit(figure.target("at least 0.95 of raw", met));
    Ok(())
}

/// What the watcher of the resume figure has seen, and when.
#[derive(Default)]
struct Seen {
    arrivals: Vec<(String, Instant)>,
    opened: usize,
}

/// Follows `WatchConsignments`, reopening after the last consignment seen.
fn follow(
    shipping: ShippingServiceClient<micro_core::NamedChannel>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let after_id =
                seen.lock().expect("seen").arrivals.last().map(|(id, _)| id.clone()).unwrap_or_default();
            let Ok(stream) = shipping.clone().watch_consignments(WatchRequest { after_id }).await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            seen.lock().expect("seen").opened += 1;
            let mut stream = stream.into_inner();
            while let Ok(Some(consignment)) = stream.message().await {
                seen.lock().expect("seen").arrivals.push((consignment.id, Instant::now()));
            }
        }
    })
}

fn consignment(i: usize) -> Consignment {
    Consignment {
        description: format!("resume #{i}"),
        weight: 1,
        containers: vec![Container {
            customer_id: "bench".into(),
            origin: "Derby".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Waits until `check` holds, up to `limit`.
async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !check() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// `stream_resume_gap_ms`.
pub async fn run_resume(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("consignments.db").display().to_string();
    let fleet = dir.path().join("fleet.json");
    std::fs::write(
        &fleet,
        r#"[{"id": "bench", "name": "bench", "capacity": 1000000, "max_weight": 2000000000, "available": true}]"#,
    )?;
    let pid = std::process::id();
    let (vessel_name, name) =
        (format!("vessel-bench-resume-{pid}"), format!("consignment-bench-resume-{pid}"));
    let fleet = fleet.display().to_string();
    let mut vessel =
        Service::start("vessel-service", &[("MICRO_SERVER_NAME", &vessel_name), ("VESSEL_FLEET", &fleet)])?;
    vessel.ready(Duration::from_secs(10)).await?;
    let log_level = "warn,consignment_service::watch=info,micro_core::server=info";
    let replica = |_: usize| {
        Service::start(
            "consignment-service",
            &[
                ("MICRO_SERVER_NAME", &name),
                ("VESSEL_SERVICE", &vessel_name),
                ("CONSIGNMENT_DB", &db),
                ("RUST_LOG", log_level),
            ],
        )
    };
    let mut replicas = vec![replica(0)?, replica(1)?];
    for replica in &mut replicas {
        replica.ready(Duration::from_secs(10)).await?;
    }
    let client = Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let channel = client.channel(&name);
    wait_pickable(&channel, 2).await?;
    let shipping = ShippingServiceClient::new(channel);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = follow(shipping.clone(), seen.clone());
    until("the watcher opening", Duration::from_secs(10), || seen.lock().expect("seen").opened > 0).await?;

    // A consignment every 20 ms, each under its own key, so a creation caught by a kill is
    // retried and stored once.
    let answered: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let producer = {
        let (shipping, answered) = (shipping.clone(), answered.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CREATE_EVERY);
            for i in 0.. {
                ticks.tick().await;
                let mut request = tonic::Request::new(consignment(i));
                request
                    .metadata_mut()
                    .insert("idempotency-key", format!("resume-{pid}-{i}").parse().expect("ascii"));
                if let Ok(reply) = shipping.clone().create_consignment(request).await
                    && let Some(stored) = reply.into_inner().consignment
                {
                    answered.lock().expect("answered").insert(stored.id, Instant::now());
                }
            }
        })
    };
    let mut gaps = Vec::new();
    let mut steady = Vec::new();
    for kill in 0..KILLS {
        eprintln!("[13 streams] resume after SIGKILL {}/{KILLS}", kill + 1);
        let arrived = seen.lock().expect("seen").arrivals.len();
        until("consignments arriving", Duration::from_secs(20), || {
            seen.lock().expect("seen").arrivals.len() >= arrived + 25
        })
        .await?;
        {
            let (seen, answered) = (seen.lock().expect("seen"), answered.lock().expect("answered"));
            let delays = seen.arrivals[arrived..].iter().filter_map(|(id, arrived)| {
                let answered = answered.get(id)?;
                Some(arrived.saturating_duration_since(*answered).as_secs_f64() * 1000.0)
            });
            steady.extend(delays);
        }
        let serving = replicas
            .iter_mut()
            .rposition(|replica| replica.log_count("watcher opened") > 0 && replica.is_running())
            .context("the replica serving the watcher")?;
        let (opened, before) = {
            let seen = seen.lock().expect("seen");
            (seen.opened, seen.arrivals.len())
        };
        let killed_at = Instant::now();
        replicas[serving].start_kill();
        until("the watcher resuming", Duration::from_secs(30), || {
            let seen = seen.lock().expect("seen");
            seen.opened > opened && seen.arrivals.len() > before
        })
        .await?;
        let resumed_at = seen.lock().expect("seen").arrivals[before].1;
        gaps.push((resumed_at - killed_at).as_secs_f64() * 1000.0);
        // A fresh replica in place of the killed one, so the next kill has somewhere to go.
        replicas.remove(serving);
        let mut fresh = replica(kill + 2)?;
        fresh.ready(Duration::from_secs(10)).await?;
        replicas.push(fresh);
    }
    producer.abort();
    watcher.abort();
    let ids: Vec<String> = seen.lock().expect("seen").arrivals.iter().map(|(id, _)| id.clone()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    anyhow::ensure!(unique.len() == ids.len(), "the watcher saw a consignment twice");
    let figure = Figure::new("stream_resume_gap_ms", median(&gaps), median(&steady), "ms")
        .baseline_is("the median time from a creation's answer to its arrival while nothing fails");
    emit(figure);
    Ok(())
}
