//! Figure 11: creating consignments with reservations (vessel-service's `Reserve` in the
//! database, then the store under it), against the path shippy had before them (ask
//! `FindAvailable`, store, then book once the event arrives; here the booking is made at
//! once, in process, the best case for that path), on SQLite files and on PostgreSQL. Both
//! run in this process on loopback over the memory registry, with SDK clients.
//!
//! - `create_throughput_64_callers_{sqlite,postgres}`: creations per second, 64 callers,
//!   a vessel with room for all; target at least 0.8 of the unreserved path.
//! - `create_latency_p99_{sqlite,postgres}`: the same runs' p99.
//! - `create_overbooked_weight_{sqlite,postgres}`: 64 callers creating 55,000 kg
//!   consignments on a 200,000 kg vessel until every one is answered: kilograms stored past
//!   the vessel's max weight; target 0.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use consignment_service::{ConsignmentRepository, ShippingHandler, repository};
use micro_core::{
    Client, NamedChannel, RunningServer, Server, broker::Message, config::ServerConfig,
    registry::MemoryRegistry,
};
use proto::{
    consignment::{
        Consignment, Container, GetRequest, Response, SettleRequest, Settlement,
        shipping_service_client::ShippingServiceClient,
        shipping_service_server::{ShippingService, ShippingServiceServer},
    },
    vessel::{
        Specification, Vessel, vessel_service_client::VesselServiceClient,
        vessel_service_server::VesselServiceServer,
    },
};
use tokio::time::Instant;
use tonic::{Request, Status};
use vessel_service::{Booker, CONSIGNMENT_CREATED, Fleet, VesselHandler, store};

use crate::report::{Figure, emit, quantile};

const CALLERS: usize = 64;
const LENGTH: Duration = Duration::from_secs(5);
/// Calls per caller at most, so a run is bounded by count as well as time.
const LIMIT_PER_CALLER: usize = 20_000;
/// The overbooking run: 55,000 kg each, on a vessel of 200,000 kg, so 3 fit.
const HEAVY: i32 = 55_000;
const MAX_WEIGHT: i32 = 200_000;
const OVERBOOK_ATTEMPTS: usize = 256;

/// A path that stores consignments: the vessel-service and consignment-service servers.
struct Path {
    shipping: ShippingServiceClient<NamedChannel>,
    repository: Arc<dyn ConsignmentRepository>,
    _servers: Vec<RunningServer>,
}

fn loopback() -> ServerConfig {
    ServerConfig { address: "127.0.0.1:0".parse().expect("address"), ..ServerConfig::default() }
}

fn fleet(max_weight: i32) -> Fleet {
    Fleet::new(vec![Vessel {
        id: "bench".into(),
        name: "Bench".into(),
        capacity: i32::MAX,
        max_weight,
        available: true,
        owner_id: String::new(),
    }])
}

/// Where the two services of one path keep their data.
struct Databases {
    vessels: String,
    consignments: String,
}

/// The baseline: FindAvailable, store, book (the event, handled at once).
struct Unreserved {
    repository: Arc<dyn ConsignmentRepository>,
    vessels: VesselServiceClient<NamedChannel>,
    booker: Booker,
}

#[tonic::async_trait]
impl ShippingService for Unreserved {
    type WatchConsignmentsStream = consignment_service::ConsignmentStream;

    async fn watch_consignments(
        &self,
        _request: Request<proto::consignment::WatchRequest>,
    ) -> Result<tonic::Response<consignment_service::ConsignmentStream>, Status> {
        Err(Status::unimplemented("WatchConsignments"))
    }

    async fn create_consignments(
        &self,
        _request: Request<tonic::Streaming<Consignment>>,
    ) -> Result<tonic::Response<proto::consignment::CreateSummary>, Status> {
        Err(Status::unimplemented("CreateConsignments"))
    }

    async fn create_consignment(
        &self,
        request: Request<Consignment>,
    ) -> Result<tonic::Response<Response>, Status> {
        let mut consignment = request.into_inner();
        consignment_service::validate(&consignment)?;
        let spec =
            Specification { capacity: consignment.containers.len() as i32, max_weight: consignment.weight };
        let vessel = self.vessels.clone().find_available(spec).await?.into_inner().vessel.unwrap_or_default();
        consignment.id = format!("c-{:016x}", rand::random::<u64>());
        consignment.vessel_id = vessel.id;
        let created = self
            .repository
            .create(consignment, None)
            .await
            .map_err(|err| Status::internal(err.to_string()))?;
        self.booker
            .book(&created.consignment, &Message::new(CONSIGNMENT_CREATED, ""))
            .await
            .map_err(|err| Status::internal(err.to_string()))?;
        Ok(tonic::Response::new(Response {
            created: true,
            consignment: Some(created.consignment),
            consignments: vec![],
        }))
    }

    async fn get_consignments(&self, _: Request<GetRequest>) -> Result<tonic::Response<Response>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn settle_reservation(
        &self,
        _: Request<SettleRequest>,
    ) -> Result<tonic::Response<Settlement>, Status> {
        Err(Status::unimplemented("not measured"))
    }
}

