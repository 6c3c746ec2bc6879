//! A server that serves and is registered, and what it runs beside the gRPC server: the
//! heartbeat, the check that its own registration is visible, the metrics endpoint.
//!
//! Everything it started stops with it. [`RunningServer::stop`] is the graceful way:
//! announce draining, wait the drain delay, deregister, drain calls in flight. Dropping a
//! `RunningServer` without `stop()` is the abrupt way: the heartbeat and the metrics
//! endpoint stop, the gRPC server closes at once (calls in flight are cut), and the
//! instance is deregistered (in a task on the current runtime when the registry needs one).
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! let running = micro_core::Server::builder("vessel-service").start().await?;
//! println!("{} at {}", running.node().id, running.local_addr());
//! running.stop().await // drains; dropping `running` would deregister without draining
//! # }
//! ```

use std::{net::SocketAddr, sync::Arc};

use futures::FutureExt;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic_health::ServingStatus;

use crate::{
    Error, Result, config::RegistryKind, config::ServerConfig, error::error_chain, metrics::MetricsEndpoint,
    registry::Node, registry::Registry,
};

/// How long a stopping server waits for its connections to close once it ended the streams
/// still open after the shutdown grace.
const STREAMS_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A background task that is aborted when this handle is dropped.
pub(super) struct Task(pub(super) JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a running server has started and must stop.
pub(super) struct Serving {
    pub(super) stop_serving: oneshot::Sender<()>,
    /// Ends the streams still open once the shutdown grace is over.
    pub(super) close_streams: tokio::sync::watch::Sender<bool>,
    pub(super) serve: JoinHandle<Result<(), tonic::transport::Error>>,
    pub(super) heartbeat: Task,
    pub(super) visibility: Task,
    /// Keeps each call's `grpc-timeout` timer from waking the runtime's time driver.
    pub(super) timer_anchor: Task,
    pub(super) metrics: Option<MetricsEndpoint>,
}

/// A server that is serving and registered. Stop it with [`RunningServer::stop`]; dropping
/// it stops everything at once and deregisters, without draining (see the module docs).
pub struct RunningServer {
    pub(super) node: Node,
    pub(super) bound: SocketAddr,
    pub(super) registry: Arc<dyn Registry>,
    pub(super) config: ServerConfig,
    pub(super) health: tonic_health::server::HealthReporter,
    pub(super) health_names: Vec<&'static str>,
    /// `None` once stopped.
    pub(super) serving: Option<Serving>,
    /// Broker subscriptions that live as long as the server (see [`crate::Server::subscription`]).
    pub(super) subscriptions: Vec<crate::broker::Subscription>,
}

impl RunningServer {
    /// The registered instance: id, name, version, advertised address, metadata.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.bound
    }

    /// Where the metrics endpoint listens, when the server serves one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.serving.as_ref()?.metrics.as_ref().map(MetricsEndpoint::address)
    }

    /// Announces that it is draining (clients stop picking it), keeps serving for the drain
    /// delay, deregisters, then drains in-flight calls for up to the shutdown grace, then
    /// closes, stops the metrics endpoint, and unsubscribes the server's broker subscriptions.
    pub async fn stop(mut self) -> Result<()> {
        let Some(serving) = self.serving.take() else { return Ok(()) };
        let Serving {
            stop_serving,
            close_streams,
            serve,
            heartbeat,
            visibility,
            timer_anchor: _until_stopped,
            metrics,
        } = serving;
        drop((heartbeat, visibility));
        let node = &self.node;
        for name in &self.health_names {
            self.health.set_service_status(*name, ServingStatus::NotServing).await;
        }
        if !self.config.drain_delay.is_zero() {
            let draining = Node { draining: true, ..node.clone() };
            match self.registry.register(&draining, self.config.register_ttl).await {
                Ok(()) => {
                    tracing::info!(service = %node.name, node = %node.id, delay = ?self.config.drain_delay, "draining");
                    tokio::time::sleep(self.config.drain_delay).await;
                }
                Err(err) => {
                    tracing::warn!(service = %node.name, error = %error_chain(&err), "could not announce draining")
                }
            }
        }
        crate::metrics::metrics().registry_event(self.registry.kind().as_str(), &node.name, "deregister");
        match self.registry.deregister(node).await {
            Ok(()) => tracing::info!(service = %node.name, node = %node.id, "deregistered"),
            Err(err) => {
                tracing::warn!(service = %node.name, registry = %self.registry.kind(), address = %self.registry.address(), error = %error_chain(&err), "deregistration failed; the registration will expire")
            }
        }
        let _ = stop_serving.send(());
        let mut serve = serve;
        let outcome = match tokio::time::timeout(self.config.shutdown_grace, &mut serve).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(service = %node.name, "drained and stopped");
                Ok(())
            }
            Ok(Ok(Err(err))) => Err(Error::Serve(Box::new(err))),
            Ok(Err(join)) => Err(Error::Serve(Box::new(join))),
            Err(_) => {
                // Streams still open end with UNAVAILABLE, so their clients open them again
                // elsewhere; unary calls still running are cut when the server closes.
                let _ = close_streams.send(true);
                match tokio::time::timeout(STREAMS_CLOSE_WAIT, &mut serve).await {
                    Ok(_) => {
                        tracing::info!(service = %node.name, grace = ?self.config.shutdown_grace, "streams still open after the shutdown grace were ended with UNAVAILABLE; stopped")
                    }
                    Err(_) => {
                        serve.abort();
                        tracing::warn!(service = %node.name, grace = ?self.config.shutdown_grace, "calls still in flight after the shutdown grace; closed anyway");
                    }
                }
                Ok(())
            }
        };
        if let Some(metrics) = metrics {
            metrics.stop().await;
        }
        for subscription in std::mem::take(&mut self.subscriptions) {
            let topic = subscription.topic().to_owned();
            subscription.unsubscribe().await;
            tracing::debug!(service = %node.name, %topic, "unsubscribed");
        }
        outcome
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let Some(Serving { stop_serving, serve, heartbeat, visibility, metrics, .. }) = self.serving.take()
        else {
            return;
        };
        drop((heartbeat, visibility, metrics));
        let _ = stop_serving.send(());
        serve.abort();
        tracing::info!(service = %self.node.name, node = %self.node.id, "dropped without stop(): deregistering without draining");
        crate::metrics::metrics().registry_event(
            self.registry.kind().as_str(),
            &self.node.name,
            "deregister",
        );
        deregister_in_background(self.registry.clone(), self.node.clone());
    }
}

