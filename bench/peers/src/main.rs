//! micro-bench-peers: FindAvailable through micro's named client (to a release
//! vessel-service) and through volo-grpc with its static discovery (to the same handler
//! served by volo-grpc), alternating in one run; medians of the rounds.
//!
//! Run it with `make bench-peers`. `micro-bench-peers serve-volo` is the volo-grpc server it
//! starts for itself.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use micro_core::{Client, NamedChannel, Node, Registry, registry::MemoryRegistry};
use proto::vessel::vessel_service_client::VesselServiceClient;
use vessel_service::{
    Fleet,
    store::{ReservationStore, SqliteStore},
};

mod volo_gen {
    include!(concat!(env!("OUT_DIR"), "/volo_gen.rs"));
}
use volo_gen::volo_gen::vessel as vg;

const ROUNDS: usize = 5;
const SEQUENTIAL_CALLS: usize = 2_000;
const CALLERS: usize = 64;
const LOAD: Duration = Duration::from_millis(1_000);
const TIME_LIMIT: Duration = Duration::from_secs(120);

fn spec() -> proto::vessel::Specification {
    proto::vessel::Specification { capacity: 3, max_weight: 55_000 }
}

/// The volo-grpc side of the handler: the same fleet, fit rule and booked loads (read from a
/// reservation store on every call) as vessel-service.
struct VoloVessels {
    fleet: Fleet,
    store: Arc<dyn ReservationStore>,
}

impl vg::VesselService for VoloVessels {
    async fn find_available(
        &self,
        request: volo_grpc::Request<vg::Specification>,
    ) -> Result<volo_grpc::Response<vg::Response>, volo_grpc::Status> {
        let asked = request.into_inner();
        let spec = proto::vessel::Specification { capacity: asked.capacity, max_weight: asked.max_weight };
        if spec.capacity <= 0 || spec.max_weight <= 0 {
            return Err(volo_grpc::Status::invalid_argument("capacity and max_weight must both be positive"));
        }
        let loads = self.store.loads().await.map_err(|err| volo_grpc::Status::unavailable(err.to_string()))?;
        match self.fleet.find_available(&spec, &loads) {
            Some(v) => Ok(volo_grpc::Response::new(vg::Response {
                vessel: Some(vg::Vessel {
                    id: v.id.clone().into(),
                    capacity: v.capacity,
                    max_weight: v.max_weight,
                    name: v.name.clone().into(),
                    available: v.available,
                    owner_id: v.owner_id.clone().into(),
                }),
                vessels: Vec::new(),
            })),
            None => Err(volo_grpc::Status::failed_precondition("no available vessel fits")),
        }
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
            volo_grpc::server::ServiceBuilder::new(vg::VesselServiceServer::new(VoloVessels {
                fleet: Fleet::default(),
                store: Arc::new(SqliteStore::in_memory()?),
            }))
            .build(),
        )
        .run(volo::net::incoming::DefaultIncoming::from(listener))
        .await
}

/// A child process that printed its address; killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` and waits for its `listening ADDR` line or its `registered` JSON line.
fn start(program: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Server, SocketAddr) {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("could not start {}: {err}", program.display()));
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let server = Server(child);
    for line in lines.by_ref() {
        let line = line.expect("read the child's log");
        if let Some(rest) = line.strip_prefix("listening ") {
            let address = rest.trim().parse().expect("an address");
            std::thread::spawn(move || lines.for_each(drop));
            return (server, address);
        }
        let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if json["fields"]["message"] == "registered"
            && let Some(address) = json["fields"]["address"].as_str()
        {
            let address = address.parse().expect("an address");
            std::thread::spawn(move || lines.for_each(drop));
            return (server, address);
        }
    }
    panic!("{} exited before it was ready", program.display());
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(sorted.len() - 1) / 2]
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[derive(Default)]
struct Side {
    p50: Vec<f64>,
    p99: Vec<f64>,
    one: Vec<f64>,
    many: Vec<f64>,
}

