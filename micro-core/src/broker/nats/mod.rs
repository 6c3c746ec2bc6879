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
//!
//! One file per concern: this one holds the broker, its settings and the [`Broker`]
//! methods; `streams.rs` the JetStream streams and consumers; `message.rs` the conversion
//! of messages and headers; `durable.rs` a durable group's member.

mod durable;
mod message;
mod streams;

use std::{collections::HashSet, sync::Mutex, time::Duration};

use async_nats::jetstream;
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::oneshot;

use self::{
    durable::DurableMember,
    message::{from_nats, to_nats_headers},
    streams::store,
};
use super::{
    AbortOnDrop, Broker, DEAD_LETTERS, Handler, Message, SubscribeOptions, Subscription, dead_letter_topic,
    run_handler,
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
}

fn broker_error(address: &str, message: impl Into<String>, source: impl Into<BoxError>) -> Error {
    super::backend_error::backend_error("nats", address, message, source)
}

fn connect_error(address: &str, source: impl Into<BoxError>) -> Error {
    super::backend_error::first_connect_error("nats", address, "is nats-server running there?", source)
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
