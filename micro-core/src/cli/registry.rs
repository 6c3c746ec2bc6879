//! Registry flags: `--registry` / `MICRO_REGISTRY` and the backend's settings.

use clap::Args;

use super::{Millis, Seconds};

use crate::config::{
    DEFAULT_CONSUL_CONNECT, DEFAULT_DNS_MAX_TTL_SECS, DEFAULT_DNS_MIN_TTL_SECS, DEFAULT_DNS_PORT,
    DEFAULT_DNS_TEMPLATE, DEFAULT_LOOKUP_TIMEOUT_MS, DEFAULT_REGISTRY_RETRY, RegistryConfig, RegistryKind,
    Secret,
};

/// Registry flags shared by every binary.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry backend.
    #[arg(long, global = true, env = "MICRO_REGISTRY", value_enum, default_value_t = RegistryKind::Mdns)]
    pub registry: RegistryKind,
    /// Registry address (Consul: host:port of the agent's HTTP API; etcd: the cluster's client
    /// endpoints, host:port comma-separated, default 127.0.0.1:2379; dns: the nameserver,
    /// ip:port); mdns and memory ignore it.
    #[arg(long, global = true, env = "MICRO_REGISTRY_ADDRESS")]
    pub registry_address: Option<String>,
    /// How long a look-up waits for a first instance of a name; a bare number is milliseconds.
    #[arg(long, global = true, env = "MICRO_LOOKUP_TIMEOUT", default_value_t = Millis::from_units(DEFAULT_LOOKUP_TIMEOUT_MS))]
    pub lookup_timeout: Millis,
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
    /// Consul Connect, native (with `--registry consul`): services register as
    /// Connect-native and serve only mutual TLS with their leaf certificate from the agent,
    /// authorizing each caller by the agent's intentions; clients present their own leaf
    /// and check the callee's SPIFFE id. Replaces `--tls-*`.
    #[arg(long, global = true, env = "MICRO_CONSUL_CONNECT", default_value_t = DEFAULT_CONSUL_CONNECT)]
    pub consul_connect: bool,
    /// The name this process presents under Consul Connect; unset: a server's name,
    /// `consignment-cli` for the CLI, `micro` for the micro command.
    #[arg(long, global = true, env = "MICRO_CONSUL_CONNECT_NAME")]
    pub consul_connect_name: Option<String>,
    /// DNS registry: the SRV query for a name, `{name}` standing for it.
    #[arg(long, global = true, env = "MICRO_DNS_TEMPLATE", default_value = DEFAULT_DNS_TEMPLATE)]
    pub dns_template: String,
    /// DNS registry: the domain appended to queries (e.g. shippy.svc.cluster.local); unset:
    /// the system's search list.
    #[arg(long, global = true, env = "MICRO_DNS_DOMAIN")]
    pub dns_domain: Option<String>,
    /// DNS registry: the nameserver to ask, ip:port; unset: the system's (/etc/resolv.conf).
    #[arg(long, global = true, env = "MICRO_DNS_NAMESERVER")]
    pub dns_nameserver: Option<std::net::SocketAddr>,
    /// DNS registry: the port of instances found through A/AAAA records (no SRV record).
    #[arg(long, global = true, env = "MICRO_DNS_PORT", default_value_t = DEFAULT_DNS_PORT)]
    pub dns_port: u16,
    /// DNS registry: the least time an answer is used before it is asked again; a bare
    /// number is seconds.
    #[arg(long, global = true, env = "MICRO_DNS_MIN_TTL", default_value_t = Seconds::from_units(DEFAULT_DNS_MIN_TTL_SECS))]
    pub dns_min_ttl: Seconds,
    /// DNS registry: the most time an answer is used before it is asked again; a bare number
    /// is seconds.
    #[arg(long, global = true, env = "MICRO_DNS_MAX_TTL", default_value_t = Seconds::from_units(DEFAULT_DNS_MAX_TTL_SECS))]
    pub dns_max_ttl: Seconds,
}

impl From<RegistryArgs> for RegistryConfig {
    fn from(args: RegistryArgs) -> Self {
        RegistryConfig {
            kind: args.registry,
            address: args.registry_address,
            lookup_timeout: args.lookup_timeout.into(),
            retry: args.registry_retry,
            consul_token: args.consul_token,
            consul_datacenter: args.consul_datacenter,
            consul_connect: args.consul_connect,
            consul_connect_name: args.consul_connect_name,
            dns_template: args.dns_template,
            dns_domain: args.dns_domain,
            dns_nameserver: args.dns_nameserver,
            dns_port: args.dns_port,
            dns_min_ttl: args.dns_min_ttl.into(),
            dns_max_ttl: args.dns_max_ttl.into(),
        }
    }
}
