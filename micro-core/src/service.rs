//! One line to a well-behaved service (feature `cli`): [`service`] reads the standard flags
//! and environment (registry, broker, server, client, TLS, logs) the way every shippy binary
//! does, installs logging, serves gRPC reflection for the descriptors it is given, and runs
//! its event subscribers for as long as it serves.
//!
//! What it reads, with no code of the caller's: `MICRO_REGISTRY` (and the registry's
//! address, token, look-up timeout), `MICRO_BROKER` and `MICRO_BROKER_ADDRESS`,
//! `MICRO_SERVER_*` and `MICRO_REGISTER_*` (name, version, labels, listen and advertise
//! addresses, heartbeat, shutdown, metrics), `MICRO_CLIENT_*`, `MICRO_TLS_*`,
//! `MICRO_LOG_FORMAT` and `RUST_LOG`; each also as a flag (`--registry consul`), which beats
//! the environment. `--help` lists them all.
//!
//! The long form, [`crate::Server::builder`] with [`crate::config`] values, stays for
//! programs that want full control: it reads nothing from the environment.
//!
//! # Examples
//! A server:
//! ```no_run
//! # async fn demo(fleet: impl proto::vessel::vessel_service_server::VesselService) -> micro_core::Result<()> {
//! use proto::vessel::vessel_service_server::VesselServiceServer;
//!
//! micro_core::service("vessel-service")
//!     .file_descriptor_set(proto::FILE_DESCRIPTOR_SET) // so `micro call` can call it
//!     .add_service(VesselServiceServer::new(fleet))
//!     .run() // until SIGINT/SIGTERM
//!     .await
//! # }
//! ```
//! A client, configured by the same flags:
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
//!
//! let client = micro_core::service("vessel-finder").client().await?;
//! let mut vessels = VesselServiceClient::new(client.channel("vessel-service"));
//! let reply = vessels.find_available(Specification { capacity: 3, max_weight: 500 }).await;
//! # Ok(()) }
//! ```
//! A subscriber, and a publish on the same broker (`MICRO_BROKER`, default: the registry):
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::broker::{SubscribeOptions, publish_proto};
//! use proto::consignment::Consignment;
//!
//! let service = micro_core::service("auditor");
//! let broker = service.broker().await?; // for publishing, e.g. from a handler
//! publish_proto(&*broker, "audit.started", None, &Consignment::default()).await?;
//! service
//!     .subscribe_proto("consignment.created", SubscribeOptions::default().queue("auditor"), |c: Consignment, _message| async move {
//!         println!("consignment {}", c.id);
//!         Ok(())
//!     })
//!     .run() // subscribed before it registers, unsubscribed after it drained
//!     .await
//! # }
//! ```

use std::{convert::Infallible, path::Path, sync::Arc};

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use tokio::sync::OnceCell;
use tonic::{body::Body, server::NamedService};
use tower::Layer;

use crate::{
    BoxError, Client, Registry, Result, RunningServer, Server,
    broker::{Broker, Handler, Message, SubscribeOptions, proto_handler},
    cli::{BrokerArgs, ClientArgs, LogArgs, RegistryArgs, ServerArgs, TlsArgs},
    config::{BrokerConfig, ClientConfig, RegistryConfig, ServerConfig},
    server::HttpService,
};

/// Every standard flag a service reads, each with its environment variable: flatten it into
/// your own clap parser (`#[command(flatten)] micro: ServiceArgs`) when the program has
/// flags of its own, then call [`Service::with_args`].
///
/// # Examples
/// ```
/// use clap::Parser;
/// #[derive(Parser)]
/// struct Cli {
///     /// Who to greet.
///     who: String,
///     #[command(flatten)]
///     micro: micro_core::service::ServiceArgs,
/// }
/// let cli = Cli::parse_from(["greet", "world", "--registry", "memory"]);
/// let service = micro_core::service::Service::with_args("greeter-client", cli.micro);
/// ```
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// The registry: `MICRO_REGISTRY`, `MICRO_REGISTRY_ADDRESS`, `MICRO_LOOKUP_TIMEOUT`, ….
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The broker: `MICRO_BROKER`, `MICRO_BROKER_ADDRESS`.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The server: `MICRO_SERVER_*`, `MICRO_REGISTER_*`, `MICRO_SHUTDOWN_*`, `MICRO_METRICS_ADDRESS`.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The client: `MICRO_CLIENT_*`.
    #[command(flatten)]
    pub client: ClientArgs,
    /// TLS: `MICRO_TLS_CERT`, `MICRO_TLS_KEY`, `MICRO_TLS_CA`.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Logs: `MICRO_LOG_FORMAT`; `RUST_LOG` selects what is logged.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The parser [`service`] uses when the program has no flags of its own.
#[derive(Debug, Parser)]
#[command(about = "A micro service: every setting below also reads its environment variable.")]
struct StandardCli {
    #[command(flatten)]
    micro: ServiceArgs,
}

