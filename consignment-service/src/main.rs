//! consignment-service: registers as `consignment-service`, reserves room through
//! `vessel-service` (found by name) before it stores a consignment, and keeps consignments in
//! SQLite or PostgreSQL (`--db`).

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use consignment_service::{
    DEFAULT_DB, DEFAULT_VESSEL_TIMEOUT_MS, FaultPoint, SERVICE_NAME, ShippingHandler, outbox::Relay,
    repository, request_size_layer,
};
use micro_core::{
    Client, Server,
    cli::{BrokerArgs, ClientArgs, LogArgs, RegistryArgs, ServerArgs, TlsArgs},
    config::{BrokerConfig, ClientConfig, RegistryConfig},
    error::error_chain,
};

/// Stores consignments once a vessel that can carry them is found.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Name under which vessel-service is registered.
    #[arg(long, env = "VESSEL_SERVICE", default_value = "vessel-service")]
    vessel_service: String,
    /// How long the vessel look-up may take, in milliseconds.
    #[arg(long, env = "CONSIGNMENT_VESSEL_TIMEOUT", default_value_t = DEFAULT_VESSEL_TIMEOUT_MS)]
    vessel_timeout: u64,
    /// Where consignments are kept: an SQLite file, created if missing (relative paths start
    /// at the working directory), which the instances on one host may share; `:memory:` (in
    /// memory only, lost on exit); or a `postgres://user@host:port/database` URL, for
    /// replicas on several hosts (the schema is created or migrated at start).
    #[arg(long, env = "CONSIGNMENT_DB", default_value = DEFAULT_DB)]
    db: String,
    /// Test-only: stop every creation at this point, so a test can kill the process there.
    #[arg(long, env = "CONSIGNMENT_TEST_FAULT", value_enum, hide = true)]
    test_fault: Option<FaultPoint>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    client: ClientArgs,
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
    cli.log.init("consignment_service=info,micro_core=info");
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
    let repository = repository::open(&cli.db).await.with_context(|| {
        format!("cannot open the consignment database {}", shippy_postgres::redacted(&cli.db))
    })?;
    tracing::info!(db = %repository.database(), schema = repository.schema_version().await?, "consignment database ready");
    let registry_config = RegistryConfig::from(cli.registry);
    let registry = registry_config.connect().await.context("cannot open the registry")?;
    let name = cli.server.server_name.clone().unwrap_or_else(|| SERVICE_NAME.to_owned());
    let tls = cli.tls.load_for(&registry_config, &name).await?;
    let client = Client::new(registry.clone())
        .config(ClientConfig::from_args(cli.client, registry_config.lookup_timeout)?)
        .tls(tls.clone())
        .idempotent_methods(proto::IDEMPOTENT_METHODS);
    // consignment.created goes out through the outbox: written with each consignment,
    // published by the relay (at least once, message id = consignment id).
    let broker = BrokerConfig::from(cli.broker).connect(&client).await.context("cannot open the broker")?;
    let relay = Relay::start(repository.clone(), broker, this_instance());
    let handler = ShippingHandler::new(
        repository,
        client.channel(&cli.vessel_service),
        Duration::from_millis(cli.vessel_timeout),
    )
    .holder(name)
    .fault_point(cli.test_fault)
    .notify_stored(relay.waker());
    Server::builder(SERVICE_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .config(cli.server.into_config_with_metrics(DEFAULT_METRICS_ADDRESS.parse()?)?)
        .tls(tls)
        .file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .registry(registry)
        .layer(request_size_layer())
        .add_service(handler.into_service())
        .run()
        .await?;
    Ok(())
}

/// This process among the replicas: `host:pid` and a random suffix.
fn this_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}:{:08x}", std::process::id(), rand::random::<u32>())
}