/// Deregisters `node` without blocking: at once when the registry needs no I/O to do it (the
/// memory registry; mDNS queues its goodbye), else in a task on the current runtime.
pub(super) fn deregister_in_background(registry: Arc<dyn Registry>, node: Node) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(service = %node.name, node = %node.id, "a server was dropped outside a tokio runtime: it could not deregister, so its registration stays until its TTL runs out; call stop() instead");
        return;
    };
    let mut deregistration = Box::pin(async move {
        if let Err(err) = registry.deregister(&node).await {
            tracing::warn!(service = %node.name, node = %node.id, registry = %registry.kind(), address = %registry.address(), error = %error_chain(&err), "deregistration failed; the registration will expire after its TTL");
        }
    });
    if deregistration.as_mut().now_or_never().is_none() {
        // Bounded by the registry's own request timeouts, so the task ends by itself.
        drop(runtime.spawn(deregistration));
    }
}

/// Registers `node` again every register interval, until aborted.
pub(super) async fn keep_registered(registry: Arc<dyn Registry>, node: Node, config: ServerConfig) {
    let mut failing = false;
    let mut ticks = tokio::time::interval(config.register_interval);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match registry.register(&node, config.register_ttl).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(service = %node.name, node = %node.id, "registered again");
            }
            Ok(()) => tracing::trace!(service = %node.name, "heartbeat"),
            Err(err) => {
                failing = true;
                crate::metrics::metrics().registry_event(
                    registry.kind().as_str(),
                    &node.name,
                    "heartbeat_failed",
                );
                tracing::warn!(service = %node.name, node = %node.id, registry = %registry.kind(), address = %registry.address(), error = %error_chain(&err), "heartbeat failed; retrying");
            }
        }
    }
}

/// Warns once when this instance's own registration cannot be seen in its registry: over
/// mDNS that means multicast does not come back on this interface (a Docker bridge, a
/// firewall), and peers will not find the service either.
pub(super) async fn check_visible(registry: Arc<dyn Registry>, node: Node) {
    let visible = match registry.lookup(&node.name).await {
        Ok(nodes) => nodes.iter().any(|n| n.id == node.id),
        Err(_) => false,
    };
    if visible {
        tracing::debug!(service = %node.name, registry = %registry.kind(), "own registration visible");
    } else if registry.kind() == RegistryKind::Mdns {
        tracing::warn!(service = %node.name, node = %node.id, "no mDNS answer came back for this instance's own announcement: multicast seems blocked on this network (Docker bridge, firewall); peers will not find it. Use MICRO_REGISTRY=consul there");
    } else {
        tracing::warn!(service = %node.name, node = %node.id, registry = %registry.kind(), address = %registry.address(), "this instance's own registration is not visible in the registry");
    }
}
