//! vessel-service: registers as `vessel-service`, serves `VesselService.FindAvailable`, and
//! books each `consignment.created` event into an SQLite file (`--db`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use micro_core::{
    Client, Server,
    cli::{BrokerArgs, LogArgs, RegistryArgs, ServerArgs, TlsArgs},
    config::{BrokerConfig, BrokerKind, RegistryConfig},
    error::error_chain,
};
use proto::vessel::vessel_service_server::VesselServiceServer;
use vessel_service::{
    Booker, Fleet, SERVICE_NAME, VesselHandler,
    bookings::{BookingStore, DEFAULT_DB},
    subscribe_created,
};

/// Finds vessels that can carry a consignment, less what is booked on them.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// JSON file with the fleet (an array of vessels); default: the one built-in vessel.
    #[arg(long, env = "VESSEL_FLEET")]
    fleet: Option<PathBuf>,
    /// SQLite database of bookings, created if missing (relative paths start at the working
    /// directory); instances on one host may share it; `:memory:` keeps bookings in memory
    /// only, lost on exit.
    #[arg(long, env = "VESSEL_DB", default_value = DEFAULT_DB)]
    db: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    broker: BrokerArgs,
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
    let db = cli.db.clone();
    let store = tokio::task::spawn_blocking(move || BookingStore::open(&db))
        .await?
        .with_context(|| format!("cannot open the bookings database {}", cli.db.display()))?;
    tracing::info!(db = %store.path(), schema = store.schema_version()?, "bookings database ready");
    let registry_config = RegistryConfig::from(cli.registry);
    let registry = registry_config.connect().await.context("cannot open the registry")?;
    let broker_config = BrokerConfig::from(cli.broker);
    let broker =
        broker_config.connect(&Client::new(registry.clone())).await.context("cannot open the broker")?;
    // Durable where the broker keeps messages, so a booking that failed is delivered again.
    let durable = !matches!(broker_config.kind, BrokerKind::Registry | BrokerKind::Memory);
    let name = cli.server.server_name.clone().unwrap_or_else(|| SERVICE_NAME.to_owned());
    let booker = Booker::new(fleet.clone(), store.clone());
    let subscription = subscribe_created(&*broker, &name, durable, booker)
        .await
        .context("cannot subscribe to consignment.created")?;
    Server::builder(SERVICE_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .config(cli.server.into_config_with_metrics(DEFAULT_METRICS_ADDRESS.parse()?)?)
        .tls(cli.tls.load()?)
        .file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .registry(registry)
        .add_service(VesselServiceServer::new(VesselHandler::new(fleet).bookings(store)))
        // Unsubscribed as it stops: the events pulled but not booked go back to the group now.
        .subscription(subscription)
        .run()
        .await?;
    Ok(())
}
