//! What the gateway knows of each service: a channel through the SDK client and the
//! descriptors its instances serve, learned by server reflection and fetched again after
//! the registry reports a change of its instances.
//!
//! The cache is bounded: it holds only names the registry lists (a name from a request
//! that the registry does not list creates nothing), at most [`MAX_SERVICES`] of them, and
//! drops a name's entry, with its registry watch, once the registry no longer lists it.
//!
//! The registry is listed at most once per [`LISTING_TTL`], one listing at a time, however
//! many requests come: names not held are answered from that listing, so a flood of
//! requests for made-up names costs the registry a few listings a second (on Consul each
//! is 1 + N HTTP queries), not one per request. A service registered within the last
//! [`LISTING_TTL`] may be answered 404 until the next listing.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use micro_core::{Client, NamedChannel, Registry};
use prost_reflect::{DescriptorPool, MethodDescriptor, ServiceDescriptor};
use tokio::task::JoinHandle;
use tonic::Code;

use super::status::GatewayError;
use crate::dynamic;

/// The most services the cache holds; beyond it the least recently used entry goes.
pub const MAX_SERVICES: usize = 512;
/// How long one registry listing (or its failure) answers for every name not held.
pub const LISTING_TTL: Duration = Duration::from_millis(500);

/// The gRPC API one registered service offers.
#[derive(Debug)]
pub struct Api {
    /// Its gRPC services (`package.Service`), in the order reflection listed them.
    pub services: Vec<ServiceDescriptor>,
}

impl Api {
    /// The method at `package.Service/Method`.
    pub fn method(&self, grpc_service: &str, method: &str) -> Option<MethodDescriptor> {
        self.services.iter().find(|s| s.full_name() == grpc_service)?.methods().find(|m| m.name() == method)
    }

    /// Every method's path, `package.Service/Method`.
    pub fn method_paths(&self) -> Vec<String> {
        self.services
            .iter()
            .flat_map(|s| s.methods())
            .map(|m| format!("{}/{}", m.parent_service().full_name(), m.name()))
            .collect()
    }
}

/// One registered service: its channel, its API once fetched, and the watch that marks
/// the API stale when instances change.
pub struct Entry {
    /// The SDK channel calls go through (balancing, retries, hedging, ejection).
    pub channel: NamedChannel,
    /// Bumped on every registry change of the name.
    generation: Arc<AtomicU64>,
    /// The API and the generation it was fetched at: read by every call without waiting.
    api: std::sync::Mutex<Option<(u64, Arc<Api>)>>,
    /// Held while the API is fetched, so concurrent calls wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
    /// When it was last used, for eviction.
    used: AtomicU64,
    watch: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl Entry {
    /// The service's API, fetched by reflection unless known since the last change of
    /// its instances.
    pub async fn api(&self) -> Result<Arc<Api>, GatewayError> {
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(known) = self.known(generation) {
            return Ok(known);
        }
        let _fetching = self.fetching.lock().await;
        // Another call may have fetched it meanwhile.
        if let Some(known) = self.known(generation) {
            return Ok(known);
        }
        let fetched = Arc::new(fetch(self.channel.clone()).await?);
        tracing::debug!(service = %self.channel.name(), generation, "reflection refreshed");
        *self.api.lock().expect("api lock") = Some((generation, fetched.clone()));
        Ok(fetched)
    }

    /// The API, when it was fetched at `generation`.
    fn known(&self, generation: u64) -> Option<Arc<Api>> {
        match self.api.lock().expect("api lock").as_ref() {
            Some((seen, known)) if *seen == generation => Some(known.clone()),
            _ => None,
        }
    }
}

async fn fetch(channel: NamedChannel) -> Result<Api, GatewayError> {
    let names = dynamic::list_services(channel.clone()).await?;
    if names.is_empty() {
        return Ok(Api { services: Vec::new() });
    }
    let pool: DescriptorPool = dynamic::descriptors(channel, &names).await?;
    let services = names.iter().filter_map(|n| pool.get_service_by_name(n)).collect();
    Ok(Api { services })
}

/// What the last registry listing gave: the names, or why it failed.
type Listing = Result<Arc<Vec<String>>, (Code, String)>;

/// Entries by registered name.
pub struct ReflectionCache {
    client: Client,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    clock: AtomicU64,
    /// The last listing and when it was taken; held while a listing runs, so only one does.
    listing: tokio::sync::Mutex<Option<(Instant, Listing)>>,
}

impl ReflectionCache {
    /// An empty cache whose channels come from `client`.
    pub fn new(client: Client) -> Self {
        ReflectionCache {
            client,
            entries: Mutex::default(),
            clock: AtomicU64::new(0),
            listing: tokio::sync::Mutex::new(None),
        }
    }

