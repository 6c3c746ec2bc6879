//! A RabbitMQ server as broker (feature `rabbitmq`, lapin on tokio, AMQP 0-9-1).
//!
//! - **Topology**: one durable topic exchange, [`EXCHANGE`]; a topic is a routing key.
//! - **Publish**: persistent, the message's headers as AMQP headers plus the `message_id`
//!   and `content_type` properties, with publisher confirms: it returns once the server
//!   confirmed the message, or fails after the publish timeout (default 10 s) with an error
//!   naming the topic, the message id and the server. A message no queue is bound to is
//!   accepted and dropped by the server (logged at debug), as on the other backends: a topic
//!   nobody subscribes to is not an error.
//! - **Plain subscribers**: an exclusive, auto-delete, server-named queue each; at most once.
//! - **Queue groups**: one queue per topic and group (`micro.<topic>.<group>`) shared by its
//!   members, so each message goes to one member. Not durable: the queue is auto-delete and
//!   delivery at most once, like the group's members themselves. **Durable** (needs a
//!   group): a durable queue that keeps messages while every member is away; a message is
//!   acknowledged after the handler succeeds; when it fails, a copy counting one more
//!   delivery (in a header of the SDK's own, not shown to handlers) goes to the back of the queue after a short pause (the consumer goes on
//!   meanwhile) and is delivered again, to any member, until a delivery limit sends it to
//!   the dead letters ([`SubscribeOptions::max_deliveries`]). A durable and a non-durable
//!   member cannot share a group: the server refuses the second with a clear error.
//! - **Flow**: every consumer holds at most 16 unacknowledged messages (a non-durable one
//!   acknowledges each on arrival); the rest wait on the server, so a slow handler does not
//!   grow this process's memory.
//!
//! lapin does not reconnect by itself: the broker does, with jittered backoff, and then
//! declares the exchange and every live subscription's queue, binding and consumer again,
//! so a restarted server loses no subscription. A publish made during an outage waits for
//! the reconnect (within its timeout) and is sent again; it may then reach subscribers
//! twice with the same message id. Every task stops with the broker or its subscription.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::broker::{Broker, Message, RabbitMqBroker, SubscribeOptions, handler};
//!
//! let broker = RabbitMqBroker::connect("127.0.0.1:5672").await?;
//! let _sub = broker
//!     .subscribe("consignment.created", SubscribeOptions::default().queue("vessel-service").durable(),
//!         handler(|m: Message| async move { println!("{:?}", m.id()); Ok(()) }))
//!     .await?;
//! broker.publish(Message::new("consignment.created", "…")).await?;
//! # Ok(()) }
//! ```
//!
//! One file per concern: this one holds the broker, its settings and the [`Broker`]
//! methods; `connection.rs` the connection and its reconnects; `message.rs` the AMQP form
//! of a message; `subscription.rs` what a subscription declares and how it consumes.

mod connection;
mod message;
mod subscription;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use lapin::types::ShortString;
use tokio::sync::watch;

use self::{
    connection::{Attached, Live, LiveSlot, LiveSlots, current, replaced, supervise},
    message::properties,
    subscription::{Binding, SubscriptionGuard, serve},
};
use super::{AbortOnDrop, Broker, Handler, Message, SubscribeOptions, Subscription};
use crate::{BoxError, Error, Result};

/// Default RabbitMQ address (vhost `/`, user `guest`).
pub const DEFAULT_RABBITMQ_ADDRESS: &str = "127.0.0.1:5672";
/// The topic exchange every message goes through.
pub const EXCHANGE: &str = "micro";
/// Default bound on a publish waiting for the server's confirmation, reconnect included.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on opening a connection (TCP and the AMQP handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest pause between reconnects (jittered).
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// How often the connection's state is checked besides its events.
const LIVENESS_POLL: Duration = Duration::from_millis(500);
/// How long publishes wait after a reconnect for the subscriptions to attach again.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// Pause before a failed publish is tried again (the connection may be going away).
const PUBLISH_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Unacknowledged messages a subscriber holds at once; the rest wait on the server, so a
/// slow handler does not grow this process's memory.
const PREFETCH: u16 = 16;
/// Pause before a failed message is requeued, so a handler that keeps failing does not spin.
const REQUEUE_DELAY: Duration = Duration::from_millis(250);
/// AMQP delivery mode of a message the server writes to disk.
const PERSISTENT: u8 = 2;
/// The exchange AMQP routes to the queue a routing key names.
const DEFAULT_EXCHANGE: &str = "";
/// Header on a copy delivered again: the topic it was published to (the copy's routing key
/// is its queue's name). Read into [`Message::topic`], not shown as a header.
const TOPIC_HEADER: &str = "x-micro-topic";
/// Header on a copy delivered again: which delivery of the message it is (the first has
/// none). Not shown as a header.
const DELIVERY_HEADER: &str = "x-micro-delivery";

