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
