//! Multicast DNS (DNS-SD) discovery with `mdns-sd`: zero set-up on one network segment.
//!
//! Every instance is a plain DNS-SD service of type [`SERVICE_TYPE`] whose instance label is
//! the node id, with key=value TXT entries `txtvers=1`, `name`, `version`, `id` and one entry
//! per metadata key, so `avahi-browse -r _micro._tcp` or any zeroconf library can read it.
//! One long-lived browse per registry feeds a cache, so look-ups answer from memory.
//!
//! The cache holds at most [`MAX_MDNS_INSTANCES`] instances of other processes, whatever
//! the segment announces. Past it, a new instance of a name this process looked up or
//! watches (the latest [`MAX_WANTED_NAMES`] such names) takes the place of one of a name
//! nobody here asked for (counted as the registry event `evicted`, service `*`); any other
//! new instance is refused (event `refused`) until some leave. Instances already known stay
//! and are updated, and this process's own are always kept, so a flood of made-up names
//! never hides a peer the process calls. (`mdns-sd`'s own record cache is not bounded by
//! this; its records expire with their TTL.)

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::stream::BoxStream;
use mdns_sd::{IfKind, ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo, UnregisterStatus};
use tokio::{sync::broadcast, time::Instant};

use super::{Change, Node, NodeId, Published, Registry, watch_published};
use crate::{Error, Result, config::RegistryKind, labels, registry::warned::WarnedOnce};

mod unicast;

/// The DNS-SD service type every micro service registers under.
pub const SERVICE_TYPE: &str = "_micro._tcp.local.";
/// The mDNS multicast group and port: where queries go, and what messages name.
const MDNS_GROUP: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(224, 0, 0, 251), 5353);
/// This backend's kind.
const KIND: RegistryKind = RegistryKind::Mdns;
/// The longest `list_services` waits for a fresh registry's first answers.
const BROWSE_WARM_UP: Duration = Duration::from_millis(1500);
/// How long a unicast query collects answers.
const UNICAST_WINDOW: Duration = Duration::from_millis(250);
/// When a fresh registry asks by unicast a second time.
const SECOND_QUERY_AFTER: Duration = Duration::from_secs(1);
/// The most instances of other processes the cache keeps (about 1 kB each).
pub const MAX_MDNS_INSTANCES: usize = 4096;
/// The most names remembered as looked up or watched by this process (see the module
/// documentation); past it the oldest is forgotten.
pub const MAX_WANTED_NAMES: usize = 1024;
/// The service label of the `refused` and `evicted` registry events: not the name announced, which the
/// network chooses.
const ANY_SERVICE: &str = "*";
/// How long a goodbye may take to go out on deregistration.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// A registry over multicast DNS. Cheap to share behind an `Arc`; one daemon thread each.
pub struct MdnsRegistry {
    daemon: ServiceDaemon,
    shared: Arc<Shared>,
    lookup_timeout: Duration,
    browse_started: Instant,
    /// Turns true once the first unicast query has collected its answers.
    first_answers: tokio::sync::watch::Receiver<bool>,
    /// The browse follower and the first unicast queries, stopped with the registry.
    tasks: [tokio::task::AbortHandle; 2],
}

struct Shared {
    /// Resolved instances keyed by lower-case DNS-SD full name.
    nodes: Mutex<HashMap<String, Node>>,
    changes: broadcast::Sender<Published>,
    /// What this process announced, so a heartbeat re-announces only on change.
    announced: Mutex<HashMap<NodeId, Node>>,
    /// Names this process looked up or watches: their instances are kept before others.
    wanted: Mutex<WarnedOnce<String>>,
}

