//! What `micro` exits with, so scripts can tell failures apart:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success |
//! | 1 | any other failure: bad input (request JSON, a client stream's stdin line, method name, settings), unreadable TLS files |
//! | 2 | usage: an unknown command, flag or value (clap's own code) |
//! | 3 | not found: no instance of the name is registered |
//! | 4 | found but not serving: instances are registered, none is `SERVING` or pickable |
//! | 5 | registry unreachable: the registry could not be asked |
//! | 6 | broker unreachable: the message broker could not be reached, or refused or failed a publish or subscribe |
//! | 7 | timed out: `micro subscribe --timeout` passed before `--count` messages arrived |
//! | 64 + N | `micro call`: the call (a stream too, after the replies it printed) failed with gRPC status code N (grpcurl's convention), e.g. 73 `FAILED_PRECONDITION`, 78 `UNAVAILABLE` |

use std::process::ExitCode;

use micro_core::{Error, error::error_chain};

/// Added to a gRPC status code when a call fails, as grpcurl does.
pub const CALL_FAILED_BASE: u8 = 64;

/// Why a command failed; each kind has its own exit code.
#[derive(Debug)]
pub enum Failure {
    /// Exit 3: no instance of the name is registered.
    NotFound(String),
    /// Exit 4: instances are registered but none serves.
    NotServing(String),
    /// Exit 5: the registry could not be asked.
    RegistryUnreachable(String),
    /// Exit 6: the broker could not be reached, or refused or failed a publish or subscribe.
    BrokerUnreachable(String),
    /// Exit 7: the wait ended before enough messages arrived.
    TimedOut(String),
    /// Exit 64 + code: the call reached the service (or its reflection) and failed.
    CallFailed {
        /// The gRPC status code.
        code: tonic::Code,
        /// What failed.
        message: String,
    },
    /// Exit 1: anything else.
    Other(String),
}

impl Failure {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::NotFound(_) => 3,
            Failure::NotServing(_) => 4,
            Failure::RegistryUnreachable(_) => 5,
            Failure::BrokerUnreachable(_) => 6,
            Failure::TimedOut(_) => 7,
            Failure::CallFailed { code, .. } => CALL_FAILED_BASE + *code as u8,
        }
    }

    /// What failed, in one line.
    pub fn message(&self) -> &str {
        match self {
            Failure::NotFound(m)
            | Failure::NotServing(m)
            | Failure::RegistryUnreachable(m)
            | Failure::BrokerUnreachable(m)
            | Failure::TimedOut(m)
            | Failure::Other(m) => m,
            Failure::CallFailed { message, .. } => message,
        }
    }

    /// Prints `error: …` on stderr and returns the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("error: {}", self.message());
        ExitCode::from(self.exit_code())
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        let message = error_chain(&err);
        match err {
            Error::NoInstance { .. } => Failure::NotFound(message),
            Error::Registry { .. } => Failure::RegistryUnreachable(message),
            Error::Broker { .. } => Failure::BrokerUnreachable(message),
            _ => Failure::Other(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_failures_follow_grpcurl() {
        let failed = |code| Failure::CallFailed { code, message: String::new() }.exit_code();
        assert_eq!(failed(tonic::Code::FailedPrecondition), 73);
        assert_eq!(failed(tonic::Code::Unavailable), 78);
        assert_eq!(failed(tonic::Code::Unauthenticated), 80);
    }
}