/// Starts a path on `databases`: with reservations, or the unreserved baseline.
async fn start(reserved: bool, databases: &Databases, max_weight: i32) -> anyhow::Result<Path> {
    let registry = Arc::new(MemoryRegistry::new());
    let (vessel_name, shipping_name) = (format!("vessel-{reserved}"), format!("shipping-{reserved}"));
    let store = store::open(&databases.vessels).await.context("the vessel database")?;
    let repository = repository::open(&databases.consignments).await.context("the consignment database")?;
    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let vessels = Server::builder(&vessel_name)
        .config(loopback())
        .registry(registry.clone())
        .add_service(VesselServiceServer::new(VesselHandler::new(fleet(max_weight), store.clone())))
        .start()
        .await?;
    let shipping = Server::builder(&shipping_name).config(loopback()).registry(registry.clone());
    let shipping = match reserved {
        true => {
            let handler = ShippingHandler::new(
                repository.clone(),
                client.channel(&vessel_name),
                Duration::from_secs(5),
            )
            .holder(&shipping_name);
            shipping.add_service(handler.into_service())
        }
        false => shipping.add_service(ShippingServiceServer::new(Unreserved {
            repository: repository.clone(),
            vessels: VesselServiceClient::new(client.channel(&vessel_name)),
            booker: Booker::new(fleet(max_weight), store),
        })),
    };
    let shipping = shipping.start().await?;
    let channel = client.channel(&shipping_name);
    crate::wait_pickable(&channel, 1).await?;
    crate::wait_pickable(&client.channel(&vessel_name), 1).await?;
    Ok(Path { shipping: ShippingServiceClient::new(channel), repository, _servers: vec![vessels, shipping] })
}

fn consignment(weight: i32) -> Consignment {
    Consignment {
        description: "bench".into(),
        weight,
        containers: vec![Container {
            customer_id: "cust".into(),
            origin: "Derby".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `CALLERS` tasks creating back to back for `LENGTH`: creations per second, and the
/// latencies (ms) of the successful ones.
async fn throughput(shipping: &ShippingServiceClient<NamedChannel>) -> (f64, Vec<f64>, usize) {
    let started = Instant::now();
    let deadline = started + LENGTH;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let mut shipping = shipping.clone();
            tokio::spawn(async move {
                let (mut latencies, mut failed) = (Vec::new(), 0);
                while Instant::now() < deadline && latencies.len() + failed < LIMIT_PER_CALLER {
                    let call = Instant::now();
                    match shipping.create_consignment(consignment(1)).await {
                        Ok(_) => latencies.push(call.elapsed().as_secs_f64() * 1e3),
                        Err(_) => failed += 1,
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (l, f) = task.await.unwrap_or_default();
        latencies.extend(l);
        failed += f;
    }
    let per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (per_second, latencies, failed)
}

/// `OVERBOOK_ATTEMPTS` creations of 55,000 kg, `CALLERS` at a time: kilograms stored past
/// the vessel's max weight.
async fn overbooked(path: &Path) -> anyhow::Result<f64> {
    use futures::StreamExt;
    futures::stream::iter(0..OVERBOOK_ATTEMPTS)
        .map(|_| {
            let mut shipping = path.shipping.clone();
            async move { shipping.create_consignment(consignment(HEAVY)).await.is_ok() }
        })
        .buffer_unordered(CALLERS)
        .collect::<Vec<bool>>()
        .await;
    let stored: i64 = path.repository.list().await?.iter().map(|c| i64::from(c.weight)).sum();
    Ok((stored - i64::from(MAX_WEIGHT)).max(0) as f64)
}

/// Fresh databases of `backend` for one path.
fn databases(
    backend: &str,
    dir: &std::path::Path,
    postgres: Option<&e2e::postgres::PostgresServer>,
    label: &str,
) -> Databases {
    match (backend, postgres) {
        ("postgres", Some(server)) => Databases {
            vessels: server.create_database(&format!("vessels_{label}")),
            consignments: server.create_database(&format!("consignments_{label}")),
        },
        _ => Databases {
            vessels: dir.join(format!("vessels-{label}.db")).display().to_string(),
            consignments: dir.join(format!("consignments-{label}.db")).display().to_string(),
        },
    }
}

/// Figure 11, on SQLite and on PostgreSQL.
pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    eprintln!("[11 create] starting PostgreSQL");
    let postgres = e2e::postgres::PostgresServer::start();
    for backend in ["sqlite", "postgres"] {
        let mut results = Vec::new();
        for reserved in [true, false] {
            let label = format!("{backend}_{}", if reserved { "reserved" } else { "unreserved" });
            eprintln!("[11 create] {label}: {CALLERS} callers for {LENGTH:?}");
            let path =
                start(reserved, &databases(backend, dir.path(), Some(&postgres), &label), i32::MAX).await?;
            let (per_second, latencies, failed) = throughput(&path.shipping).await;
            anyhow::ensure!(failed == 0, "{label}: {failed} creations failed");
            let full = start(
                reserved,
                &databases(backend, dir.path(), Some(&postgres), &format!("{label}_full")),
                MAX_WEIGHT,
            )
            .await?;
            let over = overbooked(&full).await?;
            results.push((per_second, quantile(&latencies, 0.99), over));
        }
        let [(rate, p99, over), (base_rate, base_p99, base_over)] = results[..] else { unreachable!() };
        let baseline = "the unreserved path (FindAvailable, store, book) in the same run";
        emit(
            Figure::new(format!("create_throughput_64_callers_{backend}"), rate, base_rate, "calls/s")
                .baseline_is(baseline)
                .target(">= 0.8x the unreserved path", rate >= 0.8 * base_rate),
        );
        emit(Figure::new(format!("create_latency_p99_{backend}"), p99, base_p99, "ms").baseline_is(baseline));
        emit(
            Figure::new(format!("create_overbooked_weight_{backend}"), over, base_over, "kg")
                .baseline_is(format!(
                    "{baseline}, {CALLERS} callers, {OVERBOOK_ATTEMPTS} creations of 55,000 kg on 200,000 kg"
                ))
                .target("0 kg", over == 0.0),
        );
    }
    Ok(())
}
