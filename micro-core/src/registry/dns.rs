//! DNS: discovery only, for platforms that register instances themselves (a Kubernetes
//! headless Service publishes every ready pod).
//!
//! A name resolves through a DNS SRV query built from a template, by default
//! [`DEFAULT_DNS_TEMPLATE`] (`_grpc._tcp.{name}`): with a domain set it becomes the fully
//! qualified `_grpc._tcp.<name>.<domain>.`, the record Kubernetes gives a headless Service's
//! port named `grpc`; without one the system resolver's search list completes it. Each SRV
//! target is resolved to its A/AAAA addresses, and each address with the record's port is
//! one instance. A name with no SRV record falls back to the A/AAAA records of
//! `<name>.<domain>` and the default port ([`DEFAULT_DNS_PORT`]).
//!
//! - Instances have the id `<name>@<ip>:<port>`, no version and no labels.
//! - **Re-resolution**: a watch asks again when the answer's TTL runs out, the TTL kept
//!   between a lower and an upper bound (defaults [`DEFAULT_DNS_MIN_TTL`] and
//!   [`DEFAULT_DNS_MAX_TTL`]), and reports what changed. Answers are not cached beyond that.
//!   A failed query keeps the known instances and is tried again (the lower bound, doubling
//!   to the upper).
//! - An SRV record whose target does not resolve is skipped with one warning naming it.
//! - `register` and `deregister` do nothing: the first call logs once that the platform
//!   registers. `list_services` fails: DNS cannot enumerate names.
//!
//! # Examples
//! ```no_run
//! # #[tokio::main] async fn main() -> micro_core::Result<()> {
//! use micro_core::registry::{DnsRegistry, Registry};
//!
//! let dns = DnsRegistry::builder().domain(Some("shippy.svc.cluster.local".into())).build()?;
//! // SRV _grpc._tcp.vessel-service.shippy.svc.cluster.local.
//! println!("{:?}", dns.lookup("vessel-service").await?);
//! # Ok(()) }
//! ```

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::RData,
};
use tokio::time::Instant;

use super::{Change, Node, NodeId, Registry};
use crate::{Error, Result, config::RegistryKind};

pub use crate::config::{DEFAULT_DNS_PORT, DEFAULT_DNS_TEMPLATE};
/// The shortest time an answer is used before it is asked again.
pub const DEFAULT_DNS_MIN_TTL: Duration = Duration::from_secs(crate::config::DEFAULT_DNS_MIN_TTL_SECS);
/// The longest time an answer is used before it is asked again.
pub const DEFAULT_DNS_MAX_TTL: Duration = Duration::from_secs(crate::config::DEFAULT_DNS_MAX_TTL_SECS);
/// Default time a look-up waits for a first instance.
pub const DEFAULT_DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// The stand-in for the service name in a template.
const NAME_PLACEHOLDER: &str = "{name}";
/// Bound on one DNS query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a look-up with no instance asks again until its timeout.
const LOOKUP_POLL: Duration = Duration::from_millis(200);
/// This backend's kind.
const KIND: RegistryKind = RegistryKind::Dns;

/// A discovery-only registry over DNS SRV and A/AAAA records. Cheap to share behind an `Arc`.
pub struct DnsRegistry {
    inner: Arc<Inner>,
    lookup_timeout: Duration,
    /// Whether the "the platform registers" line was logged.
    told: AtomicBool,
}

struct Inner {
    resolver: TokioResolver,
    template: String,
    domain: Option<String>,
    default_port: u16,
    ttl: (Duration, Duration),
    /// The nameserver, or `system` for the system's resolver configuration, for messages.
    address: String,
    /// SRV records whose target did not resolve, already warned about (the latest
    /// [`super::warned::MAX_WARNED`]).
    warned: Mutex<super::warned::WarnedOnce<String>>,
}

/// Builds a [`DnsRegistry`]; see [`DnsRegistry::builder`].
#[derive(Debug, Clone)]
pub struct DnsRegistryBuilder {
    template: String,
    domain: Option<String>,
    nameserver: Option<SocketAddr>,
    default_port: u16,
    min_ttl: Duration,
    max_ttl: Duration,
    lookup_timeout: Duration,
}

