//! Client flags: `MICRO_CLIENT_*`, how calls pick, time out, retry and eject.

use std::time::Duration;

use clap::Args;

use super::{Millis, Seconds};

use crate::{
    Result,
    config::{
        ClientConfig, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_CONNECTIONS, DEFAULT_EJECT_AFTER,
        DEFAULT_EJECT_TIME_MS, DEFAULT_KEEPALIVE_INTERVAL_MS, DEFAULT_KEEPALIVE_TIMEOUT_MS,
        DEFAULT_REFRESH_INTERVAL_SECS, DEFAULT_REQUEST_TIMEOUT_MS, DEFAULT_RETRIES,
        DEFAULT_RETRY_BUDGET_PERCENT, DEFAULT_THROTTLE_RATIO, Hedge,
    },
    selector::StrategyKind,
};

/// Client flags shared by every binary that calls services. Durations accept units
/// (`500ms`, `2s`, `1m`); a bare number is in the unit each setting names.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// How a channel picks an instance per call.
    #[arg(long, env = "MICRO_CLIENT_SELECTOR", value_enum, default_value_t = StrategyKind::default())]
    pub client_selector: StrategyKind,
    /// Milliseconds a call may take until its response headers, retries included, unless
    /// the caller sets its own deadline; carried to the server as `grpc-timeout`. A server
    /// stream runs on after its headers (see the stream settings).
    #[arg(long, env = "MICRO_CLIENT_REQUEST_TIMEOUT", default_value_t = Millis::from_units(DEFAULT_REQUEST_TIMEOUT_MS))]
    pub client_request_timeout: Millis,
    /// Milliseconds a server or bidirectional stream may run after its headers before it
    /// ends with DEADLINE_EXCEEDED; 0: as long as it lasts.
    #[arg(long, env = "MICRO_CLIENT_STREAM_TIMEOUT", default_value_t = Millis::from_units(0))]
    pub client_stream_timeout: Millis,
    /// Milliseconds a stream may go without a message before it ends with
    /// DEADLINE_EXCEEDED; 0: no limit.
    #[arg(long, env = "MICRO_CLIENT_STREAM_IDLE_TIMEOUT", default_value_t = Millis::from_units(0))]
    pub client_stream_idle_timeout: Millis,
    /// Retries after a failed attempt, each on another instance when there is one.
    #[arg(long, env = "MICRO_CLIENT_RETRIES", default_value_t = DEFAULT_RETRIES)]
    pub client_retries: u32,
    /// Retries allowed as a percentage of calls over the last 10 s (plus 10 per second).
    #[arg(long, env = "MICRO_CLIENT_RETRY_BUDGET", default_value_t = DEFAULT_RETRY_BUDGET_PERCENT)]
    pub client_retry_budget: f32,
    /// Seconds between full refreshes of each channel's instances from the registry.
    #[arg(long, env = "MICRO_CLIENT_REFRESH_INTERVAL", default_value_t = Seconds::from_units(DEFAULT_REFRESH_INTERVAL_SECS))]
    pub client_refresh_interval: Seconds,
    /// Consecutive failures after which an instance is ejected (a refused connection ejects at once).
    #[arg(long, env = "MICRO_CLIENT_EJECT_AFTER", default_value_t = DEFAULT_EJECT_AFTER)]
    pub client_eject_after: u32,
    /// Milliseconds of the first ejection; each further ejection doubles it, up to 30 s.
    #[arg(long, env = "MICRO_CLIENT_EJECT_TIME", default_value_t = Millis::from_units(DEFAULT_EJECT_TIME_MS))]
    pub client_eject_time: Millis,
    /// Milliseconds to establish a TCP connection to an instance; past it the instance is
    /// taken for unreachable and ejected at once.
    #[arg(long, env = "MICRO_CLIENT_CONNECT_TIMEOUT", default_value_t = Millis::from_units(DEFAULT_CONNECT_TIMEOUT_MS))]
    pub client_connect_timeout: Millis,
    /// Milliseconds between HTTP/2 keepalive pings on a connection with calls in flight (an
    /// idle one is never pinged); 0 turns them off. A peer that vanished under a call is
    /// known within interval + timeout.
    #[arg(long, env = "MICRO_CLIENT_KEEPALIVE_INTERVAL", default_value_t = Millis::from_units(DEFAULT_KEEPALIVE_INTERVAL_MS))]
    pub client_keepalive_interval: Millis,
    /// Milliseconds a keepalive ping may go unanswered before the connection is closed as
    /// dead and its instance ejected.
    #[arg(long, env = "MICRO_CLIENT_KEEPALIVE_TIMEOUT", default_value_t = Millis::from_units(DEFAULT_KEEPALIVE_TIMEOUT_MS))]
    pub client_keepalive_timeout: Millis,
    /// HTTP/2 connections a channel may open to one instance: one at first, another
    /// whenever every open one carries 8 calls; 1 keeps one connection per instance.
    #[arg(long, env = "MICRO_CLIENT_CONNECTIONS", default_value_t = DEFAULT_CONNECTIONS)]
    pub client_connections: usize,
    /// When an idempotent call not answered yet goes to a second instance: `auto` (after
    /// the name's recent p95 latency, between 20 ms and 500 ms), `off`, or a fixed number of
    /// milliseconds.
    #[arg(long, env = "MICRO_CLIENT_HEDGE", default_value = "auto", value_parser = parse_hedge)]
    pub client_hedge: Hedge,
    /// Adaptive throttling per name: once its instances refuse calls as overloaded, calls
    /// are refused locally with the probability (requests - K * accepts) / (requests + 1);
    /// this is K (at least 1), or `off`.
    #[arg(long, env = "MICRO_CLIENT_THROTTLE", default_value_t = DEFAULT_THROTTLE_RATIO, value_parser = parse_throttle)]
    pub client_throttle: f64,
}

