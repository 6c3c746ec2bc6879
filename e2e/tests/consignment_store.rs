//! consignment-service's store as real processes over mDNS, inside the private namespace:
//! consignments survive a restart and a SIGKILL in the middle of a burst, each exactly once,
//! and a replayed request id stores nothing new.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use e2e::{
    discovery::{STARTUP, mdns, wait_for},
    process::{Process, workspace_root},
    shippy::{self, CliRun},
    unique_name,
};
use futures::StreamExt;
use micro_core::{Client, NamedChannel, Registry, selector::Filter};
use proto::consignment::{
    Consignment, Container, GetRequest, shipping_service_client::ShippingServiceClient,
};
use tokio::time::Instant;

/// The request metadata entry consignment-service deduplicates by.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const BURST: usize = 500;
const KILL_AFTER_STORED: usize = 150;
const CONCURRENCY: usize = 16;

/// vessel-service with one vessel roomy enough for every burst, since each stored
/// consignment is booked on it (the fleet file is written into `dir`).
fn vessel_service(name: &str, dir: &Path) -> Process {
    let fleet = dir.join("fleet.json");
    std::fs::write(
        &fleet,
        r#"[{"id": "vessel-roomy", "name": "Roomy", "capacity": 100000, "max_weight": 2000000000, "available": true}]"#,
    )
    .expect("fleet file");
    Process::start(
        "vessel-service",
        &["--fleet", &fleet.display().to_string()],
        &[("MICRO_SERVER_NAME", name)],
    )
}

/// consignment-service on the database `db`, announcing `boot` as metadata so a test can
/// tell a restarted instance from the one before it.
fn consignment_service(name: &str, vessel_name: &str, db: &Path, boot: &str) -> Process {
    Process::start(
        "consignment-service",
        &["--db", &db.display().to_string()],
        &[
            ("MICRO_SERVER_NAME", name),
            ("MICRO_SERVER_METADATA", &format!("boot={boot}")),
            ("VESSEL_SERVICE", vessel_name),
            ("MICRO_LOOKUP_TIMEOUT", "1500"),
        ],
    )
}

/// Waits until an instance of `name` announcing `boot` is registered.
async fn wait_for_boot(registry: &Arc<dyn Registry>, name: &str, boot: &str) {
    e2e::calls::poll_until(format!("{name} boot {boot} registering"), STARTUP, async || {
        let nodes = registry.lookup(name).await.unwrap_or_default();
        nodes.iter().any(|node| node.metadata.get("boot").map(String::as_str) == Some(boot)).then_some(())
    })
    .await
}

/// A client of the instance of `name` that announced `boot` only.
fn shipping(client: &Client, name: &str, boot: &str) -> ShippingServiceClient<NamedChannel> {
    ShippingServiceClient::new(client.channel_with(name, Filter::new().metadata("boot", boot)))
}

