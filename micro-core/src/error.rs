//! The crate's one error type, and how each case maps onto a gRPC status.
//!
//! # Examples
//! ```
//! use micro_core::Error;
//! let err = Error::NoInstance { service: "vessel-service".into(), registry: "mdns".into() };
//! assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
//! ```

use std::{net::SocketAddr, time::Duration};

/// A boxed error from a backend or transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong in registration, discovery and calls. `{:?}` prints what `{}` does
/// followed by every source (see [`error_chain`]), so a `main` returning
/// [`crate::Result`] ends with one readable line.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry holds no live instance of the service.
    #[error(
        "no instance of {service} in registry {registry}: is {service} running and registered on this network?"
    )]
    NoInstance {
        /// The service name that was looked up.
        service: String,
        /// The registry that was asked (`mdns`, `consul`, `memory`).
        registry: String,
    },
    /// The registry itself could not be reached or refused the request.
    #[error("registry {registry} at {address}: {message}")]
    Registry {
        /// The registry kind.
        registry: String,
        /// Where the registry was expected.
        address: String,
        /// What happened and what to check.
        message: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A name, version, metadata entry or setting is not acceptable.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// What was invalid, e.g. `service name "a b"`.
        what: String,
        /// Why, and what would be accepted.
        reason: String,
    },
    /// The server could not bind its listening address.
    #[error(
        "could not bind {address}: {source}; is the port free and the address local? (set MICRO_SERVER_ADDRESS)"
    )]
    Bind {
        /// The address that was asked for.
        address: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The server could not bind its metrics address.
    #[error(
        "could not serve metrics at {address}: {source}; is the port free and the address local? (set MICRO_METRICS_ADDRESS to another ip:port, or off)"
    )]
    MetricsBind {
        /// The metrics address that was asked for.
        address: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// An instance was picked but the call to it failed in transport.
    #[error("{service} instance {node} at {address} (registry {registry}): {source}")]
    Transport {
        /// The service called.
        service: String,
        /// The instance id.
        node: String,
        /// The instance address.
        address: SocketAddr,
        /// The registry it came from.
        registry: String,
        /// The transport failure.
        #[source]
        source: BoxError,
    },
    /// The call or look-up did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// A call was refused, or not sent, because the service is overloaded: by a server over
    /// its concurrency limit, by every instance tried, or by the client's own throttling.
    /// The call was never started, so it is safe to send again later or elsewhere.
    #[error("{service} is overloaded: {reason}")]
    Overloaded {
        /// The service called.
        service: String,
        /// Who refused and what to check.
        reason: String,
    },
    /// The server stopped with an error while serving.
    #[error("server error: {0}")]
    Serve(#[source] BoxError),
    /// The message broker could not be reached, or refused or failed a publish or subscribe.
    #[error("broker {broker} at {address}: {message}")]
    Broker {
        /// The broker kind (`registry`, `memory`, `nats`).
        broker: String,
        /// Where the broker was expected.
        address: String,
        /// What happened and what to check.
        message: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A message's body is not the type its subscriber expects.
    #[error("topic {topic}: message {message_id} is not a valid {type_name}: {source}")]
    Decode {
        /// The topic it came on.
        topic: String,
        /// Its message id, `-` when it had none.
        message_id: String,
        /// The Rust type it should have decoded into.
        type_name: &'static str,
        /// What the decoder said.
        #[source]
        source: prost::DecodeError,
    },
    /// A call answered with a failed status: what `?` on a tonic-generated client's call
    /// gives in a function returning [`Result`], so a `main` prints one line with the code
    /// and the message (`call failed: UNAVAILABLE: no instance of greeter …`), not the
    /// status's fields.
    #[error("call failed: {}: {}", crate::metrics::code_name(.0.code()), .0.message())]
    Call(tonic::Status),
    /// A backend was asked for at run time (`MICRO_REGISTRY=etcd`, `MICRO_BROKER=nats`, …)
    /// that this build of micro-core leaves out: the cargo feature that compiles it in is off.
    #[error("{what} is not compiled in: enable micro-core's {feature:?} feature")]
    NotCompiledIn {
        /// What was asked for, e.g. `registry etcd`, `broker nats`.
        what: String,
        /// The micro-core feature that compiles it in, e.g. `etcd`.
        feature: &'static str,
    },
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Call(status)
    }
}

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into(), reason: reason.into() }
    }

    /// Builds an [`Error::NotCompiledIn`]: `what` (e.g. `registry etcd`) needs micro-core's
    /// `feature`.
    pub fn not_compiled_in(what: impl Into<String>, feature: &'static str) -> Self {
        Error::NotCompiledIn { what: what.into(), feature }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = error_chain(&err);
        match err {
            Error::NoInstance { .. }
            | Error::Registry { .. }
            | Error::Transport { .. }
            | Error::Broker { .. } => tonic::Status::unavailable(message),
            Error::InvalidArgument { .. } | Error::Decode { .. } => tonic::Status::invalid_argument(message),
            Error::Timeout { .. } => tonic::Status::deadline_exceeded(message),
            Error::Overloaded { .. } => tonic::Status::resource_exhausted(message),
            Error::NotCompiledIn { .. } => tonic::Status::unimplemented(message),
            // A status passed on through `?` keeps its code and message.
            Error::Call(status) => status,
            Error::Bind { .. } | Error::MetricsBind { .. } | Error::Serve(_) => {
                tracing::error!(error = %message, "internal error");
                tonic::Status::internal("internal server error")
            }
        }
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&error_chain(self))
    }
}

