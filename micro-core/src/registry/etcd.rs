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

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions, WatchStream,
};
use futures::{StreamExt, stream::BoxStream};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Change, Node, NodeId, Registry};
use crate::{Error, Result, config::RegistryKind, labels};

/// Where a local etcd serves clients by default.
pub const DEFAULT_ETCD_ADDRESS: &str = "127.0.0.1:2379";
/// Default time a look-up waits for a first instance.
pub const DEFAULT_ETCD_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// The prefix of every key, as go-micro's etcd registry writes it.
pub const ETCD_PREFIX: &str = "/micro/registry/";
/// Bound on one request (a read, a write, a lease grant or keep-alive).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
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

/// One client per endpoint, and the endpoint in use: requests go to one member at a time
/// and move to the next when it fails, as etcd's own Go client does.
struct Conn {
    endpoints: Vec<String>,
    /// The endpoints, comma-separated, for messages.
    address: String,
    /// A client per endpoint, replaced by a fresh one (new connection) when it fails.
    clients: Mutex<Vec<Client>>,
    /// The index of the endpoint in use.
    current: AtomicUsize,
    /// Keys (with their revision) whose bad value was already warned about.
    warned: Mutex<HashSet<(String, i64)>>,
}

impl Conn {
    async fn connect(endpoints: Vec<String>, address: String) -> Result<Conn> {
        let mut clients = Vec::new();
        for endpoint in &endpoints {
            clients.push(Self::client_for(endpoint, &address).await?);
        }
        Ok(Conn {
            endpoints,
            address,
            clients: Mutex::new(clients),
            current: AtomicUsize::new(0),
            warned: Mutex::default(),
        })
    }

    /// A client of `endpoint` alone; it connects on first use.
    async fn client_for(endpoint: &str, address: &str) -> Result<Client> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1)
            .with_require_leader(true);
        Client::connect([endpoint], Some(options)).await.map_err(|err| Error::Registry {
            registry: KIND.to_string(),
            address: address.to_owned(),
            message: format!("could not set up the client of {endpoint}: {err}"),
            source: Some(Box::new(err)),
        })
    }

    /// The endpoint in use and its client.
    fn current(&self) -> (usize, Client) {
        let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        (index, self.clients.lock().expect("etcd clients lock")[index].clone())
    }

    /// After a failure on endpoint `index`: its client is replaced by a fresh one (dropping a
    /// connection that may hang), and requests move to the next endpoint, unless another
    /// failure moved them already.
    async fn failed(&self, index: usize) {
        let next = (index + 1) % self.endpoints.len();
        if self.current.compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            && self.endpoints.len() > 1
        {
            tracing::warn!(failed = %self.endpoints[index], next = %self.endpoints[next], "etcd: endpoint failed; moving to the next");
        }
        match Self::client_for(&self.endpoints[index], &self.address).await {
            Ok(fresh) => self.clients.lock().expect("etcd clients lock")[index] = fresh,
            Err(err) => {
                tracing::warn!(error = %crate::error::error_chain(&err), "etcd: could not make a fresh client")
            }
        }
    }

    /// Runs `request` with a deadline on the endpoint in use; on a failure moves to the next
    /// endpoint and tries again, once per endpoint (at least twice). Returns the endpoint
    /// that answered, too.
    async fn call_on<T, F, Fut>(&self, what: &str, request: F) -> Result<(usize, T)>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for _ in 0..self.endpoints.len().max(2) {
            let (index, client) = self.current();
            match tokio::time::timeout(REQUEST_TIMEOUT, request(client)).await {
                Ok(Ok(value)) => return Ok((index, value)),
                Ok(Err(err)) => last = Some(self.error(what, err)),
                Err(_) => last = Some(self.timeout(what)),
            }
            self.failed(index).await;
        }
        Err(last.expect("tried at least once"))
    }

    /// [`Conn::call_on`] without the endpoint.
    async fn call<T, F, Fut>(&self, what: &str, request: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(what, request).await.map(|(_, value)| value)
    }

    fn error(&self, what: &str, err: etcd_client::Error) -> Error {
        Error::Registry {
            registry: KIND.to_string(),
            address: self.address.clone(),
            message: format!(
                "{what}: {err}; is an etcd member running there? Set MICRO_REGISTRY_ADDRESS \
                 (--registry-address) to the cluster's client endpoints"
            ),
            source: Some(Box::new(err)),
        }
    }

    fn timeout(&self, what: &str) -> Error {
        Error::Registry {
            registry: KIND.to_string(),
            address: self.address.clone(),
            message: format!(
                "{what}: no answer within {REQUEST_TIMEOUT:?}; is an etcd member running there, \
                 and does the cluster have a leader?"
            ),
            source: None,
        }
    }

    /// Warns once per key and revision that its value is not an instance.
    fn warn_bad_value(&self, key: &str, revision: i64, reason: &str) {
        if self.warned.lock().expect("etcd warned lock").insert((key.to_owned(), revision)) {
            tracing::warn!(%key, revision, reason, "etcd: skipped a value that is not a go-micro registry.Service with a node");
        }
    }
}

