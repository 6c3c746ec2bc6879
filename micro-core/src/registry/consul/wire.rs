//! What goes over the wire to and from Consul: registrations, checks and health entries.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::MIN_DEREGISTER_AFTER;
use crate::{labels, registry::Node};

/// The TTL check of a node: the id Consul itself would give a service's only check.
pub(super) fn check_id(node_id: &str) -> String {
    format!("service:{node_id}")
}

/// A duration as Go's `time.ParseDuration` reads it, in whole milliseconds.
pub(super) fn go_duration(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ServiceRegistration<'a> {
    #[serde(rename = "ID")]
    pub(super) id: &'a str,
    pub(super) name: &'a str,
    pub(super) tags: Vec<String>,
    pub(super) address: String,
    pub(super) port: u16,
    pub(super) meta: BTreeMap<&'a str, &'a str>,
    pub(super) checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) connect: Option<ConnectRegistration>,
}

/// `Connect: {Native: true}`: the service speaks Connect's mTLS itself.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ConnectRegistration {
    pub(super) native: bool,
}

/// A check definition: the TTL check the heartbeat passes, or Consul's native gRPC check of
/// the instance's `grpc.health.v1` service.
#[derive(Serialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Check {
    #[serde(rename = "CheckID")]
    pub(super) check_id: String,
    pub(super) name: String,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub(super) ttl: Option<String>,
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none")]
    pub(super) grpc: Option<String>,
    #[serde(rename = "GRPCUseTLS", skip_serializing_if = "std::ops::Not::not")]
    pub(super) grpc_use_tls: bool,
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "std::ops::Not::not")]
    pub(super) tls_skip_verify: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) timeout: Option<String>,
    pub(super) status: &'static str,
    pub(super) deregister_critical_service_after: String,
}

/// How often Consul runs the gRPC health check of an instance.
pub(super) const GRPC_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long one gRPC health check may take.
pub(super) const GRPC_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The checks of a registration: the TTL check the heartbeat keeps passing and, for an
/// instance whose reserved [`labels::HEALTH`] label says it serves `grpc.health.v1` (every
/// SDK server sets it; users cannot), Consul's native gRPC check of it (over TLS, not
/// verifying the certificate, when its [`labels::TLS`] label says it serves TLS). Both
/// start passing. A Connect-native instance gets no gRPC check: it serves only callers
/// with a Connect certificate, which Consul's check does not present.
pub(super) fn checks(node: &Node, ttl: Duration, connect_native: bool) -> Vec<Check> {
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
    if !connect_native && node.metadata.get(labels::HEALTH).is_some_and(|v| v == labels::HEALTH_GRPC) {
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
pub(super) struct ServiceEntry {
    pub(super) node: CatalogNode,
    pub(super) service: AgentService,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CatalogNode {
    #[serde(default)]
    pub(super) address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct AgentService {
    #[serde(rename = "ID")]
    pub(super) id: String,
    pub(super) service: String,
    #[serde(default)]
    pub(super) address: String,
    pub(super) port: u16,
    #[serde(default)]
    pub(super) meta: Option<BTreeMap<String, String>>,
}

impl ServiceEntry {
    /// The node this entry announces; `None` (logged) when its address is not an IP address.
    pub(super) fn into_node(self) -> Option<Node> {
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
