//! Consul over its HTTP API: services register with their local agent, clients read the
//! catalog's health view through any agent.
//!
//! Each [`Node`] becomes an agent service: `ID` is the node id, `Name` the service name,
//! `Address`/`Port` the node address, `Meta` the metadata plus `version` (also a
//! `version=<v>` tag). Every registration carries a TTL health check, `service:<id>`, which
//! each heartbeat (`register` again) passes; a node whose heartbeats stop turns critical after
//! its TTL and leaves every look-up and watch, which only see passing instances.
//!
//! Consul itself removes a critical registration only after `DeregisterCriticalServiceAfter`,
//! here three TTLs but at least one minute, and its reaper runs about once a minute; so a
//! dead node drops out of look-ups within the TTL but can stay in the catalog (critical)
//! for one to two minutes.
//!
//! A watch follows the agent through restarts: a query that fails, or that a stopping agent
//! answers early without a change, is followed by a fresh read, so instances the new agent
//! does not know are reported removed. A watch nobody polls while the agent is replaced may
//! send its next query with the old agent's index, which the fresh agent holds until its
//! 30 s wait runs out; only then does it notice.
//!
//! Tested against Consul 1.8.7 (Debian bullseye's package) and written to the v1 HTTP API.
//! Version differences handled: passing an unknown check answers 500 in 1.8 and 404 later;
//! deregistering an unknown service answers 200 in 1.8 and 404 later.
//!
//! # Examples
//! ```no_run
//! # #[tokio::main] async fn main() -> micro_core::Result<()> {
//! use micro_core::registry::{ConsulRegistry, Node, Registry};
//! use std::time::Duration;
//!
//! let consul = ConsulRegistry::builder().address("127.0.0.1:8500").build()?;
//! consul.ping().await?;
//! let node = Node::new("vessel-service", "127.0.0.1:50051".parse().unwrap());
//! consul.register(&node, Duration::from_secs(30)).await?;
//! println!("{:?}", consul.lookup("vessel-service").await?);
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use reqwest::{Method, StatusCode, Url};
use tokio::time::Instant;

use self::{
    agent::{Agent, Failure},
    watch::{WatchState, next_index},
};
use super::{Backoff, Change, Node, NodeId, Registry};
use crate::{Error, Result, config::RegistryKind};

/// Where a local Consul agent serves its HTTP API by default.
pub const DEFAULT_CONSUL_ADDRESS: &str = "127.0.0.1:8500";
/// Default time a look-up waits for a first passing instance.
pub const DEFAULT_CONSUL_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long opening a TCP connection to the agent may take before the agent counts as
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Bound on one request that does not block on purpose.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one blocking query of a watch waits for a change. It also bounds how long a
/// watch can miss that the agent was replaced by a fresh one whose index is lower.
const WATCH_WAIT: Duration = Duration::from_secs(30);
/// The least time between the starts of two queries of one watch.
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(50);
/// First and longest pause before a failed watch query is tried again (with jitter).
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(15));
/// The shortest `DeregisterCriticalServiceAfter`: Consul reaps about once a minute anyway.
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// This backend's kind.
const KIND: RegistryKind = RegistryKind::Consul;

/// A registry over a Consul agent's HTTP API. Cheap to share behind an `Arc`.
pub struct ConsulRegistry {
    agent: Arc<Agent>,
    lookup_timeout: Duration,
    /// What this process registered, with its TTL, so a heartbeat only passes the check.
    registered: Mutex<HashMap<NodeId, (Node, Duration)>>,
}

/// Builds a [`ConsulRegistry`]; see [`ConsulRegistry::builder`].
#[derive(Debug, Clone)]
pub struct ConsulRegistryBuilder {
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
    lookup_timeout: Duration,
    connect_native: bool,
}

