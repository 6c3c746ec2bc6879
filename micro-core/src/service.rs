//! One line to a well-behaved service (feature `cli`): [`service`] reads the standard
//! settings from the environment (registry, broker, server, client, TLS, logs) the way every
//! shippy binary does, installs logging, serves gRPC reflection for the descriptors it is
//! given, and runs its event subscribers for as long as it serves.
//!
//! What it reads, with no code of the caller's: `MICRO_REGISTRY` (and the registry's
//! address, token, look-up timeout), `MICRO_BROKER` and `MICRO_BROKER_ADDRESS`,
//! `MICRO_SERVER_*` and `MICRO_REGISTER_*` (name, version, labels, listen and advertise
//! addresses, heartbeat, shutdown, metrics), `MICRO_CLIENT_*`, `MICRO_TLS_*`,
//! `MICRO_LOG_FORMAT` and `RUST_LOG`.
//!
//! The command line stays the program's own: `my-service 40` hands `40` to the program,
//! and [`service`] never looks at it, except that a program run with `--help` (or `-h`)
//! alone, and no parser of its own, prints what the service is and every variable it reads
//! when it comes to [`Service::run`], and exits. A program that wants the standard settings
//! as flags too (`--registry consul`, which beat the environment) asks for them:
//! [`Service::from_command_line`] parses the whole command line, and [`Service::with_args`]
//! takes [`ServiceArgs`] flattened into the program's own clap parser.
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

/// The standard settings alone, as [`service`] reads them from the environment and
/// [`Service::from_command_line`] from the command line too.
#[derive(Debug, Parser)]
struct StandardCli {
    #[command(flatten)]
    micro: ServiceArgs,
}

/// A service configured by the standard environment of this process (`MICRO_*`, `RUST_LOG`;
/// never its command line, which stays the program's own), with logging installed on
/// stderr (`RUST_LOG`, default `<binary>=info,micro_core=info`). `name` is what it registers
/// under unless `MICRO_SERVER_NAME` says otherwise. A variable with a bad value ends the
/// process with exit code 2 and a message naming the variable, as a bad flag would.
///
/// Run with `--help` or `-h` alone, [`Service::run`] prints what the service is and every
/// variable it reads, then exits 0 before it binds or registers anything.
///
/// # Examples
/// ```no_run
/// # async fn demo() -> micro_core::Result<()> {
/// let client = micro_core::service("greeter-client").client().await?;
/// # Ok(()) }
/// ```
pub fn service(name: impl Into<String>) -> Service {
    let binary = binary_name();
    let cli = StandardCli::try_parse_from([binary.as_str()]).unwrap_or_else(|err| {
        // Nothing came from the command line, so the bad value came from a variable.
        eprintln!("{}", in_terms_of_the_environment(&err.to_string()));
        std::process::exit(2)
    });
    let mut service = Service::with_args(name, cli.micro);
    service.help_asked = help_asked(std::env::args_os().skip(1));
    service
}

/// Values `--help` does not print: tokens, passwords, headers, and addresses that carry
/// credentials (`nats://user:secret@host`).
fn may_hold_a_secret(var: &str, value: &str) -> bool {
    value.contains('@') || ["TOKEN", "PASSWORD", "SECRET", "HEADERS"].iter().any(|word| var.contains(word))
}

/// True when the arguments are `--help` or `-h` alone.
fn help_asked(mut args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    matches!((args.next(), args.next()), (Some(arg), None) if arg == "--help" || arg == "-h")
}

/// A clap error about a flag, told in terms of its environment variable: `error: invalid
/// value 'zookeeper' for MICRO_REGISTRY`, the possible values, and where the list is.
fn in_terms_of_the_environment(message: &str) -> String {
    let named = StandardCli::command().get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let var = arg.get_env()?.to_string_lossy().into_owned();
        let start = message.find(&format!("'--{long}"))?;
        let end = start + 1 + message[start + 1..].find('\'')?;
        (message[start..end].starts_with(&format!("'--{long} ")) || end == start + 3 + long.len())
            .then(|| (message[start..=end].to_owned(), var))
    });
    let mut lines: Vec<String> = message
        .lines()
        .filter(|line| !line.starts_with("For more information") && !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if let (Some((flag, var)), Some(first)) = (named, lines.first_mut()) {
        *first = first.replace(&flag, &var);
    }
    lines.push("  (the service reads its settings from the environment: `--help` lists them)".to_owned());
    lines.join("\n")
}

