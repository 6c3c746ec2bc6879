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
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::time::Instant;

use super::{Backoff, Change, Node, NodeId, Registry};
use crate::{Error, Result, config::RegistryKind, labels};

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
        let agent = Agent { http, base, address, token: self.token, datacenter: self.datacenter };
        Ok(ConsulRegistry {
            agent: Arc::new(agent),
            lookup_timeout: self.lookup_timeout,
            registered: Mutex::default(),
        })
    }
}

/// The typed HTTP client for the few endpoints used.
struct Agent {
    http: reqwest::Client,
    base: Url,
    /// `host:port`, for messages.
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
}

/// Why a request did not give what was asked.
enum Failure {
    /// No connection, or no answer in time.
    Unreachable(reqwest::Error),
    /// The agent answered with a status other than 2xx, and this body.
    Status(StatusCode, String),
    /// The agent answered, but not with what was expected.
    Refused(String),
}

impl Agent {
    /// The URL of `/<segments>`, with `dc` when it reads the `catalog`.
    fn url(&self, segments: &[&str], catalog: bool) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in build").pop_if_empty().extend(segments);
        if let (true, Some(dc)) = (catalog, &self.datacenter) {
            url.query_pairs_mut().append_pair("dc", dc);
        }
        url
    }

    /// A request to `url` with the token and the usual timeout.
    fn request_to(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, url).timeout(REQUEST_TIMEOUT);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        request
    }

    /// A request to `/<segments>`, with `dc` when it reads the `catalog`.
    fn request(&self, method: Method, segments: &[&str], catalog: bool) -> reqwest::RequestBuilder {
        self.request_to(method, self.url(segments, catalog))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let response = request.send().await.map_err(Failure::Unreachable)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(Failure::Status(status, body.trim().to_owned()))
    }

    async fn json<T: DeserializeOwned>(&self, what: &str, request: reqwest::RequestBuilder) -> Result<T> {
        let response = self.send(request).await.map_err(|failure| self.error(what, failure))?;
        response
            .json()
            .await
            .map_err(|err| self.error(what, Failure::Refused(format!("unexpected answer: {err}"))))
    }

    fn error(&self, what: &str, failure: Failure) -> Error {
        let (message, source): (String, Option<crate::BoxError>) = match failure {
            Failure::Unreachable(err) => {
                let cause = root_cause(&err);
                let what_happened = if err.is_timeout() { "no answer in time" } else { "could not connect" };
                (
                    format!(
                        "{what}: {what_happened} ({cause}); is a Consul agent running there? \
                         Set MICRO_REGISTRY_ADDRESS (--registry-address) to its HTTP address"
                    ),
                    Some(Box::new(err)),
                )
            }
            Failure::Status(status, body) => {
                let hint = match status {
                    StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                        "; check the ACL token (CONSUL_HTTP_TOKEN, --consul-token)"
                    }
                    _ => "",
                };
                (format!("{what}: the agent answered {status}: {body}{hint}"), None)
            }
            Failure::Refused(message) => (format!("{what}: {message}"), None),
        };
        Error::Registry { registry: KIND.to_string(), address: self.address.clone(), message, source }
    }

    /// PUT /v1/agent/service/register with a TTL check that starts out passing.
    async fn register(&self, node: &Node, ttl: Duration) -> Result<(), Failure> {
        let mut meta: BTreeMap<&str, &str> =
            node.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        meta.insert(labels::VERSION, &node.version);
        if node.draining {
            meta.insert(labels::DRAINING, labels::FLAG_ON);
        }
        let tags =
            if node.version.is_empty() { Vec::new() } else { vec![format!("version={}", node.version)] };
        let registration = ServiceRegistration {
            id: &node.id,
            name: &node.name,
            tags,
            address: node.address.ip().to_string(),
            port: node.address.port(),
            meta,
            checks: checks(node, ttl),
        };
        let request = self.request(Method::PUT, &["v1", "agent", "service", "register"], false);
        self.send(request.json(&registration)).await.map(drop)
    }

    /// PUT /v1/agent/check/pass/<check id>.
    async fn pass(&self, node_id: &str) -> Result<(), Failure> {
        let check = check_id(node_id);
        let request = self.request(Method::PUT, &["v1", "agent", "check", "pass", &check], false);
        self.send(request).await.map(drop)
    }

    /// GET /v1/health/service/<name>?passing: the passing instances and the index to block on
    /// next. With `index`, waits up to `wait` for something newer.
    async fn passing(
        &self,
        name: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, Vec<Node>), Failure> {
        let mut url = self.url(&["v1", "health", "service", name], true);
        url.query_pairs_mut().append_key_only("passing");
        if let Some(index) = index {
            url.query_pairs_mut()
                .append_pair("index", &index.to_string())
                .append_pair("wait", &go_duration(wait));
        }
        let mut request = self.request_to(Method::GET, url);
        if index.is_some() {
            // Consul adds up to wait/16 of jitter before it answers an idle query.
            request = request.timeout(wait + wait / 16 + REQUEST_TIMEOUT);
        }
        let response = self.send(request).await?;
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let entries: Vec<ServiceEntry> =
            response.json().await.map_err(|err| Failure::Refused(format!("unexpected answer: {err}")))?;
        let mut nodes: Vec<Node> = entries.into_iter().filter_map(ServiceEntry::into_node).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((index, nodes))
    }
}

