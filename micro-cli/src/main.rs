//! `micro`: make a service (`new`), and see and use what is registered: `services`,
//! `describe`, `health`, `watch`, `call`, `why`, `wait`, `register`, `config`, `gateway`,
//! `publish`, `subscribe`, `redeliver`; make certificates (`certs`) and explain
//! authorization policies (`authz`); same `MICRO_REGISTRY` switch and flags as the
//! services. Exit codes: see [`exit`].

mod authz;
mod call;
mod call_stream;
mod certs;
mod dynamic;
mod exit;
mod gateway;
mod health;
mod lookup;
mod message_type;
mod new;
mod out;
mod publish;
mod redeliver;
mod register;
mod settings;
mod subscribe;
mod watch;
mod why;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource};
use micro_core::{
    Error,
    cli::{BrokerArgs, ClientArgs, LogArgs, RegistryArgs, TlsArgs},
    config::{
        BrokerConfig, ClientConfig, DEFAULT_REGISTER_INTERVAL_SECS, DEFAULT_REGISTER_TTL_SECS, RegistryConfig,
    },
};

use exit::Failure;

/// Inspect services registered by name.
///
/// Exit codes: 0 success; 1 other failure (bad input); 2 usage; 3 not found (no instance
/// registered); 4 found but not serving; 5 registry unreachable; 6 broker unreachable; 7
/// timed out (subscribe); 64 + N a call failed with gRPC status code N (73
/// FAILED_PRECONDITION, 78 UNAVAILABLE, …).
#[derive(Debug, Parser)]
#[command(name = "micro", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How to print results.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new service's crate: proto, build.rs, server, client, a test that calls it by
    /// name in-process, a README; `cargo build`, `cargo test` and `cargo run` work in it at once.
    New(new::NewArgs),
    /// List the names of registered services.
    Services,
    /// Show the instances of a service: id, address, version, metadata.
    Describe {
        /// The service name.
        name: String,
    },
    /// Ask each instance's grpc.health.v1 service; fails (exit 4) unless one is SERVING.
    Health {
        /// The service name.
        name: String,
    },
    /// Stream registry changes of the named services (all, when none is named) until Ctrl-C.
    Watch {
        /// Service names.
        names: Vec<String>,
    },
    /// Make a call through the registry, learning the types from server reflection, and
    /// print the reply as JSON. A streaming method's replies are printed one JSON line each
    /// as they come; a client-streaming method reads its requests from stdin, one JSON
    /// message per line.
    Call {
        /// The service name.
        name: String,
        /// `package.Service/Method`, e.g. `vessel.VesselService/FindAvailable`.
        method: String,
        /// The request as JSON, e.g. `{"capacity": 3, "max_weight": 55000}`; `{}` when left
        /// out. Not for a client-streaming method, whose requests come from stdin.
        json: Option<String>,
    },
    /// Explain discovery for a name: what the registry holds, which instances a client
    /// could call and why not the others, and which would be picked next; fails (exit 3, 4
    /// or 5) when no instance is pickable.
    Why {
        /// The service name.
        name: String,
        /// Only instances of this version, as a filtered client would.
        #[arg(long)]
        version: Option<String>,
        /// Only instances with these labels, `key=value`, comma-separated or repeated.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        metadata: Vec<(String, String)>,
    },
    /// Show each setting's value and where it came from: flag, environment or default.
    Config,
    /// Register a service that does not register itself (a sidecar), keep it registered,
    /// and deregister it on SIGINT/SIGTERM.
    Register {
        /// The service name.
        name: String,
        /// The address peers should call, `ip:port`.
        address: SocketAddr,
        /// The version to announce.
        #[arg(long, default_value = "")]
        version: String,
        /// Metadata labels, `key=value`, comma-separated or repeated.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        metadata: Vec<(String, String)>,
        /// Seconds the registration lives without a heartbeat.
        #[arg(long, alias = "register-ttl", env = "MICRO_REGISTER_TTL", default_value_t = DEFAULT_REGISTER_TTL_SECS)]
        ttl: u64,
        /// Seconds between heartbeats; must be below the TTL.
        #[arg(long, alias = "register-interval", env = "MICRO_REGISTER_INTERVAL", default_value_t = DEFAULT_REGISTER_INTERVAL_SECS)]
        interval: u64,
    },
    /// Serve every registered service as HTTP/JSON (`POST /NAME/package.Service/Method`),
    /// with a dashboard at /ui, until SIGINT/SIGTERM.
    Gateway(gateway::GatewayArgs),
    /// Wait until every named service has an instance; fails (exit 3) after the look-up timeout.
    Wait {
        /// The service names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Publish one message on the broker (`--broker`) and print its message id.
    Publish(publish::PublishArgs),
    /// Print each message on a topic as one JSON line, until `--count`, `--timeout` or
    /// SIGINT/SIGTERM; says `subscribed to …` on stderr once the subscription is in force.
    Subscribe(subscribe::SubscribeArgs),
    /// Publish a topic's dead letters to it again (once the handler is mended), printing each
    /// message id; stops when none came for `--idle`.
    Redeliver(redeliver::RedeliverArgs),
    /// Makes a development CA (once) and a short-lived certificate per service, each naming
    /// its service by DNS name and SPIFFE id (`spiffe://TRUST_DOMAIN/svc/NAME`).
    Certs(certs::CertsArgs),
    /// Explains authorization policies: `micro authz check CALLER SERVICE METHOD --policy FILE`.
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    // The gateway serves many callers at once, on every core; the other commands make a few
    // calls and need one thread.
    let mut runtime = match cli.command {
        Command::Gateway(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(command(matches, cli)),
        Err(err) => {
            eprintln!("micro: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn command(matches: clap::ArgMatches, cli: Cli) -> ExitCode {
    let quiet = !matches!(cli.command, Command::Gateway(_));
    cli.log.init(if quiet { "micro_core=error" } else { "micro=info,micro_core=info" });
    // What needs no registry is answered before one is opened.
    let outcome = match cli.command {
        Command::Config => {
            settings::print(&matches, cli.output);
            Ok(())
        }
        Command::Certs(args) => certs::certs(args),
        Command::Authz(command) => authz::authz(command),
        Command::New(args) => new::new(args, cli.registry.registry).map(out::line),
        command => {
            // A client-streaming call waits for its reply headers until the input ends, so it
            // gets the request timeout only when one is set.
            let timeout_set = matches!(
                matches.value_source("client_request_timeout"),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            run(Cli { command, ..cli }, timeout_set).await
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// The name `micro` presents under Consul Connect, unless `MICRO_CONSUL_CONNECT_NAME` says.
const CONNECT_NAME: &str = "micro";

async fn run(cli: Cli, request_timeout_set: bool) -> Result<(), Failure> {
    let config = RegistryConfig::from(cli.registry);
    let tls = cli.tls.load_for(&config, CONNECT_NAME).await?;
    let client_config = ClientConfig::from_args(cli.client, config.lookup_timeout)?;
    let registry = config.connect().await?;
    let broker_config = BrokerConfig::from(cli.broker);
    let output = cli.output;
    match cli.command {
        Command::Services => {
            let names = registry.list_services().await?;
            if names.is_empty() && output == Output::Table {
                eprintln!("no services registered in registry {} ({})", registry.kind(), registry.address());
            }
            match output {
                Output::Json => out::line(out::json(&names)),
                Output::Table => names.iter().for_each(out::line),
            }
        }
        Command::Describe { name } => health::describe(&registry, &name, tls.as_ref(), output).await?,
        Command::Health { name } => health::health(&registry, &name, tls.as_ref(), output).await?,
        Command::Config | Command::New(_) | Command::Certs(_) | Command::Authz(_) => {
            unreachable!("answered before the registry is opened")
        }
        Command::Watch { names } => watch::watch(registry, names, output).await?,
        Command::Call { name, method, json } => {
            lookup::find(&registry, &name).await?;
            let client = micro_core::Client::new(registry.clone()).config(client_config).tls(tls);
            let named = |failure| match failure {
                Failure::CallFailed { code, message } => {
                    Failure::CallFailed { code, message: format!("call {name} {method}: {message}") }
                }
                other => other,
            };
            let descriptor = call::resolve(client.channel(&name), &method).await.map_err(named)?;
            if descriptor.is_client_streaming() {
                let client = match request_timeout_set {
                    true => client,
                    false => client.request_timeout(call_stream::CLIENT_STREAM_TIMEOUT),
                };
                let stdin = std::io::BufReader::new(std::io::stdin());
                call_stream::call(client.channel(&name), &descriptor, json.as_deref(), stdin)
                    .await
                    .map_err(named)?;
            } else if descriptor.is_server_streaming() {
                let stdin = std::io::BufReader::new(std::io::empty());
                call_stream::call(client.channel(&name), &descriptor, json.as_deref(), stdin)
                    .await
                    .map_err(named)?;
            } else {
                let json = json.as_deref().unwrap_or("{}");
                let reply = call::call(client.channel(&name), &descriptor, json).await.map_err(named)?;
                out::line(reply);
            }
        }
        Command::Why { name, version, metadata } => {
            let explanation = why::explain(registry, &name, (version, metadata), client_config, tls).await;
            match output {
                Output::Json => out::line(out::json(&explanation)),
                Output::Table => why::print(&explanation),
            }
            if let Some(failure) = explanation.failure() {
                return Err(failure);
            }
        }
        Command::Register { name, address, version, metadata, ttl, interval } => {
            let registration = register::Registration { name, address, version, metadata, ttl, interval };
            register::register(registry, registration).await?;
        }
        Command::Gateway(args) => {
            let client = micro_core::Client::new(registry).config(client_config).tls(tls.clone());
            gateway::run(args, client, tls).await?;
        }
        Command::Wait { names } => {
            for name in &names {
                let limit = config.lookup_timeout + Duration::from_secs(1);
                let found = match tokio::time::timeout(limit, registry.lookup(name)).await {
                    Ok(Ok(found)) => found,
                    Ok(Err(err)) => return Err(lookup::missing(&registry, name, err).await),
                    Err(_) => {
                        let timeout = Error::NoInstance {
                            service: name.clone(),
                            registry: registry.kind().to_string(),
                        };
                        return Err(lookup::missing(&registry, name, timeout).await);
                    }
                };
                eprintln!("{name}: {} instance(s)", found.len());
            }
        }
        Command::Publish(args) => {
            let client = micro_core::Client::new(registry.clone()).config(client_config).tls(tls);
            let connect = async || Ok(broker_config.connect(&client).await?);
            publish::publish(args, &registry, &client, connect).await?;
        }
        Command::Subscribe(args) => {
            let client = micro_core::Client::new(registry.clone()).config(client_config).tls(tls);
            let message_type = args.message_type.resolve(&registry, &client).await?;
            let broker = broker_config.connect(&client).await?;
            subscribe::subscribe(args, broker, message_type).await?;
        }
        Command::Redeliver(args) => {
            let client = micro_core::Client::new(registry.clone()).config(client_config).tls(tls);
            let broker = broker_config.connect(&client).await?;
            redeliver::redeliver(args, broker).await?;
        }
    }
    Ok(())
}

pub(crate) fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}
