//! Calling services by name: [`Client::channel`] turns a name into a channel that every
//! tonic-generated client accepts. Each call picks an instance with the channel's strategy
//! among those registered, not draining and not ejected; a background task follows the
//! registry (its watch, plus a periodic full refresh) for as long as the channel lives.
//!
//! A failed attempt is retried on another instance, with exponential backoff, full jitter
//! and a retry budget, when that is safe: always when the request never reached a server
//! (its body was never sent: a refused connection), and after sending only for idempotent
//! methods (see [`Client::idempotent_methods`]) or requests carrying an `idempotency-key`
//! header. A non-idempotent call that may have reached a server fails with `UNKNOWN`, naming
//! the instance, and is never sent twice. An instance that fails repeatedly (a refused
//! connection at once) is ejected for a while and tried again later.
//!
//! A call a server refused over its concurrency limit (`RESOURCE_EXHAUSTED` marked with
//! [`crate::server::REFUSED_HEADER`]) never started, so it goes at once to an instance not
//! tried yet, idempotent or not, within the retry budget; the refusing instance looks
//! slower to the latency-aware strategy, more so each time it refuses, so it gets fewer
//! calls. A call every instance refused fails at once with `RESOURCE_EXHAUSTED` saying so,
//! and while a name's instances keep refusing, the channel refuses some calls itself before
//! sending them (adaptive throttling, `MICRO_CLIENT_THROTTLE`), so an overloaded fleet
//! gets no retry storm.
//!
//! Silent failures cost no call either: a connection with calls in flight sends HTTP/2
//! keepalive pings (an idle one never does, as gRFC A8 asks), so a peer that vanished (a
//! dead host, a partition) under a call is known within about three seconds; an
//! idempotent call not answered within the name's recent p95 latency is hedged to another
//! instance; and the default strategy weighs each instance's latency, so a slow one gets
//! few calls. See [`crate::config::ClientConfig`] for every setting.
//!
//! Streams go the same way: an instance is picked when a stream opens, and it is retried
//! or hedged only before its response headers; the call's deadline covers it up to them,
//! and a server stream then runs on unless its whole-stream or idle deadline ends it
//! (`client/stream.rs`). A connection that breaks under a response ends it `UNAVAILABLE`.
//!
//! | concern | file |
//! | --- | --- |
//! | the builder and its channel cache | `client/mod.rs` |
//! | the `tower::Service`, picking | `client/channel.rs` |
//! | one record per instance | `client/endpoints.rs` |
//! | following the registry | `client/follow.rs` |
//! | one call: attempts, retries, hedges | `client/attempt/` (the loop, the set of attempts, refusals) |
//! | failures and the caller's status | `client/failure.rs` |
//! | outlier ejection | `client/outlier.rs` |
//! | latency estimates and the hedge delay | `client/latency.rs` |
//! | deadlines | `client/deadline.rs` |
//! | connections, keepalive | `client/connect.rs` |
//! | request replay | `client/replay.rs` |
//! | adaptive throttling when instances refuse as overloaded | `client/throttle.rs` |
//! | streams after their headers: whole-stream and idle deadlines | `client/stream.rs` |
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{client::Client, config::RegistryConfig, selector::Filter};
//! use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
//!
//! let registry = RegistryConfig::default().connect().await?;
//! let client = Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS);
//! let mut vessels = VesselServiceClient::new(client.channel("vessel-service"));
//! let reply = vessels.find_available(Specification { capacity: 3, max_weight: 55_000 }).await;
//! let v2_only = client.channel_with("vessel-service", Filter::new().version("2"));
//! # Ok(()) }
//! ```

mod attempt;
mod channel;
mod connect;
mod deadline;
mod endpoints;
mod failure;
mod finish;
mod follow;
mod latency;
mod outlier;
mod pool;
mod replay;
mod stream;
mod throttle;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

pub(crate) use self::deadline::{anchor_timers, requested_timeout};
use self::{channel::ChannelCore, follow::follow_registry};
pub use self::{
    channel::{InstanceView, NamedChannel},
    connect::connect_lazily,
    outlier::EjectReason,
    replay::MAX_REPLAY_BYTES,
};
use crate::{
    config::{ClientConfig, TlsConfig},
    registry::Registry,
    selector::{Filter, Strategy},
};

/// The request header that makes any call safe to retry: the server deduplicates by it.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Makes [`NamedChannel`]s over one registry. Cheap to clone; a clone shares its channels
/// until one of its settings changes, and then has channels of its own, so a channel
/// always has the settings of the client that made it.
#[derive(Clone)]
pub struct Client {
    registry: Arc<dyn Registry>,
    config: ClientConfig,
    make_strategy: Option<Arc<dyn Fn() -> Box<dyn Strategy> + Send + Sync>>,
    idempotent: Arc<HashSet<String>>,
    tls: Option<TlsConfig>,
    channels: Arc<Mutex<ChannelCache>>,
}