fn parse_throttle(text: &str) -> std::result::Result<f64, String> {
    match text {
        "off" | "0" => Ok(0.0),
        ratio => match ratio.parse::<f64>() {
            Ok(k) if k >= 1.0 && k.is_finite() => Ok(k),
            _ => Err(format!("expected off or a number of at least 1, got {text:?}")),
        },
    }
}

fn parse_hedge(text: &str) -> std::result::Result<Hedge, String> {
    match text {
        "auto" => Ok(Hedge::default()),
        "off" => Ok(Hedge::Off),
        millis => millis
            .parse()
            .map(|millis| Hedge::After(Duration::from_millis(millis)))
            .map_err(|_| format!("expected auto, off or a number of milliseconds, got {text:?}")),
    }
}

impl ClientConfig {
    /// The settings from flags and environment; `lookup_timeout` comes from the registry's.
    /// Fails when the settings cannot work together ([`ClientConfig::validate`]).
    pub fn from_args(args: ClientArgs, lookup_timeout: Duration) -> Result<Self> {
        let config = ClientConfig {
            strategy: args.client_selector,
            lookup_timeout,
            request_timeout: args.client_request_timeout.into(),
            stream_timeout: args.client_stream_timeout.into(),
            stream_idle_timeout: args.client_stream_idle_timeout.into(),
            retries: args.client_retries,
            retry_budget_percent: args.client_retry_budget,
            refresh_interval: args.client_refresh_interval.into(),
            eject_after: args.client_eject_after,
            eject_time: args.client_eject_time.into(),
            connect_timeout: args.client_connect_timeout.into(),
            keepalive_interval: args.client_keepalive_interval.into(),
            keepalive_timeout: args.client_keepalive_timeout.into(),
            connections: args.client_connections,
            hedge: args.client_hedge,
            throttle_ratio: args.client_throttle,
            ..ClientConfig::default()
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
        client: ClientArgs,
    }

    fn config(args: &[&str]) -> Result<ClientConfig> {
        let cli =
            Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied())).expect("flags parse");
        ClientConfig::from_args(cli.client, Duration::from_secs(3))
    }

    #[test]
    fn silent_failure_settings_come_from_flags_with_documented_defaults() {
        let defaults = config(&[]).unwrap();
        assert_eq!(defaults.hedge, Hedge::default());
        assert_eq!(defaults.strategy, StrategyKind::PeakEwma);
        assert_eq!(defaults.keepalive_interval, Duration::from_millis(DEFAULT_KEEPALIVE_INTERVAL_MS));
        let set = config(&[
            "--client-hedge",
            "off",
            "--client-keepalive-interval",
            "0",
            "--client-connect-timeout",
            "250",
        ])
        .unwrap();
        assert_eq!(set.hedge, Hedge::Off);
        assert!(set.keepalive_interval.is_zero());
        assert_eq!(set.connect_timeout, Duration::from_millis(250));
        assert_eq!(config(&["--client-hedge", "40"]).unwrap().hedge, Hedge::After(Duration::from_millis(40)));
        assert_eq!(defaults.throttle_ratio, DEFAULT_THROTTLE_RATIO);
        assert_eq!(config(&["--client-throttle", "off"]).unwrap().throttle_ratio, 0.0);
        assert_eq!(config(&["--client-throttle", "1.5"]).unwrap().throttle_ratio, 1.5);
        assert!(Cli::try_parse_from(["test", "--client-throttle", "0.5"]).is_err());
    }

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_variable() {
        let err = config(&["--client-eject-after", "0"]).unwrap_err().to_string();
        assert!(err.contains("MICRO_CLIENT_EJECT_AFTER"), "{err}");
        let parse = Cli::try_parse_from(["test", "--client-hedge", "soon"]);
        assert!(parse.is_err_and(|e| e.to_string().contains("auto, off or a number")));
    }
}
