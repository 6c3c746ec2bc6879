//! vessel-service: registers as `vessel-service` and serves `VesselService.FindAvailable`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use micro_core::{
    Server,
    cli::{LogArgs, RegistryArgs, ServerArgs, TlsArgs},
    config::RegistryConfig,
    error::error_chain,
};
use proto::vessel::vessel_service_server::VesselServiceServer;
use vessel_service::{Fleet, VesselHandler};

/// Finds vessels that can carry a consignment.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// JSON file with the fleet (an array of vessels); default: the one built-in vessel.
    #[arg(long, env = "VESSEL_FLEET")]
    fleet: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// Metrics are on by default here: loopback, a free port, announced as `metrics` metadata.
const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:0";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init("vessel_service=info,micro_core=info");
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, `error: what: why`, as every binary of the workspace prints it.
            eprintln!("error: {}", error_chain(&*err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fleet = match &cli.fleet {
        Some(path) => Fleet::from_json_file(path)?,
        None => Fleet::default(),
    };
    tracing::info!(vessels = fleet.vessels().len(), "fleet loaded");
    let registry_config = RegistryConfig::from(cli.registry);
    let registry = registry_config.connect().await.context("cannot open the registry")?;
    Server::builder("vessel-service")
        .version(env!("CARGO_PKG_VERSION"))
        .config(cli.server.into_config_with_metrics(DEFAULT_METRICS_ADDRESS.parse()?)?)
        .tls(cli.tls.load()?)
        .file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .registry(registry)
        .add_service(VesselServiceServer::new(VesselHandler::new(fleet)))
        .run()
        .await?;
    Ok(())
}
