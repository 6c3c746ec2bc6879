//! `micro gateway`: HTTP/JSON in front of every registered service. `POST
//! /{service}/{package.Service}/{Method}` with a JSON body becomes a unary gRPC call through
//! the SDK client (balancing, retries, hedging, ejection and deadlines apply), with the
//! message types learned from the service's server reflection; the reply comes back as
//! JSON (proto3 JSON mapping).
//!
//! | concern | file |
//! | --- | --- |
//! | flags, start and stop | `gateway/mod.rs` |
//! | routes, CORS | `gateway/routes.rs` |
//! | reflection cache per service, refreshed on registry changes | `gateway/reflection.rs` |
//! | JSON and headers to a call and back, schemas | `gateway/transcode.rs` |
//! | gRPC code to HTTP status, the error body | `gateway/status.rs` |
//! | server-streaming methods as server-sent events or NDJSON | `gateway/stream.rs` |
//! | Prometheus metrics | `gateway/metrics.rs` |
//! | rate limits per client address and per route, `429` with `Retry-After` | `gateway/ratelimit.rs` |
//! | the dashboard at `/ui` and its page | `gateway/dashboard.rs`, `gateway/page.html` |
//! | per-method figures from the instances' metrics | `gateway/method_stats.rs` |
//! | bearer JWTs, API keys, the policy on subjects, `401`/`403` | `gateway/auth/` |
//!
//! # Examples
//! ```sh
//! micro gateway --address 127.0.0.1:8080 &
//! curl -s localhost:8080/vessel-service/vessel.VesselService/FindAvailable \
//!      -d '{"capacity": 3, "maxWeight": 55000}'
//! ```

mod auth;
mod dashboard;
mod method_stats;
mod metrics;
mod ratelimit;
mod reflection;
mod routes;
mod status;
mod stream;
mod transcode;

use std::{net::SocketAddr, sync::Arc};

use http::HeaderValue;
use micro_core::{Client, config::TlsConfig};

use crate::exit::Failure;
use reflection::ReflectionCache;

/// Where the gateway listens unless `--address` or `MICRO_GATEWAY_ADDRESS` says otherwise.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8080";
/// The largest request body, in bytes, unless `--max-body` says otherwise.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The gateway's own flags; the registry, client and TLS flags are `micro`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address to serve HTTP/1.1 and cleartext HTTP/2 on.
    #[arg(long, env = "MICRO_GATEWAY_ADDRESS", default_value = DEFAULT_ADDRESS)]
    pub address: SocketAddr,
    /// Largest request body in bytes; a larger one is answered 413.
    #[arg(long, env = "MICRO_GATEWAY_MAX_BODY", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body: usize,
    /// Let pages from this origin (`*`: any) call the gateway (CORS); off when unset.
    #[arg(long, env = "MICRO_GATEWAY_CORS_ORIGIN")]
    pub cors_origin: Option<String>,
    /// Calls per second each client address may make (a token bucket; 429 with Retry-After
    /// beyond it); 0 turns the limit off.
    #[arg(long, env = "MICRO_GATEWAY_RATE_LIMIT", default_value_t = DEFAULT_RATE_LIMIT)]
    pub rate_limit: f64,
    /// Calls a client may make at once above its rate; 0 is one second's worth.
    #[arg(long, env = "MICRO_GATEWAY_RATE_BURST", default_value_t = DEFAULT_RATE_BURST)]
    pub rate_burst: u32,
    /// Calls per second of single routes, all clients together,
    /// `service/package.Service/Method=N`, comma-separated or repeated.
    #[arg(long, env = "MICRO_GATEWAY_ROUTE_RATE_LIMITS", value_delimiter = ',', value_parser = ratelimit::parse_route_limit)]
    pub route_rate_limits: Vec<(String, f64)>,
    /// Authentication and authorization.
    #[command(flatten)]
    pub auth: auth::AuthArgs,
}

/// Calls per second per client address unless `--rate-limit` says otherwise: off.
pub const DEFAULT_RATE_LIMIT: f64 = 0.0;
/// A client's burst unless `--rate-burst` says otherwise: one second's worth.
pub const DEFAULT_RATE_BURST: u32 = 0;

/// What every route shares.
pub struct Gateway {
    cache: ReflectionCache,
    max_body: usize,
    cors_origin: Option<HeaderValue>,
    /// TLS for the dashboard's health probes, as the client calls.
    tls: Option<TlsConfig>,
    /// Rate limits of calls.
    limits: Arc<ratelimit::RateLimits>,
    health: dashboard::HealthCache,
    /// The instances' last scrapes, for the dashboard's per-method figures.
    methods: method_stats::MethodStats,
    /// Who may call, and what.
    auth: Arc<auth::Authenticator>,
    /// Turns true when the gateway shuts down, so open streams end (`UNAVAILABLE`) and the
    /// graceful shutdown does not wait on them for ever.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// Serves until SIGINT or SIGTERM, then finishes the requests in flight.
pub async fn run(args: GatewayArgs, client: Client, tls: Option<TlsConfig>) -> Result<(), Failure> {
    let cors_origin = args
        .cors_origin
        .as_deref()
        .map(|origin| {
            HeaderValue::from_str(origin)
                .map_err(|_| Failure::Other(format!("--cors-origin {origin:?}: not a header value")))
        })
        .transpose()?;
    if !(args.rate_limit >= 0.0 && args.rate_limit.is_finite()) {
        return Err(Failure::Other(format!(
            "--rate-limit {} (MICRO_GATEWAY_RATE_LIMIT): expected calls per second, 0 for none",
            args.rate_limit
        )));
    }
    let client_rate = (args.rate_limit > 0.0).then(|| ratelimit::Rate::new(args.rate_limit, args.rate_burst));
    let route_rates: Vec<(String, ratelimit::Rate)> = args
        .route_rate_limits
        .iter()
        .map(|(route, rate)| (route.clone(), ratelimit::Rate::new(*rate, args.rate_burst)))
        .collect();
    let authenticator = auth::Authenticator::new(&args.auth)?;
    authenticator.check_address(args.address, args.auth.insecure)?;
    let (stop_streams, stopping) = tokio::sync::watch::channel(false);
    let gateway = Arc::new(Gateway {
        cache: ReflectionCache::new(client),
        max_body: args.max_body,
        cors_origin,
        tls,
        health: dashboard::HealthCache::default(),
        methods: method_stats::MethodStats::default(),
        limits: Arc::new(ratelimit::RateLimits::new(client_rate, &route_rates)),
        auth: Arc::new(authenticator),
        stopping,
    });
    let listener = tokio::net::TcpListener::bind(args.address).await.map_err(|err| {
        Failure::Other(format!("gateway address {} (MICRO_GATEWAY_ADDRESS): {err}", args.address))
    })?;
    let address = listener.local_addr().map_err(|err| Failure::Other(err.to_string()))?;
    tracing::info!(%address, cors = gateway.cors_origin.is_some(), max_body = args.max_body,
        rate_limit = args.rate_limit, route_limits = route_rates.len(),
        authenticates = gateway.auth.authenticates(), "gateway listening");
    crate::out::line(format!("micro gateway on http://{address}/ (dashboard: http://{address}/ui)"));
    // The client's address keys its rate limit.
    axum::serve(listener, routes::router(gateway).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown(stop_streams))
        .await
        .map_err(|err| Failure::Other(format!("gateway: {err}")))?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM, then ends the open streams.
async fn shutdown(stop_streams: tokio::sync::watch::Sender<bool>) {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stop_streams.send_replace(true);
}
