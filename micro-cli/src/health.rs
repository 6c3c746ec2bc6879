//! `micro describe NAME` and `micro health NAME`: each instance with its `grpc.health.v1`
//! answer.

use std::sync::Arc;

use micro_core::{
    Node, Registry,
    config::{RegistryKind, TlsConfig},
};

use crate::{Output, exit::Failure, lookup, out, why};

/// What `health` says for Consul's own `consul` entry, which is no gRPC server.
const CONSUL_ITSELF: &str = "n/a (Consul's own entry, not a gRPC service)";

/// One instance and its health.
#[derive(serde::Serialize)]
struct Described {
    #[serde(flatten)]
    node: Node,
    health: String,
}

async fn probe_all(
    registry: &Arc<dyn Registry>,
    name: &str,
    tls: Option<&TlsConfig>,
) -> Result<Vec<Described>, Failure> {
    let nodes = lookup::find(registry, name).await?;
    let consul_itself = registry.kind() == RegistryKind::Consul && name == "consul";
    let probes = nodes.iter().map(|node| async move {
        if consul_itself { CONSUL_ITSELF.to_owned() } else { why::probe(node, tls).await }
    });
    let health = futures::future::join_all(probes).await;
    Ok(nodes.into_iter().zip(health).map(|(node, health)| Described { node, health }).collect())
}

/// `micro describe NAME`: id, address, version, health and metadata of each instance.
pub async fn describe(
    registry: &Arc<dyn Registry>,
    name: &str,
    tls: Option<&TlsConfig>,
    output: Output,
) -> Result<(), Failure> {
    let described = probe_all(registry, name, tls).await?;
    match output {
        Output::Json => out::line(out::json(&described)),
        Output::Table => {
            let rows: Vec<[String; 5]> = described
                .iter()
                .map(|d| {
                    let n = &d.node;
                    let meta: Vec<String> = n.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let health =
                        if n.draining { format!("{} (draining)", d.health) } else { d.health.clone() };
                    [n.id.clone(), n.address.to_string(), n.version.clone(), health, meta.join(",")]
                })
                .collect();
            out::table(["ID", "ADDRESS", "VERSION", "HEALTH", "METADATA"], &rows);
        }
    }
    Ok(())
}

/// `micro health NAME`: succeeds when an instance is `SERVING`; otherwise says what it saw.
pub async fn health(
    registry: &Arc<dyn Registry>,
    name: &str,
    tls: Option<&TlsConfig>,
    output: Output,
) -> Result<(), Failure> {
    let described = probe_all(registry, name, tls).await?;
    match output {
        Output::Json => {
            let list: Vec<_> = described
                .iter()
                .map(
                    |d| serde_json::json!({ "id": d.node.id, "address": d.node.address, "health": d.health }),
                )
                .collect();
            out::line(out::json(&list));
        }
        Output::Table => {
            let rows: Vec<[String; 3]> = described
                .iter()
                .map(|d| [d.node.id.clone(), d.node.address.to_string(), d.health.clone()])
                .collect();
            out::table(["ID", "ADDRESS", "HEALTH"], &rows);
        }
    }
    if described.iter().any(|d| d.health == "SERVING") {
        return Ok(());
    }
    let seen: Vec<String> = described.iter().map(|d| format!("{} {}", d.node.id, d.health)).collect();
    Err(Failure::NotServing(format!(
        "{name} is registered in {} ({} instance(s)) but none is SERVING: {}",
        registry.kind(),
        described.len(),
        seen.join("; ")
    )))
}
