//! `micro`: look at what is registered. `micro services`, `micro describe NAME`,
//! `micro wait NAME...`; same `MICRO_REGISTRY` switch and flags as the services.

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use micro_core::{
    Error, Node,
    config::{RegistryArgs, RegistryConfig},
    error::error_chain,
    telemetry::LogArgs,
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
    let cli = Cli::parse();
    cli.log.init("micro_core=warn");
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
            match cli.output {
                Output::Json => println!("{}", to_json(&nodes)),
                Output::Table => print_table(&nodes),
            }
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

fn print_table(nodes: &[Node]) {
    let rows: Vec<[String; 4]> = nodes
        .iter()
        .map(|n| {
            let meta: Vec<String> = n.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            [n.id.clone(), n.address.to_string(), n.version.clone(), meta.join(",")]
        })
        .collect();
    let header = ["ID", "ADDRESS", "VERSION", "METADATA"].map(String::from);
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