/// Formats an error with its sources, `outer: inner: innermost`, without repeats.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What a failure to reach a peer comes down to, when `err`'s chain holds one: `connection
/// refused`, `connection reset`, `no answer in time`, `unreachable`; `None` otherwise. Read
/// from the I/O error's kind, so messages can say `connection refused at 127.0.0.1:2379`
/// instead of the whole chain of wrappers.
pub fn unreachable_reason(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use std::io::ErrorKind;
    let mut next = Some(err);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionRefused => Some("connection refused"),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                    Some("connection reset")
                }
                ErrorKind::TimedOut => Some("no answer in time"),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable | ErrorKind::AddrNotAvailable => {
                    Some("unreachable")
                }
                _ => None,
            };
        }
        next = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_under_wrappers_is_summarised_by_its_kind() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "tcp connect error: {:?}", self.0)
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = Wrapper(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert_eq!(unreachable_reason(&refused), Some("connection refused"));
        let other = Wrapper(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad frame"));
        assert_eq!(unreachable_reason(&other), None);
    }

    #[test]
    fn a_backend_left_out_of_the_build_names_the_feature_to_enable() {
        let err = Error::not_compiled_in("registry etcd", "etcd");
        assert_eq!(
            err.to_string(),
            r#"registry etcd is not compiled in: enable micro-core's "etcd" feature"#
        );
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unimplemented);
    }

    #[test]
    fn debug_is_the_message_and_its_sources_in_one_line() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = Error::Broker {
            broker: "nats".into(),
            address: "127.0.0.1:4222".into(),
            message: "cannot connect".into(),
            source: Some(refused.into()),
        };
        let shown = format!("{err:?}");
        assert!(shown.starts_with(&err.to_string()), "{shown}");
        assert!(shown.ends_with(": connection refused") && !shown.contains('\n'), "{shown}");
    }

    #[test]
    fn a_failed_call_is_its_code_and_message_in_one_line_and_keeps_them_on_the_wire() {
        fn call() -> Result<()> {
            Err(tonic::Status::unavailable("no instance of greeter in registry mdns"))?;
            Ok(())
        }
        let err = call().unwrap_err();
        assert_eq!(format!("{err:?}"), "call failed: UNAVAILABLE: no instance of greeter in registry mdns");
        let status = tonic::Status::from(err);
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unavailable, "no instance of greeter in registry mdns")
        );
    }
}