/// One round for one side: sequential calls, then `CALLERS` tasks for `LOAD`.
macro_rules! round {
    ($client:expr, $call:expr, $side:expr) => {{
        let mut latencies = Vec::with_capacity(SEQUENTIAL_CALLS);
        let started = Instant::now();
        for _ in 0..SEQUENTIAL_CALLS {
            let at = Instant::now();
            let client = $client.clone();
            $call(client).await.expect("a sequential call failed");
            latencies.push(at.elapsed().as_secs_f64() * 1e6);
        }
        $side.one.push(SEQUENTIAL_CALLS as f64 / started.elapsed().as_secs_f64());
        latencies.sort_by(f64::total_cmp);
        $side.p50.push(quantile(&latencies, 0.5));
        $side.p99.push(quantile(&latencies, 0.99));
        let deadline = Instant::now() + LOAD;
        let started = Instant::now();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let client = $client.clone();
                tokio::spawn(async move {
                    let mut ok = 0u64;
                    while Instant::now() < deadline && ok < 2_000_000 {
                        if $call(client.clone()).await.is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            ok += task.await.unwrap_or(0);
        }
        $side.many.push(ok as f64 / started.elapsed().as_secs_f64());
    }};
}

async fn micro_call(mut client: VesselServiceClient<NamedChannel>) -> Result<(), tonic::Status> {
    client.find_available(spec()).await.map(drop)
}

async fn volo_call(client: vg::VesselServiceClient) -> Result<(), volo_grpc::Status> {
    client.find_available(vg::Specification { capacity: 3, max_weight: 55_000 }).await.map(drop)
}

fn print(name: &str, sdk: &[f64], peer: &[f64], unit: &str) {
    let (sdk, peer) = (median(sdk), median(peer));
    println!("figure {name} sdk={sdk:.1} baseline={peer:.1} ratio={:.3} unit={unit}", sdk / peer);
}

async fn bench() {
    let vessel_bin = std::env::var_os("VESSEL_SERVICE_BIN").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/vessel-service"),
        std::path::PathBuf::from,
    );
    assert!(
        vessel_bin.is_file(),
        "{} not found: `cargo build --release -p vessel-service` first (make bench-peers does)",
        vessel_bin.display()
    );
    let (_micro_server, micro_address) = start(
        &vessel_bin,
        &[],
        &[
            ("MICRO_REGISTRY", "memory"),
            ("MICRO_SERVER_ADDRESS", "127.0.0.1:0"),
            ("MICRO_LOG_FORMAT", "json"),
        ],
    );
    let (_volo_server, volo_address) =
        start(&std::env::current_exe().expect("own path"), &["serve-volo"], &[]);

    // micro: a memory registry that lists the vessel-service process.
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(&Node::new("vessel-service", micro_address), Duration::from_secs(600))
        .await
        .expect("register");
    let registry: Arc<dyn Registry> = registry;
    let micro = VesselServiceClient::new(
        Client::new(registry).idempotent_methods(proto::IDEMPOTENT_METHODS).channel("vessel-service"),
    );
    // volo-grpc: its static discovery with the volo server's address.
    let volo = vg::VesselServiceClientBuilder::new("vessel-service")
        .load_balance(volo::loadbalance::random::WeightedRandomBalance::<()>::new())
        .discover(volo::discovery::StaticDiscover::from(vec![volo_address]))
        .build();
    for _ in 0..500 {
        micro_call(micro.clone()).await.expect("micro warm-up");
        volo_call(volo.clone()).await.expect("volo warm-up");
    }

    let (mut m, mut v) = (Side::default(), Side::default());
    for r in 0..ROUNDS {
        eprintln!("[peers] round {}/{ROUNDS}", r + 1);
        if r % 2 == 0 {
            round!(micro, micro_call, m);
            round!(volo, volo_call, v);
        } else {
            round!(volo, volo_call, v);
            round!(micro, micro_call, m);
        }
    }
    print("peer_volo_latency_p50", &m.p50, &v.p50, "us");
    print("peer_volo_latency_p99", &m.p99, &v.p99, "us");
    print("peer_volo_throughput_1_caller", &m.one, &v.one, "calls/s");
    print("peer_volo_throughput_64_callers", &m.many, &v.many, "calls/s");
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
    bench().await;
}
