//! Events between services: publish a message to a topic, subscribe to a topic alone or in
//! a queue group (each message goes to one member of each group), acknowledge after the
//! handler succeeds.
//!
//! One trait, [`Broker`], and one module per backend: [`MemoryBroker`] for one process,
//! [`RegistryBroker`], the zero set-up default (subscribers register in the service
//! registry and publishes go to them over gRPC; at most once, nothing kept), and
//! [`NatsBroker`] (feature `nats`), core NATS or, for a durable subscriber, JetStream, and
//! [`RabbitMqBroker`] (feature `rabbitmq`), a topic exchange with a queue per subscriber or
//! group, durable queues for durable subscribers.
//! [`crate::config::BrokerConfig`] picks one from `MICRO_BROKER`.
//!
//! Every message carries [`headers`]: its content type, a message id subscribers can
//! deduplicate on, and the trace context when the publisher is in a traced call.
//! [`publish_proto`] and [`subscribe_proto`] send and receive prost messages.
//! A durable group may give up on a message whose handler keeps failing
//! ([`SubscribeOptions::max_deliveries`]): it goes to the topic's [`dead_letter_topic`].
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> micro_core::Result<()> {
//! use micro_core::broker::{Broker, MemoryBroker, SubscribeOptions, publish_proto, subscribe_proto};
//!
//! let broker = MemoryBroker::new();
//! let (seen, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let _subscription = subscribe_proto(&broker, "greetings", SubscribeOptions::default(), move |text: String, _message| {
//!     let seen = seen.clone();
//!     async move { seen.send(text).map_err(Into::into) }
//! })
//! .await?;
//! publish_proto(&broker, "greetings", None, &"hello".to_owned()).await?;
//! assert_eq!(rx.recv().await.as_deref(), Some("hello"));
//! # Ok(()) }
//! ```

use std::{future::Future, sync::Arc};

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::{BoxError, Error, Result};

#[cfg(any(feature = "nats", feature = "rabbitmq"))]
mod backend_error;
mod memory;
mod message;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
mod registry;
#[cfg(test)]
mod tests;
mod trace;

pub use memory::MemoryBroker;
pub use message::{Headers, HeadersIter, INLINE_HEADERS, Message, new_message_id};
#[cfg(feature = "nats")]
pub use nats::{DEFAULT_NATS_ADDRESS, NatsBroker};
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::{DEFAULT_RABBITMQ_ADDRESS, RabbitMqBroker};
pub use registry::{
    DELIVER_PATH, MAX_ROUTED_TOPICS, QUEUE_LABEL, ROUTE_IDLE, RegistryBroker, TOPIC_LABEL, topic_service_name,
};
pub use trace::current_trace_headers;

/// Header names every backend carries, and the content types the typed helpers write.
pub mod headers {
    /// The body's media type, e.g. [`PROTOBUF`].
    pub const CONTENT_TYPE: &str = "content-type";
    /// A unique id per event; a redelivery or a replayed publish keeps it, so subscribers
    /// can deduplicate on it.
    pub const MESSAGE_ID: &str = "message-id";
    /// W3C trace context of the publishing call, when it was traced (see
    /// [`super::current_trace_headers`]).
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state that goes with [`TRACEPARENT`].
    pub const TRACESTATE: &str = "tracestate";
    /// Content type of a prost-encoded body.
    pub const PROTOBUF: &str = "application/protobuf";
    /// Content type of a JSON body.
    pub const JSON: &str = "application/json";
    /// On a dead letter: the topic the message was published to.
    pub const DEAD_LETTER_TOPIC: &str = "dead-letter-topic";
    /// On a dead letter: the queue group whose handler kept failing.
    pub const DEAD_LETTER_GROUP: &str = "dead-letter-group";
    /// On a dead letter: the handler's last error.
    pub const DEAD_LETTER_ERROR: &str = "dead-letter-error";
    /// On a dead letter: how many times the group had the message delivered.
    pub const DELIVERY_COUNT: &str = "delivery-count";
}

/// The queue group that keeps a topic's dead letters (see [`SubscribeOptions::max_deliveries`]);
/// read them with a durable subscription in this group to [`dead_letter_topic`].
pub const DEAD_LETTERS: &str = "dead-letters";

/// Where the messages of `topic` go that a group gave up on: `<topic>.dead`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dead")
}

/// How to subscribe. Default: alone (every subscriber gets every message), not durable,
/// delivered again for as long as the handler fails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// The queue group: each message goes to one member of each group. Default: none.
    pub queue: Option<String>,
    /// Keep messages for this subscriber (or its queue group) while it is away and redeliver
    /// until it acknowledges (nats: JetStream). The memory and registry brokers keep nothing
    /// and refuse it. Default: off.
    pub durable: bool,
    /// For a durable group: a message whose handler fails on its `n`-th delivery is not
    /// delivered again but published to [`dead_letter_topic`] (same body and id, plus the
    /// `dead-letter-*` and `delivery-count` [`headers`]) and kept there for the
    /// [`DEAD_LETTERS`] group, which the subscription declares. Default: `None`, delivered
    /// again until handled.
    pub max_deliveries: Option<u32>,
}

