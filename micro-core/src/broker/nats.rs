//! A NATS server as broker (feature `nats`, async-nats).
//!
//! - **Publish** goes through JetStream when the server has it: each topic gets a stream
//!   (`micro_<topic>`, file storage, interest retention: a message is kept until every
//!   durable consumer acknowledged it), and a publish returns once the stream stored it, or
//!   fails with an error naming the topic after `publish_timeout`, never silently. A server
//!   without JetStream gets a plain core publish.
//! - **Plain subscribers** use core NATS (a queue subscription for a queue group): at most
//!   once, fast.
//! - **Durable subscribers** (`SubscribeOptions::durable`, which needs a queue group) get a
//!   JetStream durable pull consumer named after the group: each message goes to one member,
//!   stays until the handler succeeds (`ack`), and a failed handler gets it again (`nak`)
//!   after [`REDELIVERY_DELAY`], until a delivery limit sends it to the dead letters
//!   ([`SubscribeOptions::max_deliveries`]). A running handler tells the server it is still at work; a
//!   member whose subscription is dropped gives back at once what it pulled (its running
//!   handler is cancelled), and the messages of a member that went silent go to the others
//!   after [`NatsBroker::ack_wait`].
//!
//! The client reconnects forever; core subscriptions are renewed by async-nats, and a
//! durable subscriber re-attaches its consumer, so a restarted server loses no subscription.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::broker::{Broker, Message, NatsBroker, SubscribeOptions, handler};
//!
//! let broker = NatsBroker::connect("127.0.0.1:4222").await?;
//! let _sub = broker
//!     .subscribe("consignment.created", SubscribeOptions::default().queue("vessel-service").durable(),
//!         handler(|m: Message| async move { println!("{:?}", m.id()); Ok(()) }))
//!     .await?;
//! broker.publish(Message::new("consignment.created", "…")).await?;
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use async_nats::jetstream::{self, consumer::pull, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::oneshot;

use super::{
    AbortOnDrop, Broker, DEAD_LETTERS, Handler, Message, SubscribeOptions, Subscription, dead_letter,
    dead_letter_topic, log_dead_lettered, run_handler,
};
use crate::{BoxError, Error, Result};

/// Default NATS address.
pub const DEFAULT_NATS_ADDRESS: &str = "127.0.0.1:4222";
/// Default bound on a publish waiting for the stream's acknowledgement, reconnect included.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for how long a durable message pulled by a member that went silent (killed, cut
/// off) waits before it goes to another member. A running handler keeps its message.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(10);
/// How long a stopping member waits for more already-pulled messages to give back.
const HAND_BACK_IDLE: Duration = Duration::from_millis(50);
/// How long a message whose handler failed waits before it is delivered again, so a handler
/// that keeps failing does not spin.
const REDELIVERY_DELAY: Duration = Duration::from_secs(1);
/// Messages a durable subscriber pulls at a time: few, so the members of a group share the
/// work; a member that stops gives back what it pulled.
const PULL_BATCH: usize = 16;
/// How often the server shows an idle pull is alive.
const PULL_HEARTBEAT: Duration = Duration::from_secs(15);

/// A broker on a NATS server.
pub struct NatsBroker {
    address: String,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    publish_timeout: Duration,
    ack_wait: Duration,
    /// Topics whose stream is known to exist; `None` once the server said it has no JetStream.
    streams: Mutex<Option<HashSet<String>>>,
}

/// The stream name of `topic`: `micro_` and the topic with every character that is not
/// `A-Z a-z 0-9 - _` as `_`.
pub fn stream_name(topic: &str) -> String {
    format!("micro_{}", sanitize(topic))
}

fn sanitize(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

impl NatsBroker {
    /// Connects to the server at `address` (`host:port` or a `nats://` URL); fails at once
    /// when it is not there. Later outages are reconnected forever.
    pub async fn connect(address: &str) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected: reconnecting"),
                    other => tracing::debug!(event = %other, "nats"),
                }
            })
            .connect(address)
            .await
            .map_err(|err| connect_error(address, err))?;
        let jetstream = jetstream::new(client.clone());
        Ok(NatsBroker {
            address: address.to_owned(),
            client,
            jetstream,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            ack_wait: DEFAULT_ACK_WAIT,
            streams: Mutex::new(Some(HashSet::new())),
        })
    }

    /// How long a publish waits for the stream to store it, across a reconnect.
    /// Default: [`DEFAULT_PUBLISH_TIMEOUT`].
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long a message pulled by a member that went silent waits before it goes to
    /// another member of the group; set when the group's consumer is made (its first member).
    /// A running handler keeps its message however long it takes. Default: [`DEFAULT_ACK_WAIT`].
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    fn error(&self, message: impl Into<String>, source: impl Into<BoxError>) -> Error {
        broker_error(&self.address, message, source)
    }

    /// Makes sure `topic`'s stream exists; `false` when the server has no JetStream. An
    /// error starts with what `what` says (the topic, and the message being published).
    async fn ensure_stream(&self, topic: &str, what: impl Fn() -> String) -> Result<bool> {
        match self.streams.lock().expect("streams lock").as_ref() {
            None => return Ok(false),
            Some(known) if known.contains(topic) => return Ok(true),
            Some(_) => {}
        }
        let config = stream::Config {
            name: stream_name(topic),
            subjects: vec![topic.to_owned()],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let created =
            tokio::time::timeout(self.publish_timeout, self.jetstream.get_or_create_stream(config)).await;
        match created {
            Ok(Ok(_)) => {}
            Ok(Err(err)) if jetstream_not_enabled(&err) => {
                tracing::warn!(address = %self.address, "nats-server has no JetStream: core NATS only, no durable delivery");
                *self.streams.lock().expect("streams lock") = None;
                return Ok(false);
            }
            // Another process may have made it between this one's look-up and its create.
            Ok(Err(err)) => {
                if self.jetstream.get_stream(stream_name(topic)).await.is_err() {
                    return Err(self.error(format!("{}: cannot create the stream", what()), err));
                }
            }
            Err(elapsed) => {
                return Err(self.error(format!("{}: no answer creating the stream", what()), elapsed));
            }
        }
        if let Some(known) = self.streams.lock().expect("streams lock").as_mut() {
            known.insert(topic.to_owned());
        }
        Ok(true)
    }
}