async fn run_cli(consignment_name: &str, file: &Path, request_id: &str) -> CliRun {
    shippy::run_cli(consignment_name, file, &["--request-id", request_id], &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consignment_survives_a_restart_and_a_rerun_with_its_request_id_stores_nothing() {
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consignments.db");
    let sample = workspace_root().join("consignment-cli").join("consignment.json");
    let _vessel = vessel_service(&vessel_name, dir.path());
    let mut first = consignment_service(&consignment_name, &vessel_name, &db, "1");
    wait_for(&registry, &vessel_name, 1).await;
    wait_for_boot(&registry, &consignment_name, "1").await;

    let run = run_cli(&consignment_name, &sample, "restart-test-1").await;
    assert!(run.success, "CLI failed: {}", run.stderr);
    assert!(run.stdout.contains("stored consignments: 1"), "{}", run.stdout);
    assert!(run.stdout.contains("request id restart-test-1"), "{}", run.stdout);
    let id = run.created_id();

    assert!(
        first.terminate(Duration::from_secs(15)).await.success(),
        "clean exit expected:\n{}",
        first.log()
    );
    let _second = consignment_service(&consignment_name, &vessel_name, &db, "2");
    wait_for_boot(&registry, &consignment_name, "2").await;

    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let stored = shipping(&client, &consignment_name, "2").get_consignments(GetRequest {}).await.unwrap();
    let stored = stored.into_inner().consignments;
    assert_eq!(stored.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    assert_eq!(stored[0].containers.len(), 3, "stored whole: {:?}", stored[0]);

    // The same request id again, after the restart: the first result, nothing new stored.
    let rerun = run_cli(&consignment_name, &sample, "restart-test-1").await;
    assert!(rerun.success, "CLI failed: {}", rerun.stderr);
    assert_eq!(rerun.created_id(), id);
    assert!(rerun.stdout.contains("nothing new stored"), "{}", rerun.stdout);
    assert!(rerun.stdout.contains("stored consignments: 1"), "{}", rerun.stdout);

    // The same request id with another consignment is refused.
    let other = dir.path().join("other.json");
    std::fs::write(
        &other,
        r#"{"description": "other", "weight": 10, "containers": [{"customer_id": "c", "origin": "Derby"}]}"#,
    )
    .unwrap();
    let refused = run_cli(&consignment_name, &other, "restart-test-1").await;
    assert!(!refused.success, "{}", refused.stdout);
    assert!(refused.stderr.contains("ALREADY_EXISTS") && refused.stderr.contains(&id), "{}", refused.stderr);
}

fn burst_consignment(i: usize) -> Consignment {
    Consignment {
        description: format!("burst #{i}"),
        weight: 100 + i as i32,
        containers: (0..=i % 5)
            .map(|c| Container {
                id: format!("{i}-{c}"),
                customer_id: format!("cust{i}"),
                origin: "Derby".to_owned(),
                user_id: "burst".to_owned(),
            })
            .collect(),
        ..Default::default()
    }
}

fn burst_request(i: usize) -> tonic::Request<Consignment> {
    let mut request = tonic::Request::new(burst_consignment(i));
    request.set_timeout(Duration::from_secs(3));
    request.metadata_mut().insert(IDEMPOTENCY_KEY, format!("burst-{i}").parse().unwrap());
    request
}

/// Which burst index each stored consignment is, checking that each is stored whole.
fn burst_indices(stored: &[Consignment]) -> BTreeMap<usize, usize> {
    let mut seen = BTreeMap::new();
    for consignment in stored {
        let i: usize = consignment.description.strip_prefix("burst #").unwrap().parse().unwrap();
        let expected = Consignment {
            id: consignment.id.clone(),
            vessel_id: consignment.vessel_id.clone(),
            reservation_id: consignment.reservation_id.clone(),
            ..burst_consignment(i)
        };
        assert_eq!(consignment, &expected, "stored in part or altered");
        assert!(
            consignment.reservation_id.starts_with("r-"),
            "stored without its reservation: {consignment:?}"
        );
        *seen.entry(i).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_a_burst_keeps_every_reported_consignment_exactly_once() {
    let started = Instant::now();
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consignments.db");
    let _vessel = vessel_service(&vessel_name, dir.path());
    let first = consignment_service(&consignment_name, &vessel_name, &db, "1");
    wait_for(&registry, &vessel_name, 1).await;
    wait_for_boot(&registry, &consignment_name, "1").await;

    // A burst of creations; SIGKILL once KILL_AFTER_STORED were answered OK. Only calls
    // answered OK count as reported stored; no new call starts after the kill.
    let client = Client::new(registry.clone())
        .idempotent_methods(proto::IDEMPOTENT_METHODS)
        .request_timeout(Duration::from_secs(3));
    let before = shipping(&client, &consignment_name, "1");
    let stored_ok = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let first = Arc::new(first);
    let results: Vec<(usize, Option<String>)> = futures::stream::iter(0..BURST)
        .map(|i| {
            let (mut shipping, stored_ok, killed, first) =
                (before.clone(), stored_ok.clone(), killed.clone(), first.clone());
            async move {
                if killed.load(Ordering::SeqCst) {
                    return (i, None);
                }
                let reply = shipping.create_consignment(burst_request(i)).await;
                let id = reply.ok().and_then(|r| r.into_inner().consignment).map(|c| c.id);
                if id.is_some()
                    && stored_ok.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER_STORED
                    && !killed.swap(true, Ordering::SeqCst)
                {
                    first.signal("KILL");
                }
                (i, id)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert!(killed.load(Ordering::SeqCst), "the burst ended before the kill");
    let reported: BTreeMap<usize, String> =
        results.into_iter().filter_map(|(i, id)| Some((i, id?))).collect();
    assert!(reported.len() >= KILL_AFTER_STORED, "only {} reported stored", reported.len());

    let _second = consignment_service(&consignment_name, &vessel_name, &db, "2");
    wait_for_boot(&registry, &consignment_name, "2").await;
    let mut after = shipping(&client, &consignment_name, "2");
    let stored = after.get_consignments(GetRequest {}).await.unwrap().into_inner().consignments;
    let seen = burst_indices(&stored);
    for (i, id) in &reported {
        assert_eq!(
            seen.get(i),
            Some(&1),
            "consignment #{i} ({id}) was reported stored; listed {:?} times",
            seen.get(i)
        );
        assert!(stored.iter().any(|c| &c.id == id), "#{i} listed under another id than reported ({id})");
    }
    assert!(seen.values().all(|&count| count == 1), "stored twice: {seen:?}");
    let unreported_but_stored = seen.len() - reported.len();
    assert!(unreported_but_stored <= CONCURRENCY, "{unreported_but_stored} stored without being reported");
    eprintln!(
        "burst: {} reported stored, {unreported_but_stored} stored but not reported, restarted and listed after {:?}",
        reported.len(),
        started.elapsed()
    );

    // Every creation again with its own key: the stored ones are answered from the store,
    // the others are stored now; in the end each is there exactly once.
    let replays: Vec<(usize, Result<String, tonic::Status>)> = futures::stream::iter(0..BURST)
        .map(|i| {
            let mut after = after.clone();
            async move {
                let reply = after.create_consignment(burst_request(i)).await;
                (i, reply.map(|r| r.into_inner().consignment.unwrap().id))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for (i, result) in &replays {
        let id = result.as_ref().unwrap_or_else(|status| panic!("replay of #{i} failed: {status:?}"));
        if let Some(first_id) = reported.get(i) {
            assert_eq!(id, first_id, "replay of #{i} must return the first result");
        }
    }
    let stored = after.get_consignments(GetRequest {}).await.unwrap().into_inner().consignments;
    let seen = burst_indices(&stored);
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), (0..BURST).collect());
    assert!(seen.values().all(|&count| count == 1), "stored twice: {seen:?}");
}