/// The variable behind the flag a clap error names (`'--registry <REGISTRY>'`).
#[cfg(test)]
fn environment_of(message: &str) -> Option<String> {
    let command = StandardCli::command();
    command.get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let named = message.contains(&format!("'--{long} ")) || message.contains(&format!("'--{long}'"));
        named.then(|| arg.get_env()).flatten().map(|var| var.to_string_lossy().into_owned())
    })
}

/// The file name of the running binary, e.g. `greeter-server`.
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| Path::new(&arg0).file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "service".to_owned())
}

/// A service under construction: what it serves, and the settings read from the environment
/// (and flags, when asked). Setters take `self` and return it. Made by [`service`],
/// [`Service::from_command_line`] or [`Service::with_args`].
pub struct Service {
    name: String,
    version: String,
    /// `--help` alone on a command line no parser read: [`Service::run`] prints the help.
    help_asked: bool,
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
    /// As [`service`], with every standard setting a flag too (`--registry consul`, which
    /// beats `MICRO_REGISTRY`): parses the whole command line, so it suits a program with no
    /// arguments of its own (one with its own flattens [`ServiceArgs`] into its parser and
    /// calls [`Service::with_args`]). `--help` lists the flags, each with its variable and
    /// default; a bad flag ends the process with clap's message and exit code 2.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo() -> micro_core::Result<()> {
    /// // `greeter --registry consul --server-address 127.0.0.1:50051`
    /// micro_core::Service::from_command_line("greeter").run().await
    /// # }
    /// ```
    pub fn from_command_line(name: impl Into<String>) -> Self {
        let name = name.into();
        let about = format!(
            "{name}: a micro service. Each setting is a flag or its environment variable (shown); \
             the flag wins."
        );
        let matches = StandardCli::command().about(about).get_matches();
        let cli = StandardCli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
        Service::with_args(name, cli.micro)
    }

    /// A service from settings the caller parsed (see [`ServiceArgs`]); installs logging
    /// like [`service`] does.
    pub fn with_args(name: impl Into<String>, args: ServiceArgs) -> Self {
        let name = name.into();
        let target = binary_name().replace('-', "_");
        // Spans are exported as the name the service registers under (OTEL_SERVICE_NAME beats it).
        let registered = args.server.server_name.clone().unwrap_or_else(|| name.clone());
        args.log.init_service(&format!("{target}=info,micro_core=info"), &registered);
        Service {
            server: Server::builder(name.clone()),
            name,
            version: String::new(),
            help_asked: false,
            args,
            served: Vec::new(),
            descriptor_sets: Vec::new(),
            registry: OnceCell::new(),
            broker: OnceCell::new(),
            subscribers: Vec::new(),
        }
    }

    /// The version announced; `MICRO_SERVER_VERSION` beats it. Default: empty.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self.server = self.server.version(self.version.clone());
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
        let tls = self
            .args
            .tls
            .load_for(&RegistryConfig::from(self.args.registry.clone()), &self.name_presented())
            .await?;
        Ok(Client::new(registry).config(config).tls(tls))
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
    /// A program made by [`service`] and run with `--help` or `-h` alone prints what it is
    /// and the variables it reads ([`Service::help`]) and exits 0 instead.
    pub async fn run(self) -> Result<()> {
        if self.help_asked {
            print!("{}", self.help());
            std::process::exit(0);
        }
        self.into_server().await?.run().await
    }

