//! Client flags: `MICRO_CLIENT_*`, how calls pick, time out, retry and eject.

use std::time::Duration;

use clap::Args;

use crate::{
    Result,
    config::{
        ClientConfig, DEFAULT_EJECT_AFTER, DEFAULT_EJECT_TIME_MS, DEFAULT_REFRESH_INTERVAL_SECS,
        DEFAULT_REQUEST_TIMEOUT_MS, DEFAULT_RETRIES, DEFAULT_RETRY_BUDGET_PERCENT,
    },
    selector::StrategyKind,
};

/// Client flags shared by every binary that calls services.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// How a channel picks an instance per call.
    #[arg(long, env = "MICRO_CLIENT_SELECTOR", value_enum, default_value_t = StrategyKind::RoundRobin)]
    pub client_selector: StrategyKind,
    /// Milliseconds a call may take, retries included, unless the caller sets a shorter
    /// deadline; carried to the server as `grpc-timeout`.
    #[arg(long, env = "MICRO_CLIENT_REQUEST_TIMEOUT", default_value_t = DEFAULT_REQUEST_TIMEOUT_MS)]
    pub client_request_timeout: u64,
    /// Retries after a failed attempt, each on another instance when there is one.
    #[arg(long, env = "MICRO_CLIENT_RETRIES", default_value_t = DEFAULT_RETRIES)]
    pub client_retries: u32,
    /// Retries allowed as a percentage of calls over the last 10 s (plus 10 per second).
    #[arg(long, env = "MICRO_CLIENT_RETRY_BUDGET", default_value_t = DEFAULT_RETRY_BUDGET_PERCENT)]
    pub client_retry_budget: f32,
    /// Seconds between full refreshes of each channel's instances from the registry.
    #[arg(long, env = "MICRO_CLIENT_REFRESH_INTERVAL", default_value_t = DEFAULT_REFRESH_INTERVAL_SECS)]
    pub client_refresh_interval: u64,
    /// Consecutive failures after which an instance is ejected (a refused connection ejects at once).
    #[arg(long, env = "MICRO_CLIENT_EJECT_AFTER", default_value_t = DEFAULT_EJECT_AFTER)]
    pub client_eject_after: u32,
    /// Milliseconds of the first ejection; each further ejection doubles it, up to 30 s.
    #[arg(long, env = "MICRO_CLIENT_EJECT_TIME", default_value_t = DEFAULT_EJECT_TIME_MS)]
    pub client_eject_time: u64,
}

impl ClientConfig {
    /// The settings from flags and environment; `lookup_timeout` comes from the registry's.
    /// Fails when the settings cannot work together ([`ClientConfig::validate`]).
    pub fn from_args(args: ClientArgs, lookup_timeout: Duration) -> Result<Self> {
        let config = ClientConfig {
            strategy: args.client_selector,
            lookup_timeout,
            request_timeout: Duration::from_millis(args.client_request_timeout),
            retries: args.client_retries,
            retry_budget_percent: args.client_retry_budget,
            refresh_interval: Duration::from_secs(args.client_refresh_interval),
            eject_after: args.client_eject_after,
            eject_time: Duration::from_millis(args.client_eject_time),
            ..ClientConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}
