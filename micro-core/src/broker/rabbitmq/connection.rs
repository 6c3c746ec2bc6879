//! The RabbitMQ broker's connection: one open at a time with its confirming publish
//! channel, watched and replaced with jittered backoff when it is lost.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{FieldTable, ShortString},
};
use tokio::sync::watch;

use super::{
    CONNECT_TIMEOUT, EXCHANGE, FIRST_RECONNECT_DELAY, LIVENESS_POLL, MAX_RECONNECT_DELAY, RESUBSCRIBE_WAIT,
    message::properties, short,
};
use crate::{BoxError, broker::Message, registry::Backoff};

/// One open connection and its confirming publish channel; replaced on reconnect.
pub(super) struct Live {
    pub(super) generation: u64,
    pub(super) connection: Connection,
    publisher: tokio::sync::Mutex<Option<Channel>>,
}

pub(super) type LiveSlot = Option<Arc<Live>>;

/// Each live subscription's id and the generation of the connection it last attached to;
/// after a reconnect, publishes wait (a bounded time) until every one is attached again.
pub(super) type Attached = Arc<Mutex<BTreeMap<u64, watch::Receiver<u64>>>>;

impl Live {
    /// Connects, declares the exchange and opens the publish channel.
    pub(super) async fn open(uri: &str, generation: u64) -> Result<Live, BoxError> {
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
    pub(super) async fn publisher(&self) -> Result<Channel, BoxError> {
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
    pub(super) async fn publish(
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
    pub(super) async fn lost(&self) {
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
pub(super) struct LiveSlots {
    pub(super) subscribers: watch::Sender<LiveSlot>,
    pub(super) publishers: watch::Sender<LiveSlot>,
}

impl LiveSlots {
    pub(super) fn set(&self, slot: LiveSlot) {
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
pub(super) async fn supervise(uri: String, address: String, slots: LiveSlots, attached: Attached) {
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
pub(super) async fn current(live: &mut watch::Receiver<LiveSlot>) -> Option<Arc<Live>> {
    live.wait_for(Option::is_some).await.ok().and_then(|slot| slot.clone())
}

/// Resolves once `generation` is no longer the current connection.
pub(super) async fn replaced(live: &mut watch::Receiver<LiveSlot>, generation: u64) {
    let _ = live.wait_for(|slot| slot.as_ref().map(|live| live.generation) != Some(generation)).await;
}

/// Publishes `message` through `exchange` with `routing_key` and waits for the server to
/// confirm it was stored in a queue.
pub(super) async fn store(
    live: &Live,
    exchange: &str,
    routing_key: &str,
    message: &Message,
) -> Result<(), BoxError> {
    let properties = properties(message)?;
    match live.publish(exchange, short(routing_key, "routing key")?, &message.body, properties).await? {
        true => Ok(()),
        false => Err(format!("no queue took it (routing key {routing_key})").into()),
    }
}
