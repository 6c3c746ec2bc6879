//! Server flags: name, version, labels, addresses, registration timing, shutdown, metrics.

use std::net::SocketAddr;

use clap::Args;

use super::{Millis, Seconds};
use crate::{
    Error, Result,
    config::{
        ConcurrencyLimit, DEFAULT_DRAIN_DELAY_MS, DEFAULT_LIMIT_MAX, DEFAULT_LIMIT_MIN,
        DEFAULT_REGISTER_INTERVAL_SECS, DEFAULT_REGISTER_TTL_SECS, DEFAULT_SERVER_ADDRESS,
        DEFAULT_SHUTDOWN_GRACE_SECS, ServerConfig,
    },
};

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
    /// How long a registration stays valid without a heartbeat; a bare number is seconds.
    #[arg(long, env = "MICRO_REGISTER_TTL", default_value_t = Seconds::from_units(DEFAULT_REGISTER_TTL_SECS))]
    pub register_ttl: Seconds,
    /// Time between heartbeats (re-registrations), less than the TTL; a bare number is seconds.
    #[arg(long, env = "MICRO_REGISTER_INTERVAL", default_value_t = Seconds::from_units(DEFAULT_REGISTER_INTERVAL_SECS))]
    pub register_interval: Seconds,
    /// How long in-flight calls get to finish at shutdown before the server closes anyway; a
    /// bare number is seconds.
    #[arg(long, env = "MICRO_SHUTDOWN_GRACE", default_value_t = Seconds::from_units(DEFAULT_SHUTDOWN_GRACE_SECS))]
    pub shutdown_grace: Seconds,
    /// How long a stopping server keeps serving after announcing that it drains, so clients
    /// stop picking it before it deregisters; 0 skips the announcement. A bare number is
    /// milliseconds.
    #[arg(long, env = "MICRO_SHUTDOWN_DRAIN_DELAY", default_value_t = Millis::from_units(DEFAULT_DRAIN_DELAY_MS))]
    pub shutdown_drain_delay: Millis,
    /// Where to serve Prometheus metrics (`ip:port`, port 0 picks one), or `off`; unset,
    /// the binary decides (the shippy services serve them on 127.0.0.1, any port).
    #[arg(long, env = "MICRO_METRICS_ADDRESS", value_parser = parse_metrics_address)]
    pub metrics_address: Option<MetricsAddress>,
    /// Authorization policy file (YAML or JSON: rules of caller × method, allow or deny,
    /// default deny), reread when it changes; needs MICRO_TLS_CA and a server certificate,
    /// since callers are known by their certificates. Unset: every caller may call every
    /// method.
    #[arg(long, env = "MICRO_AUTHZ_POLICY")]
    pub authz_policy: Option<std::path::PathBuf>,
    /// Concurrency limits: calls beyond them are refused at once with RESOURCE_EXHAUSTED.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Concurrency limit flags, `MICRO_SERVER_LIMIT*`: how many calls a server serves at once
/// before it refuses more with `RESOURCE_EXHAUSTED` (health and reflection never are).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// The limit of the whole server: `adaptive` (learned from latency, between the
    /// lowest and highest limit below), `off`, or a fixed number of calls.
    #[arg(long, env = "MICRO_SERVER_LIMIT", default_value = "adaptive", value_parser = parse_limit)]
    pub server_limit: LimitKind,
    /// The lowest adaptive limit: fewer calls in flight than this are never refused.
    #[arg(long, env = "MICRO_SERVER_LIMIT_MIN", default_value_t = DEFAULT_LIMIT_MIN)]
    pub server_limit_min: usize,
    /// The highest adaptive limit.
    #[arg(long, env = "MICRO_SERVER_LIMIT_MAX", default_value_t = DEFAULT_LIMIT_MAX)]
    pub server_limit_max: usize,
    /// Fixed limits of single methods, `/package.Service/Method=N`, comma-separated or
    /// repeated; such a method is held to its own limit instead of the server's.
    #[arg(long, env = "MICRO_SERVER_METHOD_LIMITS", value_delimiter = ',', value_parser = parse_method_limit)]
    pub server_method_limits: Vec<(String, usize)>,
}

