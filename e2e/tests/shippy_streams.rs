//! Shippy's streams end to end with the real binaries: `WatchConsignments` sees exactly what
//! is stored, in order, and a watcher resumes from its cursor on another replica when the
//! one serving it is killed, partitioned or stopped, losing nothing and seeing nothing
//! twice; a slow watcher holds back only its own stream; a bulk `CreateConsignments` sent
//! twice stores each consignment once. Each test ends by comparing with the store.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use e2e::{
    browser::{chromium_run, percent_encoded},
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    hosts::Network,
    postgres::PostgresServer,
    process::{Place, Process},
    shippy::fleet_file,
    unique_name,
};
use micro_core::{Client, NamedChannel, Registry};
use proto::consignment::{
    Consignment, Container, CreateSummary, GetRequest, WatchRequest,
    shipping_service_client::ShippingServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// How long a watcher may take to catch up with what was stored.
const CATCH_UP: Duration = Duration::from_secs(60);

/// One test's shippy: unique names, a roomy fleet, where each service keeps its data.
struct Shippy {
    vessel_name: String,
    consignment_name: String,
    fleet: PathBuf,
    vessel_db: String,
    consignment_db: String,
    dir: tempfile::TempDir,
}

impl Shippy {
    /// SQLite files in a folder of the test's own.
    fn on_sqlite() -> Shippy {
        let dir = tempfile::tempdir().expect("temporary folder");
        let (vessel_db, consignment_db) = (
            dir.path().join("vessels.db").display().to_string(),
            dir.path().join("consignments.db").display().to_string(),
        );
        Shippy::new(dir, vessel_db, consignment_db)
    }

    /// A database of each service's on `server`, which replicas share.
    fn on_postgres(server: &PostgresServer) -> Shippy {
        let (vessels, consignments) =
            (unique_name("vessels").replace('-', "_"), unique_name("consignments").replace('-', "_"));
        server.create_database(&vessels);
        server.create_database(&consignments);
        Shippy::new(
            tempfile::tempdir().expect("temporary folder"),
            server.url(&vessels),
            server.url(&consignments),
        )
    }

    fn new(dir: tempfile::TempDir, vessel_db: String, consignment_db: String) -> Shippy {
        Shippy {
            vessel_name: unique_name("vessel"),
            consignment_name: unique_name("consignment"),
            fleet: fleet_file(dir.path(), "roomy"),
            vessel_db,
            consignment_db,
            dir,
        }
    }

    fn vessel_service(&self, place: Place) -> Process {
        let fleet = self.fleet.display().to_string();
        let env = [("MICRO_SERVER_NAME", self.vessel_name.as_str()), ("MICRO_BROKER", "memory")];
        place.start("vessel-service", &["--fleet", &fleet, "--db", &self.vessel_db], &env)
    }

    fn consignment_service(&self, place: Place, boot: &str, extra: &[(&str, &str)]) -> Process {
        let boot = format!("boot={boot}");
        let mut env = vec![
            ("MICRO_SERVER_NAME", self.consignment_name.as_str()),
            ("MICRO_SERVER_METADATA", boot.as_str()),
            ("VESSEL_SERVICE", self.vessel_name.as_str()),
            ("MICRO_BROKER", "memory"),
            ("MICRO_LOOKUP_TIMEOUT", "1500"),
        ];
        env.extend(extra.iter().copied());
        place.start("consignment-service", &["--db", &self.consignment_db], &env)
    }

    async fn wait_for_boots(&self, registry: &Arc<dyn Registry>, boots: &[&str]) {
        let name = &self.consignment_name;
        poll_until(format!("{name} boots {boots:?} registering"), STARTUP, async || {
            let nodes = registry.lookup(name).await.unwrap_or_default();
            let booted =
                |boot: &&str| nodes.iter().any(|n| n.metadata.get("boot").map(String::as_str) == Some(*boot));
            boots.iter().all(booted).then_some(())
        })
        .await
    }

    fn shipping(&self, registry: &Arc<dyn Registry>) -> ShippingServiceClient<NamedChannel> {
        let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
        ShippingServiceClient::new(client.channel(&self.consignment_name))
    }
}

/// `micro gateway` on a port the system picks.
struct Gateway {
    _process: Process,
    url: String,
}

impl Gateway {
    async fn start() -> Gateway {
        let process = Process::start(
            "micro",
            &["gateway", "--address", "127.0.0.1:0"],
            &[("MICRO_LOOKUP_TIMEOUT", "1500")],
        );
        let url = e2e::gateway::url_of(&process).await;
        Gateway { _process: process, url }
    }
}

/// A child process killed when the test is done with it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A consignment of `containers` containers labelled `label`.
fn consignment(label: &str, containers: usize) -> Consignment {
    Consignment {
        description: label.to_owned(),
        weight: 10,
        containers: (0..containers)
            .map(|i| Container {
                id: format!("{label}-{i}"),
                customer_id: "cust".into(),
                origin: "Derby".into(),
                user_id: "streams".into(),
            })
            .collect(),
        ..Default::default()
    }
}

/// Stores a consignment labelled `label` under the key `label`, asking again with the same
/// key until it is stored (the key makes that safe); returns its id.
async fn create(shipping: &ShippingServiceClient<NamedChannel>, label: &str) -> String {
    poll_until(format!("consignment {label} stored"), CATCH_UP, async || {
        let mut request = tonic::Request::new(consignment(label, 1));
        request.set_timeout(Duration::from_secs(10));
        request.metadata_mut().insert(IDEMPOTENCY_KEY, label.parse().expect("ascii key"));
        match shipping.clone().create_consignment(request).await {
            Ok(reply) => Some(reply.into_inner().consignment.expect("stored").id),
            Err(status) => {
                eprintln!("creation {label} not answered yet: {status:?}");
                None
            }
        }
    })
    .await
}

/// What a resuming watcher has seen.
#[derive(Default)]
struct Watched {
    ids: Vec<String>,
    /// How each stream it opened ended.
    ends: Vec<Status>,
    opened: usize,
}

/// Watches through `shipping` until aborted: each time a stream ends it opens another
/// after the last id seen (or from now, before the first).
fn follow(
    shipping: ShippingServiceClient<NamedChannel>,
    watched: Arc<Mutex<Watched>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let after_id = watched.lock().unwrap().ids.last().cloned().unwrap_or_default();
            let mut stream = match shipping.clone().watch_consignments(WatchRequest { after_id }).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    watched.lock().unwrap().ends.push(status);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            watched.lock().unwrap().opened += 1;
            let end = loop {
                match stream.message().await {
                    Ok(Some(consignment)) => watched.lock().unwrap().ids.push(consignment.id),
                    Ok(None) => break Status::unknown("the stream ended without an error"),
                    Err(status) => break status,
                }
            };
            watched.lock().unwrap().ends.push(end);
        }
    })
}

