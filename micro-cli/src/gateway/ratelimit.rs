//! Rate limits: token buckets per client address and per route, off unless set. A call over
//! its client's rate or its route's is answered `429 Too Many Requests` at once, with
//! `Retry-After` (whole seconds until a token is back) and the gRPC-style error body
//! (`RESOURCE_EXHAUSTED`), without reaching the service.
//!
//! A client is its address (the gateway does not authenticate callers yet). At most
//! [`MAX_CLIENTS`] client buckets are kept: when full, the buckets that have refilled (a
//! full bucket is the same as a new one) are dropped; should every one still be in use, the
//! clients beyond share one bucket of their own, so no number of addresses grows the
//! gateway's memory, and a flood from many addresses is held to one client's rate.
//!
//! # Examples
//! ```sh
//! # 20 calls per second per client address (bursts of 40), FindAvailable 100 per second in all
//! micro gateway --rate-limit 20 --rate-burst 40 \
//!   --route-rate-limits vessel-service/vessel.VesselService/FindAvailable=100
//! ```

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{HeaderMap, HeaderValue, header};
use tokio::time::Instant;
use tonic::Code;

use super::{metrics, status::GatewayError};

/// The most client buckets kept at once.
pub const MAX_CLIENTS: usize = 10_000;
/// The least time between two sweeps for refilled buckets, so a flood of new addresses
/// costs one sweep a second, not one per address.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A sustained rate and the burst above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// The most tokens a bucket holds.
    pub burst: f64,
}

impl Rate {
    /// `per_second` with a burst of `burst` calls, or one second's worth when `burst` is 0.
    pub fn new(per_second: f64, burst: u32) -> Self {
        let burst = if burst == 0 { per_second.ceil().max(1.0) } else { f64::from(burst) };
        Rate { per_second, burst }
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Bucket { tokens: rate.burst, updated: now }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
    }

    /// Takes a token, or says how long until one is back.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / rate.per_second))
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut refilled = *self;
        refilled.refill(rate, now);
        refilled.tokens >= rate.burst
    }
}

/// Every limit of one gateway.
pub struct RateLimits {
    client: Option<Rate>,
    clients: Mutex<Clients>,
    /// Per route (`service/package.Service/Method`, from the settings: a bounded set).
    routes: HashMap<String, (Rate, Mutex<Bucket>)>,
}

struct Clients {
    buckets: HashMap<IpAddr, Bucket>,
    last_sweep: Option<Instant>,
    /// Shared by the clients that found no room.
    overflow: Bucket,
}

/// Why a call was refused, and when to try again.
#[derive(Debug)]
pub struct Limited {
    /// What limit: `client 127.0.0.1` or `route ...`.
    pub what: String,
    /// The limit's rate per second.
    pub per_second: f64,
    /// How long until the limit lets a call through again.
    pub retry_after: Duration,
}

impl RateLimits {
    /// `client` for each client address (none: no limit), `routes` for single routes.
    pub fn new(client: Option<Rate>, routes: &[(String, Rate)]) -> Self {
        let now = Instant::now();
        RateLimits {
            client,
            clients: Mutex::new(Clients {
                buckets: HashMap::new(),
                last_sweep: None,
                overflow: Bucket::full(client.unwrap_or(Rate::new(1.0, 1)), now),
            }),
            routes: routes
                .iter()
                .map(|(route, rate)| (route.clone(), (*rate, Mutex::new(Bucket::full(*rate, now)))))
                .collect(),
        }
    }

    /// How many client buckets are kept now.
    #[cfg(test)]
    pub fn clients_held(&self) -> usize {
        self.clients.lock().expect("rate limit lock").buckets.len()
    }

    /// Takes a token for a call from `client` to `route` (`service/package.Service/Method`).
    pub fn check(&self, client: IpAddr, route: &str, now: Instant) -> Result<(), Limited> {
        if let Some(rate) = self.client {
            let mut clients = self.clients.lock().expect("rate limit lock");
            let clients = &mut *clients;
            let due =
                clients.last_sweep.is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_EVERY);
            if due && clients.buckets.len() >= MAX_CLIENTS && !clients.buckets.contains_key(&client) {
                clients.buckets.retain(|_, bucket| !bucket.is_full(rate, now));
                clients.last_sweep = Some(now);
            }
            let bucket = match clients.buckets.len() < MAX_CLIENTS || clients.buckets.contains_key(&client) {
                true => clients.buckets.entry(client).or_insert_with(|| Bucket::full(rate, now)),
                false => &mut clients.overflow,
            };
            bucket.take(rate, now).map_err(|retry_after| Limited {
                what: format!("client {client}"),
                per_second: rate.per_second,
                retry_after,
            })?;
        }
        if let Some((rate, bucket)) = self.routes.get(route) {
            bucket.lock().expect("rate limit lock").take(*rate, now).map_err(|retry_after| Limited {
                what: format!("route {route}"),
                per_second: rate.per_second,
                retry_after,
            })?;
        }
        Ok(())
    }
}

