//! A gRPC server for tests, registered over mDNS like any service, that misbehaves on
//! request: it serves `VesselService` and `ShippingService` and reads its faults from the
//! environment.
//!
//! | variable | effect |
//! | --- | --- |
//! | `FAULT_NAME` | service name to register (required) |
//! | `FAULT_LABEL` | vessel id it answers with (`FindAvailable`'s vessel, `CreateConsignment`'s `vessel_id`); default `fault` |
//! | `FAULT_DELAY_MS` | sleep before answering |
//! | `FAULT_DELAY_AFTER` | the first N calls of each method answer at once, later ones after `FAULT_DELAY_MS` (a service that turns slow); default 0 |
//! | `FAULT_HANG` | `1`: accept every call and never answer it (the connection stays healthy) |
//! | `FAULT_EXIT_ON_CALL` | `1`: exit abruptly once a call arrives, before answering |
//! | `FAULT_SLOTS` | a fixed capacity: each call waits for one of this many slots and holds it for `FAULT_HOLD_MS` (overload that is real and costs no CPU); unset, no slots |
//! | `FAULT_HOLD_MS` | how long a call holds its slot; default 20 |
//! | `MICRO_SERVER_LIMIT`, `MICRO_SERVER_LIMIT_MIN`, `MICRO_SERVER_LIMIT_MAX`, `MICRO_SERVER_METHOD_LIMITS` | the SDK's concurrency limits, as for any service |
//! | `MICRO_SERVER_ADDRESS` | address to listen on (and advertise unless `0.0.0.0`); default `127.0.0.1:0` |
//!
//! It serves reflection for shippy's protos, so `micro call` and `micro gateway` reach it too.
//!
//! The faults apply to `FindAvailable` and `CreateConsignment`, never to `GetConsignments`,
//! which reports what reached this instance: calls are counted when they arrive, before any
//! delay, hang or exit, so a slow or hung instance counts them too. It answers with one
//! consignment per `CreateConsignment` that arrived, and its response metadata
//! `fault-arrivals` lists the arrivals per method, e.g. `CreateConsignment=3,FindAvailable=12`.
//! `FindAvailable`'s response metadata `fault-subjects` lists the `x-micro-subject` values
//! its call carried (the subject the gateway authenticated), comma-separated, or `none`, and
//! `fault-queued` how many calls were already waiting for a slot when it arrived (0 without
//! slots): how deep the queue behind the concurrency limit was, whatever the clocks say.

use std::{
    net::SocketAddr,
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
use tonic::{Request, Status, metadata::MetadataValue};

/// The `GetConsignments` response metadata listing the calls that arrived per method.
const ARRIVALS_HEADER: &str = "fault-arrivals";
/// The `FindAvailable` response metadata listing the subjects its call carried.
const SUBJECTS_HEADER: &str = "fault-subjects";
/// The `FindAvailable` response metadata: calls waiting for a slot when it arrived.
const QUEUED_HEADER: &str = "fault-queued";
/// Listening address when `MICRO_SERVER_ADDRESS` is unset: loopback, a port the system picks.
const DEFAULT_ADDRESS: &str = "127.0.0.1:0";
/// How long a call holds its slot when `FAULT_HOLD_MS` is unset.
const DEFAULT_HOLD_MS: u64 = 20;

/// The SDK's settings the fault server takes from its flags and environment.
#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    limits: micro_core::cli::LimitArgs,
}

/// The methods the faults apply to, in the order [`ARRIVALS_HEADER`] lists them.
#[derive(Clone, Copy)]
enum Method {
    CreateConsignment,
    FindAvailable,
}

impl Method {
    const ALL: [Method; 2] = [Method::CreateConsignment, Method::FindAvailable];

    fn name(self) -> &'static str {
        match self {
            Method::CreateConsignment => "CreateConsignment",
            Method::FindAvailable => "FindAvailable",
        }
    }
}

#[derive(Clone)]
struct Faults {
    label: String,
    delay: Duration,
    /// Calls of each method that arrive before the delay starts.
    delay_after: usize,
    hang: bool,
    exit_on_call: bool,
    /// A fixed capacity, when `FAULT_SLOTS` is set.
    slots: Option<Arc<Slots>>,
    /// Calls that arrived, per [`Method`] (indexed by its discriminant).
    arrived: Arc<[AtomicUsize; 2]>,
}