/// `/micro/registry/<service>/`.
fn service_prefix(name: &str) -> String {
    format!("{ETCD_PREFIX}{}/", name.replace('/', "-"))
}

/// `/micro/registry/<service>/<node id>`, as go-micro's `nodePath` makes it.
pub fn etcd_key(service: &str, node_id: &str) -> String {
    format!("{}{}", service_prefix(service), node_id.replace('/', "-"))
}

/// go-micro's `registry.Service`, with the fields in its order.
#[derive(Serialize, Deserialize)]
struct GoService {
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    endpoints: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    nodes: Option<Vec<GoNode>>,
}

/// go-micro's `registry.Node`.
#[derive(Serialize, Deserialize)]
struct GoNode {
    id: String,
    address: String,
    /// go-micro before v2 kept the port apart from the address.
    #[serde(default, skip_serializing)]
    port: Option<u16>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// The JSON go-micro writes for `node`.
fn encode(node: &Node) -> String {
    let mut metadata = node.metadata.clone();
    if node.draining {
        metadata.insert(labels::DRAINING.into(), labels::FLAG_ON.into());
    }
    let service = GoService {
        name: node.name.clone(),
        version: node.version.clone(),
        metadata: Some(BTreeMap::new()),
        endpoints: Some(Vec::new()),
        nodes: Some(vec![GoNode {
            id: node.id.clone(),
            address: node.address.to_string(),
            port: None,
            metadata: Some(metadata),
        }]),
    };
    serde_json::to_string(&service).expect("a service always serializes")
}

/// The node a key holds, or why not.
fn decode(key: &str, value: &[u8]) -> Result<Node, String> {
    let service: GoService =
        serde_json::from_slice(value).map_err(|err| format!("not go-micro's JSON: {err}"))?;
    let key_id = key.rsplit('/').next().unwrap_or_default();
    let nodes = service.nodes.unwrap_or_default();
    let position = nodes.iter().position(|n| n.id.replace('/', "-") == key_id).unwrap_or(0);
    let Some(node) = nodes.into_iter().nth(position) else {
        return Err("no node in \"nodes\"".into());
    };
    let address = match (node.address.parse::<SocketAddr>(), node.port) {
        (Ok(address), _) => address,
        (Err(_), Some(port)) => match node.address.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => return Err(format!("address {:?} is not an IP address", node.address)),
        },
        (Err(_), None) => return Err(format!("address {:?} is not ip:port", node.address)),
    };
    let mut metadata = node.metadata.unwrap_or_default();
    let draining = metadata.remove(labels::DRAINING).is_some_and(|v| v == labels::FLAG_ON);
    metadata.retain(|key, _| !labels::is_registry_field(key));
    Ok(Node {
        id: if node.id.is_empty() { key_id.to_owned() } else { node.id },
        name: service.name,
        version: service.version,
        address,
        metadata,
        draining,
    })
}

/// The instance a key-value holds; `None` (warned once) when it holds none.
fn node_of(conn: &Conn, kv: &KeyValue) -> Option<Node> {
    let key = String::from_utf8_lossy(kv.key());
    match decode(&key, kv.value()) {
        Ok(node) => Some(node),
        Err(reason) => {
            conn.warn_bad_value(&key, kv.mod_revision(), &reason);
            None
        }
    }
}

