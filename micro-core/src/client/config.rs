//! Client settings: flags and environment ([`ClientArgs`]) and their plain values
//! ([`ClientConfig`]).

use std::time::Duration;

use clap::Args;

use crate::selector::StrategyKind;

/// Default time a call may take, retries included, in milliseconds.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5000;
/// Default number of retries after a first failed attempt.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default retry budget: retries as a percentage of calls over the last 10 s.
pub const DEFAULT_RETRY_BUDGET_PERCENT: f32 = 10.0;
/// Default retries per second always allowed, whatever the budget.
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 10;
/// Default seconds between full refreshes of a channel's instances from the registry.
pub const DEFAULT_REFRESH_INTERVAL_SECS: u64 = 30;
/// Default consecutive failures after which an instance is ejected.
pub const DEFAULT_EJECT_AFTER: u32 = 3;
/// Default first ejection time in milliseconds; it doubles with each ejection, up to 30 s.
pub const DEFAULT_EJECT_TIME_MS: u64 = 1000;
/// Default time to establish a TCP connection to an instance, in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2000;
/// Default first backoff between attempts in milliseconds; it doubles, with full jitter.
pub const DEFAULT_BACKOFF_MS: u64 = 20;

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

/// How a client picks, times out, retries and ejects, as plain values.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The strategy each channel gets an instance of.
    pub strategy: StrategyKind,
    /// How long a call waits for a first instance of its name.
    pub lookup_timeout: Duration,
    /// TCP connect limit per instance.
    pub connect_timeout: Duration,
    /// Deadline of a call, retries included, unless the caller sets a shorter one.
    pub request_timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Retry budget in percent of calls.
    pub retry_budget_percent: f32,
    /// Retries per second always allowed.
    pub min_retries_per_sec: u32,
    /// First backoff; doubles per retry, with full jitter.
    pub backoff: Duration,
    /// Full refresh interval.
    pub refresh_interval: Duration,
    /// Consecutive failures before ejection.
    pub eject_after: u32,
    /// First ejection time.
    pub eject_time: Duration,
    /// TLS to instances when it has a CA; the identity is presented when servers ask.
    pub tls: Option<crate::config::TlsConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            strategy: StrategyKind::RoundRobin,
            lookup_timeout: Duration::from_millis(crate::config::DEFAULT_LOOKUP_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            request_timeout: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
            retries: DEFAULT_RETRIES,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            min_retries_per_sec: DEFAULT_MIN_RETRIES_PER_SEC,
            backoff: Duration::from_millis(DEFAULT_BACKOFF_MS),
            refresh_interval: Duration::from_secs(DEFAULT_REFRESH_INTERVAL_SECS),
            eject_after: DEFAULT_EJECT_AFTER,
            eject_time: Duration::from_millis(DEFAULT_EJECT_TIME_MS),
            tls: None,
        }
    }
}

impl ClientConfig {
    /// The settings from flags and environment; `lookup_timeout` comes from the registry's.
    pub fn from_args(args: ClientArgs, lookup_timeout: Duration) -> Self {
        ClientConfig {
            strategy: args.client_selector,
            lookup_timeout,
            request_timeout: Duration::from_millis(args.client_request_timeout),
            retries: args.client_retries,
            retry_budget_percent: args.client_retry_budget.clamp(0.0, 1000.0),
            refresh_interval: Duration::from_secs(args.client_refresh_interval.max(1)),
            eject_after: args.client_eject_after.max(1),
            eject_time: Duration::from_millis(args.client_eject_time),
            ..ClientConfig::default()
        }
    }
}