/// A broker on a RabbitMQ server.
pub struct RabbitMqBroker {
    address: String,
    /// The connection subscriptions attach to; set first after a reconnect.
    subscribers: watch::Receiver<LiveSlot>,
    /// The connection publishes use; set once the subscriptions are back.
    publishers: watch::Receiver<LiveSlot>,
    attached: Attached,
    next_subscription: AtomicU64,
    publish_timeout: Duration,
    _supervisor: AbortOnDrop,
}

impl RabbitMqBroker {
    /// Connects to the server at `address` (`host:port`, vhost `/` and user `guest`, or an
    /// `amqp://user:password@host:port/vhost` URL); fails at once when it is not there.
    /// Later outages are reconnected forever.
    pub async fn connect(address: &str) -> Result<Self> {
        let uri = amqp_uri(address);
        let shown = shown_address(address);
        let live = Live::open(&uri, 1).await.map_err(|err| connect_error(&shown, err))?;
        tracing::info!(broker = "rabbitmq", address = %shown, "connected");
        let live = Arc::new(live);
        let (subscribers, subscribers_rx) = watch::channel(Some(live.clone()));
        let (publishers, publishers_rx) = watch::channel(Some(live));
        let attached = Attached::default();
        let slots = LiveSlots { subscribers, publishers };
        let supervisor = tokio::spawn(supervise(uri, shown.clone(), slots, attached.clone()));
        Ok(RabbitMqBroker {
            address: shown,
            subscribers: subscribers_rx,
            publishers: publishers_rx,
            attached,
            next_subscription: AtomicU64::new(0),
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            _supervisor: AbortOnDrop(supervisor),
        })
    }

    /// How long a publish waits for the server's confirmation, across a reconnect; also
    /// bounds a subscribe made while the server is away. Default: [`DEFAULT_PUBLISH_TIMEOUT`].
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    fn error(&self, message: impl Into<String>, source: impl Into<BoxError>) -> Error {
        broker_error(&self.address, message, source)
    }
}

/// `address` as lapin takes it: a URL as given, `host:port` as `amqp://host:port/%2f`.
fn amqp_uri(address: &str) -> String {
    if address.contains("://") { address.to_owned() } else { format!("amqp://{address}/%2f") }
}

/// `address` without credentials, for logs and errors.
fn shown_address(address: &str) -> String {
    match address.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://{host}"),
            None => address.to_owned(),
        },
        None => address.to_owned(),
    }
}

fn broker_error(address: &str, message: impl Into<String>, source: impl Into<BoxError>) -> Error {
    super::backend_error::backend_error("rabbitmq", address, message, source)
}

fn connect_error(address: &str, source: impl Into<BoxError>) -> Error {
    super::backend_error::first_connect_error(
        "rabbitmq",
        address,
        "is rabbitmq-server running there, and are the vhost and credentials right?",
        source,
    )
}

/// An AMQP short string (at most 255 bytes), or an error naming `what`.
fn short(value: &str, what: &str) -> Result<ShortString> {
    ShortString::try_new(value)
        .map_err(|_| Error::invalid(format!("{what} {value:?}"), "AMQP allows at most 255 bytes"))
}