/// Waits until the watcher has opened `count` streams.
async fn opened(watched: &Arc<Mutex<Watched>>, count: usize) {
    poll_until(format!("watch stream #{count} open"), CATCH_UP, async || {
        (watched.lock().unwrap().opened >= count).then_some(())
    })
    .await;
}

/// Waits until the watcher has seen `expected` and returns what it saw: exactly those, in
/// order, or the test fails.
async fn saw_exactly(watched: &Arc<Mutex<Watched>>, expected: &[String]) {
    poll_until(format!("the watcher seeing {} consignments", expected.len()), CATCH_UP, async || {
        (watched.lock().unwrap().ids.len() >= expected.len()).then_some(())
    })
    .await;
    let seen = watched.lock().unwrap().ids.clone();
    assert_eq!(seen, expected, "the watcher saw every consignment stored, once each, in order");
}

/// How many watch streams each replica opened (its "watcher opened" log lines).
fn opens(replicas: &[Process]) -> Vec<usize> {
    replicas.iter().map(|replica| replica.log().matches("watcher opened").count()).collect()
}

/// The replica that opened a stream since `before` was taken.
fn serving(replicas: &[Process], before: &[usize]) -> usize {
    let now = opens(replicas);
    (0..replicas.len()).rfind(|&i| now[i] > before[i]).expect("a replica opened the stream")
}

