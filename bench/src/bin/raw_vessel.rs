//! raw-vessel: the same `VesselService.FindAvailable` handler as vessel-service (its bookings
//! in memory, as the bench runs vessel-service), served by plain tonic with no registry and
//! no SDK layers: the baseline of the memory figures.
//! Prints `listening ADDRESS` on stderr once bound; stops on SIGINT (the bench kills it).
//! Usage: `raw-vessel [ADDRESS]` (default `127.0.0.1:0`).

use proto::vessel::vessel_service_server::VesselServiceServer;
use tonic::transport::{Server, server::TcpIncoming};
use vessel_service::{Fleet, VesselHandler, store::SqliteStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("listening {}", listener.local_addr()?);
    // Same socket option as micro's server, so only the SDK's own work differs.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_service(VesselServiceServer::new(
            // As vessel-service serves it in the bench: bookings in memory, checked per call.
            VesselHandler::new(Fleet::default(), std::sync::Arc::new(SqliteStore::in_memory()?)),
        ))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