impl MdnsRegistry {
    /// Starts the mDNS daemon on every interface, loopback included, and a browse for
    /// [`SERVICE_TYPE`]. A look-up of a name not seen yet waits up to `lookup_timeout` for
    /// an answer. Must be called inside a tokio runtime.
    pub fn new(lookup_timeout: Duration) -> Result<Self> {
        let daemon = ServiceDaemon::new().map_err(mdns_error("could not start the mDNS daemon"))?;
        daemon
            .enable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])
            .map_err(mdns_error("could not enable loopback"))?;
        let events = daemon.browse(SERVICE_TYPE).map_err(mdns_error("could not browse"))?;
        let (changes, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared::new(changes));
        let browse = tokio::spawn(follow_browse(events, Arc::downgrade(&shared)));
        let (answered, first_answers) = tokio::sync::watch::channel(false);
        let asking = shared.clone();
        let first_query = tokio::spawn(async move {
            asking.ask_by_unicast().await;
            let _ = answered.send(true);
            // A responder that was busy, or an answer lost: ask once more, so an instance
            // missed at start is not left to the browse's slower re-queries.
            tokio::time::sleep(SECOND_QUERY_AFTER).await;
            asking.ask_by_unicast().await;
        });
        Ok(MdnsRegistry {
            daemon,
            shared,
            lookup_timeout,
            browse_started: Instant::now(),
            first_answers,
            tasks: [browse.abort_handle(), first_query.abort_handle()],
        })
    }

    /// Waits (up to `deadline`) until the first unicast query has collected its answers.
    async fn first_answers_in(&self, deadline: Instant) {
        let mut answered = self.first_answers.clone();
        let _ = tokio::time::timeout_at(deadline, answered.wait_for(|done| *done)).await;
    }

    fn known(&self, name: &str) -> Vec<Node> {
        let nodes = self.shared.nodes.lock().expect("mdns cache lock");
        let mut found: Vec<Node> = nodes.values().filter(|n| n.name == name).cloned().collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }
}

impl Drop for MdnsRegistry {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.daemon.shutdown();
    }
}

fn mdns_error(message: &'static str) -> impl Fn(mdns_sd::Error) -> Error {
    move |source| Error::Registry {
        registry: KIND.to_string(),
        address: MDNS_GROUP.to_string(),
        message: format!("{message}; check that a network interface has multicast enabled"),
        source: Some(Box::new(source)),
    }
}

fn full_name(id: &str) -> String {
    format!("{id}.{SERVICE_TYPE}").to_lowercase()
}

impl Shared {
    /// Asks every responder once by legacy unicast and adds what they answer.
    async fn ask_by_unicast(&self) {
        match unicast::query(UNICAST_WINDOW).await {
            Ok(found) => {
                tracing::debug!(instances = found.len(), "mdns: unicast query answered");
                for (key, node) in found {
                    self.learn(key, node);
                }
            }
            Err(err) => tracing::debug!(error = %err, "mdns: unicast query not sent"),
        }
    }

    fn new(changes: broadcast::Sender<Published>) -> Self {
        Shared {
            nodes: Mutex::default(),
            changes,
            announced: Mutex::default(),
            wanted: Mutex::new(WarnedOnce::with_limit(MAX_WANTED_NAMES)),
        }
    }

    /// Remembers that this process asked for `name`.
    fn want(&self, name: &str) {
        self.wanted.lock().expect("mdns wanted lock").first_time(name.to_owned());
    }

    /// Adds or updates one instance and tells the watchers. Once [`MAX_MDNS_INSTANCES`] are
    /// known, a new instance of another process takes the place of one nobody here asked
    /// for if its own name was asked for, and is refused otherwise.
    fn learn(&self, key: String, node: Node) {
        let own = self.announced.lock().expect("mdns lock").contains_key(&node.id);
        let wanted = own || self.wanted.lock().expect("mdns wanted lock").contains(&node.name);
        let mut nodes = self.nodes.lock().expect("mdns cache lock");
        if !own && !nodes.contains_key(&key) && nodes.len() >= MAX_MDNS_INSTANCES {
            let unwanted = if wanted { self.unwanted_key(&nodes) } else { None };
            let Some(unwanted) = unwanted else {
                crate::metrics::metrics().registry_event(KIND.as_str(), ANY_SERVICE, "refused");
                tracing::debug!(service = %node.name, node = %node.id, limit = MAX_MDNS_INSTANCES, "mdns: instance refused, the cache is full");
                return;
            };
            if let Some(evicted) = nodes.remove(&unwanted) {
                crate::metrics::metrics().registry_event(KIND.as_str(), ANY_SERVICE, "evicted");
                tracing::debug!(service = %evicted.name, node = %evicted.id, for_service = %node.name, "mdns: instance evicted for one asked for");
                let _ = self.changes.send((evicted.name.clone(), Change::Remove(evicted.id)));
            }
        }
        if nodes.get(&key) != Some(&node) {
            tracing::debug!(service = %node.name, node = %node.id, address = %node.address, "mdns: instance up");
            nodes.insert(key, node.clone());
            let _ = self.changes.send((node.name.clone(), Change::Insert(node.id.clone(), node)));
        }
    }