impl ConsulRegistry {
    /// A builder with every default: the agent at [`DEFAULT_CONSUL_ADDRESS`], no token, the
    /// agent's own datacenter, [`DEFAULT_CONSUL_LOOKUP_TIMEOUT`].
    pub fn builder() -> ConsulRegistryBuilder {
        ConsulRegistryBuilder {
            address: DEFAULT_CONSUL_ADDRESS.into(),
            token: None,
            datacenter: None,
            lookup_timeout: DEFAULT_CONSUL_LOOKUP_TIMEOUT,
            connect_native: false,
        }
    }

    /// Checks that the agent answers and knows a cluster leader, and returns the leader's
    /// server address. Fails within a couple of seconds when nothing listens.
    pub async fn ping(&self) -> Result<String> {
        let request = self.agent.request(Method::GET, &["v1", "status", "leader"], false);
        let leader: String = self.agent.json("status check", request).await?;
        if leader.is_empty() {
            return Err(self.agent.error(
                "status check",
                Failure::Refused("the agent answers but knows no cluster leader yet; it may still be starting, or has not joined its servers".into()),
            ));
        }
        Ok(leader)
    }
}

impl ConsulRegistryBuilder {
    /// The agent's HTTP API: `host:port` or `http://host:port`. Default:
    /// [`DEFAULT_CONSUL_ADDRESS`].
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// ACL token sent as `X-Consul-Token` with every request. Default: none, so the agent
    /// applies its default token.
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Datacenter whose catalog look-ups, watches and listings read (the `dc` parameter).
    /// Registration always goes to the local agent. Default: the agent's own datacenter.
    pub fn datacenter(mut self, datacenter: Option<String>) -> Self {
        self.datacenter = datacenter.filter(|d| !d.is_empty());
        self
    }

    /// How long a look-up waits for a first passing instance before it reports
    /// [`Error::NoInstance`]. Default: [`DEFAULT_CONSUL_LOOKUP_TIMEOUT`].
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// Registers services as Connect-native (`Connect: {Native: true}`), without Consul's
    /// gRPC check, which presents no Connect certificate; see [`connect`]. Default: off.
    pub fn connect_native(mut self, native: bool) -> Self {
        self.connect_native = native;
        self
    }

    /// Checks the address and makes the HTTP client; does not contact the agent (see
    /// [`ConsulRegistry::ping`]).
    pub fn build(self) -> Result<ConsulRegistry> {
        let invalid = |reason: String| Error::invalid(format!("Consul address {:?}", self.address), reason);
        let with_scheme = if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("http://{}", self.address)
        };
        let base = Url::parse(&with_scheme).map_err(|err| invalid(format!("{err}; expected host:port")))?;
        if base.scheme() != "http" {
            return Err(invalid("only plain http is supported; put TLS in front with a local agent".into()));
        }
        if base.host().is_none() || base.cannot_be_a_base() {
            return Err(invalid("expected host:port".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|err| invalid(format!("could not build an HTTP client: {err}")))?;
        let host = base.host_str().unwrap_or_default();
        let address = match base.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let agent = Agent {
            http,
            base,
            address,
            token: self.token,
            datacenter: self.datacenter,
            connect_native: self.connect_native,
        };
        Ok(ConsulRegistry {
            agent: Arc::new(agent),
            lookup_timeout: self.lookup_timeout,
            registered: Mutex::default(),
        })
    }
}

#[async_trait]
impl Registry for ConsulRegistry {
    fn kind(&self) -> crate::config::RegistryKind {
        KIND
    }

    fn address(&self) -> String {
        self.agent.address.clone()
    }

    /// The first call registers the node with a passing TTL check; later calls with the same
    /// node and TTL only pass the check, and register in full again should the agent no
    /// longer know it (it restarted, or reaped the service).
    async fn register(&self, node: &Node, ttl: Duration) -> Result<()> {
        let known = self.registered.lock().expect("consul lock").get(&node.id).cloned();
        if known.is_some_and(|(n, t)| n == *node && t == ttl) {
            match self.agent.pass(&node.id).await {
                Ok(()) => return Ok(()),
                Err(Failure::Status(status, body)) => {
                    tracing::warn!(service = %node.name, node = %node.id, %status, answer = %body, "consul: agent no longer knows this registration; registering again");
                }
                Err(failure) => return Err(self.agent.error("heartbeat", failure)),
            }
        }
        self.agent.register(node, ttl).await.map_err(|f| self.agent.error("registration", f))?;
        self.agent.pass(&node.id).await.map_err(|f| self.agent.error("first heartbeat", f))?;
        self.registered.lock().expect("consul lock").insert(node.id.clone(), (node.clone(), ttl));
        Ok(())
    }

