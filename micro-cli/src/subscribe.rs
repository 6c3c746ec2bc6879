//! `micro subscribe TOPIC`: one JSON line per message until `--count` messages, `--timeout`,
//! SIGINT/SIGTERM or a closed stdout.
//!
//! Each line is `{"topic", "message_id", "headers", BODY}`, where BODY is one of
//! `"body_json"` (a JSON body, as JSON), `"body_proto"` (a protobuf body decoded as
//! `--type`, in the proto3 JSON mapping) or `"body_base64"` (anything else; with
//! `"body_error"` when `--type` could not decode it).
//!
//! # Examples
//! ```sh
//! micro subscribe consignment.created --count 1 --timeout 30s
//! micro subscribe consignment.created --type consignment.Consignment --from consignment-service
//! micro subscribe consignment.created --dead-letters --count 1   # what a group gave up on
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use micro_core::{
    BoxError,
    broker::{self, Broker, Message, SubscribeOptions, headers},
    cli::Seconds,
};
use prost_reflect::DynamicMessage;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    exit::Failure,
    message_type::{MessageType, TypeArgs},
    out,
};

/// How often the end checks whether the printed messages' handlers have returned.
const SETTLE_POLL: Duration = Duration::from_millis(10);
/// How long after the last handler returned its acknowledgement gets to go out.
const ANSWER_GRACE: Duration = Duration::from_millis(100);
/// The longest the end waits for acknowledgements before it unsubscribes anyway.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// `micro subscribe`'s own flags; the broker, registry and client flags are `micro`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct SubscribeArgs {
    /// The topic, e.g. `consignment.created`.
    pub topic: String,
    /// Join this queue group: each message goes to one member of the group.
    #[arg(long)]
    pub queue: Option<String>,
    /// Durable delivery (nats with JetStream, rabbitmq; needs `--queue`, which names the
    /// consumer or queue that keeps the subscriber's place).
    #[arg(long)]
    pub durable: bool,
    /// Read the topic's dead letters instead: the messages a group with a delivery limit
    /// gave up on, kept on `TOPIC.dead` for the `dead-letters` group (durable), each with
    /// `dead-letter-*` headers saying from where and why. Each one printed is removed.
    #[arg(long, conflicts_with_all = ["queue", "durable"])]
    pub dead_letters: bool,
    /// Exit 0 after this many messages (default: run until stopped).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop after this long (`500ms`, `30s`, `2m`; a bare number is seconds); exit 7 when
    /// fewer than `--count` messages arrived by then, 0 without `--count`.
    #[arg(long)]
    pub timeout: Option<Seconds>,
    #[command(flatten)]
    pub message_type: TypeArgs,
}