/// Test 1: a watcher opened before five creations receives exactly those five, in order:
/// over gRPC, through consignment-cli --watch, and through the gateway as server-sent
/// events, read by curl and by the dashboard's live feed in headless Chromium.
#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_opened_before_five_creations_receives_exactly_those_five_in_order() {
    e2e::require_private_netns();
    let shippy = Shippy::on_sqlite();
    let registry = mdns();
    let _vessel = shippy.vessel_service(Place::Here);
    let service = shippy.consignment_service(Place::Here, "a", &[]);
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boots(&registry, &["a"]).await;
    let shipping = shippy.shipping(&registry);
    let before = create(&shipping, "before-the-watch").await;

    let watched = Arc::new(Mutex::new(Watched::default()));
    let watcher = follow(shipping.clone(), watched.clone());
    opened(&watched, 1).await;
    // consignment-cli --watch beside it, printing a JSON object per line.
    let cli = Process::start(
        "consignment-cli",
        &["--watch", "--output", "json"],
        &[("CONSIGNMENT_SERVICE", shippy.consignment_name.as_str()), ("RUST_LOG", "warn")],
    );
    // And the gateway's server-sent events, read by curl.
    let gateway = Gateway::start().await;
    let watch_path =
        format!("{}/{}/consignment.ShippingService/WatchConsignments", gateway.url, shippy.consignment_name);
    let events = shippy.dir.path().join("events.txt");
    let curl = std::process::Command::new("curl")
        .args(["-sS", "-N", "-H", "Accept: text/event-stream", "-d", "{}", "-o"])
        .arg(&events)
        .arg(&watch_path)
        .spawn()
        .expect("curl runs (scripts/install-test-deps installs it)");
    let _curl = KillOnDrop(curl);
    poll_until("consignment-cli's and curl's watches opening", CATCH_UP, async || {
        (service.log().matches("watcher opened").count() >= 3).then_some(())
    })
    .await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(create(&shipping, &format!("five-{i}")).await);
    }
    saw_exactly(&watched, &created).await;
    // Nothing more comes: the next one seen is the next one stored.
    created.push(create(&shipping, "sixth").await);
    saw_exactly(&watched, &created).await;
    watcher.abort();
    assert!(!created.contains(&before));
    let printed = poll_until("consignment-cli printing the six", CATCH_UP, async || {
        let ids: Vec<String> = cli
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Consignment>(line).ok())
            .map(|consignment| consignment.id)
            .collect();
        (ids.len() >= created.len()).then_some(ids)
    })
    .await;
    assert_eq!(printed, created, "consignment-cli --watch prints each consignment once, in order");
    let streamed = poll_until("curl receiving the six as server-sent events", CATCH_UP, async || {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        let ids: Vec<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter_map(|value| value["id"].as_str().map(str::to_owned))
            .collect();
        (ids.len() >= created.len()).then_some(ids)
    })
    .await;
    assert_eq!(streamed, created, "the gateway's SSE carries each consignment once, in order");
    // In a real browser: the dashboard's live feed resumes after the consignment stored
    // before the watch, and shows the six, newest first.
    let url = format!(
        "{}/ui?feed={}&feed_body={}&feed_timeout=3s",
        gateway.url,
        percent_encoded(&format!(
            "{}/consignment.ShippingService/WatchConsignments",
            shippy.consignment_name
        )),
        percent_encoded(&format!(r#"{{"after_id": "{before}"}}"#))
    );
    // The watch never ends by itself: the feed's timeout ends it, and Chromium prints the page.
    let dom = chromium_run(&["--dump-dom"], &url).await;
    let feed = dom.split(r#"id="feed""#).nth(1).expect("the feed").split("</ol>").next().unwrap_or_default();
    let shown: Vec<&str> =
        created.iter().rev().filter(|id| feed.contains(id.as_str())).map(String::as_str).collect();
    assert_eq!(shown.len(), created.len(), "the live feed shows the six:\n{feed}");
    let positions: Vec<usize> = created.iter().rev().map(|id| feed.find(id.as_str()).unwrap()).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "newest first:\n{feed}");

    // A watcher resuming after the third sees the rest, and a cursor naming nothing is refused.
    let mut resumed = shipping
        .clone()
        .watch_consignments(WatchRequest { after_id: created[2].clone() })
        .await
        .expect("resume")
        .into_inner();
    for id in &created[3..] {
        assert_eq!(&resumed.message().await.unwrap().expect("open").id, id);
    }
    let unknown = shipping.clone().watch_consignments(WatchRequest { after_id: "c-nowhere".into() }).await;
    let status = unknown.expect_err("an unknown cursor is refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("c-nowhere"), "{status:?}");
}

/// Test 2: three replicas on three hosts share PostgreSQL on a fourth (with vessel-service
/// and the test); the replica serving the watcher is SIGKILLed, then the next one serving
/// it is partitioned, while consignments are stored steadily: the watcher resumes each time
/// on another replica from its cursor and sees every consignment once, in order.
#[test]
fn the_serving_replica_killed_then_partitioned_mid_stream_loses_the_watcher_nothing() {
    e2e::require_private_netns();
    let network = Network::new(4);
    let server = PostgresServer::start_on(network.host(3));
    let shippy = Shippy::on_postgres(&server);
    let _vessel = shippy.vessel_service(Place::On(network.host(3)));
    let replicas: Vec<Process> = (0..3)
        .map(|i| shippy.consignment_service(Place::On(network.host(i)), &format!("h{i}"), &[]))
        .collect();
    network.host(3).block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &shippy.vessel_name, 1).await;
        shippy.wait_for_boots(&registry, &["h0", "h1", "h2"]).await;
        let shipping = shippy.shipping(&registry);
        let watched = Arc::new(Mutex::new(Watched::default()));
        let mut before = opens(&replicas);
        let watcher = follow(shipping.clone(), watched.clone());
        opened(&watched, 1).await;
        let mut created = Vec::new();
        let mut killed = None;
        for i in 0..45 {
            if i == 15 {
                let first = serving(&replicas, &before);
                before = opens(&replicas);
                replicas[first].signal("KILL");
                eprintln!("killed the replica on host {first}");
                killed = Some(first);
            }
            if i == 30 {
                opened(&watched, 2).await;
                let next = serving(&replicas, &before);
                assert_ne!(Some(next), killed, "the watcher moved off the killed replica");
                network.partition(next);
                eprintln!("partitioned host {next}");
            }
            created.push(create(&shipping, &format!("moving-{i}")).await);
        }
        saw_exactly(&watched, &created).await;
        let reopened = watched.lock().unwrap().opened;
        assert!(reopened >= 3, "the watcher reopened after the kill and the partition: {reopened} streams");
        let ends: Vec<(Code, String)> =
            watched.lock().unwrap().ends.iter().map(|end| (end.code(), end.message().to_owned())).collect();
        eprintln!("watch streams ended with {ends:?}");
        assert!(
            ends.iter().all(|(code, _)| *code == Code::Unavailable),
            "a broken stream ends UNAVAILABLE, so the watcher knows to open it again: {ends:?}"
        );
        watcher.abort();
        let stored: Vec<String> = shipping
            .clone()
            .get_consignments(GetRequest {})
            .await
            .expect("list")
            .into_inner()
            .consignments
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(stored, created, "the store holds what was created, each once");
    });
}

