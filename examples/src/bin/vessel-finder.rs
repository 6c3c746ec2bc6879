//! vessel-finder: a client of shippy's `vessel-service`, with shippy's proto. It asks for a
//! vessel that can carry a load and prints its id.
//!
//! Run it inside the demo's namespace, next to a running vessel-service:
//! ```sh
//! scripts/netns-run sh -c 'cargo run -p vessel-service & sleep 2;
//!   cargo run -p examples --bin vessel-finder -- --capacity 3 --max-weight 55000; kill %1'
//! ```

use clap::Parser;
use micro_core::service::{Service, ServiceArgs};
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};

/// Finds a vessel for a load.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Containers to carry.
    #[arg(long, default_value_t = 1)]
    capacity: i32,
    /// Weight to carry.
    #[arg(long, default_value_t = 1000)]
    max_weight: i32,
    /// The name vessel-service is registered under.
    #[arg(long, env = "VESSEL_SERVICE", default_value = "vessel-service")]
    vessel_service: String,
    #[command(flatten)]
    micro: ServiceArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let spec = Specification { capacity: cli.capacity, max_weight: cli.max_weight };
    let found = async {
        let client = Service::with_args("vessel-finder", cli.micro)
            .client()
            .await
            .map_err(|e| e.to_string())?
            .idempotent_methods(proto::IDEMPOTENT_METHODS);
        VesselServiceClient::new(client.channel(&cli.vessel_service))
            .find_available(spec)
            .await
            .map_err(|status| format!("FindAvailable: {}: {}", status.code(), status.message()))
    };
    match found.await.map(|reply| reply.into_inner().vessel) {
        Ok(Some(vessel)) => {
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{} ({})", vessel.id, vessel.name);
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("error: FindAvailable answered without a vessel");
            std::process::ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
