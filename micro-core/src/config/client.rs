//! How a client picks, times out, retries and ejects, as plain values.

use std::time::Duration;

use super::TlsConfig;
use crate::{Error, Result, selector::StrategyKind};

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
/// Default interval of HTTP/2 keepalive pings on a connection with calls in flight, in
/// milliseconds (an idle connection is never pinged). A gRPC server counts a ping as a
/// strike when it sent nothing since the previous one and closes the connection at the
/// third: at this interval that takes a call silent for over 6 s, longer than the default
/// deadline ([`DEFAULT_REQUEST_TIMEOUT_MS`]).
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 2000;
const _: () = assert!(
    3 * DEFAULT_KEEPALIVE_INTERVAL_MS > DEFAULT_REQUEST_TIMEOUT_MS,
    "three pings within the default deadline would close connections to gRPC servers"
);
/// Default time a keepalive ping may go unanswered before the connection is closed as
/// dead, in milliseconds: a vanished peer is known within interval + timeout.
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 1000;
/// HTTP/2 connections a channel may open to one instance, as its calls in flight grow.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// The most connections per instance a client may be set to.
pub const MAX_CONNECTIONS: usize = 64;
/// Default `K` of the client's adaptive throttling: a name's calls are refused locally
/// with the probability `(requests - K * accepts) / (requests + 1)` once its instances
/// refuse more than half of them as overloaded.
pub const DEFAULT_THROTTLE_RATIO: f64 = 2.0;
/// The recent latency quantile of a name after which an idempotent call is hedged.
pub const HEDGE_QUANTILE: f64 = 0.95;
/// The shortest adaptive hedge delay, in milliseconds: below it, hedges would chase noise.
pub const DEFAULT_HEDGE_MIN_DELAY_MS: u64 = 20;
/// The longest adaptive hedge delay, in milliseconds; also the delay before a name has a
/// latency history.
pub const DEFAULT_HEDGE_MAX_DELAY_MS: u64 = 500;

/// When an idempotent call that has not answered yet is sent to a second instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hedge {
    /// Never.
    Off,
    /// After the name's recent p95 latency ([`HEDGE_QUANTILE`]), kept between `min` and
    /// `max`.
    Adaptive {
        /// The shortest delay.
        min: Duration,
        /// The longest delay, and the delay before the name has a latency history.
        max: Duration,
    },
    /// After this fixed delay.
    After(Duration),
}

impl Default for Hedge {
    fn default() -> Self {
        Hedge::Adaptive {
            min: Duration::from_millis(DEFAULT_HEDGE_MIN_DELAY_MS),
            max: Duration::from_millis(DEFAULT_HEDGE_MAX_DELAY_MS),
        }
    }
}

impl std::fmt::Display for Hedge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hedge::Off => f.write_str("off"),
            Hedge::Adaptive { min, max } => write!(f, "adaptive (p95, {min:?} to {max:?})"),
            Hedge::After(delay) => write!(f, "after {delay:?}"),
        }
    }
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
    /// HTTP/2 keepalive ping interval on a connection with calls in flight (idle ones are
    /// never pinged); zero turns keepalive off.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// HTTP/2 connections per instance at most: one at first, another whenever every open
    /// one carries 8 attempts (see `client/pool.rs`).
    pub connections: usize,
    /// When idempotent calls are hedged.
    pub hedge: Hedge,
    /// Deadline of a call, retries included, unless the caller sets its own; it covers a
    /// call until its response headers arrive.
    pub request_timeout: Duration,
    /// The longest a server or bidirectional stream may run after its headers; zero: as
    /// long as it lasts.
    pub stream_timeout: Duration,
    /// The longest a stream may go without a message after its headers; zero: no limit.
    pub stream_idle_timeout: Duration,
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
    pub tls: Option<TlsConfig>,
    /// `K` of the adaptive throttling per name (see `client/throttle.rs`); 0 turns it off.
    pub throttle_ratio: f64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            strategy: StrategyKind::default(),
            lookup_timeout: Duration::from_millis(super::DEFAULT_LOOKUP_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            keepalive_interval: Duration::from_millis(DEFAULT_KEEPALIVE_INTERVAL_MS),
            keepalive_timeout: Duration::from_millis(DEFAULT_KEEPALIVE_TIMEOUT_MS),
            connections: DEFAULT_CONNECTIONS,
            hedge: Hedge::default(),
            request_timeout: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
            stream_timeout: Duration::ZERO,
            stream_idle_timeout: Duration::ZERO,
            retries: DEFAULT_RETRIES,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            min_retries_per_sec: DEFAULT_MIN_RETRIES_PER_SEC,
            backoff: Duration::from_millis(DEFAULT_BACKOFF_MS),
            refresh_interval: Duration::from_secs(DEFAULT_REFRESH_INTERVAL_SECS),
            eject_after: DEFAULT_EJECT_AFTER,
            eject_time: Duration::from_millis(DEFAULT_EJECT_TIME_MS),
            tls: None,
            throttle_ratio: DEFAULT_THROTTLE_RATIO,
        }
    }
}

impl ClientConfig {
    /// Checks settings that cannot work: at least one failure before an ejection, a
    /// deadline and refresh interval above zero, a retry budget from 0 to 1000 percent.
    /// [`crate::Client::config`] checks this.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |setting: &str, value: String, why: &str| Err(Error::invalid(format!("{setting}={value}"), why));
        if self.eject_after == 0 {
            return invalid("MICRO_CLIENT_EJECT_AFTER", "0".into(), "must be at least 1");
        }
        if self.request_timeout.is_zero() {
            return invalid("MICRO_CLIENT_REQUEST_TIMEOUT", "0".into(), "must be above zero");
        }
        if self.connect_timeout.is_zero() {
            return invalid("MICRO_CLIENT_CONNECT_TIMEOUT", "0".into(), "must be above zero");
        }
        if !self.keepalive_interval.is_zero() && self.keepalive_timeout.is_zero() {
            return invalid(
                "MICRO_CLIENT_KEEPALIVE_TIMEOUT",
                "0".into(),
                "must be above zero while keepalive is on",
            );
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return invalid(
                "MICRO_CLIENT_CONNECTIONS",
                self.connections.to_string(),
                &format!("must be from 1 to {MAX_CONNECTIONS}"),
            );
        }
        if let Hedge::Adaptive { min, max } = self.hedge
            && min > max
        {
            return invalid(
                "hedge delay",
                format!("{min:?} to {max:?}"),
                "the shortest must not exceed the longest",
            );
        }
        if self.refresh_interval.is_zero() {
            return invalid("MICRO_CLIENT_REFRESH_INTERVAL", "0".into(), "must be above zero");
        }
        if !(0.0..=1000.0).contains(&self.retry_budget_percent) {
            return invalid(
                "MICRO_CLIENT_RETRY_BUDGET",
                self.retry_budget_percent.to_string(),
                "must be a percentage from 0 to 1000",
            );
        }
        if self.throttle_ratio != 0.0 && !(self.throttle_ratio >= 1.0 && self.throttle_ratio.is_finite()) {
            return invalid(
                "MICRO_CLIENT_THROTTLE",
                self.throttle_ratio.to_string(),
                "must be off (0) or at least 1: below 1 it would refuse calls no server refused",
            );
        }
        Ok(())
    }
}
