//! Figure 9, nats: `NatsBroker` against plain async-nats on the same `nats-server -js`
//! (`e2e::nats::NatsServer`, stopped at the end), each with its own connection.
//!
//! The SDK's publish goes through JetStream whenever the server has it (it returns once the
//! topic's stream stored the message), so its baselines are like for like:
//! - `broker_nats_*`: a plain subscriber. Baseline: async-nats JetStream publish, awaited
//!   until stored in a stream of the same settings (file storage, interest retention), and
//!   a core subscriber.
//! - `broker_nats_durable_*`: a durable subscriber in a queue group. Baseline: the same
//!   publish and a durable pull consumer with explicit acks, acknowledged after the handler.
//! - `diag_broker_nats_vs_core_*`: the SDK's plain subscriber again against async-nats core
//!   publish and subscribe (no JetStream at all): what the stored publish costs.
//! - `diag_broker_nats_vs_stored_with_id_*`: the SDK's plain subscriber again against the
//!   stored publish of `broker_nats_*` whose messages carry a fresh 32-digit `message-id`
//!   header as the SDK's do: what the header costs, apart from the SDK's own work.

use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use e2e::nats::NatsServer;
use futures::{StreamExt, future::BoxFuture};
use micro_core::broker::{NatsBroker, SubscribeOptions};

use super::{Baseline, Probe, Publish, Side, Task, contest, sdk_side, stop_server, topic};
use crate::procs;

/// Core publish: returns once async-nats has the message for its connection.
struct CorePublisher {
    client: async_nats::Client,
    topic: String,
}

impl Publish for CorePublisher {
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.client.publish(self.topic.clone(), body).await?) })
    }
}

/// JetStream publish: returns once the stream stored the message.
struct StoredPublisher {
    jetstream: jetstream::Context,
    topic: String,
    /// Each message carries a fresh `message-id` header, as the SDK's do.
    with_id: bool,
}

impl Publish for StoredPublisher {
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let topic = self.topic.clone();
            let stored = match self.with_id {
                true => {
                    let mut headers = async_nats::HeaderMap::new();
                    let id = micro_core::broker::new_message_id();
                    headers.insert(micro_core::broker::headers::MESSAGE_ID, id.as_str());
                    self.jetstream.publish_with_headers(topic, headers, body).await?
                }
                false => self.jetstream.publish(topic, body).await?,
            };
            stored.await?;
            Ok(())
        })
    }
}

/// A core subscriber on `topic` whose loop hands each body to `probe`.
async fn core_subscriber(
    client: &async_nats::Client,
    topic: &str,
    probe: &Arc<Probe>,
) -> anyhow::Result<Task> {
    let mut subscriber = client.subscribe(topic.to_owned()).await?;
    client.flush().await?;
    let seen = probe.clone();
    Ok(Task(tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            seen.arrived(&message.payload);
        }
    })))
}

/// A stream for `topic` with the settings the SDK gives its streams.
async fn stream_for(jetstream: &jetstream::Context, topic: &str) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: format!("plain_{}", topic.replace('.', "_")),
        subjects: vec![topic.to_owned()],
        retention: stream::RetentionPolicy::Interest,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    Ok(jetstream.get_or_create_stream(config).await?)
}

async fn core_side(client: &async_nats::Client) -> anyhow::Result<Side> {
    let probe = Arc::new(Probe::default());
    let topic = topic("nats-core");
    let subscriber = core_subscriber(client, &topic, &probe).await?;
    Ok(Side::new(CorePublisher { client: client.clone(), topic }, probe, subscriber))
}

async fn stored_side(client: &async_nats::Client, with_id: bool) -> anyhow::Result<Side> {
    let probe = Arc::new(Probe::default());
    let topic = topic(if with_id { "nats-plain-id" } else { "nats-plain" });
    let jetstream = jetstream::new(client.clone());
    stream_for(&jetstream, &topic).await?;
    let subscriber = core_subscriber(client, &topic, &probe).await?;
    Ok(Side::new(StoredPublisher { jetstream, topic, with_id }, probe, subscriber))
}

async fn durable_side(client: &async_nats::Client) -> anyhow::Result<Side> {
    let probe = Arc::new(Probe::default());
    let topic = topic("nats-plain-durable");
    let jetstream = jetstream::new(client.clone());
    let stream = stream_for(&jetstream, &topic).await?;
    let config = pull::Config {
        durable_name: Some("bench".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    let consumer: jetstream::consumer::PullConsumer = stream.get_or_create_consumer("bench", config).await?;
    let mut messages = consumer.messages().await?;
    let seen = probe.clone();
    let reader = tokio::spawn(async move {
        while let Some(next) = messages.next().await {
            let Ok(message) = next else { continue };
            seen.arrived(&message.payload);
            if let Err(err) = message.ack().await {
                eprintln!("[9 broker nats] plain durable consumer: ack not sent: {err}");
            }
        }
    });
    Ok(Side::new(StoredPublisher { jetstream, topic, with_id: false }, probe, Task(reader)))
}

/// The nats broker's figures, against a nats-server started (and stopped) here.
pub async fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        procs::on_path("nats-server"),
        "nats-server is not installed: run `make test-deps` (or `apt-get install nats-server`)"
    );
    eprintln!("[9 broker nats] starting nats-server");
    let server = tokio::task::spawn_blocking(NatsServer::start).await.context("starting nats-server")?;
    let address = server.address();
    let outcome = measure(&address).await;
    stop_server("nats", server).await;
    outcome
}

async fn measure(address: &str) -> anyhow::Result<()> {
    let broker = Arc::new(NatsBroker::connect(address).await?);
    let plain = async_nats::connect(address).await.with_context(|| format!("async-nats to {address}"))?;

    let sdk = sdk_side(broker.clone(), &topic("nats"), SubscribeOptions::default()).await?;
    let stored = Baseline {
        prefix: "broker_nats".into(),
        is: "async-nats: JetStream publish (awaited until stored, same stream settings), core subscriber"
            .into(),
        side: stored_side(&plain, false).await?,
    };
    let stored_with_id = Baseline {
        prefix: "diag_broker_nats_vs_stored_with_id".into(),
        is: "async-nats: JetStream publish with a message-id header, core subscriber".into(),
        side: stored_side(&plain, true).await?,
    };
    let core = Baseline {
        prefix: "diag_broker_nats_vs_core".into(),
        is: "async-nats: core publish and core subscriber, no JetStream".into(),
        side: core_side(&plain).await?,
    };
    contest("nats", sdk, vec![stored, stored_with_id, core]).await?;

    let durable = SubscribeOptions::default().queue("bench").durable();
    let sdk = sdk_side(broker, &topic("nats-durable"), durable).await?;
    let baseline = Baseline {
        prefix: "broker_nats_durable".into(),
        is: "async-nats: JetStream publish (awaited until stored), durable pull consumer, explicit ack"
            .into(),
        side: durable_side(&plain).await?,
    };
    contest("nats durable", sdk, vec![baseline]).await
}
