//! A RabbitMQ subscription: the queue, binding and consumer it declares on every
//! connection, and the task that consumes, handles and acknowledges.

use std::sync::Arc;

use futures::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};
use tokio::{sync::watch, task::JoinSet};

use super::{
    DEFAULT_EXCHANGE, DELIVERY_HEADER, EXCHANGE, FIRST_RECONNECT_DELAY, MAX_RECONNECT_DELAY, PREFETCH,
    REQUEUE_DELAY, TOPIC_HEADER,
    connection::{Attached, Live, LiveSlot, current, replaced, store},
    message::{delivery_number, from_delivery},
    short,
};
use crate::{
    BoxError, Result,
    broker::{
        AbortOnDrop, DEAD_LETTERS, Handler, SubscribeOptions, dead_letter, dead_letter_topic,
        log_dead_lettered, run_handler,
    },
    registry::Backoff,
};

/// What a subscription declares on every connection: its queue, binding and consumer.
pub(super) struct Binding {
    topic: String,
    routing_key: ShortString,
    /// The shared queue of a group; `None` for a plain subscriber's server-named queue.
    pub(super) queue: Option<ShortString>,
    /// The group's name, for dead letters.
    group: String,
    durable: bool,
    max_deliveries: Option<u32>,
    /// The queue that keeps the topic's dead letters, when there is a delivery limit.
    dead_letters: Option<Box<Binding>>,
}

impl Binding {
    pub(super) fn new(topic: &str, options: &SubscribeOptions) -> Result<Binding> {
        let queue = match &options.queue {
            Some(group) => Some(short(&format!("{EXCHANGE}.{topic}.{group}"), "queue")?),
            None => None,
        };
        let dead_letters = match options.max_deliveries {
            Some(_) => {
                let keep = SubscribeOptions::default().queue(DEAD_LETTERS).durable();
                Some(Box::new(Binding::new(&dead_letter_topic(topic), &keep)?))
            }
            None => None,
        };
        Ok(Binding {
            topic: topic.to_owned(),
            routing_key: short(topic, "topic")?,
            queue,
            group: options.queue.clone().unwrap_or_default(),
            durable: options.durable,
            max_deliveries: options.max_deliveries,
            dead_letters,
        })
    }

    /// Declares the queue and binding on `live` (and the dead letters' queue) and starts
    /// consuming.
    pub(super) async fn attach(&self, live: &Live) -> Result<(Channel, Consumer), BoxError> {
        let channel = live.connection.create_channel().await?;
        if let Some(dead_letters) = &self.dead_letters {
            dead_letters.declare(&channel).await?;
        }
        let queue = self.declare(&channel).await?;
        channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let tag = ShortString::from(format!("micro-{:016x}", rand::random::<u64>()));
        // Acknowledged by hand even when not durable, so the prefetch bounds what waits here.
        let options = BasicConsumeOptions::default();
        let consumer = channel.basic_consume(queue, tag, options, FieldTable::default()).await?;
        Ok((channel, consumer))
    }

