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
#[cfg(any(feature = "consul", feature = "etcd"))]
const REGISTRY_RETRY_FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest pause between tries of an unreachable registry.
#[cfg(any(feature = "consul", feature = "etcd"))]
const REGISTRY_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

/// Default for Consul Connect: off.
pub const DEFAULT_CONSUL_CONNECT: bool = false;

/// Default SRV query of the DNS registry; `{name}` stands for the service name.
pub const DEFAULT_DNS_TEMPLATE: &str = "_grpc._tcp.{name}";
/// Default port of instances the DNS registry finds through A/AAAA records.
pub const DEFAULT_DNS_PORT: u16 = 50051;
/// Default lower bound, in seconds, on how long a DNS answer is used before it is asked again.
pub const DEFAULT_DNS_MIN_TTL_SECS: u64 = 1;
/// Default upper bound, in seconds, on how long a DNS answer is used before it is asked again.
pub const DEFAULT_DNS_MAX_TTL_SECS: u64 = 30;

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
    /// An etcd v3 cluster, keys laid out as go-micro's etcd registry lays them.
    Etcd,
    /// DNS SRV and A/AAAA records: discovery only; the platform registers.
    Dns,
}

impl RegistryKind {
    /// The kind as `MICRO_REGISTRY` spells it, and as [`Registry::kind`] returns it.
    pub const fn as_str(self) -> &'static str {
        match self {
            RegistryKind::Mdns => "mdns",
            RegistryKind::Consul => "consul",
            RegistryKind::Memory => "memory",
            RegistryKind::Etcd => "etcd",
            RegistryKind::Dns => "dns",
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
    /// Consul Connect, native: services register as Connect-native, and
    /// [`RegistryConfig::connect_tls`] gives each process its leaf certificate.
    pub consul_connect: bool,
    /// The name a process presents under Consul Connect; `None`: its own default (a
    /// server's name, `consignment-cli`, `micro`).
    pub consul_connect_name: Option<String>,
    /// DNS: the SRV query, `{name}` standing for the service name.
    pub dns_template: String,
    /// DNS: the domain appended to queries; `None`: the system's search list.
    pub dns_domain: Option<String>,
    /// DNS: the nameserver to ask; `None`: the system's (or `address`, when set).
    pub dns_nameserver: Option<std::net::SocketAddr>,
    /// DNS: the port of instances found through A/AAAA records.
    pub dns_port: u16,
    /// DNS: the least time an answer is used before it is asked again.
    pub dns_min_ttl: Duration,
    /// DNS: the most time an answer is used before it is asked again.
    pub dns_max_ttl: Duration,
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
            consul_connect: DEFAULT_CONSUL_CONNECT,
            consul_connect_name: None,
            dns_template: DEFAULT_DNS_TEMPLATE.into(),
            dns_domain: None,
            dns_nameserver: None,
            dns_port: DEFAULT_DNS_PORT,
            dns_min_ttl: Duration::from_secs(DEFAULT_DNS_MIN_TTL_SECS),
            dns_max_ttl: Duration::from_secs(DEFAULT_DNS_MAX_TTL_SECS),
        }
    }
}