fn broker_error(address: &str, message: impl Into<String>, source: impl Into<BoxError>) -> Error {
    super::backend_error::backend_error("nats", address, message, source)
}

fn connect_error(address: &str, source: impl Into<BoxError>) -> Error {
    super::backend_error::first_connect_error("nats", address, "is nats-server running there?", source)
}

/// Publishes `message` to its topic's stream and waits up to `timeout` for the stream to
/// store it; an error says which (`not stored`, `not stored within …`) and why.
async fn store(
    jetstream: &jetstream::Context,
    timeout: Duration,
    message: &Message,
) -> Result<(), (String, BoxError)> {
    let headers = to_nats_headers(&message.headers);
    let stored = tokio::time::timeout(timeout, async {
        let ack =
            jetstream.publish_with_headers(message.topic.clone(), headers, message.body.clone()).await?;
        ack.await.map(drop).map_err(BoxError::from)
    })
    .await;
    match stored {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(("not stored".to_owned(), err)),
        Err(elapsed) => Err((format!("not stored within {timeout:?}"), elapsed.into())),
    }
}

fn to_nats_headers(headers: &BTreeMap<String, String>) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (key, value) in headers {
        map.insert(key.as_str(), value.as_str());
    }
    map
}

fn from_nats(message: &async_nats::Message) -> Message {
    let headers = message
        .headers
        .iter()
        .flat_map(|map| map.iter())
        .filter_map(|(key, values)| {
            let key: &str = key.as_ref();
            values.first().map(|v| (key.to_owned(), AsRef::<str>::as_ref(v).to_owned()))
        })
        .collect();
    Message { topic: message.subject.to_string(), headers, body: message.payload.clone() }
}

