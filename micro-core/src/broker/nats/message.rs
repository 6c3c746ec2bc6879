//! Messages between the SDK's form and NATS's: headers one value each.

use crate::broker::{Headers, Message};

pub(super) fn to_nats_headers(headers: &Headers) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (key, value) in headers {
        map.insert(key, value);
    }
    map
}

pub(super) fn from_nats(message: &async_nats::Message) -> Message {
    let headers = message
        .headers
        .iter()
        .flat_map(|map| map.iter())
        .filter_map(|(key, values)| {
            let key: &str = key.as_ref();
            values.first().map(|v| (key.to_owned(), AsRef::<str>::as_ref(v).to_owned()))
        })
        .collect();
    Message { topic: message.subject.to_string(), headers, body: message.payload.clone() }
}
