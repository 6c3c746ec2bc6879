//! etcd (v3 API), with keys and values laid out as go-micro's etcd registry lays them, so
//! services written with go-micro and with this SDK find each other through one cluster.
//!
//! Each instance is one key, `/micro/registry/<service>/<node id>` (a `/` in either part
//! becomes `-`), held by a lease whose TTL is the registration TTL. Its value is the JSON of
//! go-micro's `registry.Service` with that one node:
//!
//! ```json
//! {"name":"vessel-service","version":"1.0.0","metadata":{},"endpoints":[],
//!  "nodes":[{"id":"vessel-service-3f9a…","address":"10.0.0.5:50051",
//!            "metadata":{"zone":"eu-1","health":"grpc","draining":"1"}}]}
//! ```
//!
//! - `version` is the service's `version`; the labels are the node's `metadata`; a draining
//!   instance carries `draining=1` there too (go-micro clients ignore it and keep calling
//!   until the key goes; SDK clients stop picking it at once).
//! - Reading, a node's `metadata` becomes its labels (minus the registry fields of
//!   [`labels::REGISTRY_FIELDS`]); the service-level `metadata` and `endpoints` are ignored.
//!   A value that is not such JSON is skipped with one warning naming the key.
//! - **Heartbeat**: registering the same node again renews its lease (one keep-alive); a
//!   lease that expired meanwhile (the process stalled longer than the TTL) is granted
//!   afresh and the key written again. A killed process's key goes when its lease runs out.
//! - **Watch**: a read of the service's prefix, then etcd's watch from the revision that
//!   read saw, so no change between the two is missed. A broken watch resumes from the last
//!   revision it delivered; one whose revision was compacted reads afresh and reports the
//!   difference.
//! - **Endpoints**: requests go to one endpoint at a time, as etcd's own Go client sends
//!   them. Every request has a deadline; one that fails or times out moves to the next
//!   endpoint (with a fresh connection for the failed one) and is tried there, once per
//!   endpoint. HTTP/2 keep-alive pings close a watch's connection to a member that
//!   vanished, and watches require a leader, so registration, heartbeats and watches move
//!   to the members that are left.
//!
//! # Examples
//! ```no_run
//! # #[tokio::main] async fn main() -> micro_core::Result<()> {
//! use micro_core::registry::{EtcdRegistry, Node, Registry};
//! use std::time::Duration;
//!
//! let etcd = EtcdRegistry::builder().endpoints("10.0.0.1:2379,10.0.0.2:2379").connect().await?;
//! let node = Node::new("vessel-service", "10.0.0.5:50051".parse().unwrap());
//! etcd.register(&node, Duration::from_secs(30)).await?;
//! println!("{:?}", etcd.lookup("vessel-service").await?);
//! # Ok(()) }
//! ```

mod conn;
mod watch;
mod wire;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{GetOptions, PutOptions};
use futures::{StreamExt, stream::BoxStream};
use tokio::time::Instant;

pub use self::wire::etcd_key;
use self::{
    conn::Conn,
    watch::{WatchState, read_prefix},
    wire::{encode, service_prefix},
};
use super::{Change, Node, NodeId, Registry};
use crate::{Error, Result, config::RegistryKind};

/// Where a local etcd serves clients by default.
pub const DEFAULT_ETCD_ADDRESS: &str = "127.0.0.1:2379";
/// Default time a look-up waits for a first instance.
pub const DEFAULT_ETCD_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// The prefix of every key, as go-micro's etcd registry writes it.
pub const ETCD_PREFIX: &str = "/micro/registry/";
/// Bound on one request (a read, a write, a lease grant or keep-alive).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request goes on while the members say there is no leader: several election
/// timeouts (etcd's default is 1 s).
const LEADER_WAIT: Duration = Duration::from_secs(8);
/// The backoff between rounds of asking for a leader.
const LEADER_POLL: (Duration, Duration) = (Duration::from_millis(100), Duration::from_millis(800));
/// How long opening a connection to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive while a stream (a watch) is open: etcd refuses pings more often than
/// every 5 s (its `--grpc-keepalive-min-time`), so 5 s, and 3 s for the answer.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(3));
/// First and longest pause before a failed watch is tried again.
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often a look-up with no instance reads again until its timeout.
const LOOKUP_POLL: Duration = Duration::from_millis(100);
/// This backend's kind.
const KIND: RegistryKind = RegistryKind::Etcd;

/// A registry over an etcd v3 cluster. Cheap to share behind an `Arc`.
pub struct EtcdRegistry {
    conn: Arc<Conn>,
    lookup_timeout: Duration,
    /// What this process registered, with its TTL and lease, so a heartbeat only renews.
    registered: Mutex<HashMap<NodeId, Registration>>,
}

#[derive(Clone)]
struct Registration {
    node: Node,
    ttl: Duration,
    lease: i64,
}

/// Builds an [`EtcdRegistry`]; see [`EtcdRegistry::builder`].
#[derive(Debug, Clone)]
pub struct EtcdRegistryBuilder {
    endpoints: Vec<String>,
    lookup_timeout: Duration,
}