    async fn deregister(&self, node: &Node) -> Result<()> {
        self.registered.lock().expect("consul lock").remove(&node.id);
        let request =
            self.agent.request(Method::PUT, &["v1", "agent", "service", "deregister", &node.id], false);
        match self.agent.send(request).await {
            Ok(_) => Ok(()),
            // Newer agents answer 404 for a service they do not know; 1.8 answers 200.
            Err(Failure::Status(StatusCode::NOT_FOUND, _)) => Ok(()),
            Err(failure) => Err(self.agent.error("deregistration", failure)),
        }
    }

    /// Passing instances only. With none, waits up to the look-up timeout with blocking
    /// queries for one to pass.
    async fn lookup(&self, name: &str) -> Result<Vec<Node>> {
        let deadline = Instant::now() + self.lookup_timeout;
        let mut index = None;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let query = self.agent.passing(name, index, wait);
            let answer = match index {
                None => query.await,
                Some(_) => match tokio::time::timeout_at(deadline, query).await {
                    Ok(answer) => answer,
                    Err(_) => break,
                },
            };
            let (answered, nodes) = answer.map_err(|f| self.agent.error("look-up", f))?;
            if !nodes.is_empty() {
                return Ok(nodes);
            }
            if deadline.saturating_duration_since(Instant::now()) < Duration::from_millis(1) {
                break;
            }
            index = Some(next_index(index.unwrap_or(0), answered));
        }
        Err(Error::NoInstance { service: name.into(), registry: self.kind().to_string() })
    }

    /// Names in the catalog (GET /v1/catalog/services) that have at least one passing
    /// instance, checked with one health query per name. Consul's own `consul` service is
    /// listed too.
    async fn list_services(&self) -> Result<Vec<String>> {
        let request = self.agent.request(Method::GET, &["v1", "catalog", "services"], true);
        let catalog: BTreeMap<String, serde_json::Value> =
            self.agent.json("service listing", request).await?;
        let agent = &self.agent;
        let checks = futures::stream::iter(catalog.into_keys())
            .map(|name| async move {
                let answer = agent.passing(&name, None, Duration::ZERO).await;
                answer.map(|(_, nodes)| (!nodes.is_empty()).then_some(name))
            })
            .buffered(8);
        let answers: Vec<Result<Option<String>, Failure>> = checks.collect().await;
        let mut names = Vec::new();
        for answer in answers {
            if let Some(name) = answer.map_err(|f| self.agent.error("service listing", f))? {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Blocking queries on the passing instances of `name`, diffed into changes. A failed
    /// query is logged and tried again with jittered backoff (250 ms doubling to 15 s) instead of
    /// ending the stream, so the stream keeps what it knows and, once the agent answers
    /// again, reports exactly what changed meanwhile; it never yields an error.
    fn watch(&self, name: &str) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
        let state = WatchState {
            agent: self.agent.clone(),
            name: name.to_owned(),
            index: 0,
            known: BTreeMap::new(),
            last_query: None,
            backoff: Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1),
            failing: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            let changes = state.next_changes().await;
            Some((changes, state))
        })
        .flat_map(|changes| futures::stream::iter(changes.into_iter().map(Ok)))
        .boxed()
    }
}

mod agent;
mod connect;
mod watch;
mod wire;

#[cfg(test)]
mod tests {
    use super::{
        watch::{diff, next_index},
        wire::{ServiceEntry, checks, go_duration},
        *,
    };
    use crate::labels;

    fn node(id: &str, port: u16) -> Node {
        let mut node = Node::new("svc", ([127, 0, 0, 1], port).into());
        node.id = id.into();
        node
    }

