//! Which message broker: the backend and its address, as plain values.

use std::{fmt, sync::Arc};

use crate::{
    Client, Result,
    broker::{Broker, MemoryBroker, RegistryBroker},
};

/// Which broker backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum BrokerKind {
    /// No broker server: subscribers register in the service registry and publishes reach
    /// them over gRPC; at most once, nothing kept.
    #[default]
    Registry,
    /// This process only.
    Memory,
    /// A NATS server: core NATS, JetStream for durable subscribers (feature `nats`; without
    /// it, [`BrokerConfig::connect`] fails with [`crate::Error::NotCompiledIn`]).
    Nats,
    /// A RabbitMQ server: a topic exchange, durable queues for durable subscribers
    /// (feature `rabbitmq`; without it, [`BrokerConfig::connect`] fails with
    /// [`crate::Error::NotCompiledIn`]).
    Rabbitmq,
}

impl BrokerKind {
    /// The kind as `MICRO_BROKER` spells it, and as [`Broker::kind`] returns it.
    pub const fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Registry => "registry",
            BrokerKind::Memory => "memory",
            BrokerKind::Nats => "nats",
            BrokerKind::Rabbitmq => "rabbitmq",
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the broker is, as plain values. Default: the registry broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerConfig {
    /// The backend. Default: [`BrokerKind::Registry`].
    pub kind: BrokerKind,
    /// The backend's address (nats: `host:port`, default
    /// [`crate::broker::DEFAULT_NATS_ADDRESS`]; rabbitmq: `host:port` or an `amqp://` URL,
    /// default [`crate::broker::DEFAULT_RABBITMQ_ADDRESS`]); registry and memory ignore it.
    pub address: Option<String>,
}

impl BrokerConfig {
    /// Connects the broker. The registry broker uses `client` (its registry and call
    /// settings); a memory broker is new and private to the caller. A backend whose feature
    /// is off fails with [`crate::Error::NotCompiledIn`].
    pub async fn connect(&self, client: &Client) -> Result<Arc<dyn Broker>> {
        let _ = &self.address;
        Ok(match self.kind {
            BrokerKind::Registry => Arc::new(RegistryBroker::new(client.clone())),
            BrokerKind::Memory => Arc::new(MemoryBroker::new()),
            #[cfg(feature = "nats")]
            BrokerKind::Nats => Arc::new(
                crate::broker::NatsBroker::connect(
                    self.address.as_deref().unwrap_or(crate::broker::DEFAULT_NATS_ADDRESS),
                )
                .await?,
            ),
            #[cfg(feature = "rabbitmq")]
            BrokerKind::Rabbitmq => Arc::new(
                crate::broker::RabbitMqBroker::connect(
                    self.address.as_deref().unwrap_or(crate::broker::DEFAULT_RABBITMQ_ADDRESS),
                )
                .await?,
            ),
            #[cfg(not(feature = "nats"))]
            BrokerKind::Nats => return Err(crate::Error::not_compiled_in("broker nats", "nats")),
            #[cfg(not(feature = "rabbitmq"))]
            BrokerKind::Rabbitmq => return Err(crate::Error::not_compiled_in("broker rabbitmq", "rabbitmq")),
        })
    }
}
