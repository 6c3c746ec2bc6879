//! Configuration with one precedence everywhere: command-line flag, then environment
//! variable, then default. Binaries flatten [`RegistryArgs`] and [`ServerArgs`] into their
//! clap parser and convert them into the plain [`RegistryConfig`] and [`ServerConfig`], so
//! the library and its tests never read the environment.
//!
//! # Examples
//! ```
//! use clap::Parser;
//! use micro_core::config::{RegistryArgs, RegistryKind};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     registry: RegistryArgs,
//! }
//! let cli = Cli::parse_from(["demo", "--registry", "memory"]);
//! assert_eq!(cli.registry.registry, RegistryKind::Memory);
//! ```

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use clap::{Args, ValueEnum};

pub use crate::client::{ClientArgs, ClientConfig};

use crate::{
    Error, Result,
    registry::{MemoryRegistry, Registry},
};

/// Default listening address: every interface, a port the system picks.
pub const DEFAULT_SERVER_ADDRESS: &str = "0.0.0.0:0";
/// Default registration TTL in seconds.
pub const DEFAULT_REGISTER_TTL_SECS: u64 = 30;
/// Default re-registration (heartbeat) interval in seconds.
pub const DEFAULT_REGISTER_INTERVAL_SECS: u64 = 10;
/// Default time a look-up waits for a first instance, in milliseconds.
pub const DEFAULT_LOOKUP_TIMEOUT_MS: u64 = 3000;
/// Default time a stopping server keeps serving after announcing that it drains, in ms.
pub const DEFAULT_DRAIN_DELAY_MS: u64 = 500;
/// Default bound on draining in-flight calls at shutdown, in seconds.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// Default for retrying an unreachable registry at start: off, so it fails at once.
pub const DEFAULT_REGISTRY_RETRY: bool = false;
/// First pause before an unreachable registry is tried again (with `MICRO_REGISTRY_RETRY`).
#[cfg(feature = "consul")]
const REGISTRY_RETRY_FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest pause between tries of an unreachable registry.
#[cfg(feature = "consul")]
const REGISTRY_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

/// Which registry backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegistryKind {
    /// Multicast DNS on the local network segment: no set-up.
    Mdns,
    /// A Consul agent over its HTTP API.
    Consul,
    /// This process only.
    Memory,
}

impl fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegistryKind::Mdns => "mdns",
            RegistryKind::Consul => "consul",
            RegistryKind::Memory => "memory",
        })
    }
}

/// Registry flags shared by every binary.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry backend.
    #[arg(long, global = true, env = "MICRO_REGISTRY", value_enum, default_value_t = RegistryKind::Mdns)]
    pub registry: RegistryKind,
    /// Registry address (Consul: host:port of the agent's HTTP API); mdns and memory ignore it.
    #[arg(long, global = true, env = "MICRO_REGISTRY_ADDRESS")]
    pub registry_address: Option<String>,
    /// How long a look-up waits for a first instance of a name, in milliseconds.
    #[arg(long, global = true, env = "MICRO_LOOKUP_TIMEOUT", default_value_t = DEFAULT_LOOKUP_TIMEOUT_MS)]
    pub lookup_timeout: u64,
    /// At start, keep trying an unreachable registry (Consul), with backoff and a warning
    /// each time, instead of failing.
    #[arg(long, global = true, env = "MICRO_REGISTRY_RETRY", default_value_t = DEFAULT_REGISTRY_RETRY)]
    pub registry_retry: bool,
    /// Consul ACL token, sent as `X-Consul-Token`; unset: the agent's default token.
    #[arg(long, global = true, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<Secret>,
    /// Consul datacenter whose services are looked up; unset: the agent's own.
    #[arg(long, global = true, env = "MICRO_CONSUL_DATACENTER")]
    pub consul_datacenter: Option<String>,
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

impl From<RegistryArgs> for RegistryConfig {
    fn from(args: RegistryArgs) -> Self {
        RegistryConfig {
            kind: args.registry,
            address: args.registry_address,
            lookup_timeout: Duration::from_millis(args.lookup_timeout),
            retry: args.registry_retry,
            consul_token: args.consul_token,
            consul_datacenter: args.consul_datacenter,
        }
    }
}

