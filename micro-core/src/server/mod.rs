//! Serving by name: [`Server`] binds, registers once the listener is bound, keeps the
//! registration alive, and on SIGINT/SIGTERM deregisters first, then drains in-flight
//! calls, then returns.
//!
//! # Examples
//! ```no_run
//! # async fn demo(fleet: impl proto::vessel::vessel_service_server::VesselService) -> micro_core::Result<()> {
//! use micro_core::{Server, config::RegistryConfig};
//! use proto::vessel::vessel_service_server::VesselServiceServer;
//!
//! let registry = RegistryConfig::default().connect().await?;
//! Server::builder("vessel-service")
//!     .version("1.0.0")
//!     .metadata("zone", "eu-1")
//!     .registry(registry)
//!     .add_service(VesselServiceServer::new(fleet))
//!     .run()
//!     .await
//! # }
//! ```

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::server::TcpIncoming,
};
use tonic_health::ServingStatus;
use tower::{Layer, util::BoxCloneSyncService};

use crate::{
    Error, Result,
    config::ServerConfig,
    middleware::ServerTraceLayer,
    registry::{MemoryRegistry, Node, Registry, validate_metadata, validate_service_name},
};

/// The HTTP-level service a server's layers wrap.
pub type HttpService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

type BoxedLayer = Arc<dyn Fn(HttpService) -> HttpService + Send + Sync>;

/// Builds and runs one named service. Setters take `self` and return it.
pub struct Server {
    name: String,
    version: String,
    metadata: BTreeMap<String, String>,
    config: ServerConfig,
    registry: Option<Arc<dyn Registry>>,
    routes: RoutesBuilder,
    layers: Vec<BoxedLayer>,
    grpc_services: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    tls: Option<crate::config::TlsConfig>,
}

impl Server {
    /// A server for the service `name`, with [`ServerConfig::default`] and no gRPC services yet.
    pub fn builder(name: impl Into<String>) -> Self {
        Server {
            name: name.into(),
            version: String::new(),
            metadata: BTreeMap::new(),
            config: ServerConfig::default(),
            registry: None,
            routes: Routes::builder(),
            layers: Vec::new(),
            grpc_services: Vec::new(),
            descriptor_sets: Vec::new(),
            tls: None,
        }
    }

    /// Serves TLS with this identity, checking client certificates against its CA when they
    /// are presented; takes precedence over the config's. Default: plaintext.
    pub fn tls(mut self, tls: Option<crate::config::TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Adds an encoded `FileDescriptorSet` (e.g. `proto::FILE_DESCRIPTOR_SET`) to the gRPC
    /// server reflection every server offers, so `micro call` and `grpcurl` can call it.
    /// Default: only the health service's own descriptors.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptor_sets.push(encoded);
        self
    }

    /// Wraps every call in a tower layer (the go-micro "wrapper"); the first layer added is
    /// the outermost. The SDK's own [`ServerTraceLayer`] (request id, one log line per
    /// failed call) always runs outside them. Default: none.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<HttpService> + Send + Sync + 'static,
        L::Service: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<http::Request<Body>>>::Future: Send + 'static,
    {
        self.layers.push(Arc::new(move |inner| BoxCloneSyncService::new(layer.layer(inner))));
        self
    }

    /// The version announced with each instance. Default: empty.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds a metadata label announced with each instance. Default: none.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Bind address, advertise address, TTL, heartbeat and drain bound; its name, version
    /// and metadata, when set, override the builder's. Default: [`ServerConfig::default`].
    pub fn config(mut self, config: ServerConfig) -> Self {
        if let Some(name) = &config.name {
            self.name = name.clone();
        }
        if let Some(version) = &config.version {
            self.version = version.clone();
        }
        self.metadata.extend(config.metadata.iter().cloned());
        self.config = config;
        self
    }

