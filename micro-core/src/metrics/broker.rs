//! A broker topic's metric handles: made once per topic (at most [`MAX_BROKER_TOPICS`]),
//! and found without a lock by a thread that used the topic recently.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, histogram::Histogram},
};

use super::{Metrics, metrics};

/// Labels of a broker's messages by outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabels {
    /// The broker kind: `registry`, `memory`, `nats`, `rabbitmq`.
    pub broker: String,
    /// The topic, or [`OTHER_TOPIC`].
    pub topic: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of a broker topic.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerTopicLabels {
    /// The broker kind.
    pub broker: String,
    /// The topic, or [`OTHER_TOPIC`].
    pub topic: String,
}

/// One broker topic's metric handles, looked up once rather than on every message; those
/// of handling made when the topic is first handled in this process.
pub(crate) struct BrokerTopic {
    broker: &'static str,
    topic: String,
    published_ok: Counter,
    published_error: Counter,
    handled: OnceLock<HandledHandles>,
}

/// Topics a thread keeps the handles of, the ones it used last.
const RECENT_TOPICS: usize = 4;

/// The handles a thread used last, by the address of the [`Metrics`] they belong to; a
/// topic beyond [`MAX_BROKER_TOPICS`] is never among them (its handles are named
/// [`OTHER_TOPIC`]), so it is looked up each time.
#[derive(Default)]
struct RecentTopics {
    handles: [Option<(usize, Arc<BrokerTopic>)>; RECENT_TOPICS],
    /// The slot the next new topic takes.
    next: usize,
}

thread_local! {
    static RECENT: std::cell::RefCell<RecentTopics> = std::cell::RefCell::default();
}

struct HandledHandles {
    ok: Counter,
    error: Counter,
    duration: Histogram,
}

impl BrokerTopic {
    fn new(metrics: &Metrics, broker: &'static str, topic: &str) -> Self {
        // One statement per handle: a family's read guard lives to the end of its statement,
        // and the next new series needs the family's write lock.
        let published_ok =
            metrics.broker_published.get_or_create(&broker_labels(broker, topic, "ok")).clone();
        let published_error =
            metrics.broker_published.get_or_create(&broker_labels(broker, topic, "error")).clone();
        BrokerTopic {
            broker,
            topic: topic.to_owned(),
            published_ok,
            published_error,
            handled: OnceLock::new(),
        }
    }

    /// Counts a publish to this topic.
    pub(crate) fn published(&self, ok: bool) {
        if ok { &self.published_ok } else { &self.published_error }.inc();
    }

    /// Counts a message of this topic handled in `seconds`.
    pub(crate) fn handled_in(&self, ok: bool, seconds: f64) {
        let handled = self.handled(metrics());
        handled.duration.observe(seconds);
        if ok { &handled.ok } else { &handled.error }.inc();
    }

    fn handled(&self, metrics: &Metrics) -> &HandledHandles {
        self.handled.get_or_init(|| {
            let (broker, topic) = (self.broker, self.topic.as_str());
            let labels = BrokerTopicLabels { broker: broker.to_owned(), topic: topic.to_owned() };
            let ok = metrics.broker_handled.get_or_create(&broker_labels(broker, topic, "ok")).clone();
            let error = metrics.broker_handled.get_or_create(&broker_labels(broker, topic, "error")).clone();
            let duration = metrics.broker_handle_duration.get_or_create(&labels).clone();
            HandledHandles { ok, error, duration }
        })
    }
}

fn broker_labels(broker: &str, topic: &str, result: &str) -> BrokerLabels {
    BrokerLabels { broker: broker.to_owned(), topic: topic.to_owned(), result: result.to_owned() }
}

/// At most this many topics per process get a label of their own; the others count as
/// [`OTHER_TOPIC`].
pub const MAX_BROKER_TOPICS: usize = 256;

/// The `topic` label of messages of topics beyond [`MAX_BROKER_TOPICS`].
pub const OTHER_TOPIC: &str = "other";

impl Metrics {
    /// Counts a publish on `broker` to `topic`.
    pub fn broker_published(&self, broker: &'static str, topic: &str, ok: bool) {
        self.broker_topic(broker, topic).published(ok);
    }

    /// Counts a message handled on `broker` from `topic` in `seconds`.
    pub fn broker_handled(&self, broker: &'static str, topic: &str, ok: bool, seconds: f64) {
        self.broker_topic(broker, topic).handled_in(ok, seconds);
    }

    /// The handles of `topic` on `broker`, made once: the topic's own for the first
    /// [`MAX_BROKER_TOPICS`] topics, then those of [`OTHER_TOPIC`]. A thread finds the
    /// handles of the [`RECENT_TOPICS`] topics it used last (a publisher's, a handler
    /// loop's) without a lock and without hashing.
    pub(crate) fn broker_topic(&self, broker: &'static str, topic: &str) -> Arc<BrokerTopic> {
        let metrics = self as *const Metrics as usize;
        let recent = RECENT.with_borrow(|recent| {
            recent.handles.iter().flatten().find_map(|(owner, handles)| {
                (*owner == metrics && handles.broker == broker && handles.topic == topic)
                    .then(|| handles.clone())
            })
        });
        if let Some(handles) = recent {
            return handles;
        }
        let handles = self.broker_topic_shared(broker, topic);
        RECENT.with_borrow_mut(|recent| {
            let slot = recent.next;
            recent.handles[slot] = Some((metrics, handles.clone()));
            recent.next = (slot + 1) % RECENT_TOPICS;
        });
        handles
    }

    fn broker_topic_shared(&self, broker: &'static str, topic: &str) -> Arc<BrokerTopic> {
        let other = {
            let known = self.broker_topics.read().expect("metrics lock");
            if let Some(handles) = known.get(broker).and_then(|topics| topics.get(topic)) {
                return handles.clone();
            }
            known.values().map(HashMap::len).sum::<usize>() >= MAX_BROKER_TOPICS
        };
        let key = if other { OTHER_TOPIC } else { topic };
        let mut known = self.broker_topics.write().expect("metrics lock");
        known
            .entry(broker)
            .or_default()
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(BrokerTopic::new(self, broker, key)))
            .clone()
    }
}
