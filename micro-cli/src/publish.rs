//! `micro publish TOPIC JSON`: one message on the broker `--broker` names; prints its id.
//!
//! # Examples
//! ```sh
//! micro publish greetings '{"text": "hello"}'                       # application/json
//! micro publish consignment.created '{"id": "c-1", "weight": 100}' \
//!     --type consignment.Consignment --from consignment-service     # application/protobuf
//! ```

use std::sync::Arc;

use micro_core::{
    Client, Registry,
    broker::{Broker, Message, headers},
};
use prost::Message as _;

use crate::{exit::Failure, message_type::TypeArgs, out};

/// `micro publish`'s own flags; the broker, registry and client flags are `micro`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// The topic, e.g. `consignment.created`.
    pub topic: String,
    /// The body as JSON; sent as it is (`application/json`), or encoded as `--type`.
    pub json: String,
    /// The message id (default: a fresh random one).
    #[arg(long)]
    pub id: Option<String>,
    /// A header, `key=value`; repeat for more.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = crate::parse_label)]
    pub headers: Vec<(String, String)>,
    #[command(flatten)]
    pub message_type: TypeArgs,
}

/// Checks the body, encodes it, publishes it on `broker` (connected only once the body is
/// good) and prints the message id. Bad JSON, an unknown type or field publish nothing.
pub async fn publish(
    args: PublishArgs,
    registry: &Arc<dyn Registry>,
    client: &Client,
    connect: impl AsyncFnOnce() -> Result<Arc<dyn Broker>, Failure>,
) -> Result<(), Failure> {
    serde_json::from_str::<serde_json::Value>(&args.json)
        .map_err(|err| Failure::Other(format!("message JSON: {err}")))?;
    let (body, content_type) = match args.message_type.resolve(registry, client).await? {
        Some(message_type) => (message_type.parse_json(&args.json)?.encode_to_vec(), headers::PROTOBUF),
        None => (args.json.into_bytes(), headers::JSON),
    };
    let mut message = Message::new(&args.topic, body).header(headers::CONTENT_TYPE, content_type);
    for (key, value) in args.headers {
        message = message.header(key, value);
    }
    if let Some(id) = args.id {
        message = message.header(headers::MESSAGE_ID, id);
    }
    let id = message.id().unwrap_or_default().to_owned();
    let broker = connect().await?;
    broker.publish(message).await?;
    out::line(id);
    Ok(())
}
