//! Registry flags: `--registry` / `MICRO_REGISTRY` and the backend's settings.

use clap::Args;

use super::Millis;

use crate::config::{
    DEFAULT_LOOKUP_TIMEOUT_MS, DEFAULT_REGISTRY_RETRY, RegistryConfig, RegistryKind, Secret,
};

/// Registry flags shared by every binary.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry backend.
    #[arg(long, global = true, env = "MICRO_REGISTRY", value_enum, default_value_t = RegistryKind::Mdns)]
    pub registry: RegistryKind,
    /// Registry address (Consul: host:port of the agent's HTTP API); mdns and memory ignore it.
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
        }
    }
}