impl Limited {
    /// `429` with `Retry-After` in whole seconds (at least 1) and the error body.
    fn into_response(self) -> Response {
        let seconds = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        let message = format!(
            "rate limit of {} exceeded ({} calls per second): retry after {seconds} s \
             (MICRO_GATEWAY_RATE_LIMIT, MICRO_GATEWAY_ROUTE_RATE_LIMITS)",
            self.what, self.per_second
        );
        GatewayError { headers: Box::new(headers), ..GatewayError::new(Code::ResourceExhausted, message) }
            .into_response()
    }
}

/// The middleware in front of calls: refuses one over its limits before it is read.
pub async fn limit(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(address)| address.ip());
    let route = request.uri().path().trim_start_matches('/').to_owned();
    match limits.check(client, &route, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(limited) => {
            tracing::debug!(%client, limit = %limited.what, "rate limited");
            let response = limited.into_response();
            metrics::record(metrics::OTHER, metrics::OTHER, response.status().as_u16(), 0.0);
            response
        }
    }
}

/// Parses `service/package.Service/Method=N` (calls per second).
pub fn parse_route_limit(text: &str) -> Result<(String, f64), String> {
    let parsed = text.rsplit_once('=').and_then(|(route, rate)| {
        let rate: f64 = rate.parse().ok().filter(|r: &f64| *r > 0.0 && r.is_finite())?;
        (route.split('/').count() == 3 && !route.split('/').any(str::is_empty))
            .then(|| (route.to_owned(), rate))
    });
    parsed
        .ok_or_else(|| format!("expected service/package.Service/Method=N (calls per second), got {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_rate_waits_while_another_is_served() {
        let limits = RateLimits::new(Some(Rate::new(2.0, 2)), &[]);
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
        let now = Instant::now();
        assert!(limits.check(a, "s/p.S/M", now).is_ok());
        assert!(limits.check(a, "s/p.S/M", now).is_ok());
        let limited = limits.check(a, "s/p.S/M", now).unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_millis(500));
        assert!(limits.check(b, "s/p.S/M", now).is_ok());
        assert!(limits.check(a, "s/p.S/M", now + Duration::from_millis(500)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_limit_holds_every_client_together() {
        let limits = RateLimits::new(None, &[("s/p.S/M".into(), Rate::new(1.0, 0))]);
        let now = Instant::now();
        assert!(limits.check(IpAddr::from([127, 0, 0, 1]), "s/p.S/M", now).is_ok());
        let limited = limits.check(IpAddr::from([127, 0, 0, 2]), "s/p.S/M", now).unwrap_err();
        assert!(limited.what.contains("route s/p.S/M"), "{limited:?}");
        assert!(limits.check(IpAddr::from([127, 0, 0, 2]), "s/p.S/Other", now).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_thousand_client_addresses_keep_the_state_bounded() {
        let limits = RateLimits::new(Some(Rate::new(10.0, 10)), &[]);
        let now = Instant::now();
        for i in 0..100_000u32 {
            let client = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = limits.check(client, "s/p.S/M", now);
        }
        assert_eq!(limits.clients_held(), MAX_CLIENTS);
        // Once their buckets have refilled, newcomers take their places.
        let later = now + Duration::from_secs(2);
        assert!(limits.check(IpAddr::from([11, 0, 0, 1]), "s/p.S/M", later).is_ok());
        for i in 0..100_000u32 {
            let _ = limits.check(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), "s/p.S/M", later);
        }
        assert_eq!(limits.clients_held(), MAX_CLIENTS);
    }

    #[test]
    fn route_limits_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_route_limit("vessel-service/vessel.VesselService/FindAvailable=5").unwrap().1, 5.0);
        assert!(parse_route_limit("FindAvailable=5").unwrap_err().contains("service/package.Service/Method"));
        assert!(parse_route_limit("a/b.C/D=0").is_err());
    }
}