/// The innermost cause of an error, e.g. `Connection refused (os error 111)`.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The TTL check of a node: the id Consul itself would give a service's only check.
fn check_id(node_id: &str) -> String {
    format!("service:{node_id}")
}

/// A duration as Go's `time.ParseDuration` reads it, in whole milliseconds.
fn go_duration(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// The index to send with the next blocking query, following Consul's advice: an index that
/// went backwards (the agent's state was reset) starts over from 0, and a 0 answer becomes 1
/// so the next query blocks.
fn next_index(previous: u64, answered: u64) -> u64 {
    if answered < previous { 0 } else { answered.max(1) }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceRegistration<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    tags: Vec<String>,
    address: String,
    port: u16,
    meta: BTreeMap<&'a str, &'a str>,
    checks: Vec<Check>,
}

/// A check definition: the TTL check the heartbeat passes, or Consul's native gRPC check of
/// the instance's `grpc.health.v1` service.
#[derive(Serialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Check {
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none")]
    grpc: Option<String>,
    #[serde(rename = "GRPCUseTLS", skip_serializing_if = "std::ops::Not::not")]
    grpc_use_tls: bool,
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "std::ops::Not::not")]
    tls_skip_verify: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    status: &'static str,
    deregister_critical_service_after: String,
}

/// How often Consul runs the gRPC health check of an instance.
const GRPC_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long one gRPC health check may take.
const GRPC_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The checks of a registration: the TTL check the heartbeat keeps passing and, for an
/// instance whose reserved [`labels::HEALTH`] label says it serves `grpc.health.v1` (every
/// SDK server sets it; users cannot), Consul's native gRPC check of it (over TLS, not
/// verifying the certificate, when its [`labels::TLS`] label says it serves TLS). Both
/// start passing.
fn checks(node: &Node, ttl: Duration) -> Vec<Check> {
    let deregister_after = go_duration(ttl.saturating_mul(3).max(MIN_DEREGISTER_AFTER));
    let tls = node.metadata.get(labels::TLS).is_some_and(|v| v == labels::FLAG_ON);
    let mut checks = vec![Check {
        check_id: check_id(&node.id),
        name: "micro heartbeat".into(),
        ttl: Some(go_duration(ttl)),
        status: "passing",
        deregister_critical_service_after: deregister_after.clone(),
        ..Check::default()
    }];
    if node.metadata.get(labels::HEALTH).is_some_and(|v| v == labels::HEALTH_GRPC) {
        checks.push(Check {
            check_id: format!("{}:grpc", check_id(&node.id)),
            name: "grpc.health.v1".into(),
            grpc: Some(node.address.to_string()),
            grpc_use_tls: tls,
            tls_skip_verify: tls,
            interval: Some(go_duration(GRPC_CHECK_INTERVAL)),
            timeout: Some(go_duration(GRPC_CHECK_TIMEOUT)),
            status: "passing",
            deregister_critical_service_after: deregister_after,
            ..Check::default()
        });
    }
    checks
}

