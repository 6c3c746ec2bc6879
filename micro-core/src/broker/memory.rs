//! A broker inside one process: for tests of your own code and for single-binary apps.
//! Every subscriber alone gets each message; each queue group gets it once, its members
//! taking turns. Nothing is kept: at most once, and only for subscribers alive at publish.
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
use tokio::sync::mpsc;

use super::{
    AbortOnDrop, Broker, Handler, Message, SubscribeOptions, Subscription, refuse_durable, run_handler,
};
use crate::Result;

/// A broker in this process's memory. Clones share subscribers.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Mutex<Topics>>,
}

#[derive(Default)]
struct Topics {
    next_id: u64,
    subscribers: HashMap<String, Vec<Subscriber>>,
    /// Turn counter per (topic, queue group).
    turns: HashMap<(String, String), usize>,
}

struct Subscriber {
    id: u64,
    queue: Option<String>,
    deliver: mpsc::UnboundedSender<Message>,
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

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
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

    async fn publish(&self, message: Message) -> Result<()> {
        let mut topics = self.inner.lock().expect("memory broker lock");
        let Topics { subscribers, turns, .. } = &mut *topics;
        let Some(list) = subscribers.get(&message.topic) else { return Ok(()) };
        let mut groups: BTreeMap<&str, Vec<&Subscriber>> = BTreeMap::new();
        for subscriber in list {
            match &subscriber.queue {
                None => {
                    let _ = subscriber.deliver.send(message.clone());
                }
                Some(queue) => groups.entry(queue).or_default().push(subscriber),
            }
        }
        for (queue, members) in groups {
            let turn = turns.entry((message.topic.clone(), queue.to_owned())).or_default();
            let _ = members[*turn % members.len()].deliver.send(message.clone());
            *turn = turn.wrapping_add(1);
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription> {
        if options.durable {
            return Err(refuse_durable(self));
        }
        let (deliver, mut inbox) = mpsc::unbounded_channel::<Message>();
        let task = tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                run_handler(&handler, message).await;
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
