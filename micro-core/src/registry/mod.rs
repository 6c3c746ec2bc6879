//! Service registries: where instances announce themselves and where clients find them.
//!
//! One trait, [`Registry`], and one module per backend: [`MemoryRegistry`] for a single
//! process, [`MdnsRegistry`] (feature `mdns`) for zero set-up discovery on one network
//! segment, [`ConsulRegistry`] (feature `consul`) for a Consul agent, [`EtcdRegistry`]
//! (feature `etcd`) for an etcd cluster, laid out as go-micro lays it, and [`DnsRegistry`]
//! (feature `dns`), discovery only, from DNS SRV records.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> micro_core::Result<()> {
//! use micro_core::registry::{MemoryRegistry, Node, Registry};
//! use std::time::Duration;
//!
//! let registry = MemoryRegistry::new();
//! let node = Node::new("vessel-service", "127.0.0.1:50051".parse().unwrap());
//! registry.register(&node, Duration::from_secs(30)).await?;
//! assert_eq!(registry.lookup("vessel-service").await?[0].id, node.id);
//! # Ok(()) }
//! ```

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::{Error, Result, config::RegistryKind};

mod backoff;
#[cfg(feature = "consul")]
mod consul;
#[cfg(feature = "dns")]
mod dns;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "mdns")]
mod mdns;
mod memory;
#[cfg(any(feature = "dns", feature = "etcd", feature = "mdns"))]
mod warned;

pub use backoff::Backoff;
#[cfg(feature = "consul")]
pub use consul::{
    ConsulRegistry, ConsulRegistryBuilder, DEFAULT_CONSUL_ADDRESS, DEFAULT_CONSUL_LOOKUP_TIMEOUT,
};
#[cfg(feature = "dns")]
pub use dns::{
    DEFAULT_DNS_LOOKUP_TIMEOUT, DEFAULT_DNS_MAX_TTL, DEFAULT_DNS_MIN_TTL, DEFAULT_DNS_PORT,
    DEFAULT_DNS_TEMPLATE, DnsRegistry, DnsRegistryBuilder,
};
#[cfg(feature = "etcd")]
pub use etcd::{
    DEFAULT_ETCD_ADDRESS, DEFAULT_ETCD_LOOKUP_TIMEOUT, ETCD_PREFIX, EtcdRegistry, EtcdRegistryBuilder,
    etcd_key,
};
#[cfg(feature = "mdns")]
pub use mdns::{MAX_MDNS_INSTANCES, MAX_WANTED_NAMES, MdnsRegistry, SERVICE_TYPE};
pub use memory::MemoryRegistry;
/// A change to the set of instances of a name: tower's shape, so it feeds a balancer directly.
pub use tower::discover::Change;

/// The identity of one running instance.
pub type NodeId = String;

/// The longest service name accepted; it keeps the mDNS instance label under 63 bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 48;

/// One running instance of a named service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// Unique per instance: `<name>-<12 hex digits>` unless set otherwise.
    pub id: NodeId,
    /// The service name clients resolve, e.g. `vessel-service`.
    pub name: String,
    /// The service version; empty when unset.
    pub version: String,
    /// The address peers connect to.
    pub address: SocketAddr,
    /// Free-form key/value labels, e.g. `zone=eu-1`.
    pub metadata: BTreeMap<String, String>,
    /// The instance is shutting down: it finishes calls in flight but takes no new ones.
    #[serde(default)]
    pub draining: bool,
}

impl Node {
    /// A node for `name` at `address` with a fresh random id, no version and no metadata.
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        let name = name.into();
        let id = format!("{name}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        Node { id, name, version: String::new(), address, metadata: BTreeMap::new(), draining: false }
    }
}

/// Where services register and clients find them.
///
/// Every method is safe to call concurrently. `register` is idempotent and doubles as the
/// heartbeat: the runtime calls it again every register interval.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// The backend, whose [`RegistryKind::as_str`] is how `MICRO_REGISTRY` spells it.
    fn kind(&self) -> RegistryKind;

    /// Where the backend lives, for error messages (`224.0.0.251:5353`, `127.0.0.1:8500`).
    fn address(&self) -> String;

    /// Announces `node`; it stays listed for `ttl` unless registered again.
    async fn register(&self, node: &Node, ttl: Duration) -> Result<()>;

    /// Withdraws `node` at once.
    async fn deregister(&self, node: &Node) -> Result<()>;

    /// The live instances of `name`; [`Error::NoInstance`] when there are none.
    async fn lookup(&self, name: &str) -> Result<Vec<Node>>;

    /// The names of all services with at least one live instance, sorted.
    async fn list_services(&self) -> Result<Vec<String>>;

    /// The instances of `name` as they come and go: first an `Insert` for each instance
    /// already known, then every change. The stream ends only if the backend shuts down.
    fn watch(&self, name: &str) -> BoxStream<'static, Result<Change<NodeId, Node>>>;
}

/// The changes a broadcast-fed registry publishes: the service name and the change.
pub(crate) type Published = (String, Change<NodeId, Node>);