    /// Declares the queue and its binding to the topic; returns the queue's name.
    async fn declare(&self, channel: &Channel) -> Result<ShortString, BoxError> {
        let (name, options) = match &self.queue {
            None => (
                ShortString::from(""),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            ),
            Some(name) if self.durable => {
                (name.clone(), QueueDeclareOptions { durable: true, ..Default::default() })
            }
            Some(name) => (name.clone(), QueueDeclareOptions { auto_delete: true, ..Default::default() }),
        };
        let queue = channel.queue_declare(name, options, FieldTable::default()).await?;
        channel
            .queue_bind(
                queue.name().clone(),
                EXCHANGE.into(),
                self.routing_key.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(queue.name().clone())
    }

    /// Runs the handler on `delivery`. A durable subscriber acknowledges it after the
    /// handler succeeds; when it fails, hands it to [`Binding::failed`]. Any other
    /// acknowledges it first (at most once).
    pub(super) async fn handle(
        &self,
        handler: &Handler,
        delivery: Delivery,
        live: &Arc<Live>,
        later: &mut JoinSet<()>,
    ) {
        let message = from_delivery(&delivery);
        if !self.durable {
            let acked = delivery.ack(BasicAckOptions::default()).await;
            if let Err(err) = acked {
                tracing::debug!(broker = "rabbitmq", topic = %self.topic, error = %err, "acknowledgement not sent");
            }
            let _ = run_handler("rabbitmq", handler, message).await;
            return;
        }
        match run_handler("rabbitmq", handler, message).await {
            Ok(()) => answered(&self.topic, delivery.ack(BasicAckOptions::default()).await),
            Err(error) => self.failed(delivery, &error, live, later).await,
        }
    }

    /// Answers a delivery whose handler failed with `error`. On its last allowed delivery it
    /// is published to the dead letters and acknowledged; otherwise, after a pause spent in a
    /// task of `later` (the consumer goes on meanwhile), a copy counting one delivery more
    /// goes to the back of the queue and the delivery is acknowledged. When a copy cannot be
    /// stored the delivery is requeued, uncounted: nothing is lost either way.
    async fn failed(&self, delivery: Delivery, error: &str, live: &Arc<Live>, later: &mut JoinSet<()>) {
        let message = from_delivery(&delivery);
        let deliveries = delivery_number(&delivery);
        if let Some(max) = self.max_deliveries.filter(|&max| deliveries >= u64::from(max)) {
            let dead = dead_letter(&message, &self.group, deliveries, error);
            let stored = store(live, EXCHANGE, &dead.topic, &dead).await;
            crate::metrics::metrics().broker_published("rabbitmq", &dead.topic, stored.is_ok());
            match stored {
                Ok(()) => {
                    log_dead_lettered("rabbitmq", &dead, &self.group, deliveries);
                    return answered(&self.topic, delivery.ack(BasicAckOptions::default()).await);
                }
                Err(err) => {
                    tracing::warn!(broker = "rabbitmq", topic = %self.topic, max, error = %err, "cannot store the dead letter; delivering again")
                }
            }
        }
        let Some(queue) = self.queue.clone() else { return };
        let (live, topic) = (live.clone(), self.topic.clone());
        later.spawn(async move {
            tokio::time::sleep(REQUEUE_DELAY).await;
            let mut copy = message;
            copy.headers.insert(DELIVERY_HEADER, (deliveries + 1).to_string());
            copy.headers.insert(TOPIC_HEADER, copy.topic.clone());
            let answer = match store(&live, DEFAULT_EXCHANGE, queue.as_str(), &copy).await {
                Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                Err(err) => {
                    tracing::debug!(broker = "rabbitmq", %topic, error = %err, "cannot store the copy; requeued");
                    delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
                }
            };
            answered(&topic, answer);
        });
    }
}

/// Logs an acknowledgement that could not be sent.
pub(super) fn answered(topic: &str, answer: lapin::Result<bool>) {
    if let Err(err) = answer {
        tracing::warn!(broker = "rabbitmq", %topic, error = %err, "acknowledgement not sent; the message will come again");
    }
}

/// Serves one subscription: consumes until the connection goes, then attaches again on the
/// next one. Ends when the broker is dropped (or with its [`Subscription`]).
pub(super) async fn serve(
    binding: Binding,
    handler: Handler,
    mut live: watch::Receiver<LiveSlot>,
    first: (Arc<Live>, Channel, Consumer),
    attached: watch::Sender<u64>,
) {
    let mut backoff = Backoff::new(FIRST_RECONNECT_DELAY, MAX_RECONNECT_DELAY);
    let mut pending = Some(first);
    // Failed messages waiting to be delivered again; they stop with this task.
    let mut later = JoinSet::new();
    loop {
        let (connection, channel, mut consumer) = match pending.take() {
            Some(attached) => attached,
            None => {
                let Some(connection) = current(&mut live).await else { return };
                match binding.attach(&connection).await {
                    Ok((channel, consumer)) => {
                        tracing::info!(broker = "rabbitmq", topic = %binding.topic, "subscribed again");
                        (connection, channel, consumer)
                    }
                    Err(err) => {
                        tracing::warn!(broker = "rabbitmq", topic = %binding.topic, error = %err, "cannot subscribe again; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
        };
        backoff.reset();
        attached.send_replace(connection.generation);
        loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => binding.handle(&handler, delivery, &connection, &mut later).await,
                    Some(Err(err)) => {
                        tracing::debug!(broker = "rabbitmq", topic = %binding.topic, error = %err, "consumer interrupted");
                        break;
                    }
                    None => break,
                },
                () = replaced(&mut live, connection.generation) => break,
                Some(_) = later.join_next(), if !later.is_empty() => {}
            }
        }
        drop((consumer, channel, connection));
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Stops a subscription's task and forgets it, so a reconnect does not wait for it.
pub(super) struct SubscriptionGuard {
    pub(super) _task: AbortOnDrop,
    pub(super) id: u64,
    pub(super) attached: Attached,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.attached.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}
