//! Shippy's one rule, end to end with the real binaries: a consignment is stored only when a
//! vessel can carry it, whatever the concurrency, the number of instances, the broker, the
//! replays and the kills. Each test ends with queries of the databases that prove the three
//! invariants (`docs/reservations.md`):
//! 1. what is booked or held on a vessel never exceeds its capacity or its max weight;
//! 2. every stored consignment has exactly one booking, on the vessel it names, and every
//!    booking belongs to a stored consignment (holds of creations that never stored are
//!    released);
//! 3. a replayed creation books nothing twice and answers with the first consignment.
//!
//! Databases are PostgreSQL (one server per test binary, a database per service and test;
//! on a host of its own where the test runs on hosts) unless a test says SQLite.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use e2e::{
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    hosts::Network,
    nats::NatsServer,
    postgres::PostgresServer,
    process::{Place, Process, env_refs},
    rabbitmq::RabbitMqServer,
    unique_name,
};
use futures::StreamExt;
use micro_core::{Client, NamedChannel, Registry, selector::Filter};
use proto::{
    consignment::{Consignment, Container, GetRequest, shipping_service_client::ShippingServiceClient},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

/// The one vessel of each test: 500 containers, 200,000 kg, so three consignments of 55,000
/// kg fit and a fourth does not.
const VESSEL: &str = "vessel-cap";
const MAX_WEIGHT: i64 = 200_000;
const CAPACITY: i64 = 500;
const HEAVY: i32 = 55_000;
/// How long a hold lasts in these tests, so orphans are settled soon.
const TTL_MS: &str = "2000";
/// How long the final state may take to settle (events delivered, orphan holds released).
const SETTLE: Duration = Duration::from_secs(60);
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";

/// Where the services keep their data.
enum Databases<'a> {
    /// A database of each service's on `server`.
    Postgres { server: &'a PostgresServer, vessels: String, consignments: String },
    /// SQLite files in a folder the test owns.
    Sqlite(PathBuf),
}

impl Databases<'_> {
    fn postgres(server: &PostgresServer) -> Databases<'_> {
        let (vessels, consignments) = (unique_name("vessels"), unique_name("consignments"));
        let vessels = vessels.replace('-', "_");
        let consignments = consignments.replace('-', "_");
        server.create_database(&vessels);
        server.create_database(&consignments);
        Databases::Postgres { server, vessels, consignments }
    }

    fn vessel_db(&self) -> String {
        match self {
            Databases::Postgres { server, vessels, .. } => server.url(vessels),
            Databases::Sqlite(dir) => dir.join("vessels.db").display().to_string(),
        }
    }

    fn consignment_db(&self) -> String {
        match self {
            Databases::Postgres { server, consignments, .. } => server.url(consignments),
            Databases::Sqlite(dir) => dir.join("consignments.db").display().to_string(),
        }
    }
}

/// One test's shippy: names, a fleet of one vessel, broker settings, databases.
struct Shippy<'a> {
    vessel_name: String,
    consignment_name: String,
    fleet: PathBuf,
    broker: Vec<(&'static str, String)>,
    databases: Databases<'a>,
    _dir: tempfile::TempDir,
}

impl<'a> Shippy<'a> {
    fn new(
        broker: Vec<(&'static str, String)>,
        databases: impl FnOnce(&Path) -> Databases<'a>,
    ) -> Shippy<'a> {
        Shippy::with_vessel(broker, MAX_WEIGHT, databases)
    }

    fn with_vessel(
        broker: Vec<(&'static str, String)>,
        max_weight: i64,
        databases: impl FnOnce(&Path) -> Databases<'a>,
    ) -> Shippy<'a> {
        let dir = tempfile::tempdir().expect("temporary folder");
        let fleet = dir.path().join("fleet.json");
        let json = format!(
            r#"[{{"id": "{VESSEL}", "name": "Capacity", "capacity": {CAPACITY}, "max_weight": {max_weight}, "available": true}}]"#
        );
        std::fs::write(&fleet, json).expect("fleet file");
        Shippy {
            vessel_name: unique_name("vessel"),
            consignment_name: unique_name("consignment"),
            fleet,
            broker,
            databases: databases(dir.path()),
            _dir: dir,
        }
    }