/// A watch of `name` for registries that keep their instances in memory and publish every
/// change on a broadcast channel: an `Insert` for each of `current`, then every change of
/// `name`; a watcher that falls behind gets an error telling it to look up again.
pub(crate) fn watch_published(
    current: Vec<Node>,
    changes: tokio::sync::broadcast::Receiver<Published>,
    name: &str,
    registry: &'static str,
    address: String,
) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
    use futures::StreamExt;
    use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
    let name = name.to_owned();
    let live = BroadcastStream::new(changes).filter_map(move |event| {
        futures::future::ready(match event {
            Ok((service, change)) if service == name => Some(Ok(change)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Error::Registry {
                registry: registry.into(),
                address: address.clone(),
                message: format!("watch fell {missed} events behind; look up again"),
                source: None,
            })),
        })
    });
    let current = current.into_iter().map(|node| Ok(Change::Insert(node.id.clone(), node)));
    futures::stream::iter(current).chain(live).boxed()
}

/// Checks a service name: 1 to [`MAX_SERVICE_NAME_LEN`] bytes of `a-z`, `0-9`, `-`, `.`, `_`,
/// starting with a letter or digit.
pub fn validate_service_name(name: &str) -> Result<()> {
    let what = || format!("service name {name:?}");
    if name.is_empty() || name.len() > MAX_SERVICE_NAME_LEN {
        return Err(Error::invalid(what(), format!("must be 1 to {MAX_SERVICE_NAME_LEN} bytes long")));
    }
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if !name.chars().all(valid_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::invalid(
            what(),
            "use lower-case letters, digits, '-', '.' and '_', starting with a letter or digit",
        ));
    }
    Ok(())
}

/// The node's own fields as registries write them beside the metadata, which decoding
/// strips: [`crate::labels::REGISTRY_FIELDS`]. Users may set none of these, nor the SDK's
/// own labels: [`crate::labels::RESERVED`] lists both.
pub const RESERVED_METADATA_KEYS: [&str; 5] = crate::labels::REGISTRY_FIELDS;
/// The longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// The longest metadata value, and the longest version.
pub const MAX_METADATA_VALUE_LEN: usize = 190;
/// The most bytes of metadata an instance may carry, keys and values together, so that its
/// mDNS announcement fits in one packet.
pub const MAX_METADATA_BYTES: usize = 768;

/// Checks a node's version and metadata against limits every backend can carry: keys of
/// `A-Z a-z 0-9 _ -` up to 64 bytes, not [reserved](crate::labels::RESERVED); values up to 190 bytes; 768 bytes in all.
pub fn validate_metadata(version: &str, metadata: &BTreeMap<String, String>) -> Result<()> {
    if version.len() > MAX_METADATA_VALUE_LEN {
        return Err(Error::invalid(
            format!("version {version:?}"),
            format!("at most {MAX_METADATA_VALUE_LEN} bytes"),
        ));
    }
    let mut total = version.len();
    for (key, value) in metadata {
        let what = || format!("metadata key {key:?}");
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN || !key.chars().all(valid_char) {
            return Err(Error::invalid(
                what(),
                format!("use 1 to {MAX_METADATA_KEY_LEN} of A-Z a-z 0-9 _ -"),
            ));
        }
        if crate::labels::is_reserved(key) {
            return Err(Error::invalid(
                what(),
                format!(
                    "the label {key:?} is reserved: the SDK sets {:?} itself; choose another key",
                    crate::labels::RESERVED
                ),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(Error::invalid(
                what(),
                format!("its value is {} bytes; at most {MAX_METADATA_VALUE_LEN}", value.len()),
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(Error::invalid(
            "metadata",
            format!(
                "{total} bytes in all; at most {MAX_METADATA_BYTES}, so an mDNS announcement fits one packet. \
                 Put schemas and documents elsewhere (gRPC reflection, a config service)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_checked() {
        assert!(validate_service_name("vessel-service").is_ok());
        assert!(validate_service_name("go.micro.srv.vessel").is_ok());
        for bad in ["", "Vessel", "vessel service", "-vessel", &"x".repeat(49)] {
            assert!(validate_service_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let meta = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(validate_metadata("1.0.0", &meta("zone", "eu-1")).is_ok());
        assert!(validate_metadata("1", &meta("name", "x")).is_err(), "reserved key");
        for label in crate::labels::RESERVED {
            let err = validate_metadata("1", &meta(label, "grpc")).unwrap_err().to_string();
            assert!(err.contains(&format!("{label:?}")) && err.contains("reserved"), "{err}");
        }
        assert!(validate_metadata("1", &meta("a=b", "x")).is_err(), "'=' in key");
        assert!(validate_metadata("1", &meta("k", &"v".repeat(191))).is_err(), "long value");
        let many: BTreeMap<_, _> = (0..14).map(|i| (format!("k{i}"), "v".repeat(60))).collect();
        let err = validate_metadata("1", &many).unwrap_err().to_string();
        assert!(err.contains("one packet"), "{err}");
    }

    #[test]
    fn node_ids_are_unique_and_named() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let (a, b) = (Node::new("svc", addr), Node::new("svc", addr));
        assert_ne!(a.id, b.id);
        assert!(a.id.starts_with("svc-"));
    }
}
