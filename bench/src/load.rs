//! Calling FindAvailable through any client, sequentially or from many tasks; every loop is
//! bounded by a count and by time.

use std::{future::Future, time::Duration};

use anyhow::Context;

use micro_core::NamedChannel;
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
use tokio::time::Instant;
use tonic::{Status, transport::Channel};

/// The request every figure sends: fits the default fleet's one vessel.
pub fn spec() -> Specification {
    Specification { capacity: 3, max_weight: 55_000 }
}

/// Something that can make one FindAvailable call.
pub trait Caller: Clone + Send + 'static {
    /// One FindAvailable call.
    fn call(&mut self) -> impl Future<Output = Result<(), Status>> + Send;
}

impl Caller for VesselServiceClient<NamedChannel> {
    async fn call(&mut self) -> Result<(), Status> {
        self.find_available(spec()).await.map(drop)
    }
}

impl Caller for VesselServiceClient<Channel> {
    async fn call(&mut self) -> Result<(), Status> {
        self.find_available(spec()).await.map(drop)
    }
}

/// A raw tonic client that sends the two headers the SDK adds to every call: a
/// `grpc-timeout` (the SDK's default 5 s deadline) and a fresh `x-request-id`. It splits
/// the SDK's cost into what these headers cost the server and what the client adds.
#[derive(Clone)]
pub struct WithSdkHeaders(pub VesselServiceClient<Channel>);

impl Caller for WithSdkHeaders {
    async fn call(&mut self) -> Result<(), Status> {
        let mut request = tonic::Request::new(spec());
        request.set_timeout(Duration::from_secs(5));
        let id = micro_core::middleware::new_request_id();
        if let Ok(value) = id.to_str().unwrap_or_default().parse() {
            request.metadata_mut().insert(micro_core::middleware::REQUEST_ID_HEADER, value);
        }
        self.0.find_available(request).await.map(drop)
    }
}

/// A raw tonic channel to one address, with the same socket options as the SDK's.
pub async fn raw_channel(address: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

/// Raw tonic clients over several connections to one address: each clone (each caller of
/// [`concurrent`]) takes the next connection in turn and keeps it.
pub struct RawConnections {
    clients: std::sync::Arc<[VesselServiceClient<Channel>]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    mine: VesselServiceClient<Channel>,
}

impl RawConnections {
    /// `connections` connections to `address`.
    pub async fn connect(address: std::net::SocketAddr, connections: usize) -> anyhow::Result<Self> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            clients.push(VesselServiceClient::new(raw_channel(address).await?));
        }
        let mine = clients.first().context("at least one connection")?.clone();
        Ok(RawConnections { clients: clients.into(), next: Default::default(), mine })
    }
}

impl Clone for RawConnections {
    fn clone(&self) -> Self {
        let next = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        RawConnections {
            clients: self.clients.clone(),
            next: self.next.clone(),
            mine: self.clients[next].clone(),
        }
    }
}

impl Caller for RawConnections {
    async fn call(&mut self) -> Result<(), Status> {
        self.mine.find_available(spec()).await.map(drop)
    }
}

/// `n` calls one after the other; the latency of each, in microseconds, unsorted.
pub async fn sequential<C: Caller>(caller: &mut C, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        caller.call().await?;
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(latencies)
}

/// What [`concurrent`] saw.
pub struct Run {
    /// Calls that succeeded.
    pub ok: u64,
    /// Calls that failed.
    pub failed: u64,
    /// How long the run took.
    pub seconds: f64,
}

impl Run {
    /// Successful calls per second.
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// `cpu_seconds` used during the run, shared out over its successful calls, in
    /// microseconds per call.
    pub fn micros_per_call(&self, cpu_seconds: f64) -> f64 {
        cpu_seconds * 1e6 / self.ok.max(1) as f64
    }
}

/// `callers` tasks calling back to back for `length` (at most `limit` calls each).
pub async fn concurrent<C: Caller>(caller: &C, callers: usize, length: Duration) -> Run {
    const LIMIT_PER_CALLER: u64 = 2_000_000;
    let started = Instant::now();
    let deadline = started + length;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut caller = caller.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline && ok + failed < LIMIT_PER_CALLER {
                    match caller.call().await {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        let (o, f) = task.await.unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    Run { ok, failed, seconds: started.elapsed().as_secs_f64() }
}

/// One call's outcome, for the failover timeline.
pub struct Outcome {
    /// When the call ended.
    pub at: Instant,
    /// Whether it succeeded.
    pub ok: bool,
}

/// `callers` tasks calling back to back until `until`; every outcome, with its end time.
pub async fn timeline<C: Caller>(caller: &C, callers: usize, until: Instant) -> Vec<Outcome> {
    const LIMIT_PER_CALLER: usize = 500_000;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut caller = caller.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() < until && outcomes.len() < LIMIT_PER_CALLER {
                    let ok = caller.call().await.is_ok();
                    outcomes.push(Outcome { at: Instant::now(), ok });
                }
                outcomes
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all.sort_by_key(|o| o.at);
    all
}

/// A raw tonic client whose every call carries a deadline (`grpc-timeout`, which tonic's
/// channel also enforces on the client side), as the SDK's calls carry its default one.
#[derive(Clone)]
pub struct WithDeadline(pub VesselServiceClient<Channel>, pub Duration);

impl Caller for WithDeadline {
    async fn call(&mut self) -> Result<(), Status> {
        let mut request = tonic::Request::new(spec());
        request.set_timeout(self.1);
        self.0.find_available(request).await.map(drop)
    }
}

/// One call of a [`paced`] run.
pub struct Timed {
    /// When it started.
    pub started: Instant,
    /// How long it took, to its answer or its failure.
    pub latency: Duration,
    /// Its failure, if it failed.
    pub error: Option<Status>,
}

/// `rate` calls per second for `length`, each in a task of its own, started on schedule
/// whether or not earlier calls have answered (an open loop, as requests come to a
/// service, so a stuck call holds back no other). Each call is given up at `limit`; every
/// call's outcome, in the order they started.
pub async fn paced<C: Caller>(caller: C, rate: u32, length: Duration, limit: Duration) -> Vec<Timed> {
    let count = (f64::from(rate) * length.as_secs_f64()).round() as u32;
    let period = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for i in 0..count {
        tokio::time::sleep_until(start + period * i).await;
        let mut caller = caller.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(limit, caller.call()).await;
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(status)) => Some(status),
                Err(_) => Some(Status::deadline_exceeded(format!("no answer within the bench's {limit:?}"))),
            };
            Timed { started, latency: started.elapsed(), error }
        }));
    }
    let mut calls = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(call) = task.await {
            calls.push(call);
        }
    }
    calls
}