/// Subscribes and prints each message as one JSON line. Each message is acknowledged only
/// once its line is written; one that arrives after `--count` is refused, so a queue group
/// or a durable consumer delivers it again.
pub async fn subscribe(
    args: SubscribeArgs,
    broker: Arc<dyn Broker>,
    message_type: Option<MessageType>,
) -> Result<(), Failure> {
    let shutdown = micro_core::server::shutdown_signal();
    tokio::pin!(shutdown);
    // One poll installs the handlers, so a signal while subscribing still ends it cleanly.
    let _ = futures::poll!(&mut shutdown);
    let (sender, mut received) = mpsc::channel::<(Message, oneshot::Sender<()>)>(1);
    // Printed messages whose handler has not returned yet, so has not acknowledged.
    let unacknowledged = Arc::new(AtomicUsize::new(0));
    let handler = {
        let unacknowledged = unacknowledged.clone();
        broker::handler(move |message| {
            let (sender, unacknowledged) = (sender.clone(), unacknowledged.clone());
            async move {
                let (printed, was_printed) = oneshot::channel();
                sender
                    .send((message, printed))
                    .await
                    .map_err(|_| BoxError::from("micro subscribe is stopping"))?;
                was_printed
                    .await
                    .map_err(|_| BoxError::from("micro subscribe stopped before printing it"))?;
                unacknowledged.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let (topic, options) = if args.dead_letters {
        let options = SubscribeOptions::default().queue(broker::DEAD_LETTERS).durable();
        (broker::dead_letter_topic(&args.topic), options)
    } else {
        let options =
            SubscribeOptions { queue: args.queue.clone(), durable: args.durable, ..Default::default() };
        (args.topic.clone(), options)
    };
    let queue = options.queue.as_deref().map(|q| format!(" in queue group {q}")).unwrap_or_default();
    let subscription = broker.subscribe(&topic, options, handler).await?;
    eprintln!("subscribed to {topic}{queue} on broker {} at {}", broker.kind(), broker.address());

    let timeout = args.timeout.map(Duration::from);
    let deadline = async {
        match timeout {
            Some(after) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut count = 0_u64;
    let outcome = loop {
        if args.count.is_some_and(|wanted| count >= wanted) {
            break Ok(());
        }
        tokio::select! {
            Some((message, printed)) = received.recv() => {
                match out::try_line(line(&message, message_type.as_ref())) {
                    Ok(()) => {
                        count += 1;
                        unacknowledged.fetch_add(1, Ordering::SeqCst);
                        let _ = printed.send(());
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
                    Err(err) => break Err(Failure::Other(format!("cannot write to stdout: {err}"))),
                }
            }
            () = &mut deadline => break match args.count {
                Some(wanted) => Err(Failure::TimedOut(format!(
                    "{count} of {wanted} message(s) on topic {topic} within {:?} (broker {} at {}); check that something publishes to it on this broker",
                    timeout.unwrap_or_default(),
                    broker.kind(),
                    broker.address()
                ))),
                None => Ok(()),
            },
            () = &mut shutdown => break Ok(()),
        }
    };
    // Messages not printed are refused, so a queue group or a durable consumer delivers them
    // again; printed ones get acknowledged before the subscription goes.
    received.close();
    while received.recv().await.is_some() {}
    let settled = async {
        while unacknowledged.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(SETTLE_POLL).await;
        }
        tokio::time::sleep(ANSWER_GRACE).await;
    };
    let _ = tokio::time::timeout(SETTLE_LIMIT, settled).await;
    subscription.unsubscribe().await;
    outcome
}

/// One message as one JSON line.
fn line(message: &Message, message_type: Option<&MessageType>) -> String {
    let mut fields = Map::new();
    fields.insert("topic".into(), Value::from(message.topic.as_str()));
    fields.insert("message_id".into(), message.id().map_or(Value::Null, Value::from));
    fields.insert("headers".into(), serde_json::to_value(&message.headers).expect("text headers serialize"));
    let content_type = message.content_type().unwrap_or_default();
    let is_json = content_type.starts_with(headers::JSON);
    let as_json = (is_json || content_type.is_empty())
        .then(|| serde_json::from_slice::<Value>(&message.body).ok())
        .flatten();
    let is_proto = content_type.starts_with(headers::PROTOBUF) || content_type.is_empty();
    match (as_json, message_type) {
        (Some(json), _) => {
            fields.insert("body_json".into(), json);
        }
        (None, Some(message_type)) if is_proto => {
            match DynamicMessage::decode(message_type.descriptor.clone(), message.body.clone()) {
                Ok(decoded) => {
                    let value = serde_json::to_value(&decoded).expect("a dynamic message serializes");
                    fields.insert("body_proto".into(), value);
                }
                Err(err) => {
                    fields.insert("body_base64".into(), Value::from(base64(&message.body)));
                    let error = format!("not a valid {}: {err}", message_type.descriptor.full_name());
                    fields.insert("body_error".into(), Value::from(error));
                }
            }
        }
        (None, _) => {
            fields.insert("body_base64".into(), Value::from(base64(&message.body)));
        }
    }
    Value::Object(fields).to_string()
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0_u32, |w, (i, b)| w | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[(word >> (18 - 6 * i)) as usize & 63]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn json_bodies_print_as_json_and_others_as_base64() {
        let json = Message::new("t", r#"{"a": 1}"#).header(headers::CONTENT_TYPE, headers::JSON);
        let line: Value = serde_json::from_str(&line(&json, None)).unwrap();
        assert_eq!(line["body_json"]["a"], 1, "{line}");
        assert_eq!(line["topic"], "t");
        assert_eq!(line["message_id"], json.id().unwrap());
        assert_eq!(line["headers"]["content-type"], headers::JSON);

        let proto =
            Message::new("t", vec![0x0a, 0x01, 0x78]).header(headers::CONTENT_TYPE, headers::PROTOBUF);
        let line: Value = serde_json::from_str(&super::line(&proto, None)).unwrap();
        assert_eq!(line["body_base64"], "CgF4", "{line}");
        assert!(line.get("body_json").is_none(), "{line}");
    }
}