impl DnsRegistry {
    /// A builder with every default: [`DEFAULT_DNS_TEMPLATE`], no domain (the system's search
    /// list), the system's nameservers, [`DEFAULT_DNS_PORT`], TTLs kept between
    /// [`DEFAULT_DNS_MIN_TTL`] and [`DEFAULT_DNS_MAX_TTL`], [`DEFAULT_DNS_LOOKUP_TIMEOUT`].
    pub fn builder() -> DnsRegistryBuilder {
        DnsRegistryBuilder {
            template: DEFAULT_DNS_TEMPLATE.into(),
            domain: None,
            nameserver: None,
            default_port: DEFAULT_DNS_PORT,
            min_ttl: DEFAULT_DNS_MIN_TTL,
            max_ttl: DEFAULT_DNS_MAX_TTL,
            lookup_timeout: DEFAULT_DNS_LOOKUP_TIMEOUT,
        }
    }
}

impl DnsRegistryBuilder {
    /// The SRV query for a name, `{name}` standing for it. Default: [`DEFAULT_DNS_TEMPLATE`].
    pub fn template(mut self, template: impl Into<String>) -> Self {
        self.template = template.into();
        self
    }

    /// The domain appended to queries, making them fully qualified (e.g.
    /// `shippy.svc.cluster.local`). Default: none, so the system's search list applies.
    pub fn domain(mut self, domain: Option<String>) -> Self {
        self.domain = domain.map(|d| d.trim_matches('.').to_owned()).filter(|d| !d.is_empty());
        self
    }

    /// The nameserver to ask, `ip:port`. Default: the system's (`/etc/resolv.conf`).
    pub fn nameserver(mut self, nameserver: Option<SocketAddr>) -> Self {
        self.nameserver = nameserver;
        self
    }

    /// The port of instances found through A/AAAA records. Default: [`DEFAULT_DNS_PORT`].
    pub fn default_port(mut self, port: u16) -> Self {
        self.default_port = port;
        self
    }

    /// The bounds an answer's TTL is kept within before a watch asks again. Defaults:
    /// [`DEFAULT_DNS_MIN_TTL`] and [`DEFAULT_DNS_MAX_TTL`].
    pub fn ttl_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_ttl = min;
        self.max_ttl = max;
        self
    }

    /// How long a look-up waits for a first instance. Default: [`DEFAULT_DNS_LOOKUP_TIMEOUT`].
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// Checks the settings and makes the resolver; asks nothing yet.
    pub fn build(self) -> Result<DnsRegistry> {
        if !self.template.contains(NAME_PLACEHOLDER) {
            return Err(Error::invalid(
                format!("DNS template {:?}", self.template),
                format!("must contain {NAME_PLACEHOLDER}, e.g. {DEFAULT_DNS_TEMPLATE}"),
            ));
        }
        if self.min_ttl.is_zero() || self.min_ttl > self.max_ttl {
            return Err(Error::invalid(
                format!("DNS TTL bounds {:?}..{:?}", self.min_ttl, self.max_ttl),
                "the lower bound must be above zero and not above the upper",
            ));
        }
        let unusable = |err: NetError| Error::Registry {
            registry: KIND.to_string(),
            address: "system".into(),
            message: format!("could not read the system's resolver configuration: {err}"),
            source: None,
        };
        let provider = TokioRuntimeProvider::default();
        let (mut builder, address) = match self.nameserver {
            Some(nameserver) => {
                let mut server = NameServerConfig::udp_and_tcp(nameserver.ip());
                for connection in &mut server.connections {
                    connection.port = nameserver.port();
                }
                let config = ResolverConfig::from_name_servers(vec![server]);
                (TokioResolver::builder_with_config(config, provider), nameserver.to_string())
            }
            None => (TokioResolver::builder(provider).map_err(unusable)?, "system".to_owned()),
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.cache_size = 0;
        options.timeout = QUERY_TIMEOUT;
        options.attempts = 1;
        let resolver = builder.build().map_err(unusable)?;
        let inner = Inner {
            resolver,
            template: self.template,
            domain: self.domain,
            default_port: self.default_port,
            ttl: (self.min_ttl, self.max_ttl),
            address,
            warned: Mutex::default(),
        };
        Ok(DnsRegistry {
            inner: Arc::new(inner),
            lookup_timeout: self.lookup_timeout,
            told: AtomicBool::new(false),
        })
    }
}

/// What one resolution found.
enum Answer {
    /// Instances, and how long the answer holds (already within the bounds).
    Found(Vec<Node>, Duration),
    /// No record: the queries made, for the message.
    Nothing(String),
}