/// A service configured by the standard flags and environment of this process: parses them
/// (exiting with clap's message on `--help` or a bad value, as any command does), installs
/// logging on stderr (`RUST_LOG`, default `<binary>=info,micro_core=info`), and returns the
/// builder. `name` is what it registers under unless `MICRO_SERVER_NAME` says otherwise.
///
/// # Examples
/// ```no_run
/// # async fn demo() -> micro_core::Result<()> {
/// let client = micro_core::service("greeter-client").client().await?;
/// # Ok(()) }
/// ```
pub fn service(name: impl Into<String>) -> Service {
    let matches = StandardCli::command().get_matches();
    let cli = StandardCli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    Service::with_args(name, cli.micro)
}

/// The file name of the running binary, e.g. `greeter-server`.
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| Path::new(&arg0).file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "service".to_owned())
}

/// A service under construction: what it serves, and the settings read from flags and
/// environment. Setters take `self` and return it. Made by [`service`] or
/// [`Service::with_args`].
pub struct Service {
    args: ServiceArgs,
    server: Server,
    served: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    registry: OnceCell<Arc<dyn Registry>>,
    broker: OnceCell<Arc<dyn Broker>>,
    subscribers: Vec<Subscriber>,
}

/// A subscription to make when the service starts.
struct Subscriber {
    topic: String,
    options: SubscribeOptions,
    handler: Handler,
}

impl Service {
    /// A service from settings the caller parsed (see [`ServiceArgs`]); installs logging
    /// like [`service`] does.
    pub fn with_args(name: impl Into<String>, args: ServiceArgs) -> Self {
        let name = name.into();
        let target = binary_name().replace('-', "_");
        // Spans are exported as the name the service registers under (OTEL_SERVICE_NAME beats it).
        let registered = args.server.server_name.clone().unwrap_or_else(|| name.clone());
        args.log.init_service(&format!("{target}=info,micro_core=info"), &registered);
        Service {
            args,
            server: Server::builder(name),
            served: Vec::new(),
            descriptor_sets: Vec::new(),
            registry: OnceCell::new(),
            broker: OnceCell::new(),
            subscribers: Vec::new(),
        }
    }

    /// The version announced; `MICRO_SERVER_VERSION` beats it. Default: empty.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.server = self.server.version(version);
        self
    }

    /// Adds a metadata label; `MICRO_SERVER_METADATA` adds more. Default: none.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.server = self.server.metadata(key, value);
        self
    }

    /// Serves gRPC reflection for an encoded `FileDescriptorSet`, as the proto build writes it
    /// (e.g. `proto::FILE_DESCRIPTOR_SET`), so `micro call` and `grpcurl` can call the
    /// services it describes. A served service it does not describe gets a warning at start.
    /// Default: only the health service's descriptors.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptor_sets.push(encoded);
        self.server = self.server.file_descriptor_set(encoded);
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
        self.served.push(S::NAME);
        self.server = self.server.add_service(service);
        self
    }

    /// Wraps every call in a tower layer, as [`Server::layer`] does. Default: none.
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
        self.server = self.server.layer(layer);
        self
    }

    /// The settings read from flags and environment.
    pub fn args(&self) -> &ServiceArgs {
        &self.args
    }

    /// The registry `MICRO_REGISTRY` names, connected on first use and shared by the server
    /// and every client of this service.
    pub async fn registry(&self) -> Result<Arc<dyn Registry>> {
        let config = RegistryConfig::from(self.args.registry.clone());
        self.registry.get_or_try_init(|| async move { config.connect().await }).await.cloned()
    }

    /// A client on this service's registry, configured by the `MICRO_CLIENT_*` and TLS
    /// settings; `client.channel("name")` is a channel any tonic-generated client accepts.
    pub async fn client(&self) -> Result<Client> {
        let registry = self.registry().await?;
        let lookup_timeout = RegistryConfig::from(self.args.registry.clone()).lookup_timeout;
        let config = ClientConfig::from_args(self.args.client.clone(), lookup_timeout)?;
        Ok(Client::new(registry).config(config).tls(self.args.tls.load()?))
    }

    /// The broker `MICRO_BROKER` names (default: the registry broker, on this service's
    /// client), connected on first use and shared by its subscribers and every caller.
    pub async fn broker(&self) -> Result<Arc<dyn Broker>> {
        let config = BrokerConfig::from(self.args.broker.clone());
        let client = self.client().await?;
        self.broker.get_or_try_init(|| async move { config.connect(&client).await }).await.cloned()
    }

    /// Runs `handler` for each message on `topic` while the service runs: subscribed when it
    /// starts, before it registers (a subscription that fails fails the start), and
    /// unsubscribed when it stops, after the calls in flight drained. Default: none.
    pub fn subscribe(
        mut self,
        topic: impl Into<String>,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Self {
        self.subscribers.push(Subscriber { topic: topic.into(), options, handler });
        self
    }

    /// As [`Service::subscribe`], with a handler that receives `M` decoded from the body, as
    /// [`crate::broker::subscribe_proto`] does.
    pub fn subscribe_proto<M, F, Fut>(self, topic: impl Into<String>, options: SubscribeOptions, f: F) -> Self
    where
        M: prost::Message + Default + 'static,
        F: Fn(M, Message) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.subscribe(topic, options, proto_handler(f))
    }

    /// Binds, registers and serves in the background; see [`RunningServer::stop`].
    pub async fn start(self) -> Result<RunningServer> {
        self.into_server().await?.start().await
    }

    /// Starts, then runs until SIGINT or SIGTERM, then stops gracefully (see [`Server::run`]).
    pub async fn run(self) -> Result<()> {
        self.into_server().await?.run().await
    }

    async fn into_server(mut self) -> Result<Server> {
        let registry = self.registry().await?;
        let tls = self.args.tls.load()?;
        let config = ServerConfig::try_from(self.args.server.clone())?;
        warn_unreflected(&self.served, &self.descriptor_sets);
        let mut subscriptions = Vec::new();
        if !self.subscribers.is_empty() {
            let broker = self.broker().await?;
            for Subscriber { topic, options, handler } in std::mem::take(&mut self.subscribers) {
                let subscription = broker.subscribe(&topic, options, handler).await?;
                tracing::info!(%topic, queue = subscription.queue().unwrap_or("-"), broker = broker.kind(), "subscribed");
                subscriptions.push(subscription);
            }
        }
        let server = self.server.config(config).tls(tls).registry(registry);
        Ok(subscriptions.into_iter().fold(server, Server::subscription))
    }
}

