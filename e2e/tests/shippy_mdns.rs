//! The shippy system as real processes over real sockets and real multicast, inside the
//! private network namespace `make test` runs in.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use e2e::{
    discovery::{mdns, wait_for},
    process::Process,
    shippy::{self, CliRun, sample_consignment},
    unique_name,
};
use futures::StreamExt;
use micro_core::{Client, registry::Change};
use proto::{
    consignment::{GetRequest, shipping_service_client::ShippingServiceClient},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use tokio::time::{Instant, timeout};

fn vessel_service(name: &str, fleet: Option<&PathBuf>) -> Process {
    let mut args = vec![];
    let fleet = fleet.map(|p| p.display().to_string());
    if let Some(fleet) = &fleet {
        args.extend(["--fleet", fleet.as_str()]);
    }
    Process::start("vessel-service", &args, &[("MICRO_SERVER_NAME", name)])
}

fn consignment_service(name: &str, vessel_name: &str) -> Process {
    Process::start(
        "consignment-service",
        &[],
        &[
            ("MICRO_SERVER_NAME", name),
            ("VESSEL_SERVICE", vessel_name),
            ("MICRO_LOOKUP_TIMEOUT", "1500"),
            ("CONSIGNMENT_DB", ":memory:"),
        ],
    )
}

async fn run_cli(consignment_name: &str, file: &std::path::Path) -> CliRun {
    shippy::run_cli(consignment_name, file, &[], &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn consignment_travels_from_cli_to_a_vessel_found_by_name() {
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let _vessel = vessel_service(&vessel_name, None);
    let _consignment = consignment_service(&consignment_name, &vessel_name);
    wait_for(&registry, &vessel_name, 1).await;
    wait_for(&registry, &consignment_name, 1).await;

    let run = run_cli(&consignment_name, &sample_consignment()).await;
    assert!(run.success, "CLI failed: {}", run.stderr);
    assert!(run.stdout.contains("on vessel vessel001"), "{}", run.stdout);
    assert!(run.stdout.contains("stored consignments: 1"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn consignment_heavier_than_every_vessel_is_refused_and_not_stored() {
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let _vessel = vessel_service(&vessel_name, None);
    let _consignment = consignment_service(&consignment_name, &vessel_name);
    wait_for(&registry, &vessel_name, 1).await;
    wait_for(&registry, &consignment_name, 1).await;

    let dir = tempfile::tempdir().unwrap();
    let heavy = dir.path().join("heavy.json");
    std::fs::write(&heavy, r#"{"description": "anvils", "weight": 250000, "containers": [{"customer_id": "c1", "origin": "Derby"}]}"#)
        .unwrap();
    let run = run_cli(&consignment_name, &heavy).await;
    assert!(!run.success, "a consignment no vessel can carry must be refused: {}", run.stdout);
    assert!(run.stderr.contains("FAILED_PRECONDITION") && run.stderr.contains("no vessel"), "{}", run.stderr);

    let channel = Client::new(registry).channel(&consignment_name);
    let stored = ShippingServiceClient::new(channel).get_consignments(GetRequest {}).await.unwrap();
    assert!(stored.into_inner().consignments.is_empty(), "the refused consignment was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_vessel_service_is_unavailable_naming_it_and_the_registry() {
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("absent-vessel"), unique_name("consignment"));
    let _consignment = consignment_service(&consignment_name, &vessel_name);
    wait_for(&registry, &consignment_name, 1).await;

    let started = Instant::now();
    let run = run_cli(&consignment_name, &sample_consignment()).await;
    assert!(!run.success);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let line = run.stderr.trim();
    assert_eq!(line.lines().count(), 1, "one-line reason expected: {line}");
    for expected in ["UNAVAILABLE", vessel_name.as_str(), "mdns"] {
        assert!(line.contains(expected), "{expected:?} missing from: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_stopped_with_sigterm_vanishes_from_other_processes_within_2s() {
    let registry = mdns();
    let name = unique_name("vessel");
    let mut vessel = vessel_service(&name, None);
    let node = wait_for(&registry, &name, 1).await.remove(0);
    let mut changes = registry.watch(&name);
    assert!(matches!(changes.next().await, Some(Ok(Change::Insert(..)))));

    let stopped_at = Instant::now();
    assert!(
        vessel.terminate(Duration::from_secs(10)).await.success(),
        "clean exit expected:\n{}",
        vessel.log()
    );
    let removed = timeout(Duration::from_secs(2), async {
        while let Some(change) = changes.next().await {
            if let Ok(Change::Remove(id)) = change
                && id == node.id
            {
                return;
            }
        }
    })
    .await;
    assert!(removed.is_ok(), "still listed {:?} after SIGTERM", stopped_at.elapsed());
    let log = vessel.log();
    let (deregistered, drained) = (log.find("deregistered").unwrap(), log.find("drained").unwrap());
    assert!(deregistered < drained, "deregistration must come before draining:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_are_both_seen_and_both_receive_calls() {
    let registry = mdns();
    let name = unique_name("vessel");
    let dir = tempfile::tempdir().unwrap();
    let fleets: Vec<PathBuf> = ["vessel-a", "vessel-b"]
        .iter()
        .map(|id| {
            let path = dir.path().join(format!("{id}.json"));
            let json = format!(
                r#"[{{"id": "{id}", "name": "{id}", "capacity": 10, "max_weight": 1000, "available": true}}]"#
            );
            std::fs::write(&path, json).unwrap();
            path
        })
        .collect();
    let _a = vessel_service(&name, Some(&fleets[0]));
    let _b = vessel_service(&name, Some(&fleets[1]));
    assert_eq!(wait_for(&registry, &name, 2).await.len(), 2);

    let client = Client::new(registry);
    let mut vessels = VesselServiceClient::new(client.channel(&name));
    let mut served_by = BTreeSet::new();
    for _ in 0..10 {
        let reply = vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await.unwrap();
        served_by.insert(reply.into_inner().vessel.unwrap().id);
    }
    assert_eq!(served_by, BTreeSet::from(["vessel-a".to_owned(), "vessel-b".to_owned()]));
}