    /// The registry names are looked up in.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        self.client.registry()
    }

    /// The names the registry lists, as of a listing at most [`LISTING_TTL`] old; entries
    /// of names it no longer lists are dropped when a new listing comes.
    pub async fn list(&self) -> Result<Arc<Vec<String>>, GatewayError> {
        let mut listing = self.listing.lock().await;
        let fresh = listing.as_ref().filter(|(at, _)| at.elapsed() < LISTING_TTL);
        let answer = match fresh {
            Some((_, answer)) => answer.clone(),
            None => {
                let answer = self.list_registry().await;
                if let Ok(names) = &answer {
                    self.entries.lock().expect("cache lock").retain(|name, _| names.contains(name));
                }
                *listing = Some((Instant::now(), answer.clone()));
                answer
            }
        };
        answer.map_err(|(code, message)| GatewayError::new(code, message))
    }

    async fn list_registry(&self) -> Listing {
        let registry = self.registry();
        let names = registry.list_services().await.map_err(|err| {
            let message = format!(
                "registry {} at {}: {}",
                registry.kind(),
                registry.address(),
                micro_core::error::error_chain(&err)
            );
            (Code::Unavailable, message)
        })?;
        Ok(Arc::new(names))
    }

    /// The entry of `name`, made if the registry lists it; otherwise 404 naming what the
    /// registry lists.
    pub async fn entry(&self, name: &str) -> Result<Arc<Entry>, GatewayError> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.entries.lock().expect("cache lock").get(name) {
            entry.used.store(now, Ordering::Relaxed);
            return Ok(entry.clone());
        }
        let names = self.list().await?;
        if !names.iter().any(|n| n == name) {
            return Err(unknown_service(self.registry().kind().as_str(), name, &names));
        }
        let mut entries = self.entries.lock().expect("cache lock");
        if let Some(entry) = entries.get(name) {
            return Ok(entry.clone());
        }
        if entries.len() >= MAX_SERVICES
            && let Some(oldest) =
                entries.iter().min_by_key(|(_, e)| e.used.load(Ordering::Relaxed)).map(|(n, _)| n.clone())
        {
            entries.remove(&oldest);
        }
        let entry = Arc::new(self.new_entry(name, now));
        entries.insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// The entries held now, by name.
    pub fn held(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    fn new_entry(&self, name: &str, now: u64) -> Entry {
        let generation = Arc::new(AtomicU64::new(0));
        let mut changes = self.registry().watch(name);
        let bumped = generation.clone();
        let service = name.to_owned();
        let watch = tokio::spawn(async move {
            while let Some(change) = changes.next().await {
                if let Err(err) = change {
                    tracing::warn!(%service, error = %err, "registry watch failed; reflection is fetched again");
                }
                bumped.fetch_add(1, Ordering::SeqCst);
            }
        });
        Entry {
            channel: self.client.channel(name),
            generation,
            api: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            used: AtomicU64::new(now),
            watch,
        }
    }
}

/// 404 for a name the registry does not list, with the closest name and what it lists.
pub fn unknown_service(registry: &str, name: &str, names: &[String]) -> GatewayError {
    let near =
        crate::lookup::suggestion(name, names).map(|n| format!("did you mean {n}? ")).unwrap_or_default();
    let listed = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
    GatewayError::new(
        Code::NotFound,
        format!("no service named {name:?} in registry {registry}; {near}registered services: {listed}"),
    )
}

/// 404 for a method `api` does not have, listing the ones it has.
pub fn unknown_method(service: &str, path: &str, api: &Api) -> GatewayError {
    let paths = api.method_paths();
    let known = if paths.is_empty() { "none".to_owned() } else { paths.join(", ") };
    GatewayError::new(Code::NotFound, format!("{service} has no method {path}; its methods: {known}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use e2e::consul::ConsulAgent;
    use futures::stream::BoxStream;
    use micro_core::{
        Node,
        config::{RegistryConfig, RegistryKind},
        registry::{Change, NodeId},
    };

    use super::*;

    /// A registry that counts the listings asked of the one it wraps.
    struct CountingListings {
        inner: Arc<dyn Registry>,
        listings: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Registry for CountingListings {
        fn kind(&self) -> RegistryKind {
            self.inner.kind()
        }
        fn address(&self) -> String {
            self.inner.address()
        }
        async fn register(&self, node: &Node, ttl: Duration) -> micro_core::Result<()> {
            self.inner.register(node, ttl).await
        }
        async fn deregister(&self, node: &Node) -> micro_core::Result<()> {
            self.inner.deregister(node).await
        }
        async fn lookup(&self, name: &str) -> micro_core::Result<Vec<Node>> {
            self.inner.lookup(name).await
        }
        async fn list_services(&self) -> micro_core::Result<Vec<String>> {
            self.listings.fetch_add(1, Ordering::SeqCst);
            self.inner.list_services().await
        }
        fn watch(&self, name: &str) -> BoxStream<'static, micro_core::Result<Change<NodeId, Node>>> {
            self.inner.watch(name)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_for_made_up_names_cost_consul_a_few_listings_a_second() {
        let agent = ConsulAgent::start_async().await;
        let config = RegistryConfig {
            kind: RegistryKind::Consul,
            address: Some(agent.http_address()),
            ..RegistryConfig::default()
        };
        let consul = config.connect().await.expect("the consul agent");
        let vessel = Node::new("vessel-service", "127.0.0.1:50051".parse().unwrap());
        consul.register(&vessel, Duration::from_secs(30)).await.unwrap();
        let counting = Arc::new(CountingListings { inner: consul, listings: AtomicUsize::new(0) });
        let cache = Arc::new(ReflectionCache::new(Client::new(counting.clone())));

        let started = Instant::now();
        futures::stream::iter(0..10_000)
            .for_each_concurrent(64, |i| {
                let cache = cache.clone();
                async move {
                    let err = cache.entry(&format!("made-up-{i}")).await.err().expect("an unknown name");
                    assert_eq!(err.code, Code::NotFound, "{}", err.message);
                    assert!(err.message.contains("vessel-service"), "{}", err.message);
                }
            })
            .await;
        let elapsed = started.elapsed();
        let listings = counting.listings.load(Ordering::SeqCst);
        eprintln!("{listings} registry listings for 10,000 made-up names in {elapsed:?}");
        // One listing per LISTING_TTL at most, plus the first.
        let allowed = (elapsed.as_secs_f64() / LISTING_TTL.as_secs_f64()).ceil() as usize + 1;
        assert!(listings <= allowed, "{listings} listings in {elapsed:?}; at most {allowed}");
        assert_eq!(cache.held(), 0, "made-up names create no entries");
        assert!(cache.entry("vessel-service").await.is_ok(), "a listed name is still found");

        // The listing is refreshed, not kept for good: a name registered since is found
        // once the next listing comes.
        let late = Node::new("late-service", "127.0.0.1:50052".parse().unwrap());
        counting.register(&late, Duration::from_secs(30)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache.entry("late-service").await.is_err() {
            assert!(Instant::now() < deadline, "a service registered later is never found");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (listings, elapsed) = (counting.listings.load(Ordering::SeqCst), started.elapsed());
        let allowed = (elapsed.as_secs_f64() / LISTING_TTL.as_secs_f64()).ceil() as usize + 1;
        assert!(listings <= allowed, "{listings} listings in {elapsed:?}; at most {allowed}");
    }
}
