//! A message in AMQP form: its headers as an AMQP table, its id and content type as
//! properties, and the SDK's own headers on a copy delivered again.

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use super::{DELIVERY_HEADER, PERSISTENT, TOPIC_HEADER, short};
use crate::{
    Result,
    broker::{Headers, Message, headers},
};

/// The AMQP properties of `message`: persistent, its headers, message id and content type.
pub(super) fn properties(message: &Message) -> Result<BasicProperties> {
    let mut table = FieldTable::default();
    for (key, value) in &message.headers {
        table.insert(short(key, "header name")?, AMQPValue::LongString(LongString::from(value)));
    }
    let mut properties = BasicProperties::default().with_delivery_mode(PERSISTENT).with_headers(table);
    if let Some(id) = message.id().and_then(|id| ShortString::try_new(id).ok()) {
        properties = properties.with_message_id(id);
    }
    if let Some(content_type) = message.content_type().and_then(|ct| ShortString::try_new(ct).ok()) {
        properties = properties.with_content_type(content_type);
    }
    Ok(properties)
}

/// A delivery as a [`Message`]: text headers, then the id and content type properties
/// where the headers lack them (a publisher outside the SDK).
pub(super) fn from_delivery(delivery: &Delivery) -> Message {
    let mut headers = Headers::new();
    for (key, value) in delivery.properties.headers().iter().flat_map(|table| table.inner()) {
        let text = match value {
            AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
            AMQPValue::ShortString(text) => text.as_str().to_owned(),
            _ => continue,
        };
        headers.insert(key.as_str().to_owned(), text);
    }
    if let Some(id) = delivery.properties.message_id()
        && !headers.contains_key(headers::MESSAGE_ID)
    {
        headers.insert(headers::MESSAGE_ID, id.as_str());
    }
    if let Some(content_type) = delivery.properties.content_type()
        && !headers.contains_key(headers::CONTENT_TYPE)
    {
        headers.insert(headers::CONTENT_TYPE, content_type.as_str());
    }
    headers.remove(DELIVERY_HEADER);
    Message {
        topic: headers.remove(TOPIC_HEADER).unwrap_or_else(|| delivery.routing_key.as_str().to_owned()),
        headers,
        body: bytes::Bytes::copy_from_slice(&delivery.data),
    }
}

/// Which delivery of its message `delivery` is: 1, or what its copy's header says.
pub(super) fn delivery_number(delivery: &Delivery) -> u64 {
    let header = delivery.properties.headers().as_ref().and_then(|table| {
        table.inner().iter().find(|(key, _)| key.as_str() == DELIVERY_HEADER).map(|(_, value)| value.clone())
    });
    match header {
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).parse().unwrap_or(1),
        _ => 1,
    }
}
