//! A broker inside one process: for tests of your own code and for single-binary apps.
//! Every subscriber alone gets each message; each queue group gets it once, its members
//! taking turns. Nothing is kept: at most once, and only for subscribers alive at publish.
//! Each subscriber has an inbox of [`INBOX_CAPACITY`] messages; a publish that finds an inbox
//! full skips that subscriber and fails with an error naming it (the others got the message),
//! so a handler slower than its publishers cannot make memory grow without bound.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> micro_core::Result<()> {
//! use micro_core::broker::{Broker, MemoryBroker, Message, SubscribeOptions, handler};
//!
//! let broker = MemoryBroker::new();
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let _sub = broker
//!     .subscribe("t", SubscribeOptions::default().queue("workers"), handler(move |m: Message| {
//!         let tx = tx.clone();
//!         async move { tx.send(m.body).map_err(Into::into) }
//!     }))
//!     .await?;
//! broker.publish(Message::new("t", "hi")).await?;
//! assert_eq!(&rx.recv().await.unwrap()[..], b"hi");
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use bytes::Bytes;
use smallvec::SmallVec;
use tokio::sync::mpsc;

use super::{
    AbortOnDrop, Broker, Handler, Headers, Message, SubscribeOptions, Subscription, refuse_durable,
    run_counted_handler,
};
use crate::{Error, Result};

/// Messages a subscriber's inbox holds while its handler is busy.
pub const INBOX_CAPACITY: usize = 1024;

/// A broker in this process's memory. Clones share subscribers.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Mutex<Topics>>,
}

#[derive(Default)]
struct Topics {
    next_id: u64,
    subscribers: HashMap<String, Vec<Subscriber>>,
    /// Turn counter per topic and queue group.
    turns: HashMap<String, HashMap<String, usize>>,
}

struct Subscriber {
    id: u64,
    queue: Option<String>,
    deliver: mpsc::Sender<Delivery>,
}

/// A message in an inbox: its topic stays behind, as the subscriber knows it, so a
/// publisher's topic is freed by the thread that made it.
#[derive(Clone)]
struct Delivery {
    headers: Headers,
    body: Bytes,
}

/// Removes its subscriber from the broker when dropped.
struct Unsubscribe {
    inner: Arc<Mutex<Topics>>,
    topic: String,
    id: u64,
    _task: AbortOnDrop,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Ok(mut topics) = self.inner.lock()
            && let Some(list) = topics.subscribers.get_mut(&self.topic)
        {
            list.retain(|s| s.id != self.id);
        }
    }
}

