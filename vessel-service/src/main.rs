//! vessel-service: registers as `vessel-service` and serves `VesselService.FindAvailable`.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use clap::Parser;
use micro_core::{
    Client, Server,
    broker::{Broker, SubscribeOptions, subscribe_proto},
    cli::{BrokerArgs, LogArgs, RegistryArgs, ServerArgs, TlsArgs},
    config::{BrokerConfig, BrokerKind, RegistryConfig},
    error::error_chain,
};
use proto::{consignment::Consignment, vessel::vessel_service_server::VesselServiceServer};
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
    let registry_config = RegistryConfig::from(cli.registry);
    let registry = registry_config.connect().await.context("cannot open the registry")?;
    let broker_config = BrokerConfig::from(cli.broker);
    let broker =
        broker_config.connect(&Client::new(registry.clone())).await.context("cannot open the broker")?;
    let _subscription = subscribe_created(&*broker, broker_config.kind).await?;
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

/// Subscribes to `consignment.created` in queue group `vessel-service` (so each event is
/// handled by one instance; durably on nats) and logs each consignment with a running count.
async fn subscribe_created(
    broker: &dyn Broker,
    kind: BrokerKind,
) -> anyhow::Result<micro_core::broker::Subscription> {
    let mut options = SubscribeOptions::default().queue("vessel-service");
    if kind != BrokerKind::Registry && kind != BrokerKind::Memory {
        options = options.durable();
    }
    let seen = Arc::new(AtomicU64::new(0));
    let subscription =
        subscribe_proto(broker, consignment_service_topic(), options, move |c: Consignment, m| {
            let count = seen.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(
                topic = %m.topic,
                message_id = m.id().unwrap_or("-"),
                consignment = %c.id,
                vessel = %c.vessel_id,
                weight = c.weight,
                containers = c.containers.len(),
                count,
                "consignment.created received"
            );
            async { Ok(()) }
        })
        .await
        .context("cannot subscribe to consignment.created")?;
    Ok(subscription)
}

/// The topic consignment-service publishes each stored consignment on.
fn consignment_service_topic() -> &'static str {
    "consignment.created"
}
