//! `micro`: see and use what is registered: `services`, `describe`, `health`, `watch`,
//! `call`, `why`, `wait`, `register`, `config`; same `MICRO_REGISTRY` switch and flags as
//! the services.

mod call;
mod why;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource};
use micro_core::{
    Error, Node,
    cli::{LogArgs, RegistryArgs, TlsArgs},
    config::{DEFAULT_REGISTER_INTERVAL_SECS, DEFAULT_REGISTER_TTL_SECS, RegistryConfig},
    error::error_chain,
    registry::{validate_metadata, validate_service_name},
};

/// Inspect services registered by name.
#[derive(Debug, Parser)]
#[command(version)]
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
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the names of registered services.
    Services,
    /// Show the instances of a service: id, address, version, metadata.
    Describe {
        /// The service name.
        name: String,
    },
    /// Ask each instance's grpc.health.v1 service; fails unless one is SERVING.
    Health {
        /// The service name.
        name: String,
    },
    /// Stream registry changes of the named services (all, when none is named) until Ctrl-C.
    Watch {
        /// Service names.
        names: Vec<String>,
    },
    /// Make a unary call through the registry, learning the types from server reflection,
    /// and print the reply as JSON.
    Call {
        /// The service name.
        name: String,
        /// `package.Service/Method`, e.g. `vessel.VesselService/FindAvailable`.
        method: String,
        /// The request as JSON, e.g. `{"capacity": 3, "max_weight": 55000}`.
        #[arg(default_value = "{}")]
        json: String,
    },
    /// Explain discovery for a name: what the registry holds, which instances a client
    /// could call and why not the others, and which would be picked next.
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
        #[arg(long, default_value_t = DEFAULT_REGISTER_TTL_SECS)]
        ttl: u64,
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = DEFAULT_REGISTER_INTERVAL_SECS)]
        interval: u64,
    },
    /// Wait until every named service has an instance; fails after the look-up timeout.
    Wait {
        /// The service names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    cli.log.init("micro_core=error");
    if let Command::Config = cli.command {
        print_settings(&matches, cli.output);
        return ExitCode::SUCCESS;
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let config = RegistryConfig::from(cli.registry);
    let tls = cli.tls.load()?;
    let registry = config.connect().await?;
    match cli.command {
        Command::Services => {
            let names = registry.list_services().await?;
            match cli.output {
                Output::Json => println!("{}", to_json(&names)),
                Output::Table => names.iter().for_each(|name| println!("{name}")),
            }
        }
        Command::Describe { name } => {
            let nodes = registry.lookup(&name).await?;
            let probes = nodes.iter().map(|node| why::probe(node, tls.as_ref()));
            let health = futures::future::join_all(probes).await;
            match cli.output {
                Output::Json => {
                    let described: Vec<Described> = nodes
                        .into_iter()
                        .zip(health)
                        .map(|(node, health)| Described { node, health })
                        .collect();
                    println!("{}", to_json(&described));
                }
                Output::Table => print_table(&nodes, &health),
            }
        }
        Command::Config => unreachable!("answered before the registry is opened"),
        Command::Health { name } => {
            let nodes = registry.lookup(&name).await?;
            let mut rows = Vec::new();
            for node in &nodes {
                rows.push((node.clone(), why::probe(node, tls.as_ref()).await));
            }
            match cli.output {
                Output::Json => {
                    let list: Vec<_> = rows
                        .iter()
                        .map(|(n, h)| serde_json::json!({ "id": n.id, "address": n.address, "health": h }))
                        .collect();
                    println!("{}", to_json(&list));
                }
                Output::Table => rows.iter().for_each(|(n, h)| println!("{}  {}  {h}", n.id, n.address)),
            }
            if !rows.iter().any(|(_, h)| h == "SERVING") {
                return Err(Error::NoInstance { service: name, registry: registry.kind().into() });
            }
        }
        Command::Watch { names } => watch(registry, names, cli.output).await?,
        Command::Call { name, method, json } => {
            let client =
                micro_core::Client::new(registry.clone()).lookup_timeout(config.lookup_timeout).tls(tls);
            match call::call(client.channel(&name), &method, &json).await {
                Ok(reply) => println!("{reply}"),
                Err(reason) => {
                    eprintln!("error: call {name} {method}: {reason}");
                    std::process::exit(1);
                }
            }
        }
        Command::Why { name, version, metadata } => {
            let explanation = why::explain(registry, &name, version, metadata, tls).await;
            match cli.output {
                Output::Json => println!("{}", to_json(&explanation)),
                Output::Table => why::print(&explanation),
            }
        }
        Command::Register { name, address, version, metadata, ttl, interval } => {
            validate_service_name(&name)?;
            let mut node = Node::new(name, address);
            node.version = version;
            node.metadata = metadata.into_iter().collect();
            validate_metadata(&node.version, &node.metadata)?;
            let ttl = Duration::from_secs(ttl);
            registry.register(&node, ttl).await?;
            eprintln!(
                "registered {} as {} in {}; Ctrl-C to deregister",
                node.address,
                node.id,
                registry.kind()
            );
            let mut heartbeat = tokio::time::interval(Duration::from_secs(interval.max(1)));
            loop {
                tokio::select! {
                    _ = heartbeat.tick() => {
                        if let Err(err) = registry.register(&node, ttl).await {
                            eprintln!("heartbeat failed: {}", error_chain(&err));
                        }
                    }
                    _ = micro_core::server::shutdown_signal() => break,
                }
            }
            registry.deregister(&node).await?;
            eprintln!("deregistered {}", node.id);
        }
        Command::Wait { names } => {
            for name in &names {
                let found = tokio::time::timeout(
                    config.lookup_timeout + Duration::from_secs(1),
                    registry.lookup(name),
                )
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("waiting for {name}"),
                    after: config.lookup_timeout,
                })??;
                eprintln!("{name}: {} instance(s)", found.len());
            }
        }
    }
    Ok(())
}