    fn vessel_service(&self, place: Place) -> Process {
        let (fleet, db) = (self.fleet.display().to_string(), self.databases.vessel_db());
        let mut env = env_refs(&self.broker);
        env.extend([("MICRO_SERVER_NAME", self.vessel_name.as_str()), ("VESSEL_RESERVATION_TTL", TTL_MS)]);
        place.start("vessel-service", &["--fleet", &fleet, "--db", &db], &env)
    }

    fn consignment_service(&self, place: Place, boot: &str, extra: &[(&str, &str)]) -> Process {
        let db = self.databases.consignment_db();
        let boot = format!("boot={boot}");
        let mut env = env_refs(&self.broker);
        env.extend([
            ("MICRO_SERVER_NAME", self.consignment_name.as_str()),
            ("MICRO_SERVER_METADATA", boot.as_str()),
            ("VESSEL_SERVICE", self.vessel_name.as_str()),
            ("MICRO_LOOKUP_TIMEOUT", "1500"),
        ]);
        env.extend(extra.iter().copied());
        place.start("consignment-service", &["--db", &db], &env)
    }

    async fn wait_for_boot(&self, registry: &Arc<dyn Registry>, boot: &str) {
        let name = &self.consignment_name;
        poll_until(format!("{name} boot {boot} registering"), STARTUP, async || {
            let nodes = registry.lookup(name).await.unwrap_or_default();
            nodes.iter().any(|n| n.metadata.get("boot").map(String::as_str) == Some(boot)).then_some(())
        })
        .await
    }

    /// A client of every instance of consignment-service, or of the one that announced `boot`.
    fn shipping(&self, client: &Client, boot: Option<&str>) -> ShippingServiceClient<NamedChannel> {
        let filter = boot.map_or_else(Filter::new, |boot| Filter::new().metadata("boot", boot));
        ShippingServiceClient::new(client.channel_with(&self.consignment_name, filter))
    }

    fn vessels(&self, client: &Client) -> VesselServiceClient<NamedChannel> {
        VesselServiceClient::new(client.channel(&self.vessel_name))
    }
}

fn client(registry: &Arc<dyn Registry>) -> Client {
    Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS)
}

/// A consignment of `containers` containers weighing `weight`, described as `label`.
fn consignment(label: &str, containers: usize, weight: i32) -> Consignment {
    Consignment {
        description: label.to_owned(),
        weight,
        containers: (0..containers)
            .map(|i| Container {
                id: format!("{label}-{i}"),
                customer_id: "cust".into(),
                origin: "Derby".into(),
                user_id: "capacity".into(),
            })
            .collect(),
        ..Default::default()
    }
}

/// A creation request with idempotency key `key` (none when empty) and a generous deadline.
fn creation(consignment: Consignment, key: &str) -> tonic::Request<Consignment> {
    let mut request = tonic::Request::new(consignment);
    request.set_timeout(Duration::from_secs(30));
    if !key.is_empty() {
        request.metadata_mut().insert(IDEMPOTENCY_KEY, key.parse().expect("ascii key"));
    }
    request
}

