//! Figure 9: the broker. Publish-to-handler latency (p50, p99, one message at a time) and
//! events per second (16 publishers, at most 512 messages not yet handled), through each
//! backend of `micro_core::broker` against the same broker driven by its plain client
//! crate, in the same run: memory against a `tokio::sync::mpsc` channel, registry against a
//! plain tonic unary call, nats against async-nats and rabbitmq against lapin. Every loop is
//! bounded in count and time; every server started here is stopped here.

pub mod memory;
pub mod nats;
mod probe;
pub mod rabbitmq;
pub mod registry;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use micro_core::broker::{Broker, Message, SubscribeOptions, handler};
use tokio::time::Instant;

pub use probe::{BODY_SIZE, Probe};

use crate::report::{Figure, emit, median, note, quantile};

/// The backends `--brokers` takes, in the order they run.
pub const BACKENDS: [&str; 4] = ["memory", "registry", "nats", "rabbitmq"];

const ROUNDS: usize = 3;
const WARM_UP_MESSAGES: usize = 200;
/// Messages published one at a time, each awaited at the handler, per round and side.
const LATENCY_MESSAGES: usize = 1_000;
/// Bound on the sequential part's time, per round and side.
const LATENCY_TIME: Duration = Duration::from_secs(4);
/// Publishers of the throughput part.
pub const PUBLISHERS: usize = 16;
/// Bound on the messages of the throughput part, per round and side.
const BURST_MESSAGES: u64 = 50_000;
/// Bound on the publishing time of the throughput part, per round and side.
const BURST_TIME: Duration = Duration::from_millis(700);
/// At most this many messages published and not yet handled, on every side: a burst
/// measures a sustained rate, not how much a queue holds (the memory broker's inbox holds
/// 1,024 and refuses more).
const WINDOW: u64 = 512;
/// How long a published message may take to reach its handler before the figure fails.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(5);
/// How long a new subscriber may take to get its first message.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// A pause before each side's turn, so it does not start while the broker still works
/// through the previous side's burst.
const QUIET: Duration = Duration::from_millis(300);
/// How long a server may take to stop.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long the handlers may take to catch up after a burst.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Publishes one body on one side of a figure.
pub trait Publish: Send + Sync + 'static {
    /// Publishes `body`; returns when the publisher's client says it is sent.
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// One side of a figure: how it publishes, the probe its subscriber reports to, and what
/// keeps that subscriber alive (dropping it stops the subscriber).
pub struct Side {
    publisher: Arc<dyn Publish>,
    probe: Arc<Probe>,
    _keep: Box<dyn Send + Sync>,
}

impl Side {
    /// A side from its parts; `keep` must stop the subscriber when dropped.
    pub fn new(publisher: impl Publish, probe: Arc<Probe>, keep: impl Send + Sync + 'static) -> Self {
        Side { publisher: Arc::new(publisher), probe, _keep: Box::new(keep) }
    }
}

/// A baseline and what its figures are called.
pub struct Baseline {
    /// Prefix of its figures' names, e.g. `broker_memory`.
    pub prefix: String,
    /// What it is, for the results table.
    pub is: String,
    /// The side itself.
    pub side: Side,
}

/// Aborts a task when dropped: the guard of a plain subscriber's loop.
pub struct Task(pub tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes through the SDK's [`Broker`] on one topic.
struct SdkPublisher {
    broker: Arc<dyn Broker>,
    topic: String,
}

impl Publish for SdkPublisher {
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.broker.publish(Message::new(&self.topic, body)).await?) })
    }
}

/// The SDK's side: a subscriber on `topic` with `options`, and publishes through `broker`.
pub async fn sdk_side(
    broker: Arc<dyn Broker>,
    topic: &str,
    options: SubscribeOptions,
) -> anyhow::Result<Side> {
    let probe = Arc::new(Probe::default());
    let seen = probe.clone();
    let subscription = broker
        .subscribe(
            topic,
            options,
            handler(move |message: Message| {
                seen.arrived(&message.body);
                std::future::ready(Ok(()))
            }),
        )
        .await
        .with_context(|| format!("subscribe to {topic} on the {} broker", broker.kind()))?;
    Ok(Side::new(SdkPublisher { broker, topic: topic.to_owned() }, probe, subscription))
}

/// Drops `server`, which stops it, off the runtime's threads; past [`STOP_LIMIT`] kills
/// every process under this one, so no server outlives the bench.
pub async fn stop_server<S: Send + 'static>(label: &str, server: S) {
    eprintln!("[9 broker {label}] stopping its server");
    let stopping = tokio::task::spawn_blocking(move || drop(server));
    if tokio::time::timeout(STOP_LIMIT, stopping).await.is_err() {
        note(format!(
            "broker {label}: its server had not stopped {STOP_LIMIT:?} after it was told to; killed it and every other process under micro-bench"
        ));
        crate::procs::kill_all_children();
    }
}

/// A topic no earlier run used.
pub fn topic(label: &str) -> String {
    format!("bench.{label}.{}.{:08x}", std::process::id(), rand::random::<u32>())
}

/// Figure 9 for every backend in `backends` (a subset of [`BACKENDS`]).
pub async fn run(backends: &[String]) -> anyhow::Result<()> {
    for backend in backends {
        match backend.as_str() {
            "memory" => memory::run().await.context("figure 9 (broker: memory)")?,
            "registry" => registry::run().await.context("figure 9 (broker: registry)")?,
            "nats" => nats::run().await.context("figure 9 (broker: nats)")?,
            "rabbitmq" => rabbitmq::run().await.context("figure 9 (broker: rabbitmq)")?,
            other => anyhow::bail!("no broker backend {other:?}; --brokers takes {BACKENDS:?}"),
        }
    }
    Ok(())
}

