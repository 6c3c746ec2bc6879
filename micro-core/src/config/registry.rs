//! Where the registry is: the backend and its settings, as plain values.

use std::{fmt, sync::Arc, time::Duration};

use crate::{
    Result,
    registry::{MemoryRegistry, Registry},
};

/// Default time a look-up waits for a first instance, in milliseconds.
pub const DEFAULT_LOOKUP_TIMEOUT_MS: u64 = 3000;
/// Default for retrying an unreachable registry at start: off, so it fails at once.
pub const DEFAULT_REGISTRY_RETRY: bool = false;
/// First pause before an unreachable registry is tried again (with `MICRO_REGISTRY_RETRY`);
/// each pause is drawn from the upper half of its nominal delay, so services do not retry
/// in lockstep.
#[cfg(feature = "consul")]
const REGISTRY_RETRY_FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest pause between tries of an unreachable registry.
#[cfg(feature = "consul")]
const REGISTRY_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

/// Which registry backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum RegistryKind {
    /// Multicast DNS on the local network segment: no set-up.
    Mdns,
    /// A Consul agent over its HTTP API.
    Consul,
    /// This process only.
    Memory,
}

impl RegistryKind {
    /// The kind as `MICRO_REGISTRY` spells it, and as [`Registry::kind`] returns it.
    pub const fn as_str(self) -> &'static str {
        match self {
            RegistryKind::Mdns => "mdns",
            RegistryKind::Consul => "consul",
            RegistryKind::Memory => "memory",
        }
    }
}

impl fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value kept out of `Debug` output and logs, such as an ACL token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

/// Where to find the registry, as plain values.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The backend.
    pub kind: RegistryKind,
    /// The backend's address, when it has one.
    pub address: Option<String>,
    /// How long a look-up waits for a first instance.
    pub lookup_timeout: Duration,
    /// Whether [`RegistryConfig::connect`] keeps trying an unreachable registry.
    pub retry: bool,
    /// Consul ACL token.
    pub consul_token: Option<Secret>,
    /// Consul datacenter for look-ups; `None`: the agent's own.
    pub consul_datacenter: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            kind: RegistryKind::Mdns,
            address: None,
            lookup_timeout: Duration::from_millis(DEFAULT_LOOKUP_TIMEOUT_MS),
            retry: DEFAULT_REGISTRY_RETRY,
            consul_token: None,
            consul_datacenter: None,
        }
    }
}

impl RegistryConfig {
    /// Opens the configured registry. Inside a tokio runtime.
    ///
    /// Consul: the agent at `address` (default [`crate::registry::DEFAULT_CONSUL_ADDRESS`])
    /// must answer and know a leader; if it does not, this fails within a couple of seconds,
    /// or with `retry` keeps trying (500 ms doubling to 30 s, with jitter), logging a warning
    /// each time.
    pub async fn connect(&self) -> Result<Arc<dyn Registry>> {
        match self.kind {
            RegistryKind::Memory => Ok(Arc::new(MemoryRegistry::global())),
            #[cfg(feature = "mdns")]
            RegistryKind::Mdns => Ok(Arc::new(crate::registry::MdnsRegistry::new(self.lookup_timeout)?)),
            #[cfg(not(feature = "mdns"))]
            RegistryKind::Mdns => {
                Err(crate::Error::invalid("registry mdns", "micro-core was built without its `mdns` feature"))
            }
            #[cfg(feature = "consul")]
            RegistryKind::Consul => {
                use crate::registry::{ConsulRegistry, DEFAULT_CONSUL_ADDRESS};
                let consul = ConsulRegistry::builder()
                    .address(self.address.as_deref().unwrap_or(DEFAULT_CONSUL_ADDRESS))
                    .token(self.consul_token.as_ref().map(|t| t.expose().to_owned()))
                    .datacenter(self.consul_datacenter.clone())
                    .lookup_timeout(self.lookup_timeout)
                    .build()?;
                let mut backoff =
                    crate::registry::Backoff::new(REGISTRY_RETRY_FIRST_DELAY, REGISTRY_RETRY_MAX_DELAY);
                loop {
                    match consul.ping().await {
                        Ok(leader) => {
                            tracing::debug!(address = %consul.address(), %leader, "consul agent answers");
                            return Ok(Arc::new(consul));
                        }
                        Err(err) if self.retry => {
                            let error = crate::error::error_chain(&err);
                            let retry_in = backoff.next_delay();
                            tracing::warn!(%error, ?retry_in, "registry not ready; trying again (MICRO_REGISTRY_RETRY is set)");
                            tokio::time::sleep(retry_in).await;
                        }
                        Err(err) => return Err(err),
                    }
                }
            }
            #[cfg(not(feature = "consul"))]
            RegistryKind::Consul => Err(crate::Error::invalid(
                "registry consul",
                "micro-core was built without its `consul` feature",
            )),
        }
    }
}