/// Warns once per served gRPC service that no given descriptor set describes: reflection
/// cannot offer it, so `micro call` and `grpcurl` cannot call it.
fn warn_unreflected(served: &[&str], sets: &[&[u8]]) {
    let described = described_services(sets);
    for name in served.iter().filter(|name| !described.iter().any(|d| d == *name)) {
        tracing::warn!(
            grpc_service = %name,
            "served without reflection: `micro call` and grpcurl cannot call it; add \
             .file_descriptor_set(FILE_DESCRIPTOR_SET) with the encoded set your proto build writes"
        );
    }
}

/// The full names (`package.Service`) of the services in encoded `FileDescriptorSet`s.
fn described_services(sets: &[&[u8]]) -> Vec<String> {
    let mut names: Vec<String> =
        crate::middleware::described_methods(sets).into_iter().map(|(service, _)| service).collect();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        micro: ServiceArgs,
    }

    #[test]
    fn descriptor_sets_name_their_services() {
        assert_eq!(described_services(&[tonic_health::pb::FILE_DESCRIPTOR_SET]), ["grpc.health.v1.Health"]);
        assert!(described_services(&[&b"not a descriptor set"[..]]).is_empty());
    }

    #[test]
    fn flags_reach_the_server_and_registry_settings() {
        let cli = Cli::parse_from(["svc", "--registry", "memory", "--server-address", "127.0.0.1:7"]);
        let config = ServerConfig::try_from(cli.micro.server).unwrap();
        assert_eq!(config.address, "127.0.0.1:7".parse().unwrap());
        assert_eq!(RegistryConfig::from(cli.micro.registry).kind, crate::config::RegistryKind::Memory);
    }

    fn memory_service() -> Service {
        let args = ["svc", "--registry", "memory", "--broker", "memory", "--server-address", "127.0.0.1:0"];
        Service::with_args("svc", Cli::parse_from(args).micro)
    }

    #[tokio::test]
    async fn subscribers_run_while_the_service_serves_and_stop_with_it() {
        let service = memory_service();
        let broker = service.broker().await.expect("the broker MICRO_BROKER names");
        assert_eq!(broker.kind(), "memory");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = crate::broker::handler(move |m: Message| {
            let tx = tx.clone();
            async move { tx.send(m.body).map_err(Into::into) }
        });
        let running =
            service.subscribe("greeted", SubscribeOptions::default(), forward).start().await.expect("start");
        broker.publish(Message::new("greeted", "one")).await.expect("publish");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.expect("handled while serving").as_deref(), Some(&b"one"[..]));
        running.stop().await.expect("stop");
        broker.publish(Message::new("greeted", "two")).await.expect("a publish nobody hears");
        let after = tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await;
        assert_eq!(after, Ok(None), "the subscription and its handler are gone once stopped");
    }

    #[tokio::test]
    async fn a_subscription_that_fails_fails_the_start_before_it_registers() {
        let service = memory_service();
        let registry = service.registry().await.expect("registry");
        let durable = SubscribeOptions::default().queue("g").durable();
        let err = service
            .subscribe("greeted", durable, crate::broker::handler(|_| async { Ok(()) }))
            .start()
            .await
            .err()
            .expect("the memory broker keeps nothing, so refuses a durable subscriber")
            .to_string();
        assert!(err.contains("memory") && err.contains("durabl"), "{err}");
        let lookup = registry.lookup("svc").await;
        assert!(lookup.as_ref().map_or(true, Vec::is_empty), "nothing registered: {lookup:?}");
    }
}
