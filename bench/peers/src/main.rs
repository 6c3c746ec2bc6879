//! micro-bench-peers: FindAvailable through micro's named client (to a release
//! vessel-service) and through volo-grpc with its static discovery (to the same handler
//! served by volo-grpc), alternating in one run; medians of the rounds.
//!
//! Run it with `make bench-peers`. `micro-bench-peers serve-volo` is the volo-grpc server it
//! starts for itself. Only what is volo-grpc's is here: the SDK side (the shared handler,
//! vessel-service and micro's client, the rounds and the figures) is `bench::peers`, in the
//! workspace, so `make test` compiles it.

use std::time::Duration;

use bench::{
    load::Caller,
    peers::{self, Side, VesselHandler},
};

mod volo_gen {
    include!(concat!(env!("OUT_DIR"), "/volo_gen.rs"));
}
use volo_gen::volo_gen::vessel as vg;

const TIME_LIMIT: Duration = Duration::from_secs(120);

/// The volo-grpc side of the handler: [`VesselHandler`] with volo-grpc's types.
struct VoloVessels(VesselHandler);

/// A tonic status as volo-grpc's, code and message kept.
fn volo_status(status: tonic::Status) -> volo_grpc::Status {
    volo_grpc::Status::new(volo_grpc::Code::from(status.code() as i32), status.message().to_owned())
}

impl vg::VesselService for VoloVessels {
    async fn find_available(
        &self,
        request: volo_grpc::Request<vg::Specification>,
    ) -> Result<volo_grpc::Response<vg::Response>, volo_grpc::Status> {
        let asked = request.into_inner();
        let spec = proto::vessel::Specification { capacity: asked.capacity, max_weight: asked.max_weight };
        let v = self.0.find_available(spec).await.map_err(volo_status)?;
        Ok(volo_grpc::Response::new(vg::Response {
            vessel: Some(vg::Vessel {
                id: v.id.into(),
                capacity: v.capacity,
                max_weight: v.max_weight,
                name: v.name.into(),
                available: v.available,
                owner_id: v.owner_id.into(),
            }),
            vessels: Vec::new(),
        }))
    }

    // The benchmark calls FindAvailable only.
    async fn reserve(
        &self,
        _request: volo_grpc::Request<vg::ReserveRequest>,
    ) -> Result<volo_grpc::Response<vg::Reservation>, volo_grpc::Status> {
        Err(volo_grpc::Status::unimplemented("reservations are not benchmarked"))
    }

    async fn confirm(
        &self,
        _request: volo_grpc::Request<vg::ReservationRef>,
    ) -> Result<volo_grpc::Response<vg::Reservation>, volo_grpc::Status> {
        Err(volo_grpc::Status::unimplemented("reservations are not benchmarked"))
    }

    async fn release(
        &self,
        _request: volo_grpc::Request<vg::ReservationRef>,
    ) -> Result<volo_grpc::Response<vg::Reservation>, volo_grpc::Status> {
        Err(volo_grpc::Status::unimplemented("reservations are not benchmarked"))
    }
}

async fn serve_volo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("listening {}", listener.local_addr()?);
    volo_grpc::server::Server::new()
        .add_service(
            volo_grpc::server::ServiceBuilder::new(vg::VesselServiceServer::new(VoloVessels(
                VesselHandler::in_memory()?,
            )))
            .build(),
        )
        .run(volo::net::incoming::DefaultIncoming::from(listener))
        .await
}

/// volo-grpc's client as a [`Caller`], its status as tonic's.
#[derive(Clone)]
struct Volo(vg::VesselServiceClient);

impl Caller for Volo {
    async fn call(&mut self) -> Result<(), tonic::Status> {
        let spec = bench::load::spec();
        let asked = vg::Specification { capacity: spec.capacity, max_weight: spec.max_weight };
        self.0.find_available(asked).await.map(drop).map_err(|status| {
            tonic::Status::new(tonic::Code::from(status.code() as i32), status.message().to_owned())
        })
    }
}

async fn bench() -> anyhow::Result<()> {
    let (_micro_server, micro_address) = peers::start_vessel_service()?;
    let (_volo_server, volo_address) = peers::start(&std::env::current_exe()?, &["serve-volo"], &[])?;
    let mut micro = peers::micro_client(micro_address).await?;
    // volo-grpc: its static discovery with the volo server's address.
    let mut volo = Volo(
        vg::VesselServiceClientBuilder::new("vessel-service")
            .load_balance(volo::loadbalance::random::WeightedRandomBalance::<()>::new())
            .discover(volo::discovery::StaticDiscover::from(vec![volo_address]))
            .build(),
    );
    bench::load::sequential(&mut micro, peers::WARM_UP_CALLS).await?;
    bench::load::sequential(&mut volo, peers::WARM_UP_CALLS).await?;

    let (mut m, mut v) = (Side::default(), Side::default());
    for r in 0..peers::ROUNDS {
        eprintln!("[peers] round {}/{}", r + 1, peers::ROUNDS);
        if r % 2 == 0 {
            peers::round(&mut micro, &mut m).await?;
            peers::round(&mut volo, &mut v).await?;
        } else {
            peers::round(&mut volo, &mut v).await?;
            peers::round(&mut micro, &mut m).await?;
        }
    }
    peers::print("volo", &m, &v);
    Ok(())
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("serve-volo") {
        if let Err(err) = serve_volo().await {
            eprintln!("serve-volo: {err}");
            std::process::exit(1);
        }
        return;
    }
    std::thread::spawn(|| {
        std::thread::sleep(TIME_LIMIT);
        eprintln!("micro-bench-peers: over its {TIME_LIMIT:?} limit; stopping");
        std::process::exit(3);
    });
    eprintln!(
        "micro-bench-peers: sdk = micro NamedChannel -> vessel-service (tonic); baseline = volo-grpc StaticDiscover -> the same handler on volo-grpc"
    );
    if let Err(err) = bench().await {
        eprintln!("micro-bench-peers: {err:#}");
        std::process::exit(1);
    }
}
