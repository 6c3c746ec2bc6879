//! A registry inside one process: for tests of a single binary, examples and tools that
//! host several services at once. Processes do not see each other's memory registry.
//!
//! Expiry needs no task of its own: every operation sweeps expired registrations first,
//! and every watch sweeps while it waits, so expiry works for as long as the registry is
//! used, on whichever runtime uses it (a background task would die with the runtime that
//! happened to create the registry, such as the first test's).
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> micro_core::Result<()> {
//! use micro_core::registry::{MemoryRegistry, Node, Registry};
//! let registry = MemoryRegistry::new();
//! registry.register(&Node::new("svc", "127.0.0.1:1".parse().unwrap()), std::time::Duration::from_secs(1)).await?;
//! assert_eq!(registry.list_services().await?, ["svc"]);
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use tokio::{sync::broadcast, time::Instant};

use super::{Change, Node, NodeId, Published, Registry, watch_published};
use crate::{Error, Result};

/// How often a waiting watch sweeps expired registrations out.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// A registry held in this process's memory. Clones share the same entries.
///
/// Registrations expire after their TTL unless registered again; an expired registration
/// is gone from look-ups at once and reported to watchers as a `Remove` within 500 ms.
#[derive(Clone)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

struct Shared {
    services: Mutex<HashMap<String, HashMap<NodeId, Entry>>>,
    changes: broadcast::Sender<Published>,
}

struct Entry {
    node: Node,
    expires: Instant,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    /// An empty registry; it starts no task, so it may be made outside a runtime.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(1024);
        MemoryRegistry { shared: Arc::new(Shared { services: Mutex::default(), changes }) }
    }

    /// The registry every `MICRO_REGISTRY=memory` user in this process shares.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<MemoryRegistry> = OnceLock::new();
        GLOBAL.get_or_init(MemoryRegistry::new).clone()
    }
}

impl Shared {
    /// Removes every registration whose TTL ran out, telling the watchers.
    fn sweep(&self) {
        let now = Instant::now();
        let mut services = self.services.lock().expect("memory registry lock");
        for (name, nodes) in services.iter_mut() {
            nodes.retain(|id, entry| {
                let live = entry.expires > now;
                if !live {
                    tracing::warn!(service = %name, node = %id, "registration expired");
                    let _ = self.changes.send((name.clone(), Change::Remove(id.clone())));
                }
                live
            });
        }
        services.retain(|_, nodes| !nodes.is_empty());
    }
}

/// Sweeps every [`SWEEP_INTERVAL`] while polled, for as long as the registry lives; yields
/// nothing.
fn sweeping(shared: Weak<Shared>) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
    futures::stream::unfold(shared, |shared| async move {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        shared.upgrade()?.sweep();
        Some(((), shared))
    })
    .filter_map(|()| futures::future::ready(None))
    .boxed()
}

#[async_trait]
impl Registry for MemoryRegistry {
    fn kind(&self) -> crate::config::RegistryKind {
        crate::config::RegistryKind::Memory
    }

    fn address(&self) -> String {
        "this process".into()
    }

    async fn register(&self, node: &Node, ttl: Duration) -> Result<()> {
        self.shared.sweep();
        let entry = Entry { node: node.clone(), expires: Instant::now() + ttl };
        let previous = self
            .shared
            .services
            .lock()
            .expect("memory registry lock")
            .entry(node.name.clone())
            .or_default()
            .insert(node.id.clone(), entry);
        if previous.is_none_or(|old| old.node != *node) {
            let change = Change::Insert(node.id.clone(), node.clone());
            let _ = self.shared.changes.send((node.name.clone(), change));
        }
        Ok(())
    }

    async fn deregister(&self, node: &Node) -> Result<()> {
        let mut services = self.shared.services.lock().expect("memory registry lock");
        if let Some(nodes) = services.get_mut(&node.name) {
            if nodes.remove(&node.id).is_some() {
                let _ = self.shared.changes.send((node.name.clone(), Change::Remove(node.id.clone())));
            }
            if nodes.is_empty() {
                services.remove(&node.name);
            }
        }
        Ok(())
    }

    async fn lookup(&self, name: &str) -> Result<Vec<Node>> {
        self.shared.sweep();
        let now = Instant::now();
        let services = self.shared.services.lock().expect("memory registry lock");
        let mut nodes: Vec<Node> = services
            .get(name)
            .into_iter()
            .flat_map(|nodes| nodes.values())
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.node.clone())
            .collect();
        if nodes.is_empty() {
            return Err(Error::NoInstance { service: name.into(), registry: self.kind().to_string() });
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn list_services(&self) -> Result<Vec<String>> {
        self.shared.sweep();
        let services = self.shared.services.lock().expect("memory registry lock");
        let mut names: Vec<String> = services.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    fn watch(&self, name: &str) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
        // Subscribe before taking the snapshot, so no change falls between the two.
        let changes = self.shared.changes.subscribe();
        self.shared.sweep();
        let current: Vec<Node> = {
            let services = self.shared.services.lock().expect("memory registry lock");
            services.get(name).into_iter().flat_map(|nodes| nodes.values()).map(|e| e.node.clone()).collect()
        };
        let published = watch_published(current, changes, name, self.kind().as_str(), self.address());
        futures::stream::select(published, sweeping(Arc::downgrade(&self.shared))).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, port: u16) -> Node {
        Node::new(name, ([127, 0, 0, 1], port).into())
    }

    #[tokio::test(start_paused = true)]
    async fn registration_expires_after_its_ttl_unless_renewed() {
        let registry = MemoryRegistry::new();
        let (kept, lapsed) = (node("svc", 1), node("svc", 2));
        let ttl = Duration::from_secs(3);
        registry.register(&kept, ttl).await.unwrap();
        registry.register(&lapsed, ttl).await.unwrap();
        let mut watch = registry.watch("svc");
        for _ in 0..2 {
            assert!(matches!(watch.next().await, Some(Ok(Change::Insert(..)))));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        registry.register(&kept, ttl).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;

        let ids: Vec<_> = registry.lookup("svc").await.unwrap().into_iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![kept.id.clone()]);
        match watch.next().await {
            Some(Ok(Change::Remove(id))) => assert_eq!(id, lapsed.id),
            other => panic!("expected the lapsed node's removal, got {other:?}"),
        }
    }

    #[test]
    fn expiry_outlives_the_runtime_that_made_the_registry() {
        // Made (and first used) on a runtime that is then shut down, as `global()` is by
        // whichever test touches it first.
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let registry = first.block_on(async {
            let registry = MemoryRegistry::new();
            registry.register(&node("warm-up", 1), Duration::from_secs(60)).await.unwrap();
            registry
        });
        drop(first);

        let second =
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        second.block_on(async {
            let lapsing = node("svc", 2);
            registry.register(&lapsing, Duration::from_secs(1)).await.unwrap();
            let mut watch = registry.watch("svc");
            assert!(matches!(watch.next().await, Some(Ok(Change::Insert(..)))));
            let removed = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
            match removed {
                Ok(Some(Ok(Change::Remove(id)))) => assert_eq!(id, lapsing.id),
                other => panic!("expected the expired node's removal, got {other:?}"),
            }
        });
    }

    #[tokio::test]
    async fn unknown_name_is_an_error_naming_service_and_registry() {
        let err = MemoryRegistry::new().lookup("vessel-service").await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("vessel-service") && text.contains("memory"), "{text}");
    }
}