impl RegistryConfig {
    /// Opens the configured registry. Inside a tokio runtime.
    ///
    /// Consul: the agent at `address` (default [`crate::registry::DEFAULT_CONSUL_ADDRESS`])
    /// must answer and know a leader; if it does not, this fails within a couple of seconds,
    /// or with `retry` keeps trying (500 ms doubling to 30 s), logging a warning each time.
    pub async fn connect(&self) -> Result<Arc<dyn Registry>> {
        match self.kind {
            RegistryKind::Memory => Ok(Arc::new(MemoryRegistry::global())),
            #[cfg(feature = "mdns")]
            RegistryKind::Mdns => Ok(Arc::new(crate::registry::MdnsRegistry::new(self.lookup_timeout)?)),
            #[cfg(not(feature = "mdns"))]
            RegistryKind::Mdns => {
                Err(Error::invalid("registry mdns", "micro-core was built without its `mdns` feature"))
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
                let mut delay = REGISTRY_RETRY_FIRST_DELAY;
                loop {
                    match consul.ping().await {
                        Ok(leader) => {
                            tracing::debug!(address = %consul.address(), %leader, "consul agent answers");
                            return Ok(Arc::new(consul));
                        }
                        Err(err) if self.retry => {
                            let error = crate::error::error_chain(&err);
                            tracing::warn!(%error, retry_in = ?delay, "registry not ready; trying again (MICRO_REGISTRY_RETRY is set)");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(REGISTRY_RETRY_MAX_DELAY);
                        }
                        Err(err) => return Err(err),
                    }
                }
            }
            #[cfg(not(feature = "consul"))]
            RegistryKind::Consul => {
                Err(Error::invalid("registry consul", "micro-core was built without its `consul` feature"))
            }
        }
    }
}

/// TLS flags: this process's certificate and key, and the CA it trusts. Unset: plaintext.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process: servers serve TLS with it, clients present
    /// it to servers that ask. Its name should be the service name, e.g. `vessel-service`.
    #[arg(long, global = true, env = "MICRO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, global = true, env = "MICRO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) to trust: clients then use TLS and check that a server's
    /// certificate names the service called; servers check client certificates presented.
    #[arg(long, global = true, env = "MICRO_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// TLS material, loaded.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// This process's certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The CA certificates to trust, PEM.
    pub ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

impl TlsArgs {
    /// Reads the files; `None` when no TLS flag is set.
    pub fn load(&self) -> Result<Option<TlsConfig>> {
        let read = |path: &std::path::Path, variable: &str| {
            std::fs::read(path).map_err(|err| {
                Error::invalid(format!("{variable}={}", path.display()), format!("cannot read it: {err}"))
            })
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert, "MICRO_TLS_CERT")?, read(key, "MICRO_TLS_KEY")?)),
            _ => None,
        };
        let ca = self.tls_ca.as_deref().map(|ca| read(ca, "MICRO_TLS_CA")).transpose()?;
        Ok((identity.is_some() || ca.is_some()).then_some(TlsConfig { identity, ca }))
    }
}

/// Server flags shared by every service binary.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Name to register under, instead of the one the binary is built with.
    #[arg(long, env = "MICRO_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Version to announce, instead of the one the binary is built with.
    #[arg(long, env = "MICRO_SERVER_VERSION")]
    pub server_version: Option<String>,
    /// Metadata labels to announce, `key=value`, comma-separated or repeated.
    #[arg(long, env = "MICRO_SERVER_METADATA", value_delimiter = ',', value_parser = parse_key_value)]
    pub server_metadata: Vec<(String, String)>,
    /// Address the gRPC server listens on.
    #[arg(long, env = "MICRO_SERVER_ADDRESS", default_value = DEFAULT_SERVER_ADDRESS)]
    pub server_address: SocketAddr,
    /// Address announced to peers, `host:port` or `host` (the bound port is kept).
    /// Unset: the bound address, or when bound to 0.0.0.0 the first address of an
    /// interface that is not loopback, docker, veth or a bridge.
    #[arg(long, env = "MICRO_SERVER_ADVERTISE")]
    pub server_advertise: Option<String>,
    /// Seconds a registration stays valid without a heartbeat.
    #[arg(long, env = "MICRO_REGISTER_TTL", default_value_t = DEFAULT_REGISTER_TTL_SECS)]
    pub register_ttl: u64,
    /// Seconds between heartbeats (re-registrations); must be less than the TTL.
    #[arg(long, env = "MICRO_REGISTER_INTERVAL", default_value_t = DEFAULT_REGISTER_INTERVAL_SECS)]
    pub register_interval: u64,
    /// Seconds in-flight calls get to finish at shutdown before the server closes anyway.
    #[arg(long, env = "MICRO_SHUTDOWN_GRACE", default_value_t = DEFAULT_SHUTDOWN_GRACE_SECS)]
    pub shutdown_grace: u64,
    /// Milliseconds a stopping server keeps serving after announcing that it drains, so
    /// clients stop picking it before it deregisters; 0 skips the announcement.
    #[arg(long, env = "MICRO_SHUTDOWN_DRAIN_DELAY", default_value_t = DEFAULT_DRAIN_DELAY_MS)]
    pub shutdown_drain_delay: u64,
    /// Where to serve Prometheus metrics (`ip:port`, port 0 picks one), or `off`; unset,
    /// the binary decides (the shippy services serve them on 127.0.0.1, any port).
    #[arg(long, env = "MICRO_METRICS_ADDRESS", value_parser = parse_metrics_address)]
    pub metrics_address: Option<MetricsAddress>,
}