#[async_trait]
impl Broker for RabbitMqBroker {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    async fn send(&self, message: Message) -> Result<()> {
        let topic = message.topic.clone();
        let message_id = message.id().unwrap_or("-").to_owned();
        let routing_key = short(&topic, "topic")?;
        let properties = properties(&message)?;
        let mut live = self.publishers.clone();
        let mut last_error: Option<BoxError> = None;
        let confirmed = tokio::time::timeout(self.publish_timeout, async {
            loop {
                let Some(connection) = current(&mut live).await else {
                    return Err(BoxError::from("the broker is shut down"));
                };
                match connection.publish(EXCHANGE, routing_key.clone(), &message.body, properties.clone()).await {
                    Ok(routed) => return Ok(routed),
                    Err(err) => {
                        tracing::debug!(broker = "rabbitmq", %topic, %message_id, error = %err, "publish failed; trying again");
                        last_error = Some(err);
                        tokio::time::sleep(PUBLISH_RETRY_DELAY).await;
                    }
                }
            }
        })
        .await;
        match confirmed {
            Ok(Ok(routed)) => {
                if !routed {
                    tracing::debug!(broker = "rabbitmq", %topic, %message_id, "no queue is bound to the topic: dropped");
                }
                Ok(())
            }
            Ok(Err(err)) => Err(self.error(format!("topic {topic} message {message_id}: not sent"), err)),
            Err(_) => {
                let reason = match &last_error {
                    Some(err) => format!("the last attempt failed: {err}"),
                    None => "the server was unreachable the whole time".to_owned(),
                };
                Err(self.error(
                    format!(
                        "topic {topic} message {message_id}: not confirmed within {:?} ({reason}); \
                         is rabbitmq-server running and reachable there?",
                        self.publish_timeout
                    ),
                    last_error.unwrap_or_else(|| "publish timed out".into()),
                ))
            }
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription> {
        options.check(topic, "the durable queue that keeps the subscriber's messages")?;
        let binding = Binding::new(topic, &options)?;
        let mut live = self.subscribers.clone();
        let attached = tokio::time::timeout(self.publish_timeout, async {
            loop {
                let Some(connection) = current(&mut live).await else {
                    return Err(BoxError::from("the broker is shut down"));
                };
                match binding.attach(&connection).await {
                    Ok((channel, consumer)) => return Ok((connection, channel, consumer)),
                    // The connection went away meanwhile: wait for the next one.
                    Err(_) if !connection.connection.status().connected() => {
                        replaced(&mut live, connection.generation).await;
                    }
                    Err(err) => return Err(err),
                }
            }
        })
        .await;
        let queue = binding.queue.as_ref().map_or("a private queue", |queue| queue.as_str()).to_owned();
        let first = match attached {
            Ok(Ok(first)) => first,
            Ok(Err(err)) => {
                let hint = if err.to_string().contains("PRECONDITION_FAILED") {
                    "; the queue exists with other settings: a durable and a non-durable member cannot share a group"
                } else {
                    ""
                };
                return Err(self.error(format!("cannot subscribe to {topic} ({queue}){hint}"), err));
            }
            Err(elapsed) => {
                return Err(self.error(
                    format!("cannot subscribe to {topic}: no connection within {:?}", self.publish_timeout),
                    elapsed,
                ));
            }
        };
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let (attached, attached_rx) = watch::channel(first.0.generation);
        self.attached.lock().expect("attached lock").insert(id, attached_rx);
        let task = tokio::spawn(serve(binding, handler, live, first, attached));
        let guard = SubscriptionGuard { _task: AbortOnDrop(task), id, attached: self.attached.clone() };
        Ok(Subscription::new(topic, options.queue, guard))
    }
}

#[cfg(test)]
mod tests {
    use lapin::message::Delivery;

    use super::{message::from_delivery, *};
    use crate::broker::headers;

    #[test]
    fn addresses_become_amqp_uris_and_hide_credentials() {
        assert_eq!(amqp_uri("127.0.0.1:5672"), "amqp://127.0.0.1:5672/%2f");
        assert_eq!(amqp_uri("amqp://u:p@h:1/v"), "amqp://u:p@h:1/v");
        assert_eq!(shown_address("amqp://u:p@h:1/v"), "amqp://h:1/v");
        assert_eq!(shown_address("h:1"), "h:1");
    }

    #[test]
    fn headers_id_and_content_type_survive_the_amqp_properties() {
        let message =
            Message::new("t", "x").header(headers::CONTENT_TYPE, "text/plain").header("x-custom", "1");
        let properties = properties(&message).unwrap();
        assert_eq!(properties.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(properties.message_id().as_ref().map(ShortString::as_str), message.id());
        let delivery = Delivery::mock(0, EXCHANGE.into(), "t".into(), false, b"x".to_vec());
        let delivery = Delivery { properties, ..delivery };
        assert_eq!(from_delivery(&delivery), message);
    }

    #[test]
    fn names_over_255_bytes_are_bad_input() {
        let long = "x".repeat(256);
        assert!(Binding::new(&long, &SubscribeOptions::default()).is_err());
        assert!(properties(&Message::new("t", "").header(long, "v")).is_err());
    }
}