/// A stream of consignments, as a bulk load sends it.
type Consignments = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Consignment> + Send>>;

/// A bulk request of `count` consignments of `containers` containers labelled `prefix`,
/// under the stream key `key`.
fn bulk(prefix: &str, count: usize, containers: usize, key: &str) -> tonic::Request<Consignments> {
    let prefix = prefix.to_owned();
    let consignments =
        tokio_stream::iter(0..count).map(move |i| consignment(&format!("{prefix}-{i}"), containers));
    let mut request = tonic::Request::new(Box::pin(consignments) as Consignments);
    request.set_timeout(Duration::from_secs(300));
    request.metadata_mut().insert(IDEMPOTENCY_KEY, key.parse().expect("ascii key"));
    request
}

/// Test 3: a bulk client stream of 1,000 consignments, then the same stream again: each is
/// stored once, and the replay answers with the same ids.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_stream_of_a_thousand_sent_twice_stores_each_once() {
    e2e::require_private_netns();
    let server = PostgresServer::shared();
    let shippy = Shippy::on_postgres(server);
    let registry = mdns();
    let _vessel = shippy.vessel_service(Place::Here);
    let _service = shippy.consignment_service(Place::Here, "a", &[]);
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boots(&registry, &["a"]).await;
    let shipping = shippy.shipping(&registry);

    let first: CreateSummary = shipping
        .clone()
        .create_consignments(bulk("bulk", 1000, 1, "bulk-load-1"))
        .await
        .expect("bulk load")
        .into_inner();
    assert_eq!((first.created, first.replayed, first.rejected), (1000, 0, 0), "{:?}", first.rejections);
    let again: CreateSummary = shipping
        .clone()
        .create_consignments(bulk("bulk", 1000, 1, "bulk-load-1"))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!((again.created, again.replayed, again.rejected), (0, 1000, 0));
    assert_eq!(again.consignment_ids, first.consignment_ids, "the replay answers with the same consignments");

    let Some((_, database)) = shippy.consignment_db.rsplit_once('/') else { panic!("a database URL") };
    let counted = server.query(
        database,
        "SELECT count(*), count(DISTINCT id), count(DISTINCT idempotency_key) FROM consignments",
    );
    assert_eq!(counted.trim(), "1000|1000|1000", "each consignment stored once");
    // consignment-cli --bulk: a file of one consignment per line, sent twice.
    let lines: Vec<String> =
        (0..3).map(|i| serde_json::to_string(&consignment(&format!("cli-bulk-{i}"), 1)).unwrap()).collect();
    let file = shippy.dir.path().join("bulk.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let run = || {
        e2e::shippy::run_cli(&shippy.consignment_name, &file, &["--bulk", "--request-id", "cli-bulk"], &[])
    };
    let first_run = run().await;
    assert!(first_run.success, "{}{}", first_run.stdout, first_run.stderr);
    assert!(
        first_run.stdout.contains("bulk load of 3: 3 created, 0 stored by an earlier run"),
        "{}",
        first_run.stdout
    );
    let second_run = run().await;
    assert!(
        second_run.stdout.contains("bulk load of 3: 0 created, 3 stored by an earlier run"),
        "{}",
        second_run.stdout
    );
    let counted =
        server.query(database, "SELECT count(*) FROM consignments WHERE description LIKE 'cli-bulk-%'");
    assert_eq!(counted.trim(), "3");
    std::fs::write(&file, format!("{}\n{{\"weight\": \"heavy\"}}\n", lines[0])).unwrap();
    let bad = run().await;
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("bulk.jsonl:2:") && bad.stderr.contains("nothing was sent"),
        "{}",
        bad.stderr
    );

    // A bad consignment in a stream is listed, and the others are stored.
    let mut mixed = vec![consignment("mixed-0", 1), consignment("mixed-1", 0), consignment("mixed-2", 1)];
    mixed[1].weight = 10;
    let mut request = tonic::Request::new(tokio_stream::iter(mixed));
    request.metadata_mut().insert(IDEMPOTENCY_KEY, "mixed".parse().unwrap());
    let summary = shipping.clone().create_consignments(request).await.expect("mixed load").into_inner();
    assert_eq!((summary.created, summary.rejected), (2, 1));
    assert_eq!(summary.rejections[0].index, 1);
    assert_eq!(summary.rejections[0].code, "INVALID_ARGUMENT");
}

