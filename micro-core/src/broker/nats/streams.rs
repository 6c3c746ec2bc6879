//! JetStream for the NATS broker: a stream per topic, made on first use, a durable consumer
//! per queue group, and a publish that waits until the stream stored it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};

use super::{NatsBroker, message::to_nats_headers};
use crate::{BoxError, Result, broker::Message};

/// The stream name of `topic`: `micro_` and the topic with every character that is not
/// `A-Z a-z 0-9 - _` as `_`.
pub fn stream_name(topic: &str) -> String {
    format!("micro_{}", sanitize(topic))
}

fn sanitize(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

impl NatsBroker {
    /// Makes sure `topic`'s stream exists; `false` when the server has no JetStream. An
    /// error starts with what `what` says (the topic, and the message being published).
    pub(super) async fn ensure_stream(&self, topic: &str, what: impl Fn() -> String) -> Result<bool> {
        match self.streams.lock().expect("streams lock").as_ref() {
            None => return Ok(false),
            Some(known) if known.contains(topic) => return Ok(true),
            Some(_) => {}
        }
        let config = stream::Config {
            name: stream_name(topic),
            subjects: vec![topic.to_owned()],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let created =
            tokio::time::timeout(self.publish_timeout, self.jetstream.get_or_create_stream(config)).await;
        match created {
            Ok(Ok(_)) => {}
            Ok(Err(err)) if jetstream_not_enabled(&err) => {
                tracing::warn!(address = %self.address, "nats-server has no JetStream: core NATS only, no durable delivery");
                *self.streams.lock().expect("streams lock") = None;
                return Ok(false);
            }
            // Another process may have made it between this one's look-up and its create.
            Ok(Err(err)) => {
                if self.jetstream.get_stream(stream_name(topic)).await.is_err() {
                    return Err(self.error(format!("{}: cannot create the stream", what()), err));
                }
            }
            Err(elapsed) => {
                return Err(self.error(format!("{}: no answer creating the stream", what()), elapsed));
            }
        }
        if let Some(known) = self.streams.lock().expect("streams lock").as_mut() {
            known.insert(topic.to_owned());
        }
        Ok(true)
    }
}

impl NatsBroker {
    /// The durable consumer of `group` on `topic`'s stream, made if it is not there yet.
    pub(super) async fn durable_consumer(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<jetstream::consumer::PullConsumer> {
        if !self.ensure_stream(topic, || format!("topic {topic}")).await? {
            return Err(self.error(
                "durable delivery needs JetStream: start nats-server with -js",
                format!("topic {topic}"),
            ));
        }
        let stream = self
            .jetstream
            .get_stream(stream_name(topic))
            .await
            .map_err(|err| self.error(format!("cannot open the stream of topic {topic}"), err))?;
        let durable = sanitize(group);
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            ..Default::default()
        };
        match stream.get_or_create_consumer(&durable, config).await {
            Ok(consumer) => Ok(consumer),
            // Another member of the group may have made it between the look-up and the create.
            Err(err) => stream
                .get_consumer(&durable)
                .await
                .map_err(|_| self.error(format!("cannot create consumer {durable} on topic {topic}"), err)),
        }
    }
}

/// Publishes `message` to its topic's stream and waits up to `timeout` for the stream to
/// store it; an error says which (`not stored`, `not stored within …`) and why.
pub(super) async fn store(
    jetstream: &jetstream::Context,
    timeout: Duration,
    message: &Message,
) -> Result<(), (String, BoxError)> {
    let headers = to_nats_headers(&message.headers);
    let stored = tokio::time::timeout(timeout, async {
        let ack =
            jetstream.publish_with_headers(message.topic.clone(), headers, message.body.clone()).await?;
        ack.await.map(drop).map_err(BoxError::from)
    })
    .await;
    match stored {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(("not stored".to_owned(), err)),
        Err(elapsed) => Err((format!("not stored within {timeout:?}"), elapsed.into())),
    }
}

/// Whether the server answered that it has no JetStream (for anyone, or for this account):
/// its API error code, not its text.
fn jetstream_not_enabled(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::{ErrorCode, context::CreateStreamErrorKind};
    match err.kind() {
        CreateStreamErrorKind::JetStream(err) => {
            matches!(
                err.error_code(),
                ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            )
        }
        _ => false,
    }
}