    /// Where to register. Default: this process's [`MemoryRegistry::global`].
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Adds a tonic-generated gRPC service.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.grpc_services.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Binds, registers and serves in the background; see [`RunningServer::stop`].
    pub async fn start(mut self) -> Result<RunningServer> {
        self.config.validate()?;
        validate_service_name(&self.name)?;
        validate_metadata(&self.version, &self.metadata)?;
        let registry = self.registry.unwrap_or_else(|| {
            tracing::warn!(service = %self.name, "no registry given: using this process's memory registry, which no other process sees; pass .registry(config.connect().await?) with a RegistryConfig of kind mdns or consul, or build with micro_core::service(..), which reads MICRO_REGISTRY");
            Arc::new(MemoryRegistry::global())
        });
        let listener = TcpListener::bind(self.config.address)
            .await
            .map_err(|source| Error::Bind { address: self.config.address, source })?;
        let bound =
            listener.local_addr().map_err(|source| Error::Bind { address: self.config.address, source })?;
        let advertised = advertise_address(bound, self.config.advertise.as_deref(), &interfaces())?;

        let mut node = Node::new(&self.name, advertised);
        node.version = self.version;
        node.metadata = self.metadata;
        // Every server serves grpc.health.v1; the label lets registries (Consul) check it.
        node.metadata.insert("health".into(), "grpc".into());
        let serves_tls = self.tls.as_ref().or(self.config.tls.as_ref()).is_some_and(|t| t.identity.is_some());
        if serves_tls {
            // Lets peers and Consul's gRPC health check know to speak TLS.
            node.metadata.insert("tls".into(), "1".into());
        }
        if let Some(address) = self.config.metrics_address {
            let bound =
                crate::metrics::serve(address).await.map_err(|source| Error::Bind { address, source })?;
            let reachable = if bound.ip().is_unspecified() {
                SocketAddr::new(advertised.ip(), bound.port())
            } else {
                bound
            };
            node.metadata.insert("metrics".into(), reachable.to_string());
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for set in &self.descriptor_sets {
            reflection = reflection.register_encoded_file_descriptor_set(set);
        }
        let reflection =
            reflection.build_v1().map_err(|err| Error::invalid("file descriptor set", err.to_string()))?;
        self.routes.add_service(health_service).add_service(reflection);

        let (stop_serving, serving_stopped) = oneshot::channel::<()>();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let layers = self.layers;
        let stack = tower::layer::layer_fn(move |routes: Routes| {
            let inner = layers.iter().rev().fold(HttpService::new(routes), |inner, layer| layer(inner));
            ServerTraceLayer.layer(inner)
        });
        let mut builder = tonic::transport::Server::builder();
        let tls = self.tls.as_ref().or(self.config.tls.as_ref());
        if let Some((tls, (cert, key))) = tls.and_then(|t| Some((t, t.identity.as_ref()?))) {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            if let Some(ca) = &tls.ca {
                config = config.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(true);
            }
            builder = builder.tls_config(config).map_err(|err| {
                Error::invalid("MICRO_TLS_CERT/MICRO_TLS_KEY", crate::error::error_chain(&err))
            })?;
        }
        let serve =
            tokio::spawn(builder.layer(stack).add_routes(self.routes.routes()).serve_with_incoming_shutdown(
                incoming,
                async {
                    let _ = serving_stopped.await;
                },
            ));

        if let Err(err) = registry.register(&node, self.config.register_ttl).await {
            // Nothing may keep serving unregistered.
            let _ = stop_serving.send(());
            serve.abort();
            return Err(err);
        }
        crate::metrics::metrics().registry_event(registry.kind(), &node.name, "register");
        tracing::info!(service = %node.name, node = %node.id, address = %node.address, %bound, registry = registry.kind(), "registered");
        let health_names: Vec<&str> = std::iter::once("").chain(self.grpc_services.iter().copied()).collect();
        for name in &health_names {
            health.set_service_status(*name, ServingStatus::Serving).await;
        }
        let heartbeat = tokio::spawn(keep_registered(registry.clone(), node.clone(), self.config.clone()));
        tokio::spawn(check_visible(registry.clone(), node.clone()));
        Ok(RunningServer {
            node,
            bound,
            registry,
            config: self.config,
            stop_serving,
            serve,
            heartbeat,
            health,
            health_names,
        })
    }

    /// Starts, then runs until SIGINT or SIGTERM, then stops gracefully. The signal handlers
    /// are installed before registering, so a signal that arrives while the server starts
    /// still stops it gracefully (deregistered) instead of killing it registered.
    pub async fn run(self) -> Result<()> {
        let mut shutdown = Box::pin(shutdown_signal());
        // One poll installs the handlers; a signal from now on is kept until awaited.
        let _ = futures::poll!(&mut shutdown);
        let running = self.start().await?;
        shutdown.await;
        tracing::info!(service = %running.node.name, "shutdown signal received");
        running.stop().await
    }
}

/// A server that is serving and registered.
pub struct RunningServer {
    node: Node,
    bound: SocketAddr,
    registry: Arc<dyn Registry>,
    config: ServerConfig,
    stop_serving: oneshot::Sender<()>,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    heartbeat: JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
    health_names: Vec<&'static str>,
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

    /// Announces that it is draining (clients stop picking it), keeps serving for the drain
    /// delay, deregisters, then drains in-flight calls for up to the shutdown grace, then closes.
    pub async fn stop(self) -> Result<()> {
        self.heartbeat.abort();
        for name in &self.health_names {
            self.health.set_service_status(*name, ServingStatus::NotServing).await;
        }
        if !self.config.drain_delay.is_zero() {
            let draining = Node { draining: true, ..self.node.clone() };
            match self.registry.register(&draining, self.config.register_ttl).await {
                Ok(()) => {
                    tracing::info!(service = %self.node.name, node = %self.node.id, delay = ?self.config.drain_delay, "draining");
                    tokio::time::sleep(self.config.drain_delay).await;
                }
                Err(err) => {
                    tracing::warn!(service = %self.node.name, error = %crate::error::error_chain(&err), "could not announce draining")
                }
            }
        }
        crate::metrics::metrics().registry_event(self.registry.kind(), &self.node.name, "deregister");
        match self.registry.deregister(&self.node).await {
            Ok(()) => tracing::info!(service = %self.node.name, node = %self.node.id, "deregistered"),
            Err(err) => {
                tracing::warn!(service = %self.node.name, error = %crate::error::error_chain(&err), "deregistration failed; the registration will expire")
            }
        }
        let _ = self.stop_serving.send(());
        let mut serve = self.serve;
        match tokio::time::timeout(self.config.shutdown_grace, &mut serve).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(service = %self.node.name, "drained and stopped");
                Ok(())
            }
            Ok(Ok(Err(err))) => Err(Error::Serve(Box::new(err))),
            Ok(Err(join)) => Err(Error::Serve(Box::new(join))),
            Err(_) => {
                serve.abort();
                tracing::warn!(service = %self.node.name, grace = ?self.config.shutdown_grace, "calls still in flight after the shutdown grace; closed anyway");
                Ok(())
            }
        }
    }
}