/// A fixed capacity: `count` slots, each held by one call for `hold`.
struct Slots {
    count: usize,
    hold: Duration,
    semaphore: tokio::sync::Semaphore,
    /// Calls holding a slot or waiting for one.
    present: AtomicUsize,
}

impl Slots {
    /// Waits for a slot and holds it; returns how many calls were waiting when this one came.
    async fn take(&self) -> usize {
        let queued = self.present.fetch_add(1, Ordering::SeqCst).saturating_sub(self.count);
        let _left = Leaves(&self.present);
        let _slot = self.semaphore.acquire().await.expect("the slots are never closed");
        tokio::time::sleep(self.hold).await;
        queued
    }
}

/// Counts a call out of [`Slots::present`] however it ends (a cancelled call too).
struct Leaves<'a>(&'a AtomicUsize);

impl Drop for Leaves<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Faults {
    /// Counts the call, then misbehaves as configured; returns how many calls were waiting
    /// for a slot when it arrived.
    async fn arrive(&self, method: Method) -> usize {
        let earlier = self.arrived[method as usize].fetch_add(1, Ordering::SeqCst);
        if self.exit_on_call {
            eprintln!("fault-server: exiting on a call, as asked");
            std::process::exit(3);
        }
        if self.hang {
            tracing::debug!(method = method.name(), "hanging, as asked");
            std::future::pending::<()>().await;
        }
        if earlier >= self.delay_after {
            tokio::time::sleep(self.delay).await;
        }
        match &self.slots {
            Some(slots) => slots.take().await,
            None => 0,
        }
    }

