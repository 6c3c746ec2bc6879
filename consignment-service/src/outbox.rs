//! The outbox relay: publishes the events [`SqliteRepository`] wrote beside each stored
//! consignment, oldest first, and marks each sent once the broker took it. A crash between
//! the commit and the publish loses nothing (the event is still unsent at the next start); a
//! crash between the publish and the mark publishes it again with the same message id, so
//! delivery is at least once and subscribers deduplicate on the id. Each event carries the
//! trace context of the create that wrote it.
//!
//! # Examples
//! ```no_run
//! # async fn demo(repository: consignment_service::SqliteRepository) {
//! use std::sync::Arc;
//! let broker = Arc::new(micro_core::broker::MemoryBroker::new());
//! let relay = consignment_service::outbox::Relay::start(repository, broker);
//! relay.wake(); // after a create, so the event goes out at once
//! # }
//! ```

use std::{sync::Arc, time::Duration};

use micro_core::broker::{Broker, Message, headers};
use tokio::sync::Notify;

use crate::SqliteRepository;

/// How often the relay looks at the outbox when nobody wakes it, and waits after a failure.
pub const RELAY_INTERVAL: Duration = Duration::from_millis(500);
/// Events read from the outbox at a time.
const BATCH: usize = 100;

/// The running relay; dropping it stops it.
pub struct Relay {
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying `repository`'s outbox to `broker`.
    pub fn start(repository: SqliteRepository, broker: Arc<dyn Broker>) -> Relay {
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(relay(repository, broker, wake.clone()));
        Relay { wake, task }
    }

    /// Makes the relay look at the outbox now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A handle that wakes the relay, for the request handler.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(repository: SqliteRepository, broker: Arc<dyn Broker>, wake: Arc<Notify>) {
    loop {
        let failed = match repository.unsent_events(BATCH).await {
            Ok(events) => {
                let mut failed = false;
                for event in events {
                    let mut message = Message::new(&event.topic, event.body)
                        .header(headers::MESSAGE_ID, &event.message_id)
                        .header(headers::CONTENT_TYPE, headers::PROTOBUF);
                    let trace =
                        [(headers::TRACEPARENT, event.traceparent), (headers::TRACESTATE, event.tracestate)];
                    for (name, value) in trace {
                        if let Some(value) = value {
                            message = message.header(name, value);
                        }
                    }
                    if let Err(err) = broker.publish(message).await {
                        tracing::warn!(topic = %event.topic, message_id = %event.message_id, error = %micro_core::error::error_chain(&err), "event not published; trying again");
                        failed = true;
                        break;
                    }
                    if let Err(err) = repository.mark_sent(event.seq).await {
                        tracing::warn!(message_id = %event.message_id, error = %micro_core::error::error_chain(&err), "event published but not marked sent; it will be published again");
                        failed = true;
                        break;
                    }
                    tracing::info!(topic = %event.topic, message_id = %event.message_id, broker = broker.kind(), "event published");
                }
                failed
            }
            Err(err) => {
                tracing::warn!(error = %micro_core::error::error_chain(&err), "cannot read the outbox");
                true
            }
        };
        if failed {
            tokio::time::sleep(RELAY_INTERVAL).await;
        } else {
            let _ = tokio::time::timeout(RELAY_INTERVAL, wake.notified()).await;
        }
    }
}