    #[test]
    fn index_resets_when_it_goes_backwards_and_never_sends_zero() {
        assert_eq!(next_index(0, 7), 7);
        assert_eq!(next_index(7, 9), 9);
        assert_eq!(next_index(9, 9), 9);
        assert_eq!(next_index(9, 3), 0);
        assert_eq!(next_index(0, 0), 1);
    }

    #[test]
    fn diff_removes_then_inserts_new_and_changed() {
        let mut known = BTreeMap::new();
        let changes = diff(&mut known, vec![node("a", 1), node("b", 2)]);
        assert!(matches!(&changes[..], [Change::Insert(a, _), Change::Insert(b, _)] if a == "a" && b == "b"));
        assert!(diff(&mut known, vec![node("a", 1), node("b", 2)]).is_empty());
        let changes = diff(&mut known, vec![node("b", 3)]);
        assert!(
            matches!(&changes[..], [Change::Remove(a), Change::Insert(b, n)] if a == "a" && b == "b" && n.address.port() == 3)
        );
    }

    #[test]
    fn entries_decode_with_version_metadata_and_address_fallback() {
        let json = r#"[{"Node":{"Node":"n1","Address":"10.0.0.5"},
            "Service":{"ID":"svc-1","Service":"svc","Address":"","Port":5000,
                       "Meta":{"version":"1.2","zone":"eu","name":"spoof"}},"Checks":[]},
            {"Node":{"Address":"10.0.0.6"},"Service":{"ID":"svc-2","Service":"svc","Address":"host.example","Port":1,"Meta":null}}]"#;
        let entries: Vec<ServiceEntry> = serde_json::from_str(json).unwrap();
        let nodes: Vec<Node> = entries.into_iter().filter_map(ServiceEntry::into_node).collect();
        assert_eq!(nodes.len(), 1, "a host name is not an address a node can be dialled at");
        assert_eq!(nodes[0].address, "10.0.0.5:5000".parse().unwrap());
        assert_eq!(nodes[0].version, "1.2");
        assert_eq!(nodes[0].metadata, BTreeMap::from([("zone".to_owned(), "eu".to_owned())]));
    }

    #[test]
    fn addresses_are_checked_when_built() {
        let address = |a: &str| ConsulRegistry::builder().address(a).build().map(|r| r.address());
        assert_eq!(address("127.0.0.1:8500").unwrap(), "127.0.0.1:8500");
        assert_eq!(address("http://consul.local:8500/").unwrap(), "consul.local:8500");
        assert!(address("https://consul:8501").is_err());
        assert!(address("a b:1").is_err());
    }

    #[test]
    fn durations_are_go_durations() {
        assert_eq!(go_duration(Duration::from_secs(2)), "2000ms");
        assert_eq!(go_duration(Duration::ZERO), "1ms");
    }

    #[test]
    fn registration_has_a_ttl_and_a_grpc_check_over_tls_when_the_instance_serves_tls() {
        let mut node = Node::new("svc", "10.0.0.5:50051".parse().unwrap());
        let bare = serde_json::to_value(checks(&node, Duration::from_secs(30), false)).unwrap();
        assert_eq!(bare.as_array().unwrap().len(), 1, "no health service announced, no gRPC check: {bare}");
        node.metadata.insert(labels::HEALTH.into(), labels::HEALTH_GRPC.into());
        let plain = serde_json::to_value(checks(&node, Duration::from_secs(30), false)).unwrap();
        assert_eq!(plain[0]["TTL"], "30000ms");
        assert_eq!(plain[1]["GRPC"], "10.0.0.5:50051");
        assert_eq!(plain[1]["Status"], "passing");
        assert!(plain[1].get("GRPCUseTLS").is_none(), "{plain}");
        node.metadata.insert(labels::TLS.into(), labels::FLAG_ON.into());
        let tls = serde_json::to_value(checks(&node, Duration::from_secs(30), false)).unwrap();
        assert_eq!(tls[1]["GRPCUseTLS"], true);
        assert_eq!(tls[1]["TLSSkipVerify"], true);
    }
}