/// Latency p50 and p99 (microseconds) and events per second, one entry per round.
#[derive(Default)]
struct Samples {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
}

/// Runs the SDK's side and the baselines in turn, [`ROUNDS`] times with the order rotated,
/// and emits three figures per baseline: `PREFIX_latency_p50`, `PREFIX_latency_p99` and
/// `PREFIX_throughput_16_publishers`.
pub async fn contest(label: &str, sdk: Side, baselines: Vec<Baseline>) -> anyhow::Result<()> {
    let mut sides: Vec<(&str, &Side)> = vec![("sdk", &sdk)];
    sides.extend(baselines.iter().map(|b| (b.prefix.as_str(), &b.side)));
    for (name, side) in &sides {
        eprintln!("[9 broker {label}] warm-up: {name}");
        settle(side).await.with_context(|| format!("{name}'s subscriber"))?;
        sequential(side, WARM_UP_MESSAGES).await.with_context(|| format!("warm-up of {name}"))?;
    }
    let mut samples: Vec<Samples> = sides.iter().map(|_| Samples::default()).collect();
    for r in 0..ROUNDS {
        for turn in 0..sides.len() {
            let i = (r + turn) % sides.len();
            let (name, side) = sides[i];
            eprintln!("[9 broker {label}] round {}/{ROUNDS}: {name}", r + 1);
            // The broker may still be busy with the previous burst (a store writing it out).
            tokio::time::sleep(QUIET).await;
            let mut latencies = sequential(side, LATENCY_MESSAGES).await.with_context(|| name.to_owned())?;
            latencies.sort_by(f64::total_cmp);
            samples[i].p50.push(quantile(&latencies, 0.50));
            samples[i].p99.push(quantile(&latencies, 0.99));
            samples[i].rate.push(burst(label, name, side).await.with_context(|| name.to_owned())?);
        }
    }
    let sdk = &samples[0];
    for (baseline, base) in baselines.iter().zip(&samples[1..]) {
        let prefix = &baseline.prefix;
        let figure = |what: &str, s: &[f64], b: &[f64], unit| {
            Figure::new(format!("{prefix}_{what}"), median(s), median(b), unit).baseline_is(&baseline.is)
        };
        emit(figure("latency_p50", &sdk.p50, &base.p50, "us"));
        emit(figure("latency_p99", &sdk.p99, &base.p99, "us"));
        emit(figure("throughput_16_publishers", &sdk.rate, &base.rate, "events/s"));
    }
    Ok(())
}

/// Publishes every 50 ms until one message reaches the handler (a subscriber may take a
/// moment to be in force, or to be found), then lets stragglers arrive.
async fn settle(side: &Side) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let before = side.probe.count();
    while side.probe.count() == before {
        anyhow::ensure!(Instant::now() < deadline, "no message reached the handler within {SETTLE_LIMIT:?}");
        side.publisher.publish(side.probe.body()).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Up to `n` messages one at a time (at most [`LATENCY_TIME`]), each awaited at the
/// handler; the publish-to-handler latency of each, in microseconds, unsorted.
async fn sequential(side: &Side, n: usize) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + LATENCY_TIME;
    side.probe.record();
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        let target = side.probe.count() + 1;
        side.publisher.publish(side.probe.body()).await?;
        anyhow::ensure!(
            side.probe.wait_for(target, ARRIVAL_LIMIT).await,
            "a published message did not reach its handler within {ARRIVAL_LIMIT:?}"
        );
    }
    Ok(side.probe.recorded())
}

/// [`PUBLISHERS`] tasks publishing back to back (at most [`BURST_MESSAGES`] in all, for at
/// most [`BURST_TIME`], at most [`WINDOW`] not yet handled); the messages handled per
/// second, from the first publish to the last arrival.
async fn burst(label: &str, name: &str, side: &Side) -> anyhow::Result<f64> {
    let probe = &side.probe;
    let before = probe.count();
    let start = probe.now();
    let deadline = Instant::now() + BURST_TIME;
    let taken = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (publisher, probe, taken) = (side.publisher.clone(), probe.clone(), taken.clone());
            tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    let index = taken.fetch_add(1, Ordering::Relaxed);
                    if index >= BURST_MESSAGES {
                        break;
                    }
                    // At most WINDOW messages published and not yet handled.
                    let handled = (before + index + 1).saturating_sub(WINDOW);
                    if probe.count() < handled && !probe.wait_for(handled, ARRIVAL_LIMIT).await {
                        break;
                    }
                    publisher.publish(probe.body()).await?;
                    sent += 1;
                }
                anyhow::Ok(sent)
            })
        })
        .collect();
    let mut sent = 0;
    for publisher in publishers {
        sent += publisher.await??;
    }
    if !probe.wait_for(before + sent, DRAIN_LIMIT).await {
        let arrived = probe.count() - before;
        note(format!(
            "broker {label}, {name}: {arrived} of {sent} messages of a burst reached the handler within {DRAIN_LIMIT:?}"
        ));
    }
    let arrived = probe.count() - before;
    let seconds = probe.last_arrival().saturating_sub(start) as f64 / 1e9;
    Ok(if seconds > 0.0 { arrived as f64 / seconds } else { f64::NAN })
}
