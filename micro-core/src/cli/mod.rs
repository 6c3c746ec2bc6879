//! The command-line flags every binary shares (feature `cli`, on by default), each with its
//! environment variable and default: flag, then environment, then default. Binaries flatten
//! them into their clap parser and convert them into the plain [`crate::config`] types, so
//! the library itself never reads the environment. Durations accept units (`500ms`, `30s`,
//! `2m`); a bare number keeps the setting's own unit ([`Seconds`], [`Millis`]).
//!
//! # Examples
//! ```
//! use clap::Parser;
//! use micro_core::{cli::RegistryArgs, config::{RegistryConfig, RegistryKind}};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     registry: RegistryArgs,
//! }
//! let cli = Cli::parse_from(["demo", "--registry", "memory"]);
//! assert_eq!(RegistryConfig::from(cli.registry).kind, RegistryKind::Memory);
//! ```

mod broker;
mod client;
mod duration;
mod json_fields;
mod log;
mod registry;
mod server;
mod telemetry;
mod tls;

pub use broker::BrokerArgs;
pub use client::ClientArgs;
pub use duration::{DurationArg, Millis, Seconds};
pub use log::{LogArgs, LogFormat};
pub use registry::RegistryArgs;
pub use server::{LimitArgs, LimitKind, MetricsAddress, ServerArgs};
pub use telemetry::{DEFAULT_OTLP_PROTOCOL, OtlpProtocol, TelemetryArgs, TracesExporter, flush_telemetry};
pub use tls::TlsArgs;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        DEFAULT_REGISTER_TTL_SECS, DEFAULT_REGISTRY_RETRY, RegistryConfig, RegistryKind, Secret, ServerConfig,
    };
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        server: ServerArgs,
    }

    // The environment's part in the precedence is tested through a child process
    // (micro-cli/tests/config_and_services.rs), never by changing this process's environment.
    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
    }

    #[test]
    fn flag_beats_default() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.registry.registry, RegistryKind::Mdns);
        assert_eq!(cli.server.register_ttl, Seconds::from_units(DEFAULT_REGISTER_TTL_SECS));
        let cli = parse(&["--registry", "consul", "--register-ttl", "60"]).unwrap();
        assert_eq!(cli.registry.registry, RegistryKind::Consul);
        assert_eq!(cli.server.register_ttl, Seconds::from_units(60));
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
        let err = parse(&["--registry", "zookeeper"]).err().expect("zookeeper is not a backend").to_string();
        for kind in ["mdns", "consul", "memory", "etcd", "dns"] {
            assert!(err.contains(kind), "{kind} missing: {err}");
        }
    }

    #[test]
    fn duration_settings_accept_units_and_bare_numbers_keep_their_unit() {
        let cli = parse(&["--register-ttl", "2m", "--register-interval", "500ms", "--lookup-timeout", "2s"])
            .unwrap();
        let lookup_timeout = RegistryConfig::from(cli.registry).lookup_timeout;
        let server = ServerConfig::try_from(cli.server).unwrap();
        assert_eq!(server.register_ttl, std::time::Duration::from_secs(120));
        assert_eq!(server.register_interval, std::time::Duration::from_millis(500));
        assert_eq!(lookup_timeout, std::time::Duration::from_secs(2));

        let cli =
            parse(&["--register-ttl", "45", "--shutdown-drain-delay", "250", "--lookup-timeout", "750"])
                .unwrap();
        let lookup_timeout = RegistryConfig::from(cli.registry).lookup_timeout;
        let server = ServerConfig::try_from(cli.server).unwrap();
        assert_eq!(server.register_ttl, std::time::Duration::from_secs(45), "bare TTL: seconds");
        assert_eq!(server.drain_delay, std::time::Duration::from_millis(250), "bare drain delay: ms");
        assert_eq!(lookup_timeout, std::time::Duration::from_millis(750), "bare look-up timeout: ms");

        let err = parse(&["--register-ttl", "soon"]).err().expect("not a duration").to_string();
        assert!(err.contains("500ms"), "{err}");
    }

    #[test]
    fn heartbeat_must_come_before_the_ttl_runs_out() {
        let cli = parse(&["--register-ttl", "10", "--register-interval", "10"]).unwrap();
        let err = ServerConfig::try_from(cli.server).unwrap_err().to_string();
        assert!(err.contains("MICRO_REGISTER_INTERVAL"), "{err}");
    }
}
