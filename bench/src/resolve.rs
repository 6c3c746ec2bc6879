//! Figure 2: what resolving a name costs per call once instances are cached.
//!
//! micro-core has no public way to run only a channel's pick, so this measures two things:
//! - each strategy's `pick` over `Candidates::with_load`, built per call as the channel does,
//!   for 1, 10, 100 and 1,000 instances (pure CPU, no I/O);
//! - a whole call through a `NamedChannel` over a memory registry with N instances (all at
//!   one in-process server) against a raw tonic channel to that server: the difference is
//!   everything the SDK adds per call, the pick included.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use micro_core::{
    Client, Node, Registry,
    registry::MemoryRegistry,
    selector::{Candidates, Filter, Load, StrategyKind},
};
use proto::vessel::{vessel_service_client::VesselServiceClient, vessel_service_server::VesselServiceServer};
use tonic::transport::server::TcpIncoming;
use vessel_service::{Fleet, VesselHandler};

use crate::{
    load::{Caller, raw_channel, sequential},
    report::{Figure, emit, median, quantile},
    wait_pickable,
};

const SIZES: [usize; 4] = [1, 10, 100, 1_000];
const PICK_ROUNDS: usize = 5;
const PICKS: usize = 400_000;
const CALLS: usize = 4_000;

fn nodes(count: usize) -> Vec<Node> {
    (0..count)
        .map(|i| {
            let mut node = Node::new("vessel-service", ([127, 0, 0, 1], 10_000 + i as u16).into());
            node.version = "0.1.0".into();
            node.metadata.insert("zone".into(), "eu-1".into());
            node
        })
        .collect()
}

/// Nanoseconds per pick of `kind` over `count` instances, the candidates built per pick.
fn pick_ns(kind: StrategyKind, count: usize) -> f64 {
    let nodes = nodes(count);
    let loads: Vec<Load> = (0..count)
        .map(|i| Load { in_flight: i % 3, latency: Some(Duration::from_micros(100 + i as u64)) })
        .collect();
    let eligible: Vec<usize> = (0..count).collect();
    let strategy = kind.build();
    let started = Instant::now();
    let mut sum = 0usize;
    for _ in 0..PICKS {
        let candidates = Candidates::with_loads(black_box(&nodes), black_box(&loads), black_box(&eligible));
        sum = sum.wrapping_add(strategy.pick(&candidates).unwrap_or(0));
    }
    black_box(sum);
    started.elapsed().as_secs_f64() * 1e9 / PICKS as f64
}

/// Nanoseconds per `clone` of a node (the channel clones the picked node for each call).
fn node_clone_ns() -> (f64, f64) {
    let node = nodes(1).remove(0);
    let shared = Arc::new(node.clone());
    let started = Instant::now();
    for _ in 0..PICKS {
        black_box(black_box(&node).clone());
    }
    let owned = started.elapsed().as_secs_f64() * 1e9 / PICKS as f64;
    let started = Instant::now();
    for _ in 0..PICKS {
        black_box(Arc::clone(black_box(&shared)));
    }
    (owned, started.elapsed().as_secs_f64() * 1e9 / PICKS as f64)
}

/// p50 of `sdk` and of `raw` calls, in microseconds. Calls alternate one by one (the first
/// of each pair alternating too), so both sides see the same moment of the machine.
async fn paired<A: Caller, B: Caller>(sdk: &mut A, raw: &mut B) -> anyhow::Result<(f64, f64)> {
    let (mut s, mut b) = (Vec::with_capacity(CALLS), Vec::with_capacity(CALLS));
    for i in 0..CALLS {
        let sdk_first = i % 2 == 0;
        for sdk_turn in [sdk_first, !sdk_first] {
            if sdk_turn {
                s.extend(sequential(sdk, 1).await?);
            } else {
                b.extend(sequential(raw, 1).await?);
            }
        }
    }
    s.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    Ok((quantile(&s, 0.5), quantile(&b, 0.5)))
}

/// Figure 2: the cost of a cached pick, from 1 to 1,000 instances.
pub async fn run() -> anyhow::Result<()> {
    eprintln!("[2/6 resolve] strategies over 1..1000 instances");
    for kind in [StrategyKind::RoundRobin, StrategyKind::Random, StrategyKind::P2c] {
        let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
        for _ in 0..PICK_ROUNDS {
            for (i, &n) in SIZES.iter().enumerate() {
                per_size[i].push(pick_ns(kind, n));
            }
        }
        let at_one = median(&per_size[0]);
        for (i, &n) in SIZES.iter().enumerate() {
            let ns = median(&per_size[i]);
            let name = format!("resolve_pick_{}_n{n}", kind.to_string().replace('-', "_"));
            let figure = Figure::new(name, ns, at_one, "ns").baseline_is("the same pick with 1 instance");
            let met = ns < 1_000.0 && ns <= at_one * 2.0 + 20.0;
            emit(figure.target("< 1 us, flat from 1 to 1,000", met));
        }
    }
    let (owned, shared) =
        (0..PICK_ROUNDS).map(|_| node_clone_ns()).fold((vec![], vec![]), |mut acc, (o, s)| {
            acc.0.push(o);
            acc.1.push(s);
            acc
        });
    emit(
        Figure::new("resolve_node_clone", median(&owned), median(&shared), "ns")
            .baseline_is("cloning an Arc<Node> instead"),
    );

    // The whole call, with N instances behind the name.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(VesselServiceServer::new(VesselHandler::new(
                Fleet::default(),
                std::sync::Arc::new(vessel_service::store::SqliteStore::in_memory().unwrap()),
            )))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                let _ = stopped.await;
            }),
    );
    let registry = Arc::new(MemoryRegistry::new());
    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let mut raw = VesselServiceClient::new(raw_channel(address).await?);
    sequential(&mut raw, 500).await?;
    for &n in &SIZES {
        eprintln!("[2/6 resolve] whole calls with {n} instance(s) behind the name");
        let name = format!("vessel-n{n}");
        for i in 0..n {
            let mut node = Node::new(&name, address);
            node.version = "0.1.0".into();
            if i == 0 {
                node.metadata.insert("pin".into(), "1".into());
            }
            registry.register(&node, Duration::from_secs(600)).await?;
        }
        // Every instance eligible: calls spread over n connections.
        let channel = client.channel(&name);
        wait_pickable(&channel, n).await?;
        let mut sdk = VesselServiceClient::new(channel);
        // Every instance gets its connection before timing starts.
        sequential(&mut sdk, 2 * n + 500).await?;
        let (s, b) = paired(&mut sdk, &mut raw).await?;
        emit(
            Figure::new(format!("resolve_call_p50_n{n}"), s, b, "us")
                .baseline_is("raw tonic Channel to the same in-process server"),
        );
        // The same n instances known, one eligible (a metadata filter): the channel's
        // snapshot and pick see n nodes, but calls use one connection.
        let pinned = client.channel_with(&name, Filter::new().metadata("pin", "1"));
        wait_pickable(&pinned, 1).await?;
        let mut sdk = VesselServiceClient::new(pinned);
        sequential(&mut sdk, 500).await?;
        let (s, b) = paired(&mut sdk, &mut raw).await?;
        emit(
            Figure::new(format!("resolve_call_p50_n{n}_one_eligible"), s, b, "us")
                .baseline_is("raw tonic Channel to the same in-process server"),
        );
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}