impl EtcdRegistry {
    /// A builder with every default: the endpoint [`DEFAULT_ETCD_ADDRESS`] and
    /// [`DEFAULT_ETCD_LOOKUP_TIMEOUT`].
    pub fn builder() -> EtcdRegistryBuilder {
        EtcdRegistryBuilder {
            endpoints: vec![DEFAULT_ETCD_ADDRESS.into()],
            lookup_timeout: DEFAULT_ETCD_LOOKUP_TIMEOUT,
        }
    }

    /// Checks that the cluster answers a read through one of the endpoints; fails within a
    /// few seconds when none does.
    pub async fn ping(&self) -> Result<()> {
        self.conn
            .call("status check", |mut c| async move {
                c.get(ETCD_PREFIX, Some(GetOptions::new().with_prefix().with_keys_only().with_limit(1))).await
            })
            .await
            .map(drop)
    }

    /// The instances under `name`'s prefix and the revision the read saw.
    async fn read(&self, name: &str) -> Result<(i64, Vec<(String, Node)>)> {
        read_prefix(&self.conn, &service_prefix(name)).await
    }

    async fn keep_alive_once(&self, lease: i64) -> Result<i64> {
        self.conn
            .call("heartbeat", |mut c| async move {
                let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok(answers.message().await?.map(|a| a.ttl()).unwrap_or(0))
            })
            .await
    }

    async fn put(&self, node: &Node, ttl: Duration, lease: Option<i64>) -> Result<i64> {
        let lease = match lease {
            Some(lease) => lease,
            None => {
                let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
                self.conn
                    .call("lease grant", |mut c| async move { c.lease_grant(seconds, None).await })
                    .await?
                    .id()
            }
        };
        let (key, value) = (etcd_key(&node.name, &node.id), encode(node));
        self.conn
            .call("registration", |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, Some(PutOptions::new().with_lease(lease))).await }
            })
            .await?;
        Ok(lease)
    }
}

impl EtcdRegistryBuilder {
    /// The cluster's client endpoints, comma-separated: `host:port` or `http://host:port`
    /// each. Default: [`DEFAULT_ETCD_ADDRESS`].
    pub fn endpoints(mut self, endpoints: &str) -> Self {
        self.endpoints =
            endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
        self
    }