/// One element of /v1/health/service/<name>; fields not read are skipped.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    node: CatalogNode,
    service: AgentService,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogNode {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

impl ServiceEntry {
    /// The node this entry announces; `None` (logged) when its address is not an IP address.
    fn into_node(self) -> Option<Node> {
        let service = self.service;
        let host = if service.address.is_empty() { &self.node.address } else { &service.address };
        let Ok(ip) = host.parse::<IpAddr>() else {
            tracing::warn!(service = %service.service, node = %service.id, address = %host, "consul: skipped an instance whose address is not an IP address");
            return None;
        };
        let mut metadata = service.meta.unwrap_or_default();
        let version = metadata.remove(labels::VERSION).unwrap_or_default();
        let draining = metadata.remove(labels::DRAINING).is_some_and(|v| v == labels::FLAG_ON);
        metadata.retain(|key, _| !labels::is_registry_field(key));
        Some(Node {
            id: service.id,
            name: service.service,
            version,
            address: SocketAddr::new(ip, service.port),
            metadata,
            draining,
        })
    }
}

/// The changes that turn `known` into `now`, applied to `known`: removals, then insertions
/// (new or changed instances), each in id order.
fn diff(known: &mut BTreeMap<NodeId, Node>, now: Vec<Node>) -> Vec<Change<NodeId, Node>> {
    let now: BTreeMap<NodeId, Node> = now.into_iter().map(|n| (n.id.clone(), n)).collect();
    let mut changes: Vec<Change<NodeId, Node>> =
        known.keys().filter(|id| !now.contains_key(*id)).map(|id| Change::Remove(id.clone())).collect();
    for (id, node) in &now {
        if known.get(id) != Some(node) {
            changes.push(Change::Insert(id.clone(), node.clone()));
        }
    }
    *known = now;
    changes
}

#[async_trait]
impl Registry for ConsulRegistry {
    fn kind(&self) -> &'static str {
        KIND.as_str()
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
        Err(Error::NoInstance { service: name.into(), registry: self.kind().into() })
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

struct WatchState {
    agent: Arc<Agent>,
    name: String,
    index: u64,
    known: BTreeMap<NodeId, Node>,
    last_query: Option<Instant>,
    backoff: Backoff,
    failing: bool,
}

impl WatchState {
    /// Queries until something changed.
    async fn next_changes(&mut self) -> Vec<Change<NodeId, Node>> {
        loop {
            if let Some(last) = self.last_query {
                tokio::time::sleep_until(last + WATCH_MIN_INTERVAL).await;
            }
            self.last_query = Some(Instant::now());
            let index = (self.index > 0).then_some(self.index);
            let started = Instant::now();
            match self.agent.passing(&self.name, index, WATCH_WAIT).await {
                Ok((answered, nodes)) => {
                    if self.failing {
                        self.failing = false;
                        tracing::info!(service = %self.name, address = %self.agent.address, "consul: watch answered again");
                    }
                    let previous = self.index;
                    self.index = next_index(previous, answered);
                    let changes = diff(&mut self.known, nodes);
                    if !changes.is_empty() {
                        self.backoff.reset();
                        return changes;
                    }
                    let early = index.is_some() && answered == previous && started.elapsed() < WATCH_WAIT;
                    if early {
                        // An agent that shuts down answers its blocking queries at once, unchanged;
                        // its successor would hold the same index far longer than it should. So
                        // read afresh (index 0), pausing longer each time this repeats.
                        tracing::debug!(service = %self.name, index = answered, "consul: blocking query woke early without a change; reading afresh");
                        self.index = 0;
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    } else {
                        self.backoff.reset();
                        tracing::trace!(service = %self.name, index = self.index, "consul: watch poll, no change");
                    }
                }
                Err(failure) => {
                    let err = self.agent.error("watch", failure);
                    let retry_in = self.backoff.next_delay();
                    tracing::warn!(service = %self.name, error = %crate::error::error_chain(&err), ?retry_in, "consul: watch failed; keeping known instances");
                    self.failing = true;
                    // The agent may come back as a new process with a fresh index.
                    self.index = 0;
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let bare = serde_json::to_value(checks(&node, Duration::from_secs(30))).unwrap();
        assert_eq!(bare.as_array().unwrap().len(), 1, "no health service announced, no gRPC check: {bare}");
        node.metadata.insert(labels::HEALTH.into(), labels::HEALTH_GRPC.into());
        let plain = serde_json::to_value(checks(&node, Duration::from_secs(30))).unwrap();
        assert_eq!(plain[0]["TTL"], "30000ms");
        assert_eq!(plain[1]["GRPC"], "10.0.0.5:50051");
        assert_eq!(plain[1]["Status"], "passing");
        assert!(plain[1].get("GRPCUseTLS").is_none(), "{plain}");
        node.metadata.insert(labels::TLS.into(), labels::FLAG_ON.into());
        let tls = serde_json::to_value(checks(&node, Duration::from_secs(30))).unwrap();
        assert_eq!(tls[1]["GRPCUseTLS"], true);
        assert_eq!(tls[1]["TLSSkipVerify"], true);
    }
}
