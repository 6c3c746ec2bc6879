//! What an instance looks like in etcd: go-micro's key layout and `registry.Service` JSON.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use etcd_client::KeyValue;
use serde::{Deserialize, Serialize};

use super::{ETCD_PREFIX, conn::Conn};
use crate::registry::Node;
use crate::{Result, labels};

/// `/micro/registry/<service>/`.
pub(super) fn service_prefix(name: &str) -> String {
    format!("{ETCD_PREFIX}{}/", name.replace('/', "-"))
}

/// `/micro/registry/<service>/<node id>`, as go-micro's `nodePath` makes it.
pub fn etcd_key(service: &str, node_id: &str) -> String {
    format!("{}{}", service_prefix(service), node_id.replace('/', "-"))
}

/// go-micro's `registry.Service`, with the fields in its order.
#[derive(Serialize, Deserialize)]
pub(super) struct GoService {
    pub(super) name: String,
    #[serde(default)]
    pub(super) version: String,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) endpoints: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub(super) nodes: Option<Vec<GoNode>>,
}

/// go-micro's `registry.Node`.
#[derive(Serialize, Deserialize)]
pub(super) struct GoNode {
    pub(super) id: String,
    pub(super) address: String,
    /// go-micro before v2 kept the port apart from the address.
    #[serde(default, skip_serializing)]
    pub(super) port: Option<u16>,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
}

/// The JSON go-micro writes for `node`.
pub(super) fn encode(node: &Node) -> String {
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
pub(super) fn decode(key: &str, value: &[u8]) -> Result<Node, String> {
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
pub(super) fn node_of(conn: &Conn, kv: &KeyValue) -> Option<Node> {
    let key = String::from_utf8_lossy(kv.key());
    match decode(&key, kv.value()) {
        Ok(node) => Some(node),
        Err(reason) => {
            conn.warn_bad_value(&key, kv.mod_revision(), &reason);
            None
        }
    }
}