impl Inner {
    /// `query` made fully qualified with the domain, if one is set.
    fn qualified(&self, query: &str) -> String {
        match &self.domain {
            Some(domain) => format!("{query}.{domain}."),
            None => query.to_owned(),
        }
    }

    fn error(&self, what: &str, err: NetError) -> Error {
        Error::Registry {
            registry: KIND.to_string(),
            address: self.address.clone(),
            message: format!("{what}: {err}; is the nameserver reachable (MICRO_DNS_NAMESERVER)?"),
            source: Some(Box::new(err)),
        }
    }

    fn clamp(&self, ttl: Option<u32>) -> Duration {
        let ttl = Duration::from_secs(ttl.unwrap_or(0).into());
        ttl.clamp(self.ttl.0, self.ttl.1)
    }

    /// Resolves `name` once: SRV, else A/AAAA with the default port.
    async fn resolve(&self, name: &str) -> Result<Answer> {
        let srv_query = self.qualified(&self.template.replace(NAME_PLACEHOLDER, name));
        let host_query = self.qualified(name);
        let records = match self.resolver.srv_lookup(srv_query.as_str()).await {
            Ok(lookup) => lookup.answers().to_vec(),
            Err(err) if err.is_no_records_found() => Vec::new(),
            Err(err) => return Err(self.error(&format!("SRV query {srv_query}"), err)),
        };
        let mut found: BTreeMap<SocketAddr, ()> = BTreeMap::new();
        let mut ttl: Option<u32> = None;
        let mut srv_seen = false;
        for record in &records {
            let RData::SRV(srv) = &record.data else { continue };
            srv_seen = true;
            ttl = Some(ttl.map_or(record.ttl, |t| t.min(record.ttl)));
            let target = srv.target.to_string();
            match self.addresses(&target).await {
                Ok((ips, ip_ttl)) if !ips.is_empty() => {
                    ttl = Some(ttl.map_or(ip_ttl, |t| t.min(ip_ttl)));
                    found.extend(ips.into_iter().map(|ip| (SocketAddr::new(ip, srv.port), ())));
                }
                Ok(_) | Err(_) => {
                    let record =
                        format!("{srv_query} SRV {} {} {} {target}", srv.priority, srv.weight, srv.port);
                    if self.warned.lock().expect("dns warned lock").first_time(record.clone()) {
                        tracing::warn!(%record, "dns: skipped an SRV record whose target has no A/AAAA record");
                    }
                }
            }
        }
        if !srv_seen {
            match self.addresses(&host_query).await {
                Ok((ips, ip_ttl)) if !ips.is_empty() => {
                    ttl = Some(ip_ttl);
                    found.extend(ips.into_iter().map(|ip| (SocketAddr::new(ip, self.default_port), ())));
                }
                Ok(_) => {}
                Err(err) if err.is_no_records_found() => {}
                Err(err) => return Err(self.error(&format!("A/AAAA query {host_query}"), err)),
            }
        }
        if found.is_empty() {
            let asked = if srv_seen {
                format!("SRV {srv_query}: no target resolves")
            } else {
                format!("no SRV record {srv_query} and no A/AAAA record {host_query}")
            };
            return Ok(Answer::Nothing(asked));
        }
        let nodes = found
            .into_keys()
            .map(|address| Node {
                id: format!("{name}@{address}"),
                name: name.to_owned(),
                version: String::new(),
                address,
                metadata: BTreeMap::new(),
                draining: false,
            })
            .collect();
        Ok(Answer::Found(nodes, self.clamp(ttl)))
    }

    /// The A/AAAA addresses of `host` and their shortest TTL.
    async fn addresses(&self, host: &str) -> Result<(Vec<IpAddr>, u32), NetError> {
        let lookup = self.resolver.lookup_ip(host).await?;
        let ttl = lookup.as_lookup().answers().iter().map(|r| r.ttl).min().unwrap_or(0);
        Ok((lookup.iter().collect(), ttl))
    }

    fn no_instance(&self, name: &str, asked: &str) -> Error {
        Error::NoInstance {
            service: name.into(),
            registry: format!("{KIND} (nameserver {}; {asked})", self.address),
        }
    }
}

#[async_trait]
impl Registry for DnsRegistry {
    fn kind(&self) -> crate::config::RegistryKind {
        KIND
    }

    fn address(&self) -> String {
        self.inner.address.clone()
    }

