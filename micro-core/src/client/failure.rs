//! How an attempt failed, what that says about the instance, and the status the caller
//! sees.

use tonic::{Code, Status};

use super::outlier::Verdict;
use crate::{BoxError, Error, error::error_chain, registry::Node};

/// How an attempt ended, when it did not succeed.
pub(crate) enum Failure {
    /// The call's deadline passed first.
    Deadline,
    /// The transport failed; `sent` tells whether the request may have reached the server.
    Transport { source: BoxError, sent: bool },
    /// The server took no part in the call ([`is_unprocessed`]): safe to send again, and no
    /// fault of the instance (a GOAWAY of a server shutting down or rotating connections).
    Unprocessed(BoxError),
    /// The server (or a proxy) answered with this status.
    Status(Status),
}

impl Failure {
    /// Whether the request may have reached a server, and the gRPC code it carries, if any.
    pub(crate) fn sent_and_code(&self) -> (bool, Option<Code>) {
        match self {
            Failure::Deadline => (true, Some(Code::DeadlineExceeded)),
            // A transport failure that carries a gRPC status (a reset stream) keeps its code.
            Failure::Transport { sent, source } => (*sent, source.downcast_ref::<Status>().map(Status::code)),
            Failure::Unprocessed(_) => (false, None),
            Failure::Status(status) => (true, Some(status.code())),
        }
    }

    /// Whether a server refused the call over its concurrency limit, before starting it.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, Failure::Status(status) if status.code() == Code::ResourceExhausted
            && crate::server::is_refusal(status.metadata().as_ref()))
    }

    /// What the failure says about the instance.
    pub(crate) fn verdict(&self) -> Verdict {
        match self {
            Failure::Status(_) if self.is_refusal() => Verdict::Refused,
            Failure::Transport { source, sent } if is_dead_peer(&**source, *sent) => Verdict::Dead,
            Failure::Unprocessed(_) => Verdict::Spared,
            Failure::Deadline | Failure::Transport { .. } | Failure::Status(_) => Verdict::Failed,
        }
    }

    /// Whether another attempt may follow: always when nothing reached a server, and after
    /// sending only for an idempotent call that failed without an answer or `UNAVAILABLE`;
    /// a call refused before it started, always.
    pub(crate) fn retry_allowed(&self, idempotent: bool) -> bool {
        let (sent, code) = self.sent_and_code();
        !sent
            || self.is_refusal()
            || (idempotent
                && !matches!(self, Failure::Deadline)
                && code.is_none_or(|c| c == Code::Unavailable))
    }

    /// The status the caller sees, naming the instance, its address and the registry.
    pub(crate) fn into_status(self, call: &CallSite<'_>, node: &Node, idempotent: bool) -> Status {
        let CallSite { method, service, registry, timeout } = *call;
        let (id, address) = (&node.id, node.address);
        match self {
            Failure::Deadline => Status::deadline_exceeded(format!(
                "{method} to {service} instance {id} at {address} exceeded its {timeout:?} deadline"
            )),
            Failure::Status(status) => status,
            Failure::Transport { source, sent: true } if !idempotent => Status::unknown(format!(
                "outcome unknown: {method} reached {service} instance {id} at {address} (registry {registry}), \
                 which failed before answering; not retried because the method is not idempotent: {}",
                error_chain(&*source)
            )),
            Failure::Transport { source, .. } | Failure::Unprocessed(source) => Error::Transport {
                service: service.to_owned(),
                node: id.clone(),
                address,
                registry: registry.into(),
                source,
            }
            .into(),
        }
    }
}

/// What every failure message of one call names.
#[derive(Clone, Copy)]
pub(crate) struct CallSite<'a> {
    pub(crate) method: &'a str,
    pub(crate) service: &'a str,
    pub(crate) registry: &'a str,
    pub(crate) timeout: std::time::Duration,
}

/// `failure`, saying how many retries came after the first attempt when there were any.
pub(crate) fn retried(failure: Status, retries: u32) -> Status {
    match retries {
        0 => failure,
        1 => Status::new(failure.code(), format!("{} (after 1 retry)", failure.message())),
        n => Status::new(failure.code(), format!("{} (after {n} retries)", failure.message())),
    }
}

/// Whether a transport failure shows the peer unreachable: a refused or timed-out
/// connection before anything was sent, or a connection that failed its keepalive.
fn is_dead_peer(err: &(dyn std::error::Error + 'static), sent: bool) -> bool {
    (!sent && is_connect_error(err)) || is_keepalive_timeout(err)
}

/// Whether the failure was a failed TCP connection: nothing reached a server.
pub(crate) fn is_connect_error(err: &(dyn std::error::Error + 'static)) -> bool {
    chain_has::<tonic::ConnectError>(err)
        || chain(err).any(|e| {
            e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                        | std::io::ErrorKind::TimedOut
                )
            })
        })
}

/// Whether the connection died because the peer stopped answering HTTP/2 pings: the only
/// timeout hyper's HTTP/2 client has (connect and call timeouts are tonic's own types).
fn is_keepalive_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    chain(err).any(|e| e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout))
}

/// Whether the server took no part in the request (RFC 9113 §8.7), so it may be sent again
/// whatever the method: its stream was above the last one a GOAWAY let through, or was
/// reset with `REFUSED_STREAM`, or its connection closed before the request was written.
pub(crate) fn is_unprocessed(err: &(dyn std::error::Error + 'static)) -> bool {
    chain(err).any(|e| {
        let refused = e.downcast_ref::<h2::Error>().is_some_and(|h2| {
            h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
        });
        refused || e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled)
    })
}

/// The reason of the GOAWAY the server sent, when that ended the attempt.
pub(crate) fn go_away_reason(err: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    chain(err)
        .find_map(|e| e.downcast_ref::<h2::Error>().filter(|h2| h2.is_go_away() && h2.is_remote())?.reason())
}

pub(crate) fn chain_has<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    chain(err).any(|e| e.is::<E>())
}

fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(source: impl Into<BoxError>, sent: bool) -> Failure {
        Failure::Transport { source: source.into(), sent }
    }

    #[test]
    fn a_refused_connection_is_a_dead_peer_and_always_retried() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(transport(refused(), false).verdict(), Verdict::Dead);
        assert!(transport(refused(), false).retry_allowed(false));
        assert_eq!(Failure::Status(Status::internal("x")).verdict(), Verdict::Failed);
    }

    #[test]
    fn after_sending_only_idempotent_calls_are_retried_and_never_past_the_deadline() {
        let reset = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!transport(reset(), true).retry_allowed(false));
        assert!(transport(reset(), true).retry_allowed(true));
        assert!(Failure::Status(Status::unavailable("x")).retry_allowed(true));
        assert!(!Failure::Status(Status::invalid_argument("x")).retry_allowed(true));
        assert!(!Failure::Deadline.retry_allowed(true));
    }

    #[test]
    fn a_request_the_server_never_processed_is_retried_and_judges_nobody() {
        let refused = || Failure::Unprocessed(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert!(refused().retry_allowed(false));
        assert_eq!(refused().verdict(), Verdict::Spared);
        // A reset the client made itself is no refusal by the server.
        assert!(!is_unprocessed(&h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert!(!is_unprocessed(&std::io::Error::from(std::io::ErrorKind::BrokenPipe)));
    }

    #[test]
    fn retries_are_counted_in_words() {
        assert_eq!(retried(Status::unavailable("down"), 1).message(), "down (after 1 retry)");
        assert_eq!(retried(Status::unavailable("down"), 2).message(), "down (after 2 retries)");
    }
}