    fn arrived(&self, method: Method) -> usize {
        self.arrived[method as usize].load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl proto::vessel::vessel_service_server::VesselService for Faults {
    async fn find_available(
        &self,
        request: Request<Specification>,
    ) -> Result<tonic::Response<Response>, Status> {
        let queued = self.arrive(Method::FindAvailable).await;
        let vessel = Vessel {
            id: self.label.clone(),
            capacity: 1,
            max_weight: 1,
            available: true,
            ..Default::default()
        };
        let subjects: Vec<&str> = request
            .metadata()
            .get_all(micro_core::auth::SUBJECT_HEADER)
            .iter()
            .map(|value| value.to_str().unwrap_or("(not ASCII)"))
            .collect();
        let subjects = if subjects.is_empty() { "none".to_owned() } else { subjects.join(",") };
        let mut response = tonic::Response::new(Response { vessel: Some(vessel), vessels: vec![] });
        let value = MetadataValue::try_from(subjects).map_err(|_| Status::internal("subjects"))?;
        response.metadata_mut().insert(SUBJECTS_HEADER, value);
        response.metadata_mut().insert(QUEUED_HEADER, MetadataValue::from(queued as u64));
        Ok(response)
    }

    /// Holds nothing: answers as FindAvailable does (and counts as one), with a reservation
    /// on the label's vessel.
    async fn reserve(
        &self,
        request: Request<proto::vessel::ReserveRequest>,
    ) -> Result<tonic::Response<proto::vessel::Reservation>, Status> {
        self.arrive(Method::FindAvailable).await;
        let request = request.into_inner();
        let vessel = Vessel {
            id: self.label.clone(),
            capacity: 1,
            max_weight: 1,
            available: true,
            ..Default::default()
        };
        Ok(tonic::Response::new(proto::vessel::Reservation {
            id: format!("r-{}-{}", self.label, request.consignment_id),
            vessel: Some(vessel),
            consignment_id: request.consignment_id,
            state: "held".into(),
            ..Default::default()
        }))
    }

    async fn confirm(
        &self,
        request: Request<proto::vessel::ReservationRef>,
    ) -> Result<tonic::Response<proto::vessel::Reservation>, Status> {
        let id = request.into_inner().reservation_id;
        Ok(tonic::Response::new(proto::vessel::Reservation {
            id,
            state: "confirmed".into(),
            ..Default::default()
        }))
    }

    async fn release(
        &self,
        request: Request<proto::vessel::ReservationRef>,
    ) -> Result<tonic::Response<proto::vessel::Reservation>, Status> {
        let id = request.into_inner().reservation_id;
        Ok(tonic::Response::new(proto::vessel::Reservation {
            id,
            state: "released".into(),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl proto::consignment::shipping_service_server::ShippingService for Faults {
    type WatchConsignmentsStream = std::pin::Pin<
        Box<dyn tonic::codegen::tokio_stream::Stream<Item = Result<Consignment, Status>> + Send>,
    >;

    async fn watch_consignments(
        &self,
        _request: Request<proto::consignment::WatchRequest>,
    ) -> Result<
        tonic::Response<
            std::pin::Pin<
                Box<dyn tonic::codegen::tokio_stream::Stream<Item = Result<Consignment, Status>> + Send>,
            >,
        >,
        Status,
    > {
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
    ) -> Result<tonic::Response<consignment::Response>, Status> {
        self.arrive(Method::CreateConsignment).await;
        let consignment = Consignment { vessel_id: self.label.clone(), ..request.into_inner() };
        let reply =
            consignment::Response { created: true, consignment: Some(consignment), consignments: vec![] };
        Ok(tonic::Response::new(reply))
    }

    async fn get_consignments(
        &self,
        _: Request<GetRequest>,
    ) -> Result<tonic::Response<consignment::Response>, Status> {
        let consignments = vec![Consignment::default(); self.arrived(Method::CreateConsignment)];
        let mut response =
            tonic::Response::new(consignment::Response { created: false, consignment: None, consignments });
        let arrivals: Vec<String> =
            Method::ALL.iter().map(|&method| format!("{}={}", method.name(), self.arrived(method))).collect();
        let value = MetadataValue::try_from(arrivals.join(",")).map_err(|_| Status::internal("arrivals"))?;
        response.metadata_mut().insert(ARRIVALS_HEADER, value);
        Ok(response)
    }

    /// Stores nothing, so every reservation it is asked about is abandoned.
    async fn settle_reservation(
        &self,
        _: Request<consignment::SettleRequest>,
    ) -> Result<tonic::Response<consignment::Settlement>, Status> {
        Ok(tonic::Response::new(consignment::Settlement::default()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let name = std::env::var("FAULT_NAME").map_err(|_| "FAULT_NAME must name the service")?;
    let var = |key: &str| std::env::var(key).ok();
    let cli = <Cli as clap::Parser>::parse();
    let hold =
        Duration::from_millis(var("FAULT_HOLD_MS").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_HOLD_MS));
    let slots = var("FAULT_SLOTS")
        .map(|v| v.parse::<usize>().map_err(|_| format!("FAULT_SLOTS={v:?}: expected a number of slots")))
        .transpose()?
        .map(|count| {
            let semaphore = tokio::sync::Semaphore::new(count);
            Arc::new(Slots { count, hold, semaphore, present: AtomicUsize::new(0) })
        });
    let faults = Faults {
        label: var("FAULT_LABEL").unwrap_or_else(|| "fault".into()),
        delay: Duration::from_millis(var("FAULT_DELAY_MS").and_then(|v| v.parse().ok()).unwrap_or(0)),
        delay_after: var("FAULT_DELAY_AFTER").and_then(|v| v.parse().ok()).unwrap_or(0),
        hang: var("FAULT_HANG").as_deref() == Some("1"),
        exit_on_call: var("FAULT_EXIT_ON_CALL").as_deref() == Some("1"),
        slots,
        arrived: Arc::default(),
    };
    let address = var("MICRO_SERVER_ADDRESS").unwrap_or_else(|| DEFAULT_ADDRESS.into());
    let address: SocketAddr =
        address.parse().map_err(|_| format!("MICRO_SERVER_ADDRESS={address:?}: expected ip:port"))?;
    let registry = RegistryConfig::default().connect().await?;
    let (limit, method_limits) = cli.limits.into_limits();
    let config = ServerConfig { address, limit, method_limits, ..ServerConfig::default() };
    Server::builder(name)
        .config(config)
        .registry(registry)
        .file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .add_service(VesselServiceServer::new(faults.clone()))
        .add_service(ShippingServiceServer::new(faults))
        .run()
        .await?;
    Ok(())
}
