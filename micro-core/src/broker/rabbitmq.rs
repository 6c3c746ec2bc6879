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

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::{sync::watch, task::JoinSet};

use super::{
    AbortOnDrop, Broker, DEAD_LETTERS, Handler, Message, SubscribeOptions, Subscription, dead_letter,
    dead_letter_topic, headers, log_dead_lettered, run_handler,
};
use crate::{BoxError, Error, Result, registry::Backoff};

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

/// One open connection and its confirming publish channel; replaced on reconnect.
struct Live {
    generation: u64,
    connection: Connection,
    publisher: tokio::sync::Mutex<Option<Channel>>,
}

type LiveSlot = Option<Arc<Live>>;

/// Each live subscription's id and the generation of the connection it last attached to;
/// after a reconnect, publishes wait (a bounded time) until every one is attached again.
type Attached = Arc<Mutex<BTreeMap<u64, watch::Receiver<u64>>>>;

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

impl Live {
    /// Connects, declares the exchange and opens the publish channel.
    async fn open(uri: &str, generation: u64) -> Result<Live, BoxError> {
        let properties = ConnectionProperties::default().with_connection_name("micro".into());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(uri, properties))
            .await
            .map_err(|_| format!("no AMQP handshake within {CONNECT_TIMEOUT:?}"))??;
        let live = Live { generation, connection, publisher: tokio::sync::Mutex::new(None) };
        let channel = live.publisher().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        Ok(live)
    }

    /// The publish channel (publisher confirms on), opened again if the server closed it.
    async fn publisher(&self) -> Result<Channel, BoxError> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|channel| channel.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes through `exchange` and waits for the confirmation; `Ok(false)` when no
    /// queue was bound.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: ShortString,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<bool, BoxError> {
        let channel = self.publisher().await?;
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm =
            channel.basic_publish(exchange.into(), routing_key, options, body, properties).await?.await?;
        match confirm {
            Confirmation::Ack(returned) => Ok(returned.is_none()),
            Confirmation::Nack(_) => Err("the server refused to store it (nack)".into()),
            Confirmation::NotRequested => Err("the channel has no publisher confirms".into()),
        }
    }

    /// Resolves once the connection is gone.
    async fn lost(&self) {
        let mut events = self.connection.events_listener();
        while self.connection.status().connected() {
            tokio::select! {
                event = events.next() => match event {
                    Some(lapin::Event::Error(err)) => tracing::debug!(broker = "rabbitmq", error = %err, "connection error"),
                    Some(_) => {}
                    None => return,
                },
                () = tokio::time::sleep(LIVENESS_POLL) => {}
            }
        }
    }
}

/// Owns both connection slots; empties them when dropped (the broker is gone), so
/// subscriptions see the end and stop.
struct LiveSlots {
    subscribers: watch::Sender<LiveSlot>,
    publishers: watch::Sender<LiveSlot>,
}

impl LiveSlots {
    fn set(&self, slot: LiveSlot) {
        self.subscribers.send_replace(slot.clone());
        self.publishers.send_replace(slot);
    }
}

impl Drop for LiveSlots {
    fn drop(&mut self) {
        self.set(None);
    }
}

/// Watches the connection and, when it is lost, reconnects with jittered backoff; the
/// subscriptions attach to the new connection before publishes may use it.
async fn supervise(uri: String, address: String, slots: LiveSlots, attached: Attached) {
    let mut backoff = Backoff::new(FIRST_RECONNECT_DELAY, MAX_RECONNECT_DELAY);
    loop {
        let Some(live) = slots.publishers.borrow().clone() else { return };
        live.lost().await;
        let generation = live.generation + 1;
        drop(live);
        slots.set(None);
        tracing::warn!(broker = "rabbitmq", %address, "connection lost: reconnecting");
        let mut attempts = 0_u64;
        let live = loop {
            tokio::time::sleep(backoff.next_delay()).await;
            attempts += 1;
            match Live::open(&uri, generation).await {
                Ok(live) => break Arc::new(live),
                Err(err) => {
                    tracing::debug!(broker = "rabbitmq", %address, attempts, error = %err, "reconnect failed")
                }
            }
        };
        backoff.reset();
        tracing::info!(broker = "rabbitmq", %address, attempts, "reconnected");
        slots.subscribers.send_replace(Some(live.clone()));
        let waiting: Vec<watch::Receiver<u64>> =
            attached.lock().expect("attached lock").values().cloned().collect();
        let all_back = async {
            for mut subscription in waiting {
                // An error means the subscription was dropped meanwhile.
                let _ = subscription.wait_for(|attached| *attached >= generation).await;
            }
        };
        if tokio::time::timeout(RESUBSCRIBE_WAIT, all_back).await.is_err() {
            tracing::warn!(broker = "rabbitmq", %address, "not every subscription is back yet; publishing anyway");
        }
        slots.publishers.send_replace(Some(live));
    }
}