    /// How long a look-up waits for a first instance before it reports
    /// [`Error::NoInstance`]. Default: [`DEFAULT_ETCD_LOOKUP_TIMEOUT`].
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// Checks the endpoints and makes the client; does not wait for the cluster (see
    /// [`EtcdRegistry::ping`]).
    pub async fn connect(self) -> Result<EtcdRegistry> {
        let mut endpoints = Vec::new();
        for endpoint in &self.endpoints {
            let invalid = |reason: &str| Error::invalid(format!("etcd endpoint {endpoint:?}"), reason);
            if endpoint.starts_with("https://") {
                return Err(invalid("only plain http is supported"));
            }
            let bare = endpoint.strip_prefix("http://").unwrap_or(endpoint).trim_end_matches('/');
            let uri: http::Uri = format!("http://{bare}")
                .parse()
                .map_err(|_| invalid("expected host:port, or several separated by commas"))?;
            if uri.host().is_none() || uri.port().is_none() || !matches!(uri.path(), "" | "/") {
                return Err(invalid("expected host:port, or several separated by commas"));
            }
            endpoints.push(format!("http://{bare}"));
        }
        if endpoints.is_empty() {
            return Err(Error::invalid("etcd endpoints", "none given; expected host:port[,host:port…]"));
        }
        let address = endpoints.iter().map(|e| e.trim_start_matches("http://")).collect::<Vec<_>>().join(",");
        let conn = Conn::connect(endpoints, address).await?;
        Ok(EtcdRegistry {
            conn: Arc::new(conn),
            lookup_timeout: self.lookup_timeout,
            registered: Mutex::default(),
        })
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn kind(&self) -> crate::config::RegistryKind {
        KIND
    }

    fn address(&self) -> String {
        self.conn.address.clone()
    }

    /// The first call grants a lease of `ttl` and writes the node's key with it; later calls
    /// with the same node and TTL renew the lease, and write the key again (on the same
    /// lease) when the node changed, or on a new lease when the old one expired.
    async fn register(&self, node: &Node, ttl: Duration) -> Result<()> {
        let known = self.registered.lock().expect("etcd lock").get(&node.id).cloned();
        let mut lease = None;
        if let Some(known) = known.filter(|k| k.ttl == ttl) {
            if self.keep_alive_once(known.lease).await? > 0 {
                if known.node == *node {
                    return Ok(());
                }
                lease = Some(known.lease);
            } else {
                tracing::warn!(service = %node.name, node = %node.id, "etcd: the lease had expired; registering again");
            }
        }
        let lease = self.put(node, ttl, lease).await?;
        let registration = Registration { node: node.clone(), ttl, lease };
        self.registered.lock().expect("etcd lock").insert(node.id.clone(), registration);
        Ok(())
    }

    /// Deletes the node's key and revokes its lease.
    async fn deregister(&self, node: &Node) -> Result<()> {
        let known = self.registered.lock().expect("etcd lock").remove(&node.id);
        let key = etcd_key(&node.name, &node.id);
        self.conn
            .call("deregistration", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        if let Some(known) = known {
            let revoked = self
                .conn
                .call("lease revoke", |mut c| async move { c.lease_revoke(known.lease).await })
                .await;
            if let Err(err) = revoked {
                tracing::debug!(error = %err, "etcd: lease not revoked; it expires by itself");
            }
        }
        Ok(())
    }

    /// The instances under the name's prefix. With none, reads again until the look-up
    /// timeout.
    async fn lookup(&self, name: &str) -> Result<Vec<Node>> {
        let deadline = Instant::now() + self.lookup_timeout;
        loop {
            let (_, found) = self.read(name).await?;
            if !found.is_empty() {
                let mut nodes: Vec<Node> = found.into_iter().map(|(_, node)| node).collect();
                nodes.sort_by(|a, b| a.id.cmp(&b.id));
                return Ok(nodes);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NoInstance { service: name.into(), registry: self.kind().to_string() });
            }
            tokio::time::sleep(left.min(LOOKUP_POLL)).await;
        }
    }

    /// The service names of every key under `/micro/registry/` that holds an instance, go-micro's
    /// included.
    async fn list_services(&self) -> Result<Vec<String>> {
        let (_, found) = read_prefix(&self.conn, ETCD_PREFIX).await?;
        let mut names: Vec<String> = found.into_iter().map(|(_, node)| node.name).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// A read of the name's prefix, then etcd's watch from the revision after it. A watch
    /// that breaks is resumed from the last revision delivered (a fresh read when that
    /// revision was compacted away); it never yields an error, and keeps what it knows
    /// while the cluster is away.
    fn watch(&self, name: &str) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
        let state = WatchState {
            conn: self.conn.clone(),
            name: name.to_owned(),
            prefix: service_prefix(name),
            known: BTreeMap::new(),
            revision: None,
            stream: None,
            pending: VecDeque::new(),
            backoff: crate::registry::Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1),
            failing: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            let change = state.next_change().await;
            Some((Ok(change), state))
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::{wire::decode, *};

    #[test]
    fn keys_are_go_micros_node_paths() {
        assert_eq!(
            etcd_key("vessel-service", "vessel-service-1"),
            "/micro/registry/vessel-service/vessel-service-1"
        );
        assert_eq!(etcd_key("a/b", "c/d"), "/micro/registry/a-b/c-d");
    }

    #[test]
    fn encoding_is_go_micros_service_json_and_reads_back() {
        let mut node = Node::new("svc", "10.0.0.5:50051".parse().unwrap());
        node.version = "1.2.3".into();
        node.metadata.insert("zone".into(), "eu-1".into());
        node.draining = true;
        let json: serde_json::Value = serde_json::from_str(&encode(&node)).unwrap();
        assert_eq!(json["name"], "svc");
        assert_eq!(json["version"], "1.2.3");
        assert_eq!(json["nodes"][0]["id"], node.id.as_str());
        assert_eq!(json["nodes"][0]["address"], "10.0.0.5:50051");
        assert_eq!(json["nodes"][0]["metadata"]["zone"], "eu-1");
        assert_eq!(json["nodes"][0]["metadata"]["draining"], "1");
        assert!(json["endpoints"].is_array() && json["metadata"].is_object(), "{json}");
        let key = etcd_key(&node.name, &node.id);
        assert_eq!(decode(&key, encode(&node).as_bytes()).unwrap(), node);
    }

    #[test]
    fn go_micro_values_decode_with_nulls_and_old_ports() {
        let v2 = r#"{"name":"greeter","version":"latest","metadata":null,"endpoints":null,
            "nodes":[{"id":"greeter-1","address":"10.0.0.7:9090","metadata":{"protocol":"grpc","version":"x"}}]}"#;
        let node = decode("/micro/registry/greeter/greeter-1", v2.as_bytes()).unwrap();
        assert_eq!(node.address, "10.0.0.7:9090".parse().unwrap());
        assert_eq!(node.version, "latest");
        assert_eq!(node.metadata, BTreeMap::from([("protocol".to_owned(), "grpc".to_owned())]));
        let v1 = r#"{"name":"greeter","nodes":[{"id":"g","address":"10.0.0.7","port":9090}]}"#;
        assert_eq!(decode("/micro/registry/greeter/g", v1.as_bytes()).unwrap().address.port(), 9090);
        assert!(decode("k", b"{not json").unwrap_err().contains("JSON"));
        assert!(decode("k", br#"{"name":"x","nodes":[]}"#).is_err());
        assert!(decode("k", br#"{"name":"x","nodes":[{"id":"a","address":"host:1"}]}"#).is_err());
    }
}