    /// Does nothing: the platform publishes instances in DNS. Logs that once.
    async fn register(&self, node: &Node, _ttl: Duration) -> Result<()> {
        if !self.told.swap(true, Ordering::Relaxed) {
            tracing::info!(service = %node.name, "dns registry: registration is left to the platform (e.g. a Kubernetes headless Service); nothing is registered");
        }
        Ok(())
    }

    /// Does nothing, as `register`.
    async fn deregister(&self, _node: &Node) -> Result<()> {
        Ok(())
    }

    /// Resolves `name`; with no record, asks again until the look-up timeout.
    async fn lookup(&self, name: &str) -> Result<Vec<Node>> {
        let deadline = Instant::now() + self.lookup_timeout;
        loop {
            match self.inner.resolve(name).await? {
                Answer::Found(nodes, _) => return Ok(nodes),
                Answer::Nothing(asked) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.inner.no_instance(name, &asked));
                    }
                    tokio::time::sleep(left.min(LOOKUP_POLL)).await;
                }
            }
        }
    }

    /// Fails: DNS cannot enumerate names.
    async fn list_services(&self) -> Result<Vec<String>> {
        Err(Error::Registry {
            registry: KIND.to_string(),
            address: self.inner.address.clone(),
            message: "DNS cannot list services; ask the platform (e.g. kubectl get services)".into(),
            source: None,
        })
    }

    /// Resolves `name` again whenever the last answer's TTL (within the bounds) ran out and
    /// reports what changed. Never yields an error: a failed query keeps what is known.
    fn watch(&self, name: &str) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        let backoff = super::Backoff::new(inner.ttl.0, inner.ttl.1);
        let state = (BTreeMap::<NodeId, Node>::new(), None::<Instant>, backoff);
        futures::stream::unfold((inner, name, state), |(inner, name, (mut known, mut next, mut backoff))| async move {
            loop {
                if let Some(at) = next {
                    tokio::time::sleep_until(at).await;
                }
                let (now, wait) = match inner.resolve(&name).await {
                    Ok(Answer::Found(nodes, ttl)) => (nodes, ttl),
                    Ok(Answer::Nothing(_)) => (Vec::new(), inner.ttl.0),
                    Err(err) => {
                        let retry_in = backoff.next_delay();
                        tracing::warn!(service = %name, error = %crate::error::error_chain(&err), ?retry_in, "dns: query failed; keeping known instances");
                        next = Some(Instant::now() + retry_in);
                        continue;
                    }
                };
                backoff.reset();
                next = Some(Instant::now() + wait);
                let now: BTreeMap<NodeId, Node> = now.into_iter().map(|n| (n.id.clone(), n)).collect();
                let mut changes: Vec<Change<NodeId, Node>> =
                    known.keys().filter(|id| !now.contains_key(*id)).map(|id| Change::Remove(id.clone())).collect();
                changes.extend(
                    now.iter().filter(|(id, n)| known.get(*id) != Some(n)).map(|(id, n)| Change::Insert(id.clone(), n.clone())),
                );
                known = now;
                if !changes.is_empty() {
                    return Some((changes, (inner, name, (known, next, backoff))));
                }
            }
        })
        .flat_map(|changes| futures::stream::iter(changes.into_iter().map(Ok)))
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_need_the_name_and_ttl_bounds_must_be_ordered() {
        assert!(DnsRegistry::builder().template("_grpc._tcp.svc").build().is_err());
        let bad = DnsRegistry::builder().ttl_bounds(Duration::from_secs(5), Duration::from_secs(1));
        assert!(bad.build().is_err());
    }

    #[tokio::test]
    async fn queries_are_qualified_with_the_domain() {
        let dns = DnsRegistry::builder()
            .domain(Some("shippy.svc.cluster.local.".into()))
            .nameserver(Some("127.0.0.1:53".parse().unwrap()))
            .build()
            .unwrap();
        assert_eq!(dns.inner.qualified("_grpc._tcp.a"), "_grpc._tcp.a.shippy.svc.cluster.local.");
        assert_eq!(dns.inner.clamp(Some(0)), DEFAULT_DNS_MIN_TTL);
        assert_eq!(dns.inner.clamp(Some(3600)), DEFAULT_DNS_MAX_TTL);
        assert_eq!(dns.inner.clamp(Some(7)), Duration::from_secs(7));
    }
}