/// The channels a configured client made, by name and filter. It holds them weakly: a
/// channel, and the task that follows the registry for it, ends with its last clone.
type ChannelCache = HashMap<(String, Filter), Weak<ChannelCore>>;

impl Client {
    /// A client over `registry` with [`ClientConfig::default`].
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Client {
            registry,
            config: ClientConfig::default(),
            make_strategy: None,
            idempotent: Arc::default(),
            tls: None,
            channels: Arc::default(),
        }
    }

    /// Calls instances over TLS when `tls` has a CA, checking that each server's
    /// certificate names the service; presents its identity to servers that ask. Takes
    /// precedence over the config's. Default: plaintext.
    pub fn tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self.reconfigured()
    }

    /// All settings at once, e.g. from `cli::ClientArgs` (which validates them).
    /// Default: [`ClientConfig::default`].
    ///
    /// # Panics
    /// When the settings cannot work ([`ClientConfig::validate`] fails): a mistake in the
    /// code that wrote them, which flags and environment never make.
    pub fn config(mut self, config: ClientConfig) -> Self {
        if let Err(err) = config.validate() {
            panic!("invalid client settings: {err}");
        }
        self.config = config;
        self.reconfigured()
    }

    /// A client with these settings gets a channel cache of its own.
    fn reconfigured(mut self) -> Self {
        self.channels = Arc::default();
        self
    }

    /// A strategy of your own; each new channel gets one from `make`.
    /// Default: the config's [`crate::selector::StrategyKind`] (round robin).
    pub fn strategy<S: Strategy>(mut self, make: impl Fn() -> S + Send + Sync + 'static) -> Self {
        self.make_strategy = Some(Arc::new(move || Box::new(make())));
        self.reconfigured()
    }

    /// gRPC paths (`/package.Service/Method`) safe to retry after the request was sent,
    /// e.g. `proto::IDEMPOTENT_METHODS`. Default: none.
    pub fn idempotent_methods(mut self, paths: &[&str]) -> Self {
        self.idempotent = Arc::new(paths.iter().map(|p| (*p).to_owned()).collect());
        self.reconfigured()
    }

    /// How long a call waits for a first instance of its name. Default: 3 s.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.config.lookup_timeout = timeout;
        self.reconfigured()
    }

    /// Deadline of each call, retries included, unless the caller sets its own
    /// (`tonic::Request::set_timeout`). It covers a call until its response headers: a
    /// server stream then runs on (see `client/stream.rs`). Default: 5 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self.reconfigured()
    }

    /// The TLS this client calls with, if any: the one given to [`Client::tls`], else its
    /// config's.
    pub fn tls_config(&self) -> Option<&TlsConfig> {
        self.tls.as_ref().or(self.config.tls.as_ref())
    }

    /// The registry this client resolves names in.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// A channel to every instance of `name`. Needs a tokio runtime.
    pub fn channel(&self, name: &str) -> NamedChannel {
        self.channel_with(name, Filter::default())
    }

    /// A channel to the instances of `name` that `filter` accepts. Needs a tokio runtime.
    pub fn channel_with(&self, name: &str, filter: Filter) -> NamedChannel {
        let mut channels = self.channels.lock().expect("client channels lock");
        let key = (name.to_owned(), filter);
        if let Some(core) = channels.get(&key).and_then(Weak::upgrade) {
            return NamedChannel { core };
        }
        channels.retain(|_, core| core.strong_count() > 0);
        let channel = self.new_channel(name, key.1.clone());
        channels.insert(key, Arc::downgrade(&channel.core));
        channel
    }

    fn new_channel(&self, name: &str, filter: Filter) -> NamedChannel {
        let (strategy, strategy_name) = match &self.make_strategy {
            Some(make) => (make(), "custom".to_owned()),
            None => (self.config.strategy.build(), self.config.strategy.to_string()),
        };
        let mut config = self.config.clone();
        if self.tls.is_some() {
            config.tls = self.tls.clone();
        }
        let kind = self.registry.kind().to_string();
        let core = Arc::new(ChannelCore::new(
            name,
            kind,
            filter,
            strategy,
            strategy_name,
            config,
            self.idempotent.clone(),
        ));
        core.spawn(follow_registry(Arc::downgrade(&core), self.registry.clone()));
        NamedChannel { core }
    }
}

#[cfg(test)]
mod tests;