/// Where metrics are served, as `MICRO_METRICS_ADDRESS` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddress {
    /// No metrics endpoint.
    Off,
    /// Serve on this address.
    At(SocketAddr),
}

fn parse_metrics_address(text: &str) -> Result<MetricsAddress, String> {
    match text {
        "off" | "" => Ok(MetricsAddress::Off),
        text => {
            text.parse().map(MetricsAddress::At).map_err(|_| format!("expected ip:port or off, got {text:?}"))
        }
    }
}

impl ServerArgs {
    /// The server config, with metrics on `default_metrics` unless the flags say otherwise.
    pub fn into_config_with_metrics(self, default_metrics: SocketAddr) -> Result<ServerConfig> {
        let metrics = self.metrics_address.unwrap_or(MetricsAddress::At(default_metrics));
        let mut config = ServerConfig::try_from(self)?;
        config.metrics_address = match metrics {
            MetricsAddress::Off => None,
            MetricsAddress::At(address) => Some(address),
        };
        Ok(config)
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
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
        }
    }
}

impl TryFrom<ServerArgs> for ServerConfig {
    type Error = Error;

    fn try_from(args: ServerArgs) -> Result<Self> {
        if args.register_interval == 0 || args.register_interval >= args.register_ttl {
            return Err(Error::invalid(
                format!("MICRO_REGISTER_INTERVAL={}", args.register_interval),
                format!("must be at least 1 and less than MICRO_REGISTER_TTL={}", args.register_ttl),
            ));
        }
        Ok(ServerConfig {
            name: args.server_name,
            version: args.server_version,
            metadata: args.server_metadata,
            address: args.server_address,
            advertise: args.server_advertise,
            register_ttl: Duration::from_secs(args.register_ttl),
            register_interval: Duration::from_secs(args.register_interval),
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            drain_delay: Duration::from_millis(args.shutdown_drain_delay),
            metrics_address: match args.metrics_address {
                Some(MetricsAddress::At(address)) => Some(address),
                Some(MetricsAddress::Off) | None => None,
            },
            tls: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        server: ServerArgs,
    }

    // The environment's part in the precedence is tested through a child process
    // (micro-core/tests/micro_command.rs), never by changing this process's environment.
    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
    }

    #[test]
    fn flag_beats_default() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.registry.registry, RegistryKind::Mdns);
        assert_eq!(cli.server.register_ttl, DEFAULT_REGISTER_TTL_SECS);
        let cli = parse(&["--registry", "consul", "--register-ttl", "60"]).unwrap();
        assert_eq!(cli.registry.registry, RegistryKind::Consul);
        assert_eq!(cli.server.register_ttl, 60);
    }

    #[test]
    fn consul_settings_and_retry_come_from_flags() {
        let config = RegistryConfig::from(parse(&[]).unwrap().registry);
        assert_eq!(config.retry, DEFAULT_REGISTRY_RETRY);
        assert_eq!((config.consul_token, config.consul_datacenter), (None, None));

        let cli =
            parse(&["--registry-retry", "--consul-token", "s3cret", "--consul-datacenter", "eu"]).unwrap();
        let config = RegistryConfig::from(cli.registry);
        assert!(config.retry);
        assert_eq!(config.consul_token.as_ref().map(Secret::expose), Some("s3cret"));
        assert_eq!(config.consul_datacenter.as_deref(), Some("eu"));
        assert!(!format!("{config:?}").contains("s3cret"), "the token must stay out of Debug output");
    }

    #[test]
    fn unknown_registry_lists_the_valid_ones() {
        let err = parse(&["--registry", "etcd"]).err().expect("etcd is not a backend").to_string();
        assert!(err.contains("mdns") && err.contains("consul") && err.contains("memory"), "{err}");
    }

    #[test]
    fn heartbeat_must_come_before_the_ttl_runs_out() {
        let cli = parse(&["--register-ttl", "10", "--register-interval", "10"]).unwrap();
        let err = ServerConfig::try_from(cli.server).unwrap_err().to_string();
        assert!(err.contains("MICRO_REGISTER_INTERVAL"), "{err}");
    }
}