impl SubscribeOptions {
    /// Joins queue group `queue`. Default: none.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Asks for durable delivery. Default: off.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Gives up on a message after `n` deliveries whose handler failed, sending it to the
    /// dead letters; see [`SubscribeOptions::max_deliveries`]. Default: no limit.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    #[cfg(any(feature = "nats", feature = "rabbitmq"))]
    /// Checks what every durable backend needs: a group for a durable subscriber
    /// (`group_names` says what the group name names there), and a delivery limit only on a
    /// durable group, of at least one.
    pub(crate) fn check(&self, topic: &str, group_names: &str) -> Result<()> {
        let what = || format!("durable subscription to {topic}");
        if self.durable && self.queue.is_none() {
            return Err(Error::invalid(what(), format!("name a queue group: it names {group_names}")));
        }
        match self.max_deliveries {
            Some(_) if !self.durable => Err(Error::invalid(
                format!("subscription to {topic}"),
                "a delivery limit needs a durable group: only durable messages are delivered again",
            )),
            Some(0) => Err(Error::invalid(what(), "max_deliveries must be at least 1")),
            _ => Ok(()),
        }
    }
}

#[cfg(any(feature = "nats", feature = "rabbitmq"))]
/// The dead letter of `message`, which group `group` had delivered `deliveries` times,
/// its handler failing last with `error`.
pub(crate) fn dead_letter(message: &Message, group: &str, deliveries: u64, error: &str) -> Message {
    // Header values are one line of text on every backend.
    let error: String =
        error.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_DEAD_LETTER_ERROR).collect();
    let mut dead = message.clone();
    dead.topic = dead_letter_topic(&message.topic);
    dead.headers.insert(headers::DEAD_LETTER_TOPIC, message.topic.clone());
    dead.headers.insert(headers::DEAD_LETTER_GROUP, group);
    dead.headers.insert(headers::DEAD_LETTER_ERROR, error);
    dead.headers.insert(headers::DELIVERY_COUNT, deliveries.to_string());
    dead
}

#[cfg(any(feature = "nats", feature = "rabbitmq"))]
/// Characters of a handler's error kept on its dead letter.
const MAX_DEAD_LETTER_ERROR: usize = 1000;

#[cfg(any(feature = "nats", feature = "rabbitmq"))]
/// Logs that `group` gave up, after `deliveries`, on the message `dead` is the dead letter of.
pub(crate) fn log_dead_lettered(broker: &str, dead: &Message, group: &str, deliveries: u64) {
    tracing::error!(
        broker,
        topic = dead.headers.get(headers::DEAD_LETTER_TOPIC).unwrap_or("-"),
        message_id = dead.id().unwrap_or("-"),
        group,
        deliveries,
        dead_letter_topic = %dead.topic,
        "handler kept failing: message sent to the dead letters"
    );
}

/// What a subscriber runs for each message: `Ok` acknowledges it; an error is logged with
/// the topic and message id, and a durable backend delivers the message again.
pub type Handler = Arc<dyn Fn(Message) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// Makes a [`Handler`] from an async closure.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    Arc::new(move |message| Box::pin(f(message)))
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    topic: String,
    queue: Option<String>,
    guard: Box<dyn Send + Sync>,
    stopping: Option<tokio::task::JoinHandle<()>>,
}

impl Subscription {
    /// A subscription that lasts as long as `guard`: dropping the guard must stop delivery.
    pub fn new(topic: impl Into<String>, queue: Option<String>, guard: impl Send + Sync + 'static) -> Self {
        Subscription { topic: topic.into(), queue, guard: Box::new(guard), stopping: None }
    }

    /// Makes [`Subscription::unsubscribe`] wait for `task`, which ends by itself once the
    /// guard is dropped (after giving back what it holds, say).
    pub fn stopping_with(mut self, task: tokio::task::JoinHandle<()>) -> Self {
        self.stopping = Some(task);
        self
    }

