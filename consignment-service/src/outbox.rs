//! The outbox relay: publishes the events the repository wrote beside each stored
//! consignment, oldest first, and marks each sent once the broker took it. Replicas on one
//! database take turns: only the holder of the outbox lease relays, and another takes over
//! once a holder's lease runs out (it stopped or died). A crash between
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
//! let relay = consignment_service::outbox::Relay::start(Arc::new(repository), broker, "host:42".into());
//! relay.wake(); // after a create, so the event goes out at once
//! # }
//! ```

use std::{sync::Arc, time::Duration};

use micro_core::broker::{Broker, Message, headers};
use tokio::sync::Notify;

use crate::ConsignmentRepository;

/// How often the relay looks at the outbox when nobody wakes it, and waits after a failure.
pub const RELAY_INTERVAL: Duration = Duration::from_millis(500);
/// Events read from the outbox at a time.
const BATCH: usize = 100;
/// How long the outbox lease lasts unless renewed (each round renews it): how long the
/// other replicas wait to relay after the relaying one died.
pub const RELAY_LEASE: Duration = Duration::from_secs(5);

/// The running relay; dropping it stops it.
pub struct Relay {
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying `repository`'s outbox to `broker` whenever `instance` (this process,
    /// unique among the replicas) holds the outbox lease.
    pub fn start(
        repository: Arc<dyn ConsignmentRepository>,
        broker: Arc<dyn Broker>,
        instance: String,
    ) -> Relay {
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(relay(repository, broker, wake.clone(), instance));
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

async fn relay(
    repository: Arc<dyn ConsignmentRepository>,
    broker: Arc<dyn Broker>,
    wake: Arc<Notify>,
    instance: String,
) {
    let mut leased = false;
    loop {
        match repository.lease_outbox(&instance, RELAY_LEASE).await {
            Ok(holds) if holds != leased => {
                leased = holds;
                tracing::info!(instance = %instance, relaying = leased, "outbox lease {}", if leased { "taken" } else { "held by another replica" });
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %micro_core::error::error_chain(&err), "cannot take the outbox lease");
                leased = false;
            }
        }
        if !leased {
            tokio::time::sleep(RELAY_INTERVAL).await;
            continue;
        }
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
