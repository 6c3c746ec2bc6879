//! One event and its headers. A message made by [`Message::new`] costs one allocation, its
//! topic: the well-known header names are `&'static str`, and up to [`INLINE_HEADERS`]
//! headers live inside the message, their values too when no longer than a message id.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use bytes::Bytes;
use smallvec::SmallVec;

use super::{current_trace_headers, headers};

/// Headers kept inside a [`Headers`] before it allocates: an id, a content type and a
/// trace context.
pub const INLINE_HEADERS: usize = 4;

/// Bytes of a header value kept inside a [`Headers`]: a message id's 32 hex digits.
const INLINE_VALUE: usize = 32;

/// One event: its topic, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it is published, e.g. `consignment.created`.
    pub topic: String,
    /// Text headers ([`headers`] names the well-known ones).
    pub headers: Headers,
    /// The payload.
    pub body: Bytes,
}

impl Message {
    /// A message on `topic` with `body`, a fresh [`headers::MESSAGE_ID`] and, when made
    /// while handling a traced call, its trace context ([`current_trace_headers`]).
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Self {
        let mut headers = current_trace_headers();
        let id = message_id_digits();
        headers.insert(headers::MESSAGE_ID, std::str::from_utf8(&id).expect("hex digits are ASCII"));
        Message { topic: topic.into(), headers, body: body.into() }
    }

    /// Sets a header. Default: only a message id.
    pub fn header(
        mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl AsRef<str> + Into<String>,
    ) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The message id, when it has one.
    pub fn id(&self) -> Option<&str> {
        self.headers.get(headers::MESSAGE_ID)
    }

    /// The content type, when it has one.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(headers::CONTENT_TYPE)
    }
}

/// A fresh message id: 32 random hex digits.
pub fn new_message_id() -> String {
    message_id_digits().iter().map(|&digit| digit as char).collect()
}

/// The digits of a fresh message id.
fn message_id_digits() -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let mut id = [0u8; 32];
    for (nibble, digit) in id.iter_mut().rev().enumerate() {
        *digit = DIGITS[(bits >> (nibble * 4)) as usize & 0xf];
    }
    id
}

/// A message's text headers, one value per name, in name order (as a `BTreeMap` keeps
/// them). Names are case-sensitive; the [`headers`] constants are stored without a copy.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: SmallVec<[(Cow<'static, str>, Value); INLINE_HEADERS]>,
}

/// A header value: inside when it fits in [`INLINE_VALUE`] bytes, else on the heap.
#[derive(Clone)]
enum Value {
    Inline { len: u8, bytes: [u8; INLINE_VALUE] },
    Heap(String),
}

impl Value {
    fn new(text: impl AsRef<str> + Into<String>) -> Self {
        let len = text.as_ref().len();
        if len > INLINE_VALUE {
            return Value::Heap(text.into());
        }
        let mut bytes = [0; INLINE_VALUE];
        bytes[..len].copy_from_slice(text.as_ref().as_bytes());
        Value::Inline { len: len as u8, bytes }
    }

    fn as_str(&self) -> &str {
        match self {
            Value::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("copied from a str")
            }
            Value::Heap(text) => text,
        }
    }

    fn into_string(self) -> String {
        match self {
            Value::Heap(text) => text,
            inline => inline.as_str().to_owned(),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Value {}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name).ok().map(|at| self.entries[at].1.as_str())
    }

    /// Whether `name` has a value.
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Sets `name` to `value`; returns the value it replaces.
    pub fn insert(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl AsRef<str> + Into<String>,
    ) -> Option<String> {
        let name = name.into();
        let value = Value::new(value);
        match self.position(&name) {
            Ok(at) => Some(std::mem::replace(&mut self.entries[at].1, value).into_string()),
            Err(at) => {
                self.entries.insert(at, (name, value));
                None
            }
        }
    }

    /// Removes `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.position(name).ok().map(|at| self.entries.remove(at).1.into_string())
    }

    /// Removes every header.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The headers as `(name, value)`, in name order.
    pub fn iter(&self) -> HeadersIter<'_> {
        HeadersIter(self.entries.iter())
    }

    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(name, _)| name.as_ref())
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(entry, _)| entry.as_ref().cmp(name))
    }
}

/// The headers of a [`Headers`] as `(name, value)`, in name order.
pub struct HeadersIter<'a>(std::slice::Iter<'a, (Cow<'static, str>, Value)>);

impl<'a> Iterator for HeadersIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (name.as_ref(), value.as_str()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = HeadersIter<'a>;

    fn into_iter(self) -> HeadersIter<'a> {
        self.iter()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<N: Into<Cow<'static, str>>, V: AsRef<str> + Into<String>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, headers: I) {
        for (name, value) in headers {
            self.insert(name, value);
        }
    }
}

impl<N: Into<Cow<'static, str>>, V: AsRef<str> + Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(headers: I) -> Self {
        let mut all = Headers::new();
        all.extend(headers);
        all
    }
}

impl From<BTreeMap<String, String>> for Headers {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already in name order.
        Headers {
            entries: map.into_iter().map(|(name, value)| (Cow::Owned(name), Value::new(value))).collect(),
        }
    }
}

impl From<Headers> for BTreeMap<String, String> {
    fn from(headers: Headers) -> Self {
        headers.entries.into_iter().map(|(name, value)| (name.into_owned(), value.into_string())).collect()
    }
}

impl serde::Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_name_order_one_value_each_like_a_map() {
        let mut headers = Headers::new();
        for (name, value) in
            [("tenant", "a"), (headers::MESSAGE_ID, "m-1"), ("b", "1"), ("z", "9"), ("a", "0")]
        {
            assert_eq!(headers.insert(name, value), None);
        }
        assert_eq!(headers.insert("tenant".to_owned(), "b"), Some("a".to_owned()), "replaced");
        let long = "x".repeat(INLINE_VALUE + 1);
        assert_eq!(
            headers.insert("z", long.clone()),
            Some("9".to_owned()),
            "a long value replaces a short one"
        );
        assert_eq!(headers.insert("z", "9"), Some(long), "and is given back whole");
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["a", "b", headers::MESSAGE_ID, "tenant", "z"]);
        assert_eq!(headers.get("tenant"), Some("b"));
        assert_eq!(headers.remove("b"), Some("1".to_owned()));
        assert!(!headers.contains_key("b") && headers.get("B").is_none(), "case-sensitive, gone");
        let map: BTreeMap<String, String> = headers.clone().into();
        assert_eq!(Headers::from(map.clone()), headers);
        assert_eq!(serde_json::to_string(&headers).unwrap(), serde_json::to_string(&map).unwrap());
        assert_eq!(format!("{headers:?}"), format!("{map:?}"));
    }

    #[test]
    fn message_ids_are_32_hex_digits_and_differ() {
        let (first, second) = (new_message_id(), new_message_id());
        assert_eq!(first.len(), 32);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{first}");
        assert_ne!(first, second);
        assert_eq!(Message::new("t", "").id().map(str::len), Some(32));
    }
}