    /// Stops delivery, as dropping it does, and waits until the backend has finished
    /// stopping: on nats a durable member has then given back the messages it had pulled
    /// but not handled, so a process about to exit strands none of them.
    pub async fn unsubscribe(self) {
        let Subscription { guard, stopping, .. } = self;
        drop(guard);
        if let Some(task) = stopping {
            let _ = task.await;
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The queue group, if any.
    pub fn queue(&self) -> Option<&str> {
        self.queue.as_deref()
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("topic", &self.topic).field("queue", &self.queue).finish()
    }
}

/// Aborts a task when dropped: the guard of a subscription served by one task.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes and subscribes; chosen by `MICRO_BROKER` ([`crate::config::BrokerConfig`]).
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The backend's short name, as `MICRO_BROKER` spells it.
    fn kind(&self) -> &'static str;

    /// Where the backend lives, for error messages.
    fn address(&self) -> String;

    /// Publishes `message` to `message.topic`. Returns once the backend took it (nats with
    /// JetStream: once the stream stored it); an error means it may not have been delivered.
    /// Counted in the broker metrics by topic and result; the backend's work is [`Broker::send`].
    async fn publish(&self, message: Message) -> Result<()> {
        let counts = crate::metrics::metrics().broker_topic(self.kind(), &message.topic);
        let outcome = self.send(message).await;
        counts.published(outcome.is_ok());
        outcome
    }

    /// What the backend does to publish `message`, as [`Broker::publish`] describes; call
    /// `publish`, which also counts it.
    async fn send(&self, message: Message) -> Result<()>;

    /// Runs `handler` for each message on `topic` until the [`Subscription`] is dropped.
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription>;
}

/// Runs `handler` on `message` in a span continuing the publisher's trace; logs a failure
/// with the topic and message id. Returns the handler's error, as text, when it failed.
pub(crate) async fn run_handler(
    broker: &'static str,
    handler: &Handler,
    message: Message,
) -> Result<(), String> {
    let counts = crate::metrics::metrics().broker_topic(broker, &message.topic);
    run_counted_handler(&counts, handler, message).await
}

/// [`run_handler`] for a subscriber that looked up its topic's metric handles once: every
/// message it gets is on that one topic.
pub(crate) async fn run_counted_handler(
    counts: &crate::metrics::BrokerTopic,
    handler: &Handler,
    message: Message,
) -> Result<(), String> {
    use tracing::Instrument;
    let message_id = message.id().unwrap_or("-");
    let span = tracing::info_span!("broker.handle", topic = %message.topic, message_id = %message_id);
    // A failure is logged in the span, which names the topic and the message; without the
    // span (logs at warn), the warning names them itself.
    let named = (span.is_disabled() && tracing::enabled!(tracing::Level::WARN))
        .then(|| (message.topic.clone(), message_id.to_owned()));
    trace::continue_trace(&message.headers, &span);
    let started = std::time::Instant::now();
    let outcome = handler(message).instrument(span.clone()).await;
    counts.handled_in(outcome.is_ok(), started.elapsed().as_secs_f64());
    outcome.map_err(|err| {
        let error = crate::error::error_chain(&*err);
        match named {
            Some((topic, message_id)) => tracing::warn!(%topic, %message_id, %error, "handler failed"),
            None => span.in_scope(|| tracing::warn!(%error, "handler failed")),
        }
        error
    })
}

/// Decodes `message`'s body as `M`; the error names the topic, the message id and the type.
pub fn decode<M: prost::Message + Default>(message: &Message) -> Result<M> {
    M::decode(message.body.clone()).map_err(|source| Error::Decode {
        topic: message.topic.clone(),
        message_id: message.id().unwrap_or("-").to_owned(),
        type_name: std::any::type_name::<M>(),
        source,
    })
}

/// Publishes `value` prost-encoded on `topic`, content type [`headers::PROTOBUF`], with
/// `message_id` (a fresh one when `None`) and the current trace context. Returns the id.
pub async fn publish_proto<M: prost::Message>(
    broker: &(impl Broker + ?Sized),
    topic: &str,
    message_id: Option<String>,
    value: &M,
) -> Result<String> {
    let mut message =
        Message::new(topic, value.encode_to_vec()).header(headers::CONTENT_TYPE, headers::PROTOBUF);
    if let Some(id) = message_id {
        message.headers.insert(headers::MESSAGE_ID, id);
    }
    let id = message.id().unwrap_or_default().to_owned();
    broker.publish(message).await?;
    Ok(id)
}

/// Subscribes with a handler that receives `M` decoded from the body: see [`proto_handler`].
pub async fn subscribe_proto<M, F, Fut>(
    broker: &(impl Broker + ?Sized),
    topic: &str,
    options: SubscribeOptions,
    f: F,
) -> Result<Subscription>
where
    M: prost::Message + Default + 'static,
    F: Fn(M, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    broker.subscribe(topic, options, proto_handler(f)).await
}

/// A [`Handler`] that decodes each body as `M` and runs `f` on it (and the message, for its
/// headers). A body that does not decode is logged as an error naming the topic, the message
/// id and the type, and acknowledged (dropped), so it cannot block a queue.
pub fn proto_handler<M, F, Fut>(f: F) -> Handler
where
    M: prost::Message + Default + 'static,
    F: Fn(M, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let f = Arc::new(f);
    handler(move |message: Message| {
        let f = f.clone();
        async move {
            match decode::<M>(&message) {
                Ok(value) => f(value, message).await,
                Err(err) => {
                    tracing::error!(error = %err, "dropped a malformed message (acknowledged, not redelivered)");
                    Ok(())
                }
            }
        }
    })
}

/// The error a broker without durable storage gives a durable subscriber.
pub(crate) fn refuse_durable(broker: &dyn Broker) -> Error {
    Error::Broker {
        broker: broker.kind().into(),
        address: broker.address(),
        message:
            "keeps nothing, so it cannot deliver durably; use MICRO_BROKER=nats or MICRO_BROKER=rabbitmq \
                  for durable subscribers"
                .into(),
        source: None,
    }
}
