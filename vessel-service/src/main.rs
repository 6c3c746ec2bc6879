//! vessel-service: registers as `vessel-service`, serves `VesselService` (find, reserve,
//! confirm, release), confirms each `consignment.created` event's reservation, and settles
//! expired holds with their holders; reservations live in SQLite or PostgreSQL (`--db`).

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

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
    Booker, DEFAULT_RESERVATION_TTL_MS, Fleet, SERVICE_NAME, VesselHandler,
    reaper::{Reaper, ShippingSettler},
    store::{self, DEFAULT_DB},
    subscribe_created,
};

/// Finds vessels that can carry a consignment, less what is booked on them.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// JSON file with the fleet (an array of vessels); default: the one built-in vessel.
    #[arg(long, env = "VESSEL_FLEET")]
    fleet: Option<PathBuf>,
    /// Where reservations are kept: an SQLite file, created if missing (relative paths start
    /// at the working directory), which the instances on one host may share; `:memory:` (in
    /// memory only, lost on exit); or a `postgres://user@host:port/database` URL, for
    /// instances on several hosts (the schema is created or migrated at start).
    #[arg(long, env = "VESSEL_DB", default_value = DEFAULT_DB)]
    db: String,
    /// How long room is held for a consignment before it is stored, in milliseconds; a hold
    /// not confirmed by then is settled with its holder (released unless it was stored).
    #[arg(long, env = "VESSEL_RESERVATION_TTL", default_value_t = DEFAULT_RESERVATION_TTL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    reservation_ttl: u64,
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
    let store = store::open(&cli.db)
        .await
        .with_context(|| format!("cannot open the reservations database {}", store::redacted(&cli.db)))?;
    tracing::info!(db = %store.database(), schema = store.schema_version().await?, "reservations database ready");
    let registry_config = RegistryConfig::from(cli.registry);
    let registry = registry_config.connect().await.context("cannot open the registry")?;
    let name = cli.server.server_name.clone().unwrap_or_else(|| SERVICE_NAME.to_owned());
    let tls = cli.tls.load_for(&registry_config, &name).await?;
    let client = Client::new(registry.clone()).tls(tls.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let broker_config = BrokerConfig::from(cli.broker);
    let broker = broker_config.connect(&client).await.context("cannot open the broker")?;
    // Durable where the broker keeps messages, so a booking that failed is delivered again.
    let durable = !matches!(broker_config.kind, BrokerKind::Registry | BrokerKind::Memory);
    let booker = Booker::new(fleet.clone(), store.clone());
    let subscription = subscribe_created(&*broker, &name, durable, booker)
        .await
        .context("cannot subscribe to consignment.created")?;
    let ttl = Duration::from_millis(cli.reservation_ttl);
    let _reaper = Reaper::start(store.clone(), Arc::new(ShippingSettler::new(client)), reap_interval(ttl));
    Server::builder(SERVICE_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .config(cli.server.into_config_with_metrics(DEFAULT_METRICS_ADDRESS.parse()?)?)
        .tls(tls)
        .file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .registry(registry)
        .add_service(VesselServiceServer::new(VesselHandler::new(fleet, store).reservation_ttl(ttl)))
        // Unsubscribed as it stops: the events pulled but not booked go back to the group now.
        .subscription(subscription)
        .run()
        .await?;
    Ok(())
}

/// How often expired holds are looked for: a quarter of their time, between 200 ms and 5 s,
/// so a hold is settled within about 1.25 times its time.
fn reap_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}