/// What one creation came to.
#[derive(Debug)]
enum Outcome {
    Stored(Consignment),
    Refused(#[allow(dead_code, reason = "shown by Debug in failures")] String),
}

/// Creates `consignment` under `key`; a refusal must be FAILED_PRECONDITION naming the
/// vessel's remaining room, anything else but success fails the test.
async fn create(
    shipping: &mut ShippingServiceClient<NamedChannel>,
    consignment: Consignment,
    key: &str,
) -> Outcome {
    match shipping.create_consignment(creation(consignment, key)).await {
        Ok(reply) => Outcome::Stored(reply.into_inner().consignment.expect("a stored consignment")),
        Err(status) if status.code() == Code::FailedPrecondition => {
            assert!(
                status.message().contains(&format!("{VESSEL} has")) && status.message().contains("kg left"),
                "a refusal names the vessel's remaining room: {status:?}"
            );
            Outcome::Refused(status.message().to_owned())
        }
        Err(status) => panic!("creation {key:?} failed: {status:?}"),
    }
}

/// 12 creations of 55,000 kg at once: exactly 3 stored, 9 refused.
async fn twelve_at_once(shipping: &ShippingServiceClient<NamedChannel>, prefix: &str) -> Vec<Consignment> {
    let outcomes: Vec<Outcome> = futures::stream::iter(0..12)
        .map(|i| {
            let mut shipping = shipping.clone();
            async move {
                create(
                    &mut shipping,
                    consignment(&format!("{prefix} #{i}"), 3, HEAVY),
                    &format!("{prefix}-{i}"),
                )
                .await
            }
        })
        .buffer_unordered(12)
        .collect()
        .await;
    stored_of(outcomes)
}

/// 12 creations of 55,000 kg one after another: the first 3 stored, the rest refused.
async fn twelve_in_turn(
    shipping: &mut ShippingServiceClient<NamedChannel>,
    prefix: &str,
) -> Vec<Consignment> {
    let mut outcomes = Vec::new();
    for i in 0..12 {
        outcomes.push(
            create(shipping, consignment(&format!("{prefix} #{i}"), 3, HEAVY), &format!("{prefix}-{i}"))
                .await,
        );
    }
    assert!(
        outcomes[..3].iter().all(|o| matches!(o, Outcome::Stored(_))),
        "the first three fit: {outcomes:?}"
    );
    stored_of(outcomes)
}

fn stored_of(outcomes: Vec<Outcome>) -> Vec<Consignment> {
    let refused = outcomes.iter().filter(|o| matches!(o, Outcome::Refused(_))).count();
    let stored: Vec<Consignment> = outcomes
        .into_iter()
        .filter_map(|o| if let Outcome::Stored(c) = o { Some(c) } else { None })
        .collect();
    assert_eq!((stored.len(), refused), (3, 9), "exactly 3 of 55,000 kg fit 200,000 kg");
    stored
}

/// The invariants, by one query each, once the state has settled (events delivered, orphan
/// holds released): the vessel's load within its capacity and max weight and equal to what
/// its bookings add up to; the bookings exactly the stored consignments' reservations, each
/// on the vessel its consignment names, and no hold left over.
async fn prove_invariants(
    server: &PostgresServer,
    vessels: &str,
    consignments: &str,
    max_weight: i64,
) -> (usize, i64) {
    let query = |db: &str, sql: &str| server.query(db, sql);
    // 1: within capacity and max weight, and the running total is what the rows add up to.
    let load = query(
        vessels,
        "SELECT coalesce(sum(containers), 0) || '|' || coalesce(sum(weight), 0) FROM reservations",
    );
    let total = query(
        vessels,
        "SELECT coalesce(sum(containers), 0) || '|' || coalesce(sum(weight), 0) FROM vessel_loads",
    );
    assert_eq!(load, total, "the running total matches the reservations");
    let (containers, weight) = load.split_once('|').expect("two sums");
    let (containers, weight): (i64, i64) = (containers.parse().unwrap(), weight.parse().unwrap());
    assert!(
        containers <= CAPACITY && weight <= max_weight,
        "overbooked: {containers} containers, {weight} kg"
    );
    // 2: one confirmed booking per stored consignment, on its vessel; nothing else.
    let stored_sql = "SELECT reservation_id || ' ' || id || ' ' || vessel_id FROM consignments ORDER BY 1";
    let booked_sql =
        "SELECT id || ' ' || consignment_id || ' ' || vessel_id || ' ' || state FROM reservations ORDER BY 1";
    let settled =
        poll_until("every stored consignment booked and every other hold released", SETTLE, async || {
            let stored: Vec<String> = lines(&query(consignments, stored_sql))
                .into_iter()
                .map(|l| format!("{l} confirmed"))
                .collect();
            let booked = lines(&query(vessels, booked_sql));
            (stored == booked).then_some(stored.len())
        })
        .await;
    // 3: no consignment stored twice for one key or one reservation.
    let duplicates = query(
        consignments,
        "SELECT count(*) FROM (SELECT reservation_id FROM consignments GROUP BY reservation_id HAVING count(*) > 1) d",
    );
    assert_eq!(duplicates, "0", "a reservation stored twice");
    (settled, weight)
}

fn lines(text: &str) -> Vec<String> {
    text.lines().filter(|line| !line.is_empty()).map(str::to_owned).collect()
}

/// Test 1 with `broker`, processes in this namespace, PostgreSQL on loopback.
async fn twelve_creations_store_exactly_three(broker: Vec<(&'static str, String)>) {
    let server = PostgresServer::shared();
    let registry = mdns();
    for phase in ["at-once", "in-turn"] {
        let shippy = Shippy::new(broker.clone(), |_| Databases::postgres(server));
        let _vessel = shippy.vessel_service(Place::Here);
        let _consignment = shippy.consignment_service(Place::Here, "1", &[]);
        wait_for(&registry, &shippy.vessel_name, 1).await;
        shippy.wait_for_boot(&registry, "1").await;
        let client = client(&registry);
        let mut shipping = shippy.shipping(&client, None);
        let stored = match phase {
            "at-once" => twelve_at_once(&shipping, phase).await,
            _ => twelve_in_turn(&mut shipping, phase).await,
        };
        let Databases::Postgres { vessels, consignments, .. } = &shippy.databases else { unreachable!() };
        let (booked, weight) = prove_invariants(server, vessels, consignments, MAX_WEIGHT).await;
        assert_eq!((booked, weight), (3, 165_000), "{phase}: {stored:?}");
        let listed = shipping.get_consignments(GetRequest {}).await.expect("list").into_inner().consignments;
        assert_eq!(listed.len(), 3, "{phase}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_twelve_creations_at_once_and_in_turn_store_exactly_three() {
    e2e::require_private_netns();
    let server = NatsServer::start();
    twelve_creations_store_exactly_three(vec![
        ("MICRO_BROKER", "nats".into()),
        ("MICRO_BROKER_ADDRESS", server.address()),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_twelve_creations_at_once_and_in_turn_store_exactly_three() {
    e2e::require_private_netns();
    twelve_creations_store_exactly_three(vec![
        ("MICRO_BROKER", "rabbitmq".into()),
        ("MICRO_BROKER_ADDRESS", rabbitmq_vhost()),
    ])
    .await;
}

/// On the default registry broker the topic's subscribers register under one fixed name, so
/// this shippy runs on a host of its own, its PostgreSQL there too.
#[test]
fn registry_broker_twelve_creations_at_once_and_in_turn_store_exactly_three() {
    e2e::require_private_netns();
    let network = Network::new(1);
    let host = network.host(0);
    let server = PostgresServer::start_on(host);
    host.block_on(|| async {
        let registry = mdns();
        for phase in ["at-once", "in-turn"] {
            let shippy =
                Shippy::new(vec![("MICRO_BROKER", "registry".into())], |_| Databases::postgres(&server));
            let _vessel = shippy.vessel_service(Place::On(host));
            let _consignment = shippy.consignment_service(Place::On(host), "1", &[]);
            wait_for(&registry, &shippy.vessel_name, 1).await;
            shippy.wait_for_boot(&registry, "1").await;
            let client = client(&registry);
            let mut shipping = shippy.shipping(&client, None);
            match phase {
                "at-once" => twelve_at_once(&shipping, phase).await,
                _ => twelve_in_turn(&mut shipping, phase).await,
            };
            let Databases::Postgres { vessels, consignments, .. } = &shippy.databases else { unreachable!() };
            assert_eq!(
                prove_invariants(&server, vessels, consignments, MAX_WEIGHT).await,
                (3, 165_000),
                "{phase}"
            );
        }
    });
}

/// A virtual host of its own on the binary's shared node, open to `guest`; its address.
fn rabbitmq_vhost() -> String {
    let server = RabbitMqServer::shared();
    let vhost = unique_name("capacity");
    for args in [
        vec!["add_vhost", vhost.as_str()],
        vec!["set_permissions", "-p", vhost.as_str(), "guest", ".*", ".*", ".*"],
    ] {
        let output = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args(["-q", "-n", server.node()])
            .args(&args)
            .envs(server.ctl_env())
            .output()
            .unwrap_or_else(|err| panic!("cannot run rabbitmqctl: {err}; apt-get install rabbitmq-server"));
        assert!(output.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    format!("amqp://guest:guest@{}/{vhost}", server.address())
}

/// Test 3: consignment-service SIGKILLed between the reservation and the store (at its
/// test-only fault point) on SQLite files two instances share: nothing is stored, and the
/// room it held is offered again once the hold expires and the other instance settles it.
#[tokio::test(flavor = "multi_thread")]
async fn a_creation_killed_between_reserve_and_store_stores_nothing_and_its_room_comes_back() {
    e2e::require_private_netns();
    let registry = mdns();
    // Room for one consignment of 55,000 kg.
    let shippy = Shippy::with_vessel(vec![("MICRO_BROKER", "memory".into())], 60_000, |dir| {
        Databases::Sqlite(dir.to_owned())
    });
    let _vessel = shippy.vessel_service(Place::Here);
    let doomed = Arc::new(shippy.consignment_service(
        Place::Here,
        "doomed",
        &[("CONSIGNMENT_TEST_FAULT", "pause-after-reserve")],
    ));
    let _survivor = shippy.consignment_service(Place::Here, "survivor", &[]);
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boot(&registry, "doomed").await;
    shippy.wait_for_boot(&registry, "survivor").await;
    let client = client(&registry);

    // No key: not idempotent, so the SDK sends it to the doomed instance only, once.
    let mut to_doomed = shippy.shipping(&client, Some("doomed"));
    let pending = tokio::spawn(async move {
        to_doomed.create_consignment(creation(consignment("doomed", 3, HEAVY), "")).await
    });
    poll_until("the doomed instance reaching its fault point", STARTUP, async || {
        doomed.log().contains("fault point reached").then_some(())
    })
    .await;
    doomed.signal("KILL");
    let status = pending.await.expect("task").expect_err("the killed creation cannot succeed");
    assert_ne!(status.code(), Code::Ok);

    // The survivor is refused while the dead instance's hold lives, then stores once it is
    // settled (abandoned) and released.
    let mut to_survivor = shippy.shipping(&client, Some("survivor"));
    let stored = poll_until("the held room offered again", Duration::from_secs(60), async || {
        match create(&mut to_survivor, consignment("survivor", 3, HEAVY), "").await {
            Outcome::Stored(consignment) => Some(consignment),
            Outcome::Refused(_) => None,
        }
    })
    .await;
    let listed = to_survivor.get_consignments(GetRequest {}).await.expect("list").into_inner().consignments;
    assert_eq!(listed, vec![stored.clone()], "nothing of the killed creation is stored");
    // Full again: 5,000 kg left, and the dead instance's hold is gone for good.
    let mut vessels = shippy.vessels(&client);
    let status = vessels
        .find_available(Specification { capacity: 1, max_weight: 5_001 })
        .await
        .expect_err("5,000 kg left");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("5000 kg left"), "{status:?}");
}

/// Test 5: two replicas on one PostgreSQL: a creation through one is listed by the other, a
/// key replayed through the other answers with the first consignment, and one key sent to
/// both at once stores once.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_postgres_agree_on_listings_and_keys() {
    e2e::require_private_netns();
    let server = PostgresServer::shared();
    let registry = mdns();
    let shippy = Shippy::with_vessel(vec![("MICRO_BROKER", "memory".into())], 100_000_000, |_| {
        Databases::postgres(server)
    });
    let _vessel = shippy.vessel_service(Place::Here);
    let _a = shippy.consignment_service(Place::Here, "a", &[]);
    let _b = shippy.consignment_service(Place::Here, "b", &[]);
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boot(&registry, "a").await;
    shippy.wait_for_boot(&registry, "b").await;
    let client = client(&registry);
    let (mut a, mut b) = (shippy.shipping(&client, Some("a")), shippy.shipping(&client, Some("b")));

    let first = a
        .create_consignment(creation(consignment("replicated", 2, 1_000), "replica-key"))
        .await
        .expect("create");
    let first = first.into_inner().consignment.expect("stored");
    let listed = b.get_consignments(GetRequest {}).await.expect("list").into_inner().consignments;
    assert_eq!(listed, vec![first.clone()], "the other replica lists it");
    let replay = b
        .create_consignment(creation(consignment("replicated", 2, 1_000), "replica-key"))
        .await
        .expect("replay");
    assert_eq!(replay.metadata().get(REPLAYED).and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(replay.into_inner().consignment, Some(first.clone()), "the first answer");

    // One key to both replicas at once, 8 times: one consignment, one booking.
    let answers: Vec<String> = futures::stream::iter(0..8)
        .map(|i| {
            let mut shipping = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move {
                let reply =
                    shipping.create_consignment(creation(consignment("raced", 1, 1_000), "raced-key")).await;
                reply
                    .unwrap_or_else(|status| panic!("raced creation #{i}: {status:?}"))
                    .into_inner()
                    .consignment
                    .unwrap()
                    .id
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert_eq!(answers.iter().collect::<BTreeSet<_>>().len(), 1, "one consignment for one key: {answers:?}");
    let Databases::Postgres { vessels, consignments, .. } = &shippy.databases else { unreachable!() };
    let (booked, _) = prove_invariants(server, vessels, consignments, 100_000_000).await;
    assert_eq!(booked, 2);
}

/// Test 4: many rounds of concurrent creations of random sizes against two consignment
/// replicas and two vessel instances on PostgreSQL, with replayed keys, and a replica
/// SIGKILLed and restarted between rounds; at the end, one query per invariant.
#[tokio::test(flavor = "multi_thread")]
async fn random_rounds_with_replays_and_kills_keep_every_invariant() {
    e2e::require_private_netns();
    let seed: u64 =
        std::env::var("CAPACITY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("capacity: seed {seed} (CAPACITY_SEED={seed} repeats this run)");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = PostgresServer::shared();
    let registry = mdns();
    let shippy = Shippy::new(vec![("MICRO_BROKER", "memory".into())], |_| Databases::postgres(server));
    let _vessels = [shippy.vessel_service(Place::Here), shippy.vessel_service(Place::Here)];
    let mut replicas = [
        shippy.consignment_service(Place::Here, "r0", &[]),
        shippy.consignment_service(Place::Here, "r1", &[]),
    ];
    wait_for(&registry, &shippy.vessel_name, 2).await;
    shippy.wait_for_boot(&registry, "r0").await;
    shippy.wait_for_boot(&registry, "r1").await;
    let client = client(&registry);
    let shipping = shippy.shipping(&client, None);
    // Each key stored: the consignment's id (the first answer) and the contents it was sent with.
    let mut first_answers: std::collections::BTreeMap<String, (String, Consignment)> = Default::default();
    let mut boots = 2;
    for round in 0..6 {
        // Sizes from 1 to 60,000 kg: the vessel fills within a few rounds.
        let creations: Vec<(String, Consignment)> = (0..16)
            .map(|i| {
                let weight = rng.random_range(1_000..=60_000);
                let containers = rng.random_range(1..=40);
                (format!("round{round}-{i}"), consignment(&format!("r{round} #{i}"), containers, weight))
            })
            .collect();
        // Some keys of earlier rounds again, with the same contents: replays.
        let replays: Vec<(String, Consignment)> = first_answers
            .iter()
            .take(rng.random_range(0..=3))
            .map(|(key, (_, contents))| (key.clone(), contents.clone()))
            .collect();
        let kill_at = (round % 2 == 1).then(|| rng.random_range(0..replicas.len()));
        let calls = creations.iter().chain(&replays).cloned().map(|(key, consignment)| {
            let mut shipping = shipping.clone();
            async move {
                let reply = shipping.create_consignment(creation(consignment, &key)).await;
                (key, reply)
            }
        });
        let mut running = futures::stream::iter(calls).buffer_unordered(8);
        let mut answered = 0;
        while let Some((key, reply)) = running.next().await {
            answered += 1;
            if let Some(doomed) = kill_at
                && answered == 4
            {
                replicas[doomed].signal("KILL");
                replicas[doomed] = shippy.consignment_service(Place::Here, &format!("r{boots}"), &[]);
                boots += 1;
            }
            match reply {
                Ok(reply) => {
                    let stored = reply.into_inner().consignment.expect("stored");
                    let contents = Consignment {
                        id: String::new(),
                        vessel_id: String::new(),
                        reservation_id: String::new(),
                        ..stored.clone()
                    };
                    let (first, _) =
                        first_answers.entry(key.clone()).or_insert_with(|| (stored.id.clone(), contents));
                    assert_eq!(*first, stored.id, "a replay of {key} answered another consignment");
                }
                Err(status) if status.code() == Code::FailedPrecondition => {
                    assert!(!first_answers.contains_key(&key), "{key} was stored, then refused on replay");
                }
                // A call in flight on the killed replica may fail; its key is replayed below.
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::Unknown) =>
                {
                    eprintln!("capacity: {key} failed with the killed replica: {status:?}");
                }
                Err(status) => panic!("creation {key} failed: {status:?}"),
            }
        }
    }
    let Databases::Postgres { vessels, consignments, .. } = &shippy.databases else { unreachable!() };
    let (booked, weight) = prove_invariants(server, vessels, consignments, MAX_WEIGHT).await;
    let stored = server.query(consignments, "SELECT count(*) FROM consignments");
    assert_eq!(stored, booked.to_string());
    assert_eq!(stored, first_answers.len().to_string(), "every success is stored, once");
    eprintln!("capacity: seed {seed}: {booked} stored, {weight} kg of {MAX_WEIGHT}");
}

/// Test 2: two consignment-service replicas and three vessel-service instances on three
/// hosts, PostgreSQL on a fourth (the client there too); one vessel host is partitioned
/// mid-run: no creation fails (each is stored or refused for room), and the invariants hold.
#[test]
fn across_hosts_with_a_vessel_host_partitioned_no_creation_fails_and_nothing_is_overbooked() {
    e2e::require_private_netns();
    let network = Network::new(4);
    let server = PostgresServer::start_on(network.host(3));
    // Room for 20 of 55,000 kg.
    let shippy = Shippy::with_vessel(vec![("MICRO_BROKER", "memory".into())], 1_100_000, |_| {
        Databases::postgres(&server)
    });
    let _vessels: Vec<Process> = (0..3).map(|i| shippy.vessel_service(Place::On(network.host(i)))).collect();
    let _replicas: Vec<Process> = (0..2)
        .map(|i| shippy.consignment_service(Place::On(network.host(i)), &format!("h{i}"), &[]))
        .collect();
    let (stored, refused) = network.host(3).block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &shippy.vessel_name, 3).await;
        shippy.wait_for_boot(&registry, "h0").await;
        shippy.wait_for_boot(&registry, "h1").await;
        let client = client(&registry);
        let shipping = shippy.shipping(&client, None);
        let outcomes = futures::stream::iter(0..40)
            .map(|i| {
                let (mut shipping, network) = (shipping.clone(), &network);
                async move {
                    if i == 10 {
                        network.partition(2);
                    }
                    create(
                        &mut shipping,
                        consignment(&format!("hosts #{i}"), 3, HEAVY),
                        &format!("hosts-{i}"),
                    )
                    .await
                }
            })
            .buffer_unordered(6)
            .collect::<Vec<_>>()
            .await;
        let stored = outcomes.iter().filter(|o| matches!(o, Outcome::Stored(_))).count();
        (stored, outcomes.len() - stored)
    });
    assert_eq!(stored + refused, 40);
    assert!(stored <= 20, "{stored} of 55,000 kg stored on 1,100,000 kg");
    let Databases::Postgres { vessels, consignments, .. } = &shippy.databases else { unreachable!() };
    let (booked, weight) = network
        .host(3)
        .block_on(|| async { prove_invariants(&server, vessels, consignments, 1_100_000).await });
    assert_eq!(booked, stored);
    assert!(weight <= 1_100_000);
    eprintln!("hosts: {stored} stored, {refused} refused, {weight} kg booked");
}
