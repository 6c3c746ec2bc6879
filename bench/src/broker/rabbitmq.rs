//! Figure 9, rabbitmq: `RabbitMqBroker` with a durable subscriber in a queue group (a
//! durable queue, messages acknowledged after the handler) against plain lapin doing the
//! same on the same `rabbitmq-server` (`e2e::rabbitmq::RabbitMqServer`, stopped at the
//! end): persistent publishes with publisher confirms, awaited, to a durable topic exchange,
//! and a durable queue consumed with manual acks and the SDK's prefetch (16). Each side has
//! its own connection.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use e2e::rabbitmq::RabbitMqServer;
use futures::{StreamExt, future::BoxFuture};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use micro_core::broker::{RabbitMqBroker, SubscribeOptions};

use super::{Baseline, Probe, Publish, Side, Task, contest, sdk_side, stop_server, topic};

/// The plain side's exchange, apart from the SDK's.
const EXCHANGE: &str = "bench.plain";
/// Unacknowledged messages the consumer holds at once, as the SDK's durable subscriber.
const PREFETCH: u16 = 16;
/// AMQP delivery mode of a message the server writes to disk.
const PERSISTENT: u8 = 2;

/// Persistent publish on a confirming channel: returns once the server confirmed it.
struct ConfirmedPublisher {
    channel: Channel,
    topic: String,
    _connection: Connection,
}

impl Publish for ConfirmedPublisher {
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
            let confirm = self
                .channel
                .basic_publish(EXCHANGE.into(), self.topic.clone().into(), options, &body, properties)
                .await?
                .await?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => {
                    anyhow::bail!("the server returned the message: no queue bound")
                }
                other => anyhow::bail!("the server did not confirm the message: {other:?}"),
            }
        })
    }
}

async fn lapin_side(address: &str) -> anyhow::Result<Side> {
    let probe = Arc::new(Probe::default());
    let topic = topic("rabbitmq-plain");
    let uri = format!("amqp://{address}/%2f");
    let connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .with_context(|| format!("lapin to {uri}"))?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;

    let consuming = connection.create_channel().await?;
    let queue = format!("{EXCHANGE}.{topic}.bench");
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    consuming.queue_declare(queue.clone().into(), options, FieldTable::default()).await?;
    consuming
        .queue_bind(
            queue.clone().into(),
            EXCHANGE.into(),
            topic.clone().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    consuming.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = consuming
        .basic_consume(queue.into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let seen = probe.clone();
    let reader = tokio::spawn(async move {
        let _channel = consuming;
        while let Some(next) = consumer.next().await {
            let Ok(delivery) = next else { continue };
            seen.arrived(&delivery.data);
            if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
                eprintln!("[9 broker rabbitmq] plain consumer: ack not sent: {err}");
            }
        }
    });
    let publisher = ConfirmedPublisher { channel, topic, _connection: connection };
    Ok(Side::new(publisher, probe, Task(reader)))
}

/// The rabbitmq broker's figures, against a rabbitmq-server started (and stopped) here.
pub async fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        std::path::Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").is_file(),
        "rabbitmq-server is not installed: run `make test-deps` \
         (or `apt-get install --no-install-recommends rabbitmq-server`)"
    );
    eprintln!("[9 broker rabbitmq] starting rabbitmq-server (a few seconds)");
    let server =
        tokio::task::spawn_blocking(RabbitMqServer::start).await.context("starting rabbitmq-server")?;
    let address = server.address();
    let outcome = measure(&address).await;
    stop_server("rabbitmq", server).await;
    outcome
}

async fn measure(address: &str) -> anyhow::Result<()> {
    let broker = Arc::new(RabbitMqBroker::connect(address).await?);
    let durable = SubscribeOptions::default().queue("bench").durable();
    let sdk = sdk_side(broker, &topic("rabbitmq"), durable).await?;
    let baseline = Baseline {
        prefix: "broker_rabbitmq".into(),
        is: "lapin: persistent publish with publisher confirms, durable queue, manual ack after the handler"
            .into(),
        side: lapin_side(address).await?,
    };
    contest("rabbitmq", sdk, vec![baseline]).await
}