/// Prints each change of the watched names, one line each, until SIGINT/SIGTERM. With no
/// names, watches every registered name and picks up new ones every 2 s.
async fn watch(
    registry: std::sync::Arc<dyn micro_core::Registry>,
    names: Vec<String>,
    output: Output,
) -> Result<(), Error> {
    use futures::StreamExt;
    use micro_core::registry::Change;
    let (sender, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let mut watched = std::collections::HashSet::new();
    let mut relist = tokio::time::interval(Duration::from_secs(2));
    let shutdown = micro_core::server::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = relist.tick() => {
                let wanted = if names.is_empty() { registry.list_services().await.unwrap_or_default() } else { names.clone() };
                for name in wanted {
                    if watched.insert(name.clone()) {
                        let mut stream = registry.watch(&name);
                        let sender = sender.clone();
                        tokio::spawn(async move {
                            while let Some(change) = stream.next().await {
                                if sender.send((name.clone(), change)).is_err() { return; }
                            }
                        });
                    }
                }
            }
            Some((name, change)) = changes.recv() => {
                let line = match (change, output) {
                    (Ok(Change::Insert(_, node)), Output::Json) => serde_json::json!({ "event": "up", "node": node }).to_string(),
                    (Ok(Change::Remove(id)), Output::Json) => serde_json::json!({ "event": "down", "name": name, "id": id }).to_string(),
                    (Ok(Change::Insert(_, node)), Output::Table) => {
                        let state = if node.draining { "draining" } else { "up" };
                        format!("{state:<8} {name}  {}  {}  version {:?}", node.id, node.address, node.version)
                    }
                    (Ok(Change::Remove(id)), Output::Table) => format!("{:<8} {name}  {id}", "down"),
                    (Err(err), _) => format!("error    {name}: {}", error_chain(&err)),
                };
                println!("{line}");
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

/// An instance as `micro describe --output json` prints it: the node's fields and its health.
#[derive(serde::Serialize)]
struct Described {
    #[serde(flatten)]
    node: Node,
    health: String,
}

fn print_table(nodes: &[Node], health: &[String]) {
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .zip(health)
        .map(|(n, health)| {
            let meta: Vec<String> = n.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let health = if n.draining { format!("{health} (draining)") } else { health.clone() };
            [n.id.clone(), n.address.to_string(), n.version.clone(), health, meta.join(",")]
        })
        .collect();
    let header = ["ID", "ADDRESS", "VERSION", "HEALTH", "METADATA"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("plain data serializes")
}

/// One row per setting: its id, value and source (`flag`, `env NAME`, `default`).
fn print_settings(matches: &ArgMatches, output: Output) {
    let command = Cli::command();
    let mut rows = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(source) = matches.value_source(id) else { continue };
        let value: Vec<String> =
            matches.get_raw(id).into_iter().flatten().map(|v| v.to_string_lossy().into_owned()).collect();
        let secret = arg.get_env().is_some_and(|env| env.to_string_lossy().contains("TOKEN"));
        let value = if secret && !value.is_empty() { vec!["(set, hidden)".to_owned()] } else { value };
        let source = match (source, arg.get_env()) {
            (ValueSource::CommandLine, _) => "flag".to_owned(),
            (ValueSource::EnvVariable, Some(env)) => format!("env {}", env.to_string_lossy()),
            _ => "default".to_owned(),
        };
        rows.push([id.to_owned(), value.join(","), source]);
    }
    match output {
        Output::Json => {
            let map: serde_json::Map<String, serde_json::Value> = rows
                .into_iter()
                .map(|[id, value, source]| (id, serde_json::json!({ "value": value, "source": source })))
                .collect();
            println!("{}", to_json(&map));
        }
        Output::Table => {
            let width = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(7);
            let value_width = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(5);
            println!("{:<width$}  {:<value_width$}  SOURCE", "SETTING", "VALUE");
            for [id, value, source] in rows {
                println!("{id:<width$}  {value:<value_width$}  {source}");
            }
        }
    }
}
