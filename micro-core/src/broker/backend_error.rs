//! The errors of a broker backend with a server (nats, rabbitmq): a failure to reach it says
//! what it came down to (`connection refused`), read from the I/O error's kind, instead of
//! the client library's chain of wrappers.

use crate::{BoxError, Error};

/// `broker`'s error at `address`: `message`, then what a failure to reach it came down to,
/// or `source` as the cause when it is something else.
pub(super) fn backend_error(
    broker: &'static str,
    address: &str,
    message: impl Into<String>,
    source: impl Into<BoxError>,
) -> Error {
    let (message, source) = (message.into(), source.into());
    let (message, source) = match crate::error::unreachable_reason(&*source) {
        Some(reason) => (format!("{message}: {reason}"), None),
        None => (message, Some(source)),
    };
    Error::Broker { broker: broker.into(), address: address.into(), message, source }
}

/// The error of `broker`'s first connection to `address`: what it came down to (or
/// `cannot connect`, with `source` as the cause), then `check`, what to look at.
pub(super) fn first_connect_error(
    broker: &'static str,
    address: &str,
    check: &str,
    source: impl Into<BoxError>,
) -> Error {
    let source = source.into();
    let (message, source) = match crate::error::unreachable_reason(&*source) {
        Some(reason) => (format!("{reason}; {check}"), None),
        None => (format!("cannot connect; {check}"), Some(source)),
    };
    Error::Broker { broker: broker.into(), address: address.into(), message, source }
}