/// The resident memory of `process`, in bytes.
fn rss(process: &Process) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid())).expect("process status");
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The value of the counter line starting with `series` on a metrics page.
async fn scrape(address: &str, series: &str) -> u64 {
    let page =
        reqwest::get(format!("http://{address}/metrics")).await.expect("metrics").text().await.unwrap();
    page.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// Test 4: a watcher that reads one consignment a second while about 40 MB of consignments
/// are stored (some 160 MB once decoded): the server sends it only as fast as it reads (its
/// sent-messages count stays near what was read), its memory grows by less than what was
/// stored (the bulk load itself, SQLite's cache and the allocator's arenas take some 25 MB),
/// and the stream outlives the 5 s unary deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_holds_back_only_its_own_stream() {
    e2e::require_private_netns();
    let shippy = Shippy::on_sqlite();
    let registry = mdns();
    let metrics = format!("127.0.0.1:{}", e2e::free_port());
    let _vessel = shippy.vessel_service(Place::Here);
    let service = shippy.consignment_service(Place::Here, "a", &[("MICRO_METRICS_ADDRESS", &metrics)]);
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boots(&registry, &["a"]).await;
    let shipping = shippy.shipping(&registry);
    let _warm_up = create(&shipping, "warm-up").await;
    let rss_before = rss(&service);

    let mut watch =
        shipping.clone().watch_consignments(WatchRequest::default()).await.expect("watch").into_inner();
    // 400 consignments of 2,000 containers: about 100 KB each on the wire.
    let produced = std::sync::atomic::AtomicBool::new(false);
    let produce = async {
        let mut shipping = shipping.clone();
        let summary = shipping.create_consignments(bulk("heavy", 400, 2000, "heavy-load")).await;
        produced.store(true, std::sync::atomic::Ordering::SeqCst);
        summary
    };
    let sent_series = r#"micro_server_stream_messages_total{method="/consignment.ShippingService/WatchConsignments",direction="sent"}"#;
    let read_slowly = async {
        let mut read = 0u64;
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        while !produced.load(std::sync::atomic::Ordering::SeqCst) || read < 8 {
            interval.tick().await;
            let consignment = watch.message().await.expect("the slow stream is not cut").expect("open");
            assert_eq!(consignment.containers.len(), 2000);
            read += 1;
            let sent = scrape(&metrics, sent_series).await;
            assert!(
                sent <= read + 64,
                "the server sent {sent} while the reader took {read}: it does not wait for the reader"
            );
        }
        read
    };
    let (summary, read) = tokio::join!(produce, read_slowly);
    assert_eq!(summary.expect("the heavy load is stored").into_inner().created, 400);
    let grown = rss(&service).saturating_sub(rss_before);
    assert!(
        grown < 48 * 1024 * 1024,
        "consignment-service grew by {grown} bytes while about 40 MB were stored and watched"
    );
    // Read past the unary deadline, and the stream still gives the next consignment.
    assert!(read >= 8);
    assert_eq!(watch.message().await.expect("still open").expect("more").containers.len(), 2000);
}

