//! What the gateway knows of each service: a channel through the SDK client and the
//! descriptors its instances serve, learned by server reflection and fetched again after
//! the registry reports a change of its instances.
//!
//! The cache is bounded: it holds only names the registry lists (a name from a request
//! that the registry does not list creates nothing), at most [`MAX_SERVICES`] of them, and
//! drops a name's entry, with its registry watch, once the registry no longer lists it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
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
    /// The API and the generation it was fetched at.
    api: tokio::sync::Mutex<Option<(u64, Arc<Api>)>>,
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
        let mut api = self.api.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some((seen, known)) = api.as_ref()
            && *seen == generation
        {
            return Ok(known.clone());
        }
        let fetched = Arc::new(fetch(self.channel.clone()).await?);
        tracing::debug!(service = %self.channel.name(), generation, "reflection refreshed");
        *api = Some((generation, fetched.clone()));
        Ok(fetched)
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

/// Entries by registered name.
pub struct ReflectionCache {
    client: Client,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    clock: AtomicU64,
}

impl ReflectionCache {
    /// An empty cache whose channels come from `client`.
    pub fn new(client: Client) -> Self {
        ReflectionCache { client, entries: Mutex::default(), clock: AtomicU64::new(0) }
    }

    /// The registry names are looked up in.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        self.client.registry()
    }

    /// The names the registry lists; entries of names it no longer lists are dropped.
    pub async fn list(&self) -> Result<Vec<String>, GatewayError> {
        let registry = self.registry();
        let names = registry.list_services().await.map_err(|err| {
            GatewayError::new(
                Code::Unavailable,
                format!(
                    "registry {} at {}: {}",
                    registry.kind(),
                    registry.address(),
                    micro_core::error::error_chain(&err)
                ),
            )
        })?;
        self.entries.lock().expect("cache lock").retain(|name, _| names.contains(name));
        Ok(names)
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
            return Err(unknown_service(self.registry().kind(), name, &names));
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
            api: tokio::sync::Mutex::new(None),
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