#[async_trait]
impl Broker for NatsBroker {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    async fn send(&self, message: Message) -> Result<()> {
        let topic = message.topic.clone();
        let message_id = message.id().unwrap_or("-").to_owned();
        if self.ensure_stream(&topic, || format!("topic {topic} message {message_id}")).await? {
            store(&self.jetstream, self.publish_timeout, &message)
                .await
                .map_err(|(what, err)| self.error(format!("topic {topic} message {message_id}: {what}"), err))
        } else {
            let headers = to_nats_headers(&message.headers);
            self.client
                .publish_with_headers(topic.clone(), headers, message.body)
                .await
                .map_err(|err| self.error(format!("topic {topic} message {message_id}: not sent"), err))
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription> {
        options.check(topic, "the JetStream consumer that keeps the subscriber's place")?;
        if !options.durable {
            let subscriber = match &options.queue {
                Some(queue) => self.client.queue_subscribe(topic.to_owned(), queue.clone()).await,
                None => self.client.subscribe(topic.to_owned()).await,
            }
            .map_err(|err| self.error(format!("cannot subscribe to {topic}"), err))?;
            // The subscription is in force on the server once a flush returns.
            self.client.flush().await.map_err(|err| self.error("flush after subscribe", err))?;
            let task = tokio::spawn(async move {
                let mut subscriber = subscriber;
                while let Some(message) = subscriber.next().await {
                    let _ = run_handler("nats", &handler, from_nats(&message)).await;
                }
            });
            return Ok(Subscription::new(topic, options.queue, AbortOnDrop(task)));
        }
        let queue = options.queue.clone().unwrap_or_default();
        let consumer = self.durable_consumer(topic, &queue).await?;
        if options.max_deliveries.is_some() {
            // The dead letters are kept from the first one, whether or not anyone reads them yet.
            self.durable_consumer(&dead_letter_topic(topic), DEAD_LETTERS).await?;
        }
        // Dropping the subscription drops `stop`: the task hands back what it holds and ends.
        let (stop, stopped) = oneshot::channel::<()>();
        let member = DurableMember {
            topic: topic.to_owned(),
            consumer_name: consumer.cached_info().name.clone(),
            group: queue,
            ack_wait: self.ack_wait,
            max_deliveries: options.max_deliveries,
            jetstream: self.jetstream.clone(),
            publish_timeout: self.publish_timeout,
        };
        let task = tokio::spawn(member.serve(consumer, handler, stopped));
        Ok(Subscription::new(topic, options.queue, stop).stopping_with(task))
    }
}

impl NatsBroker {
    /// The durable consumer of `group` on `topic`'s stream, made if it is not there yet.
    async fn durable_consumer(&self, topic: &str, group: &str) -> Result<jetstream::consumer::PullConsumer> {
        if !self.ensure_stream(topic, || format!("topic {topic}")).await? {
            return Err(self.error(
                "durable delivery needs JetStream: start nats-server with -js",
                format!("topic {topic}"),
            ));
        }
        let stream = self
            .jetstream
            .get_stream(stream_name(topic))
            .await
            .map_err(|err| self.error(format!("cannot open the stream of topic {topic}"), err))?;
        let durable = sanitize(group);
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            ..Default::default()
        };
        match stream.get_or_create_consumer(&durable, config).await {
            Ok(consumer) => Ok(consumer),
            // Another member of the group may have made it between the look-up and the create.
            Err(err) => stream
                .get_consumer(&durable)
                .await
                .map_err(|_| self.error(format!("cannot create consumer {durable} on topic {topic}"), err)),
        }
    }
}

/// One member of a durable group: pulls, handles, acknowledges; on stop gives back at once
/// every message it holds, so the group's other members get them without waiting for the
/// ack wait.
struct DurableMember {
    topic: String,
    consumer_name: String,
    group: String,
    ack_wait: Duration,
    max_deliveries: Option<u32>,
    /// Where dead letters are published.
    jetstream: jetstream::Context,
    publish_timeout: Duration,
}

impl DurableMember {
    async fn serve(
        self,
        consumer: jetstream::consumer::PullConsumer,
        handler: Handler,
        mut stopped: oneshot::Receiver<()>,
    ) {
        loop {
            let pull = consumer.stream().max_messages_per_batch(PULL_BATCH).heartbeat(PULL_HEARTBEAT);
            let mut messages = tokio::select! {
                pulled = pull.messages() => match pulled {
                    Ok(messages) => messages,
                    Err(err) => {
                        tracing::warn!(topic = %self.topic, consumer = %self.consumer_name, error = %err, "cannot pull; trying again");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = &mut stopped => return,
                        }
                    }
                },
                _ = &mut stopped => return,
            };
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    _ = &mut stopped => return self.hand_back(messages, None).await,
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        tracing::debug!(topic = %self.topic, error = %err, "pull interrupted");
                        continue;
                    }
                    None => break,
                };
                let handled = tokio::select! {
                    handled = self.handle(&handler, &message) => handled,
                    _ = &mut stopped => return self.hand_back(messages, Some(message)).await,
                };
                let ack = match handled {
                    Ok(()) => message.ack().await,
                    Err(error) => self.failed(&message, &error).await,
                };
                if let Err(err) = ack {
                    tracing::warn!(topic = %self.topic, error = %err, "acknowledgement not sent; the message will come again");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = &mut stopped => return,
            }
        }
    }

    /// Runs the handler, telling the server it is still at work every third of the ack wait,
    /// so a long handler's message is not delivered to another member meanwhile.
    async fn handle(&self, handler: &Handler, message: &jetstream::Message) -> Result<(), String> {
        let handled = run_handler("nats", handler, from_nats(message));
        tokio::pin!(handled);
        let every = self.ack_wait / 3;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                handled = &mut handled => return handled,
                _ = progress.tick() => {
                    if let Err(err) = message.ack_with(jetstream::AckKind::Progress).await {
                        tracing::debug!(topic = %self.topic, error = %err, "progress not sent");
                    }
                }
            }
        }
    }

    /// Answers a message whose handler failed with `error`: delivered again after a pause
    /// or, on its last allowed delivery, published to the dead letters and acknowledged. A
    /// dead letter that cannot be stored leaves the message to be delivered again.
    async fn failed(&self, message: &jetstream::Message, error: &str) -> Result<(), async_nats::Error> {
        let deliveries = message.info().map_or(1, |info| info.delivered).max(1).unsigned_abs();
        if let Some(max) = self.max_deliveries.filter(|&max| deliveries >= u64::from(max)) {
            let dead = dead_letter(&from_nats(message), &self.group, deliveries, error);
            let stored = store(&self.jetstream, self.publish_timeout, &dead).await;
            crate::metrics::metrics().broker_published("nats", &dead.topic, stored.is_ok());
            match stored {
                Ok(()) => {
                    log_dead_lettered("nats", &dead, &self.group, deliveries);
                    return message.ack().await;
                }
                Err((what, err)) => {
                    tracing::warn!(topic = %self.topic, max, error = %err, "dead letter {what}; delivering again")
                }
            }
        }
        message.ack_with(jetstream::AckKind::Nak(Some(REDELIVERY_DELAY))).await
    }

    /// Gives back `current` (its handler cancelled) and every message already pulled, for
    /// redelivery to the group at once. The pull is ended first, so the server does not hand
    /// them straight back to this member.
    async fn hand_back(&self, mut messages: pull::Stream, current: Option<jetstream::Message>) {
        let mut held: Vec<jetstream::Message> = current.into_iter().collect();
        // What was pulled is already in the client; more than two batches means new ones are
        // still arriving, and those the server gives to the others after the ack wait.
        for _ in 0..2 * PULL_BATCH {
            match tokio::time::timeout(HAND_BACK_IDLE, messages.next()).await {
                Ok(Some(Ok(message))) => held.push(message),
                Ok(Some(Err(_))) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        drop(messages);
        let mut given_back = 0;
        for message in held {
            if message.ack_with(jetstream::AckKind::Nak(None)).await.is_ok() {
                given_back += 1;
            }
        }
        tracing::debug!(topic = %self.topic, consumer = %self.consumer_name, given_back, "durable member stopped");
    }
}
/// Whether the server answered that it has no JetStream (for anyone, or for this account):
/// its API error code, not its text.
fn jetstream_not_enabled(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::{ErrorCode, context::CreateStreamErrorKind};
    match err.kind() {
        CreateStreamErrorKind::JetStream(err) => {
            matches!(
                err.error_code(),
                ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            )
        }
        _ => false,
    }
}