/// Test 5: SIGTERM to the replica serving a watcher: its stream ends cleanly with
/// UNAVAILABLE after the shutdown grace, the watcher reopens on the other replica from its
/// cursor, and it sees every consignment once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_an_open_stream_cleanly_and_the_watcher_reopens_elsewhere() {
    e2e::require_private_netns();
    let server = PostgresServer::shared();
    let shippy = Shippy::on_postgres(server);
    let registry = mdns();
    let _vessel = shippy.vessel_service(Place::Here);
    let quick = [("MICRO_SHUTDOWN_GRACE", "1"), ("MICRO_SHUTDOWN_DRAIN_DELAY", "200")];
    let mut replicas: Vec<Process> =
        ["a", "b"].iter().map(|boot| shippy.consignment_service(Place::Here, boot, &quick)).collect();
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boots(&registry, &["a", "b"]).await;
    let shipping = shippy.shipping(&registry);
    let before = opens(&replicas);
    let watched = Arc::new(Mutex::new(Watched::default()));
    let watcher = follow(shipping.clone(), watched.clone());
    opened(&watched, 1).await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(create(&shipping, &format!("term-{i}")).await);
    }
    let first = serving(&replicas, &before);
    saw_exactly(&watched, &created).await;
    let exit = replicas[first].terminate(Duration::from_secs(30)).await;
    assert!(exit.success(), "the replica stops cleanly: {exit:?}\n{}", replicas[first].log());
    opened(&watched, 2).await;
    {
        let ends = &watched.lock().unwrap().ends;
        let clean =
            ends.iter().any(|end| end.code() == Code::Unavailable && end.message().contains("shutting down"));
        assert!(clean, "the stream ended cleanly, with UNAVAILABLE saying why: {ends:?}");
    }
    for i in 5..10 {
        created.push(create(&shipping, &format!("term-{i}")).await);
    }
    saw_exactly(&watched, &created).await;
    watcher.abort();
    let _ = &shippy.dir;
}