async fn keep_registered(registry: Arc<dyn Registry>, node: Node, config: ServerConfig) {
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
                crate::metrics::metrics().registry_event(registry.kind(), &node.name, "heartbeat_failed");
                tracing::warn!(service = %node.name, node = %node.id, error = %crate::error::error_chain(&err), "heartbeat failed; retrying");
            }
        }
    }
}

/// Warns once when this instance's own registration cannot be seen in its registry: over
/// mDNS that means multicast does not come back on this interface (a Docker bridge, a
/// firewall), and peers will not find the service either.
async fn check_visible(registry: Arc<dyn Registry>, node: Node) {
    let visible = match registry.lookup(&node.name).await {
        Ok(nodes) => nodes.iter().any(|n| n.id == node.id),
        Err(_) => false,
    };
    if visible {
        tracing::debug!(service = %node.name, registry = registry.kind(), "own registration visible");
    } else if registry.kind() == "mdns" {
        tracing::warn!(service = %node.name, node = %node.id, "no mDNS answer came back for this instance's own announcement: multicast seems blocked on this network (Docker bridge, firewall); peers will not find it. Use MICRO_REGISTRY=consul there");
    } else {
        tracing::warn!(service = %node.name, node = %node.id, registry = registry.kind(), address = %registry.address(), "this instance's own registration is not visible in the registry");
    }
}

/// Resolves on SIGINT or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Interface name prefixes whose addresses peers on other hosts cannot reach.
const UNREACHABLE_INTERFACE_PREFIXES: [&str; 10] =
    ["docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "vxlan", "lxc", "podman"];

fn interfaces() -> Vec<(String, IpAddr)> {
    if_addrs::get_if_addrs()
        .map(|list| list.into_iter().map(|i| (i.name.clone(), i.ip())).collect())
        .unwrap_or_default()
}

/// The address to announce for a listener bound at `bound`: the override when given (a
/// missing port is the bound one), the bound address when it is specific, else the first
/// IPv4 address of an interface that is neither loopback nor a container or VM bridge,
/// else loopback.
pub fn advertise_address(
    bound: SocketAddr,
    advertise: Option<&str>,
    interfaces: &[(String, IpAddr)],
) -> Result<SocketAddr> {
    if let Some(text) = advertise {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(addr);
        }
        if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, bound.port()));
        }
        return Err(Error::invalid(
            format!("MICRO_SERVER_ADVERTISE={text:?}"),
            "expected an IP address, with or without :port",
        ));
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let reachable = interfaces.iter().find(|(name, ip)| {
        ip.is_ipv4()
            && !ip.is_loopback()
            && !UNREACHABLE_INTERFACE_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
    });
    let ip = reachable.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |(_, ip)| *ip);
    Ok(SocketAddr::new(ip, bound.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(list: &[(&str, &str)]) -> Vec<(String, IpAddr)> {
        list.iter().map(|(n, ip)| (n.to_string(), ip.parse().unwrap())).collect()
    }

    #[test]
    fn wildcard_bind_never_advertises_a_bridge() {
        let bound = "0.0.0.0:4000".parse().unwrap();
        let list = ifs(&[
            ("lo", "127.0.0.1"),
            ("docker0", "172.17.0.1"),
            ("veth12", "10.1.0.1"),
            ("eth0", "192.168.1.20"),
        ]);
        assert_eq!(advertise_address(bound, None, &list).unwrap(), "192.168.1.20:4000".parse().unwrap());
        let only_bridges = ifs(&[("lo", "127.0.0.1"), ("br-5f2a", "172.18.0.1")]);
        assert_eq!(advertise_address(bound, None, &only_bridges).unwrap(), "127.0.0.1:4000".parse().unwrap());
    }

    #[test]
    fn specific_bind_and_override_win() {
        let bound = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertise_address(bound, None, &[]).unwrap(), bound);
        assert_eq!(
            advertise_address(bound, Some("10.0.0.5"), &[]).unwrap(),
            "10.0.0.5:4000".parse().unwrap()
        );
        assert_eq!(
            advertise_address(bound, Some("10.0.0.5:80"), &[]).unwrap(),
            "10.0.0.5:80".parse().unwrap()
        );
        assert!(advertise_address(bound, Some("vessel.local"), &[]).is_err());
    }
}