/// Who gets a message on `topic`: every subscriber alone, and one member of each queue
/// group, whose turn it is.
fn receivers<'a>(
    list: &'a [Subscriber],
    turns: &mut HashMap<String, HashMap<String, usize>>,
    topic: &str,
) -> SmallVec<[&'a Subscriber; 4]> {
    let mut receivers: SmallVec<[&Subscriber; 4]> = list.iter().filter(|s| s.queue.is_none()).collect();
    if receivers.len() == list.len() {
        return receivers;
    }
    let mut groups: BTreeMap<&str, Vec<&Subscriber>> = BTreeMap::new();
    for subscriber in list {
        if let Some(queue) = &subscriber.queue {
            groups.entry(queue).or_default().push(subscriber);
        }
    }
    let topic_turns = match turns.get_mut(topic) {
        Some(topic_turns) => topic_turns,
        None => turns.entry(topic.to_owned()).or_default(),
    };
    for (queue, members) in groups {
        let turn = match topic_turns.get_mut(queue) {
            Some(turn) => turn,
            None => topic_turns.entry(queue.to_owned()).or_default(),
        };
        receivers.push(members[*turn % members.len()]);
        *turn = turn.wrapping_add(1);
    }
    receivers
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands `message` to every receiver whose inbox has room.
    fn deliver(&self, message: Message) -> Result<()> {
        let mut full = Vec::new();
        let mut refused = None;
        {
            let mut topics = self.inner.lock().expect("memory broker lock");
            let Topics { subscribers, turns, .. } = &mut *topics;
            let Some(list) = subscribers.get(&message.topic) else { return Ok(()) };
            let receivers = receivers(list, turns, &message.topic);
            // Each receiver gets a copy but the last, which gets the message itself.
            let mut delivery = Some(Delivery { headers: message.headers, body: message.body });
            for (n, subscriber) in receivers.iter().enumerate() {
                let copy = if n + 1 == receivers.len() { delivery.take() } else { delivery.clone() };
                let copy = copy.expect("the message is moved only to the last receiver");
                if let Err(mpsc::error::TrySendError::Full(back)) = subscriber.deliver.try_send(copy) {
                    full.push(match &subscriber.queue {
                        Some(queue) => format!("queue group {queue}"),
                        None => format!("subscriber {}", subscriber.id),
                    });
                    refused = Some(back);
                }
            }
        }
        let Some(Delivery { headers, .. }) = refused else { return Ok(()) };
        Err(Error::Broker {
            broker: self.kind().into(),
            address: self.address(),
            message: format!(
                "topic {} message {}: not delivered to {}: inbox full ({INBOX_CAPACITY} messages waiting); \
                 its handler is slower than the publishers",
                message.topic,
                headers.get(super::headers::MESSAGE_ID).unwrap_or("-"),
                full.join(", ")
            ),
            source: None,
        })
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn address(&self) -> String {
        "this process".into()
    }

    /// Counts and delivers in one step: nothing here waits, so [`Broker::publish`]'s own
    /// future around [`Broker::send`]'s would only cost an allocation per message.
    async fn publish(&self, message: Message) -> Result<()> {
        let counts = crate::metrics::metrics().broker_topic(self.kind(), &message.topic);
        let outcome = self.deliver(message);
        counts.published(outcome.is_ok());
        outcome
    }

    async fn send(&self, message: Message) -> Result<()> {
        self.deliver(message)
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription> {
        // Nothing is kept, so nothing is delivered again either.
        if options.durable || options.max_deliveries.is_some() {
            return Err(refuse_durable(self));
        }
        let (deliver, mut inbox) = mpsc::channel::<Delivery>(INBOX_CAPACITY);
        let subscribed = topic.to_owned();
        let counts = crate::metrics::metrics().broker_topic(self.kind(), topic);
        let task = tokio::spawn(async move {
            while let Some(Delivery { headers, body }) = inbox.recv().await {
                let message = Message { topic: subscribed.clone(), headers, body };
                let _ = run_counted_handler(&counts, &handler, message).await;
            }
        });
        let mut topics = self.inner.lock().expect("memory broker lock");
        topics.next_id += 1;
        let id = topics.next_id;
        topics.subscribers.entry(topic.to_owned()).or_default().push(Subscriber {
            id,
            queue: options.queue.clone(),
            deliver,
        });
        let guard =
            Unsubscribe { inner: self.inner.clone(), topic: topic.to_owned(), id, _task: AbortOnDrop(task) };
        Ok(Subscription::new(topic, options.queue, guard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{handler, headers};

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_inbox_refuses_the_publish_and_names_the_subscriber() {
        let broker = MemoryBroker::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _sub = broker
            .subscribe(
                "t",
                SubscribeOptions::default().queue("slow"),
                handler(move |m: Message| {
                    let tx = tx.clone();
                    async move { tx.send(m.body).map_err(Into::into) }
                }),
            )
            .await
            .unwrap();
        // The handler's task cannot run before this test yields, so the inbox fills up.
        for n in 0..INBOX_CAPACITY {
            broker.publish(Message::new("t", n.to_string())).await.expect("room in the inbox");
        }
        let err = broker.publish(Message::new("t", "one too many")).await.unwrap_err().to_string();
        assert!(err.contains("inbox full") && err.contains("queue group slow"), "{err}");
        for n in 0..INBOX_CAPACITY {
            assert_eq!(rx.recv().await.unwrap(), n.to_string());
        }
        broker.publish(Message::new("t", "room again")).await.expect("the inbox drained");
        assert_eq!(&rx.recv().await.unwrap()[..], b"room again");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_handler_and_a_malformed_body_are_logged_with_topic_id_and_type() {
        let broker = MemoryBroker::new();
        let log = crate::test_log::logged(async {
            let (done, mut finished) = mpsc::unbounded_channel();
            let failing_done = done.clone();
            let _failing = broker
                .subscribe(
                    "orders",
                    SubscribeOptions::default(),
                    handler(move |_| {
                        let done = failing_done.clone();
                        async move {
                            let _ = done.send(());
                            Err("the warehouse is closed".into())
                        }
                    }),
                )
                .await
                .unwrap();
            let _typed = crate::broker::subscribe_proto(
                &broker,
                "counts",
                SubscribeOptions::default(),
                move |_: prost_types::Duration, _| {
                    let done = done.clone();
                    async move { done.send(()).map_err(Into::into) }
                },
            )
            .await
            .unwrap();
            broker.publish(Message::new("orders", "x").header(headers::MESSAGE_ID, "m-1")).await.unwrap();
            broker
                .publish(Message::new("counts", vec![0xff, 0xff]).header(headers::MESSAGE_ID, "m-2"))
                .await
                .unwrap();
            // Only the failing handler signals; the malformed body never reaches its handler,
            // so a well-formed message after it shows it was dropped without blocking.
            let valid = prost::Message::encode_to_vec(&prost_types::Duration { seconds: 1, nanos: 0 });
            broker.publish(Message::new("counts", valid).header(headers::MESSAGE_ID, "m-3")).await.unwrap();
            for _ in 0..2 {
                finished.recv().await.unwrap();
            }
        })
        .await;
        let failed = log.lines().find(|l| l.contains("handler failed")).unwrap_or_else(|| panic!("{log}"));
        assert!(
            failed.contains("orders") && failed.contains("m-1") && failed.contains("warehouse is closed"),
            "{failed}"
        );
        let dropped = log.lines().find(|l| l.contains("malformed")).unwrap_or_else(|| panic!("{log}"));
        assert!(
            dropped.contains("counts") && dropped.contains("m-2") && dropped.contains("Duration"),
            "{dropped}"
        );
    }
}
