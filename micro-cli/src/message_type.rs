//! `--type NAME --from SERVICE`, shared by `micro publish` and `micro subscribe`: a protobuf
//! message type learned from the server reflection of a running service that knows it.
//!
//! # Examples
//! ```sh
//! micro publish consignment.created '{"id": "c-1"}' --type consignment.Consignment --from consignment-service
//! ```

use std::sync::Arc;

use micro_core::{Client, Registry};
use prost_reflect::{DynamicMessage, MessageDescriptor};

use crate::{dynamic, exit::Failure, lookup};

/// The message type flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TypeArgs {
    /// Protobuf message type of the body, by full name (`package.Message`, e.g.
    /// `consignment.Consignment`); learned from `--from`'s server reflection.
    #[arg(long = "type", value_name = "FULL.MESSAGE.NAME", requires = "from")]
    pub type_name: Option<String>,
    /// A registered service whose server reflection describes `--type`.
    #[arg(long, value_name = "SERVICE", requires = "type_name")]
    pub from: Option<String>,
}

/// A message type and the service that described it.
pub struct MessageType {
    /// The type's descriptor.
    pub descriptor: MessageDescriptor,
    /// The service it was learned from.
    pub service: String,
}

impl MessageType {
    /// Parses `json` as this type (proto3 JSON mapping, unknown fields refused); the error
    /// names the type, the service and the line and column.
    pub fn parse_json(&self, json: &str) -> Result<DynamicMessage, Failure> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        DynamicMessage::deserialize(self.descriptor.clone(), &mut deserializer)
            .and_then(|m| deserializer.end().map(|()| m))
            .map_err(|err| {
                Failure::Other(format!(
                    "message JSON is not a valid {} (as {} describes it): {err}",
                    self.descriptor.full_name(),
                    self.service
                ))
            })
    }
}

impl TypeArgs {
    /// The type named by `--type`, from `--from`'s reflection; `None` without `--type`.
    /// Fails with [`Failure::NotFound`] when the service is not registered, and
    /// [`Failure::Other`] naming the type and the service when it does not know the type.
    pub async fn resolve(
        &self,
        registry: &Arc<dyn Registry>,
        client: &Client,
    ) -> Result<Option<MessageType>, Failure> {
        let (Some(type_name), Some(service)) = (&self.type_name, &self.from) else {
            return Ok(None);
        };
        lookup::find(registry, service).await?;
        let channel = client.channel(service);
        let unknown = || {
            Failure::Other(format!(
                "{service} does not know message type {type_name}: its server reflection does not \
                 describe it; check the full name (package.Message, as in the .proto) and that \
                 {service} serves descriptors for it"
            ))
        };
        let pool = match dynamic::descriptors(channel, std::slice::from_ref(type_name)).await {
            Ok(pool) => pool,
            Err(Failure::CallFailed { code: tonic::Code::NotFound, .. }) => return Err(unknown()),
            Err(other) => return Err(other),
        };
        let descriptor = pool.get_message_by_name(type_name).ok_or_else(unknown)?;
        Ok(Some(MessageType { descriptor, service: service.clone() }))
    }
}