impl RegistryConfig {
    /// `ping`'s answer once the registry gives one. When it fails: with `retry`, a warning
    /// and another try after a jittered backoff (500 ms doubling to 30 s); without, the error.
    #[cfg(any(feature = "consul", feature = "etcd"))]
    async fn until_ready<T, F: Future<Output = Result<T>>>(&self, mut ping: impl FnMut() -> F) -> Result<T> {
        let mut backoff = crate::registry::Backoff::new(REGISTRY_RETRY_FIRST_DELAY, REGISTRY_RETRY_MAX_DELAY);
        loop {
            match ping().await {
                Ok(answer) => return Ok(answer),
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

    #[cfg(feature = "consul")]
    fn consul(&self) -> Result<crate::registry::ConsulRegistry> {
        use crate::registry::{ConsulRegistry, DEFAULT_CONSUL_ADDRESS};
        ConsulRegistry::builder()
            .address(self.address.as_deref().unwrap_or(DEFAULT_CONSUL_ADDRESS))
            .token(self.consul_token.as_ref().map(|t| t.expose().to_owned()))
            .datacenter(self.consul_datacenter.clone())
            .lookup_timeout(self.lookup_timeout)
            .connect_native(self.consul_connect)
            .build()
    }

    /// With the Consul registry and `consul_connect` on, this process's TLS under Consul
    /// Connect as `consul_connect_name`, else `default_name` (see
    /// [`crate::registry::ConsulRegistry::connect_tls`]); otherwise `None`. Inside a tokio
    /// runtime.
    pub async fn connect_tls(&self, default_name: &str) -> Result<Option<super::TlsConfig>> {
        if !self.consul_connect {
            return Ok(None);
        }
        if self.kind != RegistryKind::Consul {
            return Err(crate::Error::invalid(
                "MICRO_CONSUL_CONNECT",
                format!("needs MICRO_REGISTRY=consul, not {}", self.kind),
            ));
        }
        #[cfg(feature = "consul")]
        {
            let name = self.consul_connect_name.as_deref().unwrap_or(default_name);
            let consul = self.consul()?;
            self.until_ready(|| consul.ping()).await?;
            Ok(Some(consul.connect_tls(name).await?))
        }
        #[cfg(not(feature = "consul"))]
        Err(crate::Error::not_compiled_in(format!("Consul Connect (for {default_name})"), "consul"))
    }

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
            RegistryKind::Mdns => Err(crate::Error::not_compiled_in("registry mdns", "mdns")),
            #[cfg(feature = "consul")]
            RegistryKind::Consul => {
                let consul = self.consul()?;
                let leader = self.until_ready(|| consul.ping()).await?;
                tracing::debug!(address = %consul.address(), %leader, "consul agent answers");
                Ok(Arc::new(consul))
            }
            #[cfg(not(feature = "consul"))]
            RegistryKind::Consul => Err(crate::Error::not_compiled_in("registry consul", "consul")),
            #[cfg(feature = "etcd")]
            RegistryKind::Etcd => {
                use crate::registry::{DEFAULT_ETCD_ADDRESS, EtcdRegistry};
                let etcd = EtcdRegistry::builder()
                    .endpoints(self.address.as_deref().unwrap_or(DEFAULT_ETCD_ADDRESS))
                    .lookup_timeout(self.lookup_timeout)
                    .connect()
                    .await?;
                self.until_ready(|| etcd.ping()).await?;
                Ok(Arc::new(etcd))
            }
            #[cfg(not(feature = "etcd"))]
            RegistryKind::Etcd => Err(crate::Error::not_compiled_in("registry etcd", "etcd")),
            #[cfg(feature = "dns")]
            RegistryKind::Dns => {
                let nameserver = match (self.dns_nameserver, &self.address) {
                    (Some(nameserver), _) => Some(nameserver),
                    (None, Some(address)) => Some(address.parse().map_err(|_| {
                        crate::Error::invalid(format!("DNS nameserver {address:?}"), "expected ip:port")
                    })?),
                    (None, None) => None,
                };
                let dns = crate::registry::DnsRegistry::builder()
                    .template(self.dns_template.clone())
                    .domain(self.dns_domain.clone())
                    .nameserver(nameserver)
                    .default_port(self.dns_port)
                    .ttl_bounds(self.dns_min_ttl, self.dns_max_ttl)
                    .lookup_timeout(self.lookup_timeout)
                    .build()?;
                Ok(Arc::new(dns))
            }
            #[cfg(not(feature = "dns"))]
            RegistryKind::Dns => Err(crate::Error::not_compiled_in("registry dns", "dns")),
        }
    }
}