/// The current connection, waiting for one while reconnecting; `None` once the broker is gone.
async fn current(live: &mut watch::Receiver<LiveSlot>) -> Option<Arc<Live>> {
    live.wait_for(Option::is_some).await.ok().and_then(|slot| slot.clone())
}

/// Resolves once `generation` is no longer the current connection.
async fn replaced(live: &mut watch::Receiver<LiveSlot>, generation: u64) {
    let _ = live.wait_for(|slot| slot.as_ref().map(|live| live.generation) != Some(generation)).await;
}

/// The AMQP properties of `message`: persistent, its headers, message id and content type.
fn properties(message: &Message) -> Result<BasicProperties> {
    let mut table = FieldTable::default();
    for (key, value) in &message.headers {
        table.insert(short(key, "header name")?, AMQPValue::LongString(LongString::from(value.as_str())));
    }
    let mut properties = BasicProperties::default().with_delivery_mode(PERSISTENT).with_headers(table);
    if let Some(id) = message.id().and_then(|id| ShortString::try_new(id).ok()) {
        properties = properties.with_message_id(id);
    }
    if let Some(content_type) = message.content_type().and_then(|ct| ShortString::try_new(ct).ok()) {
        properties = properties.with_content_type(content_type);
    }
    Ok(properties)
}

/// A delivery as a [`Message`]: text headers, then the id and content type properties
/// where the headers lack them (a publisher outside the SDK).
fn from_delivery(delivery: &Delivery) -> Message {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in delivery.properties.headers().iter().flat_map(|table| table.inner()) {
        let text = match value {
            AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
            AMQPValue::ShortString(text) => text.as_str().to_owned(),
            _ => continue,
        };
        headers.insert(key.as_str().to_owned(), text);
    }
    if let Some(id) = delivery.properties.message_id() {
        headers.entry(headers::MESSAGE_ID.to_owned()).or_insert_with(|| id.as_str().to_owned());
    }
    if let Some(content_type) = delivery.properties.content_type() {
        headers.entry(headers::CONTENT_TYPE.to_owned()).or_insert_with(|| content_type.as_str().to_owned());
    }
    headers.remove(DELIVERY_HEADER);
    Message {
        topic: headers.remove(TOPIC_HEADER).unwrap_or_else(|| delivery.routing_key.as_str().to_owned()),
        headers,
        body: bytes::Bytes::copy_from_slice(&delivery.data),
    }
}

/// What a subscription declares on every connection: its queue, binding and consumer.
struct Binding {
    topic: String,
    routing_key: ShortString,
    /// The shared queue of a group; `None` for a plain subscriber's server-named queue.
    queue: Option<ShortString>,
    /// The group's name, for dead letters.
    group: String,
    durable: bool,
    max_deliveries: Option<u32>,
    /// The queue that keeps the topic's dead letters, when there is a delivery limit.
    dead_letters: Option<Box<Binding>>,
}

impl Binding {
    fn new(topic: &str, options: &SubscribeOptions) -> Result<Binding> {
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
    async fn attach(&self, live: &Live) -> Result<(Channel, Consumer), BoxError> {
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
    async fn handle(&self, handler: &Handler, delivery: Delivery, live: &Arc<Live>, later: &mut JoinSet<()>) {
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
            copy.headers.insert(DELIVERY_HEADER.to_owned(), (deliveries + 1).to_string());
            copy.headers.insert(TOPIC_HEADER.to_owned(), copy.topic.clone());
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

/// Publishes `message` through `exchange` with `routing_key` and waits for the server to
/// confirm it was stored in a queue.
async fn store(live: &Live, exchange: &str, routing_key: &str, message: &Message) -> Result<(), BoxError> {
    let properties = properties(message)?;
    match live.publish(exchange, short(routing_key, "routing key")?, &message.body, properties).await? {
        true => Ok(()),
        false => Err(format!("no queue took it (routing key {routing_key})").into()),
    }
}

/// Which delivery of its message `delivery` is: 1, or what its copy's header says.
fn delivery_number(delivery: &Delivery) -> u64 {
    let header = delivery.properties.headers().as_ref().and_then(|table| {
        table.inner().iter().find(|(key, _)| key.as_str() == DELIVERY_HEADER).map(|(_, value)| value.clone())
    });
    match header {
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).parse().unwrap_or(1),
        _ => 1,
    }
}

/// Logs an acknowledgement that could not be sent.
fn answered(topic: &str, answer: lapin::Result<bool>) {
    if let Err(err) = answer {
        tracing::warn!(broker = "rabbitmq", %topic, error = %err, "acknowledgement not sent; the message will come again");
    }
}

/// Serves one subscription: consumes until the connection goes, then attaches again on the
/// next one. Ends when the broker is dropped (or with its [`Subscription`]).
async fn serve(
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
struct SubscriptionGuard {
    _task: AbortOnDrop,
    id: u64,
    attached: Attached,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.attached.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
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
    use super::*;

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
