//! consignment-cli: reads a consignment from a JSON file, asks `consignment-service` (found
//! by name through the registry) to store it, prints the result and every stored consignment.
//! `--bulk` stores a file of one consignment per line in one stream; `--watch` prints
//! consignments as they are stored.

mod bulk;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, anyhow};
use clap::{Parser, ValueEnum};
use micro_core::{
    Client,
    cli::{ClientArgs, LogArgs, RegistryArgs, TlsArgs},
    client::IDEMPOTENCY_KEY_HEADER,
    config::{ClientConfig, RegistryConfig},
    metrics::code_name,
};
use proto::consignment::{Consignment, GetRequest, shipping_service_client::ShippingServiceClient};

/// The longest request id consignment-service accepts, in bytes.
const MAX_REQUEST_ID_BYTES: usize = 128;
/// Set to `true` by consignment-service on a reply that an earlier call with the same
/// idempotency key already stored.
const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// Submits a consignment and lists what is stored.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// JSON file with the consignment: description, weight, containers (with --bulk, one
    /// consignment per line).
    #[arg(default_value = "consignment.json")]
    file: PathBuf,
    /// Store every consignment of FILE, one JSON object per line, in one stream; a run
    /// again with the same --request-id stores nothing twice.
    #[arg(long, conflicts_with = "watch")]
    bulk: bool,
    /// Print consignments as they are stored (a JSON object per line with --output json),
    /// until interrupted; FILE is not read. The stream is reopened after the last one
    /// printed when its instance goes away, so none is missed or printed twice.
    #[arg(long)]
    watch: bool,
    /// With --watch: start after this consignment instead of from now.
    #[arg(long, requires = "watch")]
    after: Option<String>,
    /// Name under which consignment-service is registered.
    #[arg(long, env = "CONSIGNMENT_SERVICE", default_value = "consignment-service")]
    consignment_service: String,
    /// How to print the result.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Idempotency key sent with CreateConsignment; running again with the same id and file
    /// stores nothing new and prints the first result. Default: a fresh random id per run.
    #[arg(long, env = "CONSIGNMENT_REQUEST_ID", value_parser = parse_request_id)]
    request_id: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Lines for people.
    Text,
    /// One JSON object: `{"created": ..., "consignments": [...]}`.
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init("consignment_cli=warn,micro_core=error");
    let outcome = run(cli).await;
    // Spans not exported yet go out before the process ends (nothing to do without OTLP).
    tokio::task::spawn_blocking(micro_core::cli::flush_telemetry).await.ok();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", micro_core::error::error_chain(&*err));
            ExitCode::FAILURE
        }
    }
}

fn parse_request_id(id: &str) -> Result<String, String> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES {
        return Err(format!("must be 1 to {MAX_REQUEST_ID_BYTES} bytes, got {}", id.len()));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".to_owned());
    }
    Ok(id.to_owned())
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn read_consignment(path: &PathBuf) -> anyhow::Result<Consignment> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read consignment file {shown}"))?;
    if text.trim().is_empty() {
        return Err(anyhow!(
            "{shown}:1:1: malformed consignment JSON: the file is empty; expected an object"
        ));
    }
    serde_json::from_str(&text).map_err(|err| {
        let reason = err.to_string();
        let reason = reason.split(" at line ").next().unwrap_or(&reason);
        // serde_json counts columns from 0 before a line's first character; editors from 1.
        anyhow!("{shown}:{}:{}: malformed consignment JSON: {reason}", err.line(), err.column().max(1))
    })
}

/// The name the CLI presents under Consul Connect, unless `MICRO_CONSUL_CONNECT_NAME` says.
const CONNECT_NAME: &str = "consignment-cli";

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Bad input fails before anything is sent.
    let (consignment, bulk) = match (cli.watch, cli.bulk) {
        (true, _) => (None, None),
        (false, true) => (None, Some(bulk::read_lines(&cli.file)?)),
        (false, false) => (Some(read_consignment(&cli.file)?), None),
    };
    let request_id = cli.request_id.unwrap_or_else(new_request_id);
    let registry_config = RegistryConfig::from(cli.registry);
    let registry = registry_config.connect().await.context("cannot open the registry")?;
    let client = Client::new(registry)
        .config(ClientConfig::from_args(cli.client, registry_config.lookup_timeout)?)
        .tls(cli.tls.load_for(&registry_config, CONNECT_NAME).await?)
        .idempotent_methods(proto::IDEMPOTENT_METHODS);
    let mut shipping = ShippingServiceClient::new(client.channel(&cli.consignment_service));
    if let Some(consignments) = bulk {
        return bulk::load(shipping, consignments, &request_id, cli.output).await;
    }
    let Some(consignment) = consignment else {
        return watch::watch(shipping, cli.after, cli.output).await;
    };

    // The SDK client resends a call that carries the key when an instance fails; the
    // service stores it once.
    // Each call's deadline is the client's (`MICRO_CLIENT_REQUEST_TIMEOUT`), retries included.
    let mut request = tonic::Request::new(consignment);
    request.metadata_mut().insert(IDEMPOTENCY_KEY_HEADER, request_id.parse().context("request id")?);
    let reply = shipping.create_consignment(request).await.map_err(|status| {
        let err = failed("CreateConsignment", status);
        anyhow!("{err:#} (request id {request_id}: re-run with --request-id {request_id} to retry without storing twice)")
    })?;
    let replayed = reply.metadata().get(IDEMPOTENT_REPLAYED_HEADER).is_some_and(|v| v == "true");
    let created = reply
        .into_inner()
        .consignment
        .ok_or_else(|| anyhow!("CreateConsignment answered without the consignment"))?;

    let stored = shipping
        .get_consignments(GetRequest {})
        .await
        .map_err(|status| failed("GetConsignments", status))?
        .into_inner()
        .consignments;

    match cli.output {
        Output::Json => {
            let json = serde_json::json!({
                "created": created,
                "request_id": request_id,
                "replayed": replayed,
                "consignments": stored,
            });
            line(serde_json::to_string_pretty(&json)?);
        }
        Output::Text => {
            line(format!(
                "created consignment {} on vessel {} ({} containers, weight {})",
                created.id,
                created.vessel_id,
                created.containers.len(),
                created.weight
            ));
            match replayed {
                true => {
                    line(format!("request id {request_id}: stored by an earlier run; nothing new stored"))
                }
                false => line(format!(
                    "request id {request_id} (re-run with --request-id {request_id} to retry safely)"
                )),
            }
            line(format!("stored consignments: {}", stored.len()));
            for c in &stored {
                line(format!(
                    "  {}  vessel {}  {} containers  weight {}  {}",
                    c.id,
                    c.vessel_id,
                    c.containers.len(),
                    c.weight,
                    c.description
                ));
            }
        }
    }
    Ok(())
}

/// One line saying which call failed, with its status code and message.
fn failed(method: &str, status: tonic::Status) -> anyhow::Error {
    anyhow!("{method} failed: {}: {}", code_name(status.code()), status.message())
}

/// Writes a line to stdout; exits quietly (0) when stdout is a closed pipe (`| head -1`).
fn line(text: String) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {err}");
        std::process::exit(1);
    }
}
