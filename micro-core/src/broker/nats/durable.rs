//! A member of a durable group on JetStream: pulls, handles, acknowledges, and on stop gives
//! back what it holds.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio::sync::oneshot;

use super::{HAND_BACK_IDLE, PULL_BATCH, PULL_HEARTBEAT, REDELIVERY_DELAY, from_nats, store};
use crate::broker::{Handler, dead_letter, log_dead_lettered, run_handler};

/// One member of a durable group: pulls, handles, acknowledges; on stop gives back at once
/// every message it holds, so the group's other members get them without waiting for the
/// ack wait.
pub(super) struct DurableMember {
    pub(super) topic: String,
    pub(super) consumer_name: String,
    pub(super) group: String,
    pub(super) ack_wait: Duration,
    pub(super) max_deliveries: Option<u32>,
    /// Where dead letters are published.
    pub(super) jetstream: jetstream::Context,
    pub(super) publish_timeout: Duration,
}

impl DurableMember {
    pub(super) async fn serve(
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
