//! `micro register NAME IP:PORT`: a sidecar registration, kept alive until SIGINT/SIGTERM.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use micro_core::{
    Node, Registry,
    error::error_chain,
    registry::{validate_metadata, validate_service_name},
};

use crate::exit::Failure;

/// What to register and how often.
pub struct Registration {
    /// The service name.
    pub name: String,
    /// The address peers call.
    pub address: SocketAddr,
    /// The version announced.
    pub version: String,
    /// Metadata labels.
    pub metadata: Vec<(String, String)>,
    /// Seconds the registration lives without a heartbeat.
    pub ttl: u64,
    /// Seconds between heartbeats.
    pub interval: u64,
}

/// Registers, heartbeats every interval, and deregisters on SIGINT/SIGTERM.
pub async fn register(registry: Arc<dyn Registry>, r: Registration) -> Result<(), Failure> {
    let invalid = |e: micro_core::Error| Failure::Other(error_chain(&e));
    validate_service_name(&r.name).map_err(invalid)?;
    if r.interval == 0 || r.interval >= r.ttl {
        return Err(Failure::Other(format!(
            "heartbeat interval {} s (MICRO_REGISTER_INTERVAL, --interval) must be at least 1 and below the TTL {} s (MICRO_REGISTER_TTL, --ttl)",
            r.interval, r.ttl
        )));
    }
    let mut node = Node::new(r.name, r.address);
    node.version = r.version;
    node.metadata = r.metadata.into_iter().collect();
    validate_metadata(&node.version, &node.metadata).map_err(invalid)?;
    let ttl = Duration::from_secs(r.ttl);
    let shutdown = micro_core::server::shutdown_signal();
    tokio::pin!(shutdown);
    // One poll installs the handlers, so a signal during registration still deregisters.
    let _ = futures::poll!(&mut shutdown);
    registry.register(&node, ttl).await?;
    eprintln!(
        "registered {} as {} in {} (TTL {} s, heartbeat every {} s); Ctrl-C to deregister",
        node.address,
        node.id,
        registry.kind(),
        r.ttl,
        r.interval
    );
    let mut heartbeat = tokio::time::interval(Duration::from_secs(r.interval));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if let Err(err) = registry.register(&node, ttl).await {
                    eprintln!("heartbeat failed: {}", error_chain(&err));
                }
            }
            _ = &mut shutdown => break,
        }
    }
    registry.deregister(&node).await?;
    eprintln!("deregistered {}", node.id);
    Ok(())
}
