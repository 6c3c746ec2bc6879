//! Serving by name: [`Server`] binds, registers once the listener is bound, keeps the
//! registration alive, and on SIGINT/SIGTERM deregisters first, then drains in-flight
//! calls, then returns. Streams still open after the shutdown grace end with
//! `UNAVAILABLE` (`server/drain.rs`), so their clients open them again elsewhere. [`Server::start`] gives a [`RunningServer`]: `stop()` it to drain;
//! dropping it deregisters and stops everything it started, without draining.
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

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::oneshot};
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
    labels,
    middleware::{ServedMethods, ServerTraceLayer},
    registry::{MemoryRegistry, Node, Registry, validate_metadata, validate_service_name},
    tls::TlsIncoming,
};

mod advertise;
mod deadline;
mod drain;
pub mod limit;
mod running;

pub use advertise::advertise_address;
use advertise::interfaces;
pub use limit::{REFUSED_HEADER, is_refusal};
pub use running::RunningServer;
use running::{Serving, Task, check_visible, keep_registered};

/// The gRPC server reflection service every server offers (v1).
const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

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
    subscriptions: Vec<crate::broker::Subscription>,
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
            subscriptions: Vec::new(),
        }
    }

    /// Keeps a broker subscription for as long as the server runs: [`RunningServer::stop`]
    /// unsubscribes it (waiting, as [`crate::broker::Subscription::unsubscribe`] does) once
    /// the calls in flight have drained; a start that fails or a dropped server drops it.
    /// Default: none.
    pub fn subscription(mut self, subscription: crate::broker::Subscription) -> Self {
        self.subscriptions.push(subscription);
        self
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
    /// the outermost. The SDK's own [`ServerTraceLayer`] (trace span, request id, metrics,
    /// one log line per failed call) always runs outside them. Default: none.
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

    /// How many calls it serves at once before refusing more with `RESOURCE_EXHAUSTED`
    /// (health and reflection are never refused); see [`limit`]. Default: adaptive, from
    /// [`crate::config::DEFAULT_LIMIT_MIN`] to [`crate::config::DEFAULT_LIMIT_MAX`]. Call it
    /// after [`Server::config`], which replaces every setting.
    pub fn concurrency_limit(mut self, limit: crate::config::ConcurrencyLimit) -> Self {
        self.config.limit = limit;
        self
    }

    /// A fixed limit of its own for the method `path` (`/package.Service/Method`), which
    /// then is held to it instead of the server's limit. Default: none. Call it after
    /// [`Server::config`], which replaces every setting.
    pub fn method_limit(mut self, path: impl Into<String>, limit: usize) -> Self {
        self.config.method_limits.push((path.into(), limit));
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

    /// Binds, registers and serves in the background; see [`RunningServer::stop`]. A start
    /// that fails leaves nothing behind: no listener, no task, no registration.
    pub async fn start(mut self) -> Result<RunningServer> {
        self.config.validate()?;
        validate_service_name(&self.name)?;
        validate_metadata(&self.version, &self.metadata)?;
        // What can fail without touching the network comes first.
        let tls = self.tls.take().or_else(|| self.config.tls.clone());
        let material = tls.as_ref().map(|tls| tls.material()).unwrap_or_default();
        let serves_tls = material.identity.is_some();
        let authorizes = self.config.authz_policy.is_some();
        if authorizes && !(serves_tls && material.ca.is_some()) {
            return Err(Error::invalid(
                "MICRO_AUTHZ_POLICY",
                "needs MICRO_TLS_CERT, MICRO_TLS_KEY and MICRO_TLS_CA: callers are known by their certificates \
                 (`micro certs` makes a development set)",
            ));
        }
        // With a policy, a caller without a certificate of the CA is refused at the
        // handshake; without one, a certificate is checked when presented. Each connection
        // is accepted with the material in force then (renewed files apply without a restart).
        let tls_source = match &tls {
            Some(tls) if serves_tls => Some(tls.source()?),
            _ => None,
        };
        // Consul Connect: each caller is authorized by the agent, so every caller must
        // present a certificate.
        let authorizer = tls_source.as_ref().and_then(|source| source.authorizer());
        let requires_client_certificates = authorizes || authorizer.is_some();
        let builder = tonic::transport::Server::builder();
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for set in &self.descriptor_sets {
            reflection = reflection.register_encoded_file_descriptor_set(set);
        }
        let reflection =
            reflection.build_v1().map_err(|err| Error::invalid("file descriptor set", err.to_string()))?;
        self.routes.add_service(health_service).add_service(reflection);
        let registry = self.registry.unwrap_or_else(|| {
            tracing::warn!(service = %self.name, "no registry given: using this process's memory registry, which no other process sees; pass .registry(config.connect().await?) with a RegistryConfig of kind mdns or consul, or build with micro_core::service(..), which reads MICRO_REGISTRY");
            Arc::new(MemoryRegistry::global())
        });

        // From here on, each early return drops what was started so far: the listener, then
        // the metrics endpoint (which stops when dropped).
        let listener = TcpListener::bind(self.config.address)
            .await
            .map_err(|source| Error::Bind { address: self.config.address, source })?;
        let bound =
            listener.local_addr().map_err(|source| Error::Bind { address: self.config.address, source })?;
        let advertised = advertise_address(bound, self.config.advertise.as_deref(), &interfaces())?;

        let mut node = Node::new(&self.name, advertised);
        node.version = self.version;
        node.metadata = self.metadata;
        // Reserved labels, so no user label can claim them (validate_metadata refused them).
        // Every server serves grpc.health.v1; the label lets registries (Consul) check it.
        node.metadata.insert(labels::HEALTH.into(), labels::HEALTH_GRPC.into());
        if serves_tls {
            // Lets peers and Consul's gRPC health check know to speak TLS.
            node.metadata.insert(labels::TLS.into(), labels::FLAG_ON.into());
            if let Some(certified) = certified_name(&material).filter(|certified| *certified != node.name) {
                node.metadata.insert(labels::TLS_NAME.into(), certified);
            }
        }
        let metrics = match self.config.metrics_address {
            Some(address) => {
                let endpoint = crate::metrics::serve(address)
                    .await
                    .map_err(|source| Error::MetricsBind { address, source })?;
                let bound = endpoint.address();
                let reachable = if bound.ip().is_unspecified() {
                    SocketAddr::new(advertised.ip(), bound.port())
                } else {
                    bound
                };
                node.metadata.insert(labels::METRICS.into(), reachable.to_string());
                Some(endpoint)
            }
            None => None,
        };

        let (stop_serving, serving_stopped) = oneshot::channel::<()>();
        let mut layers = self.layers;
        if let Some(path) = &self.config.authz_policy {
            let layer = crate::auth::AuthzLayer::watch(&node.name, path, &self.grpc_services)?;
            layers.insert(0, Arc::new(move |inner| BoxCloneSyncService::new(layer.layer(inner))));
        }
        if let Some(authorizer) = authorizer {
            let layer = crate::auth::AuthorizeLayer::new(&node.name, &self.grpc_services, authorizer);
            layers.insert(0, Arc::new(move |inner| BoxCloneSyncService::new(layer.layer(inner))));
        }
        // Metric labels only for what this server serves: a made-up path counts as `unknown`.
        let served = self.grpc_services.iter().copied().chain([
            <tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> as NamedService>::NAME,
            REFLECTION_SERVICE,
        ]);
        let descriptor_sets: Vec<&[u8]> =
            self.descriptor_sets.iter().copied().chain([tonic_health::pb::FILE_DESCRIPTOR_SET]).collect();
        let trace = ServerTraceLayer::new(ServedMethods::new(served, &descriptor_sets));
        // Inside the trace layer, so a refusal is counted and logged like any failed call.
        let limits =
            limit::LimitLayer::new(&self.name, advertised, self.config.limit, &self.config.method_limits);
        // Inside the trace layer too, so a stream ended at shutdown is counted as UNAVAILABLE.
        let (drain, close_streams) = drain::StreamDrainLayer::new(&node.name, trace.methods());
        // Inside the trace layer too, so a call past its deadline is counted and logged so.
        let deadline = deadline::DeadlineLayer::new(&node.name);
        let stack = tower::layer::layer_fn(move |routes: Routes| {
            // Without layers of its own, the routes are called as they are: a boxed service
            // boxes every call's future.
            let inner = match layers.is_empty() {
                true => tower::util::Either::Left(routes),
                false => tower::util::Either::Right(
                    layers.iter().rev().fold(HttpService::new(routes), |inner, layer| layer(inner)),
                ),
            };
            trace.layer(deadline.layer(drain.layer(limits.layer(inner))))
        });
        let router = builder.layer(stack).add_routes(self.routes.routes());
        let stopped = async {
            let _ = serving_stopped.await;
        };
        let serve =
            match tls_source {
                Some(source) => tokio::spawn(router.serve_with_incoming_shutdown(
                    TlsIncoming::new(listener, source, requires_client_certificates),
                    stopped,
                )),
                None => tokio::spawn(router.serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stopped,
                )),
            };

        if let Err(err) = registry.register(&node, self.config.register_ttl).await {
            // Nothing may keep serving unregistered, nor stay half-registered (Consul may
            // hold the service although its first heartbeat failed).
            let _ = stop_serving.send(());
            serve.abort();
            let _ = serve.await;
            if let Some(metrics) = metrics {
                metrics.stop().await;
            }
            if let Err(cleanup) = registry.deregister(&node).await {
                tracing::debug!(service = %node.name, error = %crate::error::error_chain(&cleanup), "nothing to withdraw after the failed registration");
            }
            return Err(err);
        }
        crate::metrics::metrics().registry_event(registry.kind().as_str(), &node.name, "register");
        tracing::info!(service = %node.name, node = %node.id, address = %node.address, %bound, registry = %registry.kind(), "registered");
        let health_names: Vec<&str> = std::iter::once("").chain(self.grpc_services.iter().copied()).collect();
        for name in &health_names {
            health.set_service_status(*name, ServingStatus::Serving).await;
        }
        let heartbeat =
            Task(tokio::spawn(keep_registered(registry.clone(), node.clone(), self.config.clone())));
        let visibility = Task(tokio::spawn(check_visible(registry.clone(), node.clone())));
        let timer_anchor = Task(tokio::spawn(crate::client::anchor_timers()));
        Ok(RunningServer {
            node,
            bound,
            registry,
            config: self.config,
            health,
            health_names,
            serving: Some(Serving {
                stop_serving,
                close_streams,
                serve,
                heartbeat,
                visibility,
                timer_anchor,
                metrics,
            }),
            subscriptions: std::mem::take(&mut self.subscriptions),
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
        let stopped = running.stop().await;
        // The last spans go out before the process ends (nothing to do with no exporter).
        #[cfg(feature = "cli")]
        tokio::task::spawn_blocking(crate::cli::flush_telemetry).await.ok();
        stopped
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

/// The service the certificate of `material` names (its SPIFFE id's `/svc/` part).
fn certified_name(material: &crate::tls::Material) -> Option<String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let (certificate, _) = material.identity.as_ref()?;
    let der = CertificateDer::pem_slice_iter(certificate).next()?.ok()?;
    crate::auth::identity::spiffe_id_of(der.as_ref())?.service().map(str::to_owned)
}
