//! How a server binds, announces itself and stops, as plain values.

use std::{net::SocketAddr, time::Duration};

use super::TlsConfig;
use crate::{Error, Result};

/// Default listening address: every interface, a port the system picks.
pub const DEFAULT_SERVER_ADDRESS: &str = "0.0.0.0:0";
/// Default registration TTL in seconds.
pub const DEFAULT_REGISTER_TTL_SECS: u64 = 30;
/// Default re-registration (heartbeat) interval in seconds.
pub const DEFAULT_REGISTER_INTERVAL_SECS: u64 = 10;
/// Default time a stopping server keeps serving after announcing that it drains, in ms.
pub const DEFAULT_DRAIN_DELAY_MS: u64 = 500;
/// Default bound on draining in-flight calls at shutdown, in seconds.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// Default lowest adaptive concurrency limit: a server never refuses a call while fewer
/// than this many are in flight, whatever its latency does (a 64-caller load on one
/// instance, as in `make bench`, is never refused).
pub const DEFAULT_LIMIT_MIN: usize = 100;
/// Default highest adaptive concurrency limit.
pub const DEFAULT_LIMIT_MAX: usize = 1000;

/// How many calls a server serves at once before it refuses more with
/// `RESOURCE_EXHAUSTED` (health and reflection calls are never refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcurrencyLimit {
    /// No limit: every call is served, however many wait.
    Off,
    /// Learned from latency (see [`crate::server::limit`]), kept between `min` and `max`.
    Adaptive {
        /// The lowest limit; it also starts there.
        min: usize,
        /// The highest limit.
        max: usize,
    },
    /// This many calls at once, always.
    Fixed(usize),
}

impl Default for ConcurrencyLimit {
    fn default() -> Self {
        ConcurrencyLimit::Adaptive { min: DEFAULT_LIMIT_MIN, max: DEFAULT_LIMIT_MAX }
    }
}

impl std::fmt::Display for ConcurrencyLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConcurrencyLimit::Off => f.write_str("off"),
            ConcurrencyLimit::Adaptive { min, max } => write!(f, "adaptive ({min} to {max})"),
            ConcurrencyLimit::Fixed(limit) => write!(f, "{limit}"),
        }
    }
}

/// How a server binds, announces itself and stops, as plain values.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Overrides the name given to [`crate::Server::builder`].
    pub name: Option<String>,
    /// Overrides the version set on the builder.
    pub version: Option<String>,
    /// Added to (and overriding) the builder's metadata.
    pub metadata: Vec<(String, String)>,
    /// Address to listen on.
    pub address: SocketAddr,
    /// Address to announce instead of the bound one.
    pub advertise: Option<String>,
    /// Registration TTL.
    pub register_ttl: Duration,
    /// Heartbeat interval.
    pub register_interval: Duration,
    /// Drain bound at shutdown.
    pub shutdown_grace: Duration,
    /// How long a stopping server serves on after announcing that it drains.
    pub drain_delay: Duration,
    /// Where to serve Prometheus metrics; `None` (the default) serves none.
    pub metrics_address: Option<SocketAddr>,
    /// TLS: served when it has an identity; client certificates checked against its CA.
    pub tls: Option<TlsConfig>,
    /// An authorization policy file ([`crate::auth::Policy`]): with it, callers must present
    /// a certificate of the TLS CA, and only the calls it allows are served. Default: none
    /// (every caller may call every method).
    pub authz_policy: Option<std::path::PathBuf>,
    /// The concurrency limit of the whole server (every method without a limit of its own).
    pub limit: ConcurrencyLimit,
    /// Fixed limits of single methods (`/package.Service/Method`, limit): such a method is
    /// held to its own limit instead of the server's.
    pub method_limits: Vec<(String, usize)>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: None,
            version: None,
            metadata: Vec::new(),
            address: DEFAULT_SERVER_ADDRESS.parse().expect("valid default address"),
            advertise: None,
            register_ttl: Duration::from_secs(DEFAULT_REGISTER_TTL_SECS),
            register_interval: Duration::from_secs(DEFAULT_REGISTER_INTERVAL_SECS),
            shutdown_grace: Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS),
            drain_delay: Duration::from_millis(DEFAULT_DRAIN_DELAY_MS),
            metrics_address: None,
            tls: None,
            authz_policy: None,
            limit: ConcurrencyLimit::default(),
            method_limits: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Checks settings that cannot work together: the heartbeat must come before the
    /// registration's TTL runs out. [`crate::Server`] checks this before it starts.
    pub fn validate(&self) -> Result<()> {
        if self.register_interval.is_zero() || self.register_interval >= self.register_ttl {
            return Err(Error::invalid(
                format!("MICRO_REGISTER_INTERVAL={:?}", self.register_interval),
                format!("must be above zero and less than MICRO_REGISTER_TTL={:?}", self.register_ttl),
            ));
        }
        let invalid = |what: String, why: &str| Err(Error::invalid(what, why));
        match self.limit {
            ConcurrencyLimit::Adaptive { min, max } if min == 0 || min > max => {
                return invalid(
                    format!("MICRO_SERVER_LIMIT_MIN={min} with MICRO_SERVER_LIMIT_MAX={max}"),
                    "the lowest limit must be at least 1 and not above the highest",
                );
            }
            ConcurrencyLimit::Fixed(0) => {
                return invalid("MICRO_SERVER_LIMIT=0".into(), "must be at least 1, or off");
            }
            _ => {}
        }
        for (method, limit) in &self.method_limits {
            let well_formed =
                method.strip_prefix('/').and_then(|m| m.split_once('/')).is_some_and(|(service, name)| {
                    !service.is_empty() && !name.is_empty() && !name.contains('/')
                });
            if !well_formed {
                return invalid(
                    format!("MICRO_SERVER_METHOD_LIMITS entry {method:?}"),
                    "expected /package.Service/Method=N",
                );
            }
            if *limit == 0 {
                return invalid(format!("MICRO_SERVER_METHOD_LIMITS entry {method}=0"), "must be at least 1");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_must_come_before_the_ttl_runs_out() {
        let config = ServerConfig {
            register_ttl: Duration::from_secs(10),
            register_interval: Duration::from_secs(10),
            ..ServerConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("MICRO_REGISTER_INTERVAL"), "{err}");
        assert!(ServerConfig::default().validate().is_ok());
    }
}