    /// The key of an instance in `nodes` that is not this process's and whose name nobody
    /// here asked for.
    fn unwanted_key(&self, nodes: &HashMap<String, Node>) -> Option<String> {
        let announced = self.announced.lock().expect("mdns lock");
        let wanted = self.wanted.lock().expect("mdns wanted lock");
        nodes
            .iter()
            .find(|(_, node)| !announced.contains_key(&node.id) && !wanted.contains(&node.name))
            .map(|(key, _)| key.clone())
    }
}

async fn follow_browse(events: mdns_sd::Receiver<ServiceEvent>, shared: std::sync::Weak<Shared>) {
    while let Ok(event) = events.recv_async().await {
        let Some(shared) = shared.upgrade() else { return };
        match event {
            ServiceEvent::ServiceResolved(resolved) => {
                let Some(node) = decode_resolved(&resolved) else {
                    tracing::debug!(instance = %resolved.fullname, "ignored an instance without micro TXT entries");
                    continue;
                };
                shared.learn(resolved.fullname.to_lowercase(), node);
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                let removed = shared.nodes.lock().expect("mdns cache lock").remove(&fullname.to_lowercase());
                if let Some(node) = removed {
                    tracing::debug!(service = %node.name, node = %node.id, "mdns: instance gone");
                    let _ = shared.changes.send((node.name.clone(), Change::Remove(node.id)));
                }
            }
            other => tracing::trace!(event = ?other, "mdns event"),
        }
    }
    tracing::debug!("mdns browse ended");
}

/// The TXT entries that announce `node`, in order: `txtvers`, `name`, `version`, `id`,
/// `draining=1` while it drains, then metadata by key. Call [`super::validate_metadata`] first; this does not check sizes.
pub(crate) fn encode_txt(node: &Node) -> Vec<(String, String)> {
    let mut txt = vec![
        (labels::TXTVERS.to_owned(), labels::TXTVERS_CURRENT.to_owned()),
        (labels::NAME.to_owned(), node.name.clone()),
        (labels::VERSION.to_owned(), node.version.clone()),
        (labels::ID.to_owned(), node.id.clone()),
    ];
    if node.draining {
        txt.push((labels::DRAINING.to_owned(), labels::FLAG_ON.to_owned()));
    }
    txt.extend(node.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    txt
}

/// The node a set of TXT entries announces at `address`; `None` without `name` and `id`.
pub(crate) fn decode_txt<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    address: SocketAddr,
) -> Option<Node> {
    let (mut name, mut id, mut version, mut draining) = (None, None, String::new(), false);
    let mut metadata = BTreeMap::new();
    for (key, value) in entries {
        match key {
            labels::NAME => name = Some(value.to_owned()),
            labels::ID => id = Some(value.to_owned()),
            labels::VERSION => version = value.to_owned(),
            labels::DRAINING => draining = value == labels::FLAG_ON,
            key if labels::is_registry_field(key) => {}
            key => {
                metadata.insert(key.to_owned(), value.to_owned());
            }
        }
    }
    Some(Node { id: id?, name: name?, version, address, metadata, draining })
}

fn decode_resolved(resolved: &ResolvedService) -> Option<Node> {
    let ips: Vec<IpAddr> = resolved.addresses.iter().map(|ip| ip.to_ip_addr()).collect();
    let ip = ips.iter().find(|ip| ip.is_ipv4()).or(ips.first())?;
    let entries = resolved.txt_properties.iter().map(|p| (p.key(), p.val_str()));
    decode_txt(entries, SocketAddr::new(*ip, resolved.port))
}

#[async_trait]
impl Registry for MdnsRegistry {
    fn kind(&self) -> RegistryKind {
        KIND
    }

    fn address(&self) -> String {
        MDNS_GROUP.to_string()
    }

