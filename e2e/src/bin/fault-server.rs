//! A gRPC server for tests, registered over mDNS like any service, that misbehaves on
//! request: it serves `VesselService` and `ShippingService` and reads its faults from the
//! environment.
//!
//! | variable | effect |
//! | --- | --- |
//! | `FAULT_NAME` | service name to register (required) |
//! | `FAULT_LABEL` | vessel id it answers with; default `fault` |
//! | `FAULT_DELAY_MS` | sleep before answering |
//! | `FAULT_EXIT_ON_CALL` | `1`: exit abruptly once a call arrives, before answering |
//!
//! `GetConsignments` answers with one consignment per `CreateConsignment` it has served, so
//! a test can count what reached this instance.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use micro_core::{Server, config::RegistryConfig, config::ServerConfig};
use proto::{
    consignment::{self, Consignment, GetRequest, shipping_service_server::ShippingServiceServer},
    vessel::{Response, Specification, Vessel, vessel_service_server::VesselServiceServer},
};
use tonic::{Request, Status};

#[derive(Clone)]
struct Faults {
    label: String,
    delay: Duration,
    exit_on_call: bool,
    created: Arc<AtomicUsize>,
}

impl Faults {
    async fn arrive(&self) {
        if self.exit_on_call {
            eprintln!("fault-server: exiting on a call, as asked");
            std::process::exit(3);
        }
        tokio::time::sleep(self.delay).await;
    }
}

#[tonic::async_trait]
impl proto::vessel::vessel_service_server::VesselService for Faults {
    async fn find_available(&self, _: Request<Specification>) -> Result<tonic::Response<Response>, Status> {
        self.arrive().await;
        let vessel = Vessel {
            id: self.label.clone(),
            capacity: 1,
            max_weight: 1,
            available: true,
            ..Default::default()
        };
        Ok(tonic::Response::new(Response { vessel: Some(vessel), vessels: vec![] }))
    }
}

#[tonic::async_trait]
impl proto::consignment::shipping_service_server::ShippingService for Faults {
    async fn create_consignment(
        &self,
        request: Request<Consignment>,
    ) -> Result<tonic::Response<consignment::Response>, Status> {
        self.arrive().await;
        self.created.fetch_add(1, Ordering::SeqCst);
        let reply = consignment::Response {
            created: true,
            consignment: Some(request.into_inner()),
            consignments: vec![],
        };
        Ok(tonic::Response::new(reply))
    }

    async fn get_consignments(
        &self,
        _: Request<GetRequest>,
    ) -> Result<tonic::Response<consignment::Response>, Status> {
        let consignments = vec![Consignment::default(); self.created.load(Ordering::SeqCst)];
        Ok(tonic::Response::new(consignment::Response { created: false, consignment: None, consignments }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let name = std::env::var("FAULT_NAME").map_err(|_| "FAULT_NAME must name the service")?;
    let var = |key: &str| std::env::var(key).ok();
    let faults = Faults {
        label: var("FAULT_LABEL").unwrap_or_else(|| "fault".into()),
        delay: Duration::from_millis(var("FAULT_DELAY_MS").and_then(|v| v.parse().ok()).unwrap_or(0)),
        exit_on_call: var("FAULT_EXIT_ON_CALL").as_deref() == Some("1"),
        created: Arc::default(),
    };
    let registry = RegistryConfig::default().connect().await?;
    let config = ServerConfig { address: "127.0.0.1:0".parse()?, ..ServerConfig::default() };
    Server::builder(name)
        .config(config)
        .registry(registry)
        .add_service(VesselServiceServer::new(faults.clone()))
        .add_service(ShippingServiceServer::new(faults))
        .run()
        .await?;
    Ok(())
}