    /// What `--help` prints for a service made by [`service`]: its name, version and binary,
    /// what it serves and subscribes to, then every environment variable it reads with its
    /// meaning and its value here (set, or the default).
    pub fn help(&self) -> String {
        use std::fmt::Write;
        let mut text = self.name.clone();
        if !self.version.is_empty() {
            let _ = write!(text, " {}", self.version);
        }
        let _ = write!(text, ": a micro service (the program {})", binary_name());
        let served: Vec<&str> = self.served.iter().copied().filter(|s| !s.starts_with("grpc.")).collect();
        if !served.is_empty() {
            let _ = write!(text, " serving {}", served.join(", "));
        }
        let topics: Vec<&str> = self.subscribers.iter().map(|s| s.topic.as_str()).collect();
        if !topics.is_empty() {
            let _ = write!(
                text,
                "{} subscribed to {}",
                if served.is_empty() { "" } else { "," },
                topics.join(", ")
            );
        }
        text.push_str(
            ".\n\nIt reads its settings from the environment, not from its command line, which is the \
             program's own.\nEach variable, its meaning and its value here:\n\n",
        );
        let command = StandardCli::command();
        let rows: Vec<(String, String)> = command
            .get_arguments()
            .filter(|arg| !arg.is_hide_set())
            .filter_map(|arg| {
                let var = arg.get_env()?.to_string_lossy().into_owned();
                let value = match std::env::var(&var) {
                    Ok(value) if arg.is_hide_env_values_set() || may_hold_a_secret(&var, &value) => {
                        "set (value hidden)".to_owned()
                    }
                    Ok(value) => format!("{value:?} (set)"),
                    Err(_) => match arg.get_default_values() {
                        [] => "unset".to_owned(),
                        defaults => {
                            let defaults: Vec<_> = defaults.iter().map(|d| d.to_string_lossy()).collect();
                            format!("{} (default)", defaults.join(","))
                        }
                    },
                };
                let meaning = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                let meaning = meaning.split([';', '(']).next().unwrap_or_default();
                let meaning =
                    meaning.split(". ").next().unwrap_or_default().trim().trim_end_matches('.').to_owned();
                Some((var, format!("{meaning}: {value}")))
            })
            .collect();
        let width = rows.iter().map(|(var, _)| var.len()).max().unwrap_or(0);
        for (var, line) in rows {
            let _ = writeln!(text, "  {var:width$}  {line}");
        }
        text.push_str("\nRUST_LOG chooses what is logged (default: <binary>=info,micro_core=info).\n");
        text
    }

    /// The name this service serves under, which it presents under Consul Connect.
    fn name_presented(&self) -> String {
        self.args.server.server_name.clone().unwrap_or_else(|| self.name.clone())
    }

    async fn into_server(mut self) -> Result<Server> {
        let registry = self.registry().await?;
        let tls = self
            .args
            .tls
            .load_for(&RegistryConfig::from(self.args.registry.clone()), &self.name_presented())
            .await?;
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
        crate::middleware::described_methods(sets).into_iter().map(|described| described.service).collect();
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
    fn only_help_alone_asks_for_the_service_help() {
        let args = |list: &[&str]| list.iter().map(std::ffi::OsString::from).collect::<Vec<_>>().into_iter();
        assert!(help_asked(args(&["--help"])));
        assert!(help_asked(args(&["-h"])));
        assert!(!help_asked(args(&[])));
        assert!(!help_asked(args(&["40"])), "the program's own argument");
        assert!(!help_asked(args(&["--help", "40"])), "the program's own parser decides");
    }

    #[test]
    fn a_bad_value_names_the_variable_it_came_from() {
        let err =
            StandardCli::try_parse_from(["svc", "--registry", "zookeeper"]).expect_err("no such registry");
        assert_eq!(environment_of(&err.to_string()).as_deref(), Some("MICRO_REGISTRY"), "{err}");
        let err = StandardCli::try_parse_from(["svc", "--register-ttl", "soon"]).expect_err("not a duration");
        assert_eq!(environment_of(&err.to_string()).as_deref(), Some("MICRO_REGISTER_TTL"), "{err}");
        let told = in_terms_of_the_environment(&err.to_string());
        assert!(told.starts_with("error: invalid value 'soon' for MICRO_REGISTER_TTL"), "{told}");
        assert!(!told.contains("--register-ttl") && !told.contains("try '--help'"), "{told}");
    }

    #[test]
    fn help_says_what_the_service_is_then_lists_its_variables() {
        let help =
            memory_service().version("1.2.3").add_service(tonic_health::server::health_reporter().1).help();
        let first = help.lines().next().unwrap_or_default();
        assert!(first.starts_with("svc 1.2.3: a micro service (the program "), "{help}");
        for var in ["MICRO_REGISTRY ", "MICRO_SERVER_ADDRESS ", "MICRO_BROKER ", "MICRO_LOG_FORMAT "] {
            assert!(help.contains(var), "{var} missing: {help}");
        }
        assert!(help.lines().count() < 120, "one line a variable: {help}");
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