    async fn register(&self, node: &Node, _ttl: Duration) -> Result<()> {
        if self.shared.announced.lock().expect("mdns lock").get(&node.id) == Some(node) {
            return Ok(()); // the daemon keeps answering queries for it
        }
        let host = format!("{}.local.", node.id);
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            &node.id,
            &host,
            node.address.ip(),
            node.address.port(),
            encode_txt(node).as_slice(),
        )
        .map_err(mdns_error("could not build the announcement"))?;
        // The id is random per instance, so probing for a name conflict only adds delay.
        info.set_requires_probe(false);
        self.daemon.register(info).map_err(mdns_error("could not announce"))?;
        self.shared.announced.lock().expect("mdns lock").insert(node.id.clone(), node.clone());
        Ok(())
    }

    async fn deregister(&self, node: &Node) -> Result<()> {
        self.shared.announced.lock().expect("mdns lock").remove(&node.id);
        let status =
            self.daemon.unregister(&full_name(&node.id)).map_err(mdns_error("could not withdraw"))?;
        match tokio::time::timeout(GOODBYE_TIMEOUT, status.recv_async()).await {
            Ok(Ok(UnregisterStatus::OK)) => Ok(()),
            Ok(Ok(UnregisterStatus::NotFound)) => {
                tracing::debug!(node = %node.id, "mdns: was not announced");
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(Error::Registry {
                registry: KIND.to_string(),
                address: MDNS_GROUP.to_string(),
                message: format!("the goodbye for {} was not confirmed", node.id),
                source: None,
            }),
        }
    }

    async fn lookup(&self, name: &str) -> Result<Vec<Node>> {
        self.shared.want(name);
        let mut changes = self.shared.changes.subscribe();
        let deadline = Instant::now() + self.lookup_timeout;
        // A fresh registry first hears every responder's unicast answer.
        self.first_answers_in(deadline).await;
        // On a miss, every responder is asked once more, within this look-up (it ends with it).
        let mut asking = std::pin::pin!(self.shared.ask_by_unicast());
        let mut asked = false;
        loop {
            let found = self.known(name);
            if !found.is_empty() {
                return Ok(found);
            }
            let event = tokio::select! {
                () = &mut asking, if !asked => {
                    asked = true;
                    continue;
                }
                event = tokio::time::timeout_at(deadline, changes.recv()) => event,
            };
            match event {
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                    return Err(Error::NoInstance {
                        service: name.into(),
                        registry: self.kind().to_string(),
                    });
                }
            }
        }
    }

    async fn list_services(&self) -> Result<Vec<String>> {
        self.first_answers_in(self.browse_started + BROWSE_WARM_UP).await;
        let nodes = self.shared.nodes.lock().expect("mdns cache lock");
        let mut names: Vec<String> = nodes.values().map(|n| n.name.clone()).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn watch(&self, name: &str) -> BoxStream<'static, Result<Change<NodeId, Node>>> {
        self.shared.want(name);
        // Subscribe before taking the snapshot, so no change falls between the two.
        let changes = self.shared.changes.subscribe();
        watch_published(self.known(name), changes, name, self.kind().as_str(), self.address())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by the tests that flood a cache: the counts they check are process-wide.
    static FLOODING: Mutex<()> = Mutex::new(());

    #[test]
    fn txt_entries_round_trip() {
        let mut node = Node::new("vessel-service", "127.0.0.1:50051".parse().unwrap());
        node.version = "1.2.0".into();
        node.metadata.insert("zone".into(), "eu-1".into());
        node.metadata.insert("team".into(), "fleet".into());
        node.draining = true;
        let txt = encode_txt(&node);
        assert_eq!(txt[0], (labels::TXTVERS.into(), labels::TXTVERS_CURRENT.into()));
        let decoded = decode_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str())), node.address);
        assert_eq!(decoded, Some(node));
    }

    #[tokio::test]
    async fn past_the_limit_new_instances_are_refused_and_counted_but_own_ones_kept() {
        let _counting = FLOODING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (changes, _) = broadcast::channel(16);
        let shared = Shared::new(changes);
        let own = Node::new("own-service", "127.0.0.1:2".parse().unwrap());
        shared.announced.lock().unwrap().insert(own.id.clone(), own.clone());
        let peer = Node::new("peer-service", "127.0.0.1:3".parse().unwrap());
        shared.learn(full_name(&peer.id), peer.clone());
        let refused = || {
            let labels = crate::metrics::RegistryLabels {
                registry: KIND.to_string(),
                service: ANY_SERVICE.into(),
                event: "refused".into(),
            };
            crate::metrics::metrics().registry_events.get(&labels).map_or(0, |c| c.get())
        };
        let refused_before = refused();
        for i in 0..MAX_MDNS_INSTANCES + 100 {
            let flood = Node::new(format!("made-up-{i}"), "127.0.0.1:4".parse().unwrap());
            shared.learn(full_name(&flood.id), flood);
        }
        assert_eq!(shared.nodes.lock().unwrap().len(), MAX_MDNS_INSTANCES);
        assert_eq!(refused() - refused_before, 101, "the flood past the limit, counted");
        shared.learn(full_name(&own.id), own.clone());
        let mut moved = peer.clone();
        moved.address = "127.0.0.1:5".parse().unwrap();
        shared.learn(full_name(&peer.id), moved.clone());
        let nodes = shared.nodes.lock().unwrap();
        assert_eq!(nodes.get(&full_name(&own.id)), Some(&own), "this process's own instance is kept");
        assert_eq!(nodes.get(&full_name(&peer.id)), Some(&moved), "a known peer stays and is updated");
    }

    #[tokio::test]
    async fn past_the_limit_an_instance_of_a_name_asked_for_takes_the_place_of_a_made_up_one() {
        let _counting = FLOODING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (changes, _) = broadcast::channel(16);
        let shared = Shared::new(changes);
        for i in 0..MAX_MDNS_INSTANCES {
            let flood = Node::new(format!("made-up-{i}"), "127.0.0.1:4".parse().unwrap());
            shared.learn(full_name(&flood.id), flood);
        }
        let peers: Vec<Node> = (0..3)
            .map(|i| Node::new("vessel-service", format!("127.0.0.1:{}", 10 + i).parse().unwrap()))
            .collect();
        shared.learn(full_name(&peers[0].id), peers[0].clone());
        let known = |node: &Node| shared.nodes.lock().unwrap().contains_key(&full_name(&node.id));
        assert!(!known(&peers[0]), "a name nobody asked for is refused when full");

        shared.want("vessel-service");
        for peer in &peers {
            shared.learn(full_name(&peer.id), peer.clone());
        }
        assert!(peers.iter().all(known), "each instance of a name asked for finds a place");
        let nodes = shared.nodes.lock().unwrap();
        assert_eq!(nodes.len(), MAX_MDNS_INSTANCES);
        assert_eq!(nodes.values().filter(|n| n.name.starts_with("made-up-")).count(), MAX_MDNS_INSTANCES - 3);
    }

    #[test]
    fn txt_without_name_or_id_is_not_a_micro_node() {
        let addr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(decode_txt([("name", "x")], addr), None);
        assert_eq!(decode_txt([("id", "x-1")], addr), None);
    }

    #[test]
    fn largest_allowed_announcement_fits_one_packet() {
        use super::super::{MAX_METADATA_BYTES, MAX_SERVICE_NAME_LEN};
        let name = "n".repeat(MAX_SERVICE_NAME_LEN);
        let mut node = Node::new(name, "127.0.0.1:1".parse().unwrap());
        let (mut k, mut total) = (0, 0);
        while total + 70 <= MAX_METADATA_BYTES {
            node.metadata.insert(format!("key{k:04}"), "v".repeat(62));
            total += 7 + 62;
            k += 1;
        }
        super::super::validate_metadata(&node.version, &node.metadata).unwrap();
        let txt_bytes: usize = encode_txt(&node).iter().map(|(k, v)| 1 + k.len() + 1 + v.len()).sum();
        let names = 2 * (node.id.len() + SERVICE_TYPE.len()) + 2 * node.id.len();
        // DNS header, PTR + SRV + TXT + A records with their names: well under an Ethernet MTU.
        assert!(12 + names + txt_bytes + 4 * 12 + 4 < 1460, "{txt_bytes} TXT bytes");
    }
}