/// Every instance under `prefix`, by key, and the revision of the read.
async fn read_prefix(conn: &Conn, prefix: &str) -> Result<(i64, Vec<(String, Node)>)> {
    let answer = conn
        .call("look-up", |mut c| {
            let prefix = prefix.to_owned();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
    let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
    let nodes = answer
        .kvs()
        .iter()
        .filter_map(|kv| node_of(conn, kv).map(|node| (String::from_utf8_lossy(kv.key()).into_owned(), node)))
        .collect();
    Ok((revision, nodes))
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn kind(&self) -> &'static str {
        KIND.as_str()
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
                return Err(Error::NoInstance { service: name.into(), registry: self.kind().into() });
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
            backoff: WATCH_BACKOFF.0,
            failing: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            let change = state.next_change().await;
            Some((Ok(change), state))
        })
        .boxed()
    }
}

struct WatchState {
    conn: Arc<Conn>,
    name: String,
    prefix: String,
    /// The instances known, by key.
    known: BTreeMap<String, Node>,
    /// The last revision reflected in `known`; `None`: read afresh.
    revision: Option<i64>,
    /// The open watch and the endpoint it runs on.
    stream: Option<(usize, WatchStream)>,
    pending: VecDeque<Change<NodeId, Node>>,
    backoff: Duration,
    failing: bool,
}

impl WatchState {
    async fn next_change(&mut self) -> Change<NodeId, Node> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return change;
            }
            if let Err(err) = self.step().await {
                let endpoint = self.stream.take().map_or(self.conn.current().0, |(index, _)| index);
                tracing::warn!(service = %self.name, error = %crate::error::error_chain(&err), retry_in = ?self.backoff, "etcd: watch failed; keeping known instances");
                self.failing = true;
                self.conn.failed(endpoint).await;
                tokio::time::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).min(WATCH_BACKOFF.1);
            }
        }
    }

    /// Reads, opens the watch, or takes one answer of it.
    async fn step(&mut self) -> Result<()> {
        let Some(revision) = self.revision else {
            let (revision, found) = read_prefix(&self.conn, &self.prefix).await?;
            self.replace(found.into_iter().collect());
            self.revision = Some(revision);
            return Ok(());
        };
        let Some((_, stream)) = &mut self.stream else {
            let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(revision + 1);
            let stream = self
                .conn
                .call_on("watch", |mut c| {
                    let (prefix, options) = (self.prefix.clone(), options.clone());
                    async move { c.watch(prefix, Some(options)).await }
                })
                .await?;
            self.stream = Some(stream);
            return Ok(());
        };
        let answer = stream.message().await.map_err(|err| self.conn.error("watch", err))?;
        let Some(answer) = answer else {
            return Err(self.conn.error("watch", etcd_client::Error::WatchError("the stream ended".into())));
        };
        if self.failing {
            self.failing = false;
            tracing::info!(service = %self.name, address = %self.conn.address, "etcd: watch answers again");
        }
        self.backoff = WATCH_BACKOFF.0;
        if answer.canceled() || answer.compact_revision() > 0 {
            tracing::warn!(service = %self.name, compacted = answer.compact_revision(), reason = %answer.cancel_reason(), "etcd: watch cancelled; reading afresh");
            self.stream = None;
            self.revision = None;
            return Ok(());
        }
        let mut last = None;
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(Some(kv.mod_revision()));
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let node = match event.event_type() {
                EventType::Put => node_of(&self.conn, kv),
                EventType::Delete => None,
            };
            self.apply(key, node);
        }
        let progress = answer.header().map(|h| h.revision()).filter(|_| answer.events().is_empty());
        if let Some(revision) = last.or(progress) {
            self.revision = Some(revision.max(self.revision.unwrap_or(0)));
        }
        Ok(())
    }

    /// Records what `key` holds now (`None`: nothing usable) and queues the change.
    fn apply(&mut self, key: String, node: Option<Node>) {
        match node {
            Some(node) => {
                if self.known.get(&key) != Some(&node) {
                    if let Some(old) = self.known.get(&key).filter(|old| old.id != node.id) {
                        self.pending.push_back(Change::Remove(old.id.clone()));
                    }
                    self.pending.push_back(Change::Insert(node.id.clone(), node.clone()));
                    self.known.insert(key, node);
                }
            }
            None => {
                if let Some(old) = self.known.remove(&key) {
                    self.pending.push_back(Change::Remove(old.id));
                }
            }
        }
    }

    /// Makes `known` what a fresh read found, queueing the difference.
    fn replace(&mut self, found: BTreeMap<String, Node>) {
        let gone: Vec<String> = self.known.keys().filter(|k| !found.contains_key(*k)).cloned().collect();
        for key in gone {
            self.apply(key, None);
        }
        for (key, node) in found {
            self.apply(key, Some(node));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