/// What `MICRO_SERVER_LIMIT` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Learned from latency.
    Adaptive,
    /// No limit.
    Off,
    /// A fixed number of calls.
    Fixed(usize),
}

fn parse_limit(text: &str) -> Result<LimitKind, String> {
    match text {
        "adaptive" | "auto" => Ok(LimitKind::Adaptive),
        "off" => Ok(LimitKind::Off),
        number => number
            .parse()
            .map(LimitKind::Fixed)
            .map_err(|_| format!("expected adaptive, off or a number of calls, got {text:?}")),
    }
}

fn parse_method_limit(text: &str) -> Result<(String, usize), String> {
    let parsed = text.rsplit_once('=').and_then(|(path, limit)| Some((path.to_owned(), limit.parse().ok()?)));
    parsed.ok_or_else(|| format!("expected /package.Service/Method=N, got {text:?}"))
}

impl LimitArgs {
    /// The server's limit and the methods' limits.
    pub fn into_limits(self) -> (ConcurrencyLimit, Vec<(String, usize)>) {
        let limit = match self.server_limit {
            LimitKind::Adaptive => {
                ConcurrencyLimit::Adaptive { min: self.server_limit_min, max: self.server_limit_max }
            }
            LimitKind::Off => ConcurrencyLimit::Off,
            LimitKind::Fixed(limit) => ConcurrencyLimit::Fixed(limit),
        };
        (limit, self.server_method_limits)
    }
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

impl TryFrom<ServerArgs> for ServerConfig {
    type Error = Error;

    fn try_from(args: ServerArgs) -> Result<Self> {
        let (limit, method_limits) = args.limits.into_limits();
        let config = ServerConfig {
            name: args.server_name,
            version: args.server_version,
            metadata: args.server_metadata,
            address: args.server_address,
            advertise: args.server_advertise,
            register_ttl: args.register_ttl.into(),
            register_interval: args.register_interval.into(),
            shutdown_grace: args.shutdown_grace.into(),
            drain_delay: args.shutdown_drain_delay.into(),
            metrics_address: match args.metrics_address {
                Some(MetricsAddress::At(address)) => Some(address),
                Some(MetricsAddress::Off) | None => None,
            },
            tls: None,
            authz_policy: args.authz_policy,
            limit,
            method_limits,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn config(args: &[&str]) -> Result<ServerConfig> {
        let cli =
            Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied())).expect("flags parse");
        ServerConfig::try_from(cli.server)
    }

    #[test]
    fn limits_come_from_flags_with_an_adaptive_default() {
        let defaults = config(&[]).unwrap();
        assert_eq!(defaults.limit, ConcurrencyLimit::default());
        assert!(defaults.method_limits.is_empty());
        let set = config(&[
            "--server-limit-min",
            "4",
            "--server-limit-max",
            "40",
            "--server-method-limits",
            "/a.B/C=2,/a.B/D=3",
        ])
        .unwrap();
        assert_eq!(set.limit, ConcurrencyLimit::Adaptive { min: 4, max: 40 });
        assert_eq!(set.method_limits, [("/a.B/C".to_owned(), 2), ("/a.B/D".to_owned(), 3)]);
        assert_eq!(config(&["--server-limit", "off"]).unwrap().limit, ConcurrencyLimit::Off);
        assert_eq!(config(&["--server-limit", "7"]).unwrap().limit, ConcurrencyLimit::Fixed(7));
    }

    #[test]
    fn limits_that_cannot_work_are_refused_naming_the_variable() {
        let err = config(&["--server-limit-min", "50", "--server-limit-max", "10"]).unwrap_err().to_string();
        assert!(err.contains("MICRO_SERVER_LIMIT_MIN"), "{err}");
        let err = config(&["--server-method-limits", "FindAvailable=3"]).unwrap_err().to_string();
        assert!(err.contains("MICRO_SERVER_METHOD_LIMITS"), "{err}");
        assert!(Cli::try_parse_from(["test", "--server-limit", "lots"]).is_err());
    }
}
