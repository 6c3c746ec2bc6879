//! shippy's `consignment.created` end to end, per broker backend, with the binaries as real
//! processes: consignment-service publishes each stored consignment through its outbox,
//! vessel-service books it in its queue group (the name it registers under, one per test
//! here), and a subscriber outside the project's services (a plain async-nats or lapin
//! client; on the default registry broker, the `micro subscribe` command) sees what went
//! over the wire.
//!
//! - default (registry broker over mDNS): each test runs on a host of its own
//!   ([`e2e::hosts`]), since the topic's subscribers register under one fixed name,
//!   `broker.consignment.created`, that every shippy of the test run would otherwise share.
//! - nats: each test has a nats-server of its own (JetStream, a temporary store), so the
//!   fixed topic's stream `micro_consignment_created` is never shared.
//! - rabbitmq: one node for the whole test binary ([`RabbitMqServer::shared`]) and a
//!   virtual host per test, so exchanges and queues are never shared.
//!
//! Every process a test starts is stopped when it ends (dropped, or with its host).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use e2e::{
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    hosts::{Host, Network},
    nats::NatsServer,
    process::{Place, Process, env_refs},
    rabbitmq::RabbitMqServer,
    shippy::{self, sample_consignment},
    unique_name,
};
use futures::StreamExt;
use micro_core::{
    Client, NamedChannel, Registry,
    broker::{headers, topic_service_name},
    selector::Filter,
};
use prost::Message as _;
use proto::consignment::{
    Consignment, Container, GetRequest, shipping_service_client::ShippingServiceClient,
};

/// The topic consignment-service publishes each stored consignment on.
const TOPIC: &str = "consignment.created";
/// The JetStream stream the nats broker keeps [`TOPIC`] in.
const NATS_STREAM: &str = "micro_consignment_created";
/// What vessel-service logs for each event it handled: booked (info), or found booked
/// already (debug, a second delivery of one consignment).
const HANDLED_LINES: [&str; 2] = ["consignment booked", "already booked"];
/// vessel-service's log filter: debug for its own events, so a second delivery shows.
const VESSEL_LOG: &str = "info,micro_core=debug,vessel_service=debug";
/// What consignment-service's outbox relay logs once the broker took an event.
const PUBLISHED_LINE: &str = "event published";
/// Creations in the queue-group tests.
const CREATIONS: usize = 100;
/// Creations under way at once.
const CONCURRENCY: usize = 8;
/// How long every event of a test may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(60);
/// A pause after the last awaited event in which a duplicate would show.
const QUIET: Duration = Duration::from_millis(700);
/// The burst of the SIGKILL test, and after how many stored ones the kill comes.
const BURST: usize = 300;
const KILL_AFTER_STORED: usize = 80;
/// The one vessel of each test's fleet, and its capacity unless a test fills it.
const VESSEL_ID: &str = "vessel-test";
const ROOMY_CAPACITY: i32 = 100_000;
/// Request metadata consignment-service deduplicates creations by.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("e2e=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// One event as a subscriber outside the project saw it.
#[derive(Debug, Clone)]
struct Seen {
    message_id: Option<String>,
    content_type: Option<String>,
    body: prost::bytes::Bytes,
}

impl Seen {
    /// The consignment in the body; fails the test when the body is not one.
    fn consignment(&self) -> Consignment {
        Consignment::decode(self.body.clone())
            .unwrap_or_else(|err| panic!("event {:?} is not a Consignment: {err}", self.message_id))
    }

    /// Fails the test unless this is the `consignment.created` of consignment `id`: a
    /// prost `Consignment` with that id, content type `application/protobuf`, message id = `id`.
    fn assert_of(&self, id: &str) {
        assert_eq!(self.content_type.as_deref(), Some(headers::PROTOBUF), "content type of {id}'s event");
        assert_eq!(self.message_id.as_deref(), Some(id), "message id of {id}'s event");
        assert_eq!(self.consignment().id, id, "consignment in the body of {id}'s event");
    }
}

/// What the outside subscriber has seen so far, shared with its task.
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Seen>>>);

impl Inbox {
    fn push(&self, seen: Seen) {
        self.0.lock().unwrap().push(seen);
    }

    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    /// The events whose message id is `id`.
    fn of(&self, id: &str) -> Vec<Seen> {
        self.all().into_iter().filter(|s| s.message_id.as_deref() == Some(id)).collect()
    }

    /// Waits until an event with message id `id` arrived.
    async fn wait_for(&self, id: &str) {
        poll_until(format!("the outside subscriber seeing {TOPIC} {id}"), ARRIVAL, async || {
            (!self.of(id).is_empty()).then_some(())
        })
        .await
    }

    /// Waits until every one of `ids` arrived.
    async fn wait_for_all(&self, ids: &BTreeSet<String>) {
        let what = format!("the outside subscriber seeing {} events", ids.len());
        poll_until(what, ARRIVAL, async || {
            let seen: BTreeSet<String> = self.all().into_iter().filter_map(|s| s.message_id).collect();
            ids.is_subset(&seen).then_some(())
        })
        .await
    }
}

/// Aborts a task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A plain async-nats core subscription on [`TOPIC`], outside the project's code.
async fn nats_core_subscriber(address: &str) -> (Inbox, TaskGuard) {
    let client = async_nats::connect(address).await.unwrap_or_else(|err| panic!("nats at {address}: {err}"));
    let mut subscriber = client.subscribe(TOPIC).await.expect("core subscription");
    client.flush().await.expect("subscription in force");
    let inbox = Inbox::default();
    let filling = inbox.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Some(message) = subscriber.next().await {
            filling.push(seen_from_nats(message.headers.as_ref(), message.payload.clone()));
        }
    });
    (inbox, TaskGuard(task))
}

fn seen_from_nats(headers: Option<&async_nats::HeaderMap>, body: prost::bytes::Bytes) -> Seen {
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    Seen { message_id: header(headers::MESSAGE_ID), content_type: header(headers::CONTENT_TYPE), body }
}

/// A durable JetStream consumer of its own on shippy's stream (made by vessel-service's
/// subscription, waited for), acknowledging each message: it keeps every event published
/// from its creation on, whoever else is up.
async fn nats_durable_subscriber(address: &str) -> (Inbox, TaskGuard) {
    use async_nats::jetstream::{self, consumer::pull};
    let client = async_nats::connect(address).await.unwrap_or_else(|err| panic!("nats at {address}: {err}"));
    let context = jetstream::new(client);
    let stream = poll_until(format!("stream {NATS_STREAM} on {address}"), STARTUP, async || {
        context.get_stream(NATS_STREAM).await.ok()
    })
    .await;
    let config = pull::Config {
        durable_name: Some("e2e-outside".to_owned()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    let consumer = stream.create_consumer(config).await.expect("durable consumer");
    let inbox = Inbox::default();
    let filling = inbox.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok(mut messages) = consumer.messages().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            while let Some(Ok(message)) = messages.next().await {
                filling.push(seen_from_nats(message.headers.as_ref(), message.payload.clone()));
                let _ = message.ack().await;
            }
        }
    });
    (inbox, TaskGuard(task))
}

/// The broker settings every shippy process of a test gets.
fn broker_env(kind: &str, address: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![("MICRO_BROKER", kind.to_owned())];
    if let Some(address) = address {
        env.push(("MICRO_BROKER_ADDRESS", address.to_owned()));
    }
    env
}

/// One test's shippy: names, broker settings, a fleet of one vessel, and files (the fleet,
/// the consignment and booking databases) in a temporary folder.
struct Shippy {
    vessel_name: String,
    consignment_name: String,
    broker: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
    fleet: PathBuf,
}

impl Shippy {
    /// A vessel with room for every creation of a test.
    fn new(broker: Vec<(&'static str, String)>) -> Shippy {
        Shippy::with_vessel(broker, ROOMY_CAPACITY)
    }

    /// A vessel of `capacity` containers (and weight enough for them all).
    fn with_vessel(broker: Vec<(&'static str, String)>, capacity: i32) -> Shippy {
        let dir = tempfile::tempdir().expect("temporary folder");
        let fleet = dir.path().join("fleet.json");
        let json = format!(
            r#"[{{"id": "{VESSEL_ID}", "name": "Test vessel", "capacity": {capacity}, "max_weight": 2000000000, "available": true}}]"#
        );
        std::fs::write(&fleet, json).expect("fleet file");
        Shippy {
            vessel_name: unique_name("vessel"),
            consignment_name: unique_name("consignment"),
            broker,
            dir,
            fleet,
        }
    }

    /// A vessel-service instance; instances of one test share the booking file.
    fn vessel_service(&self, place: Place) -> Process {
        let fleet = self.fleet.display().to_string();
        let db = self.dir.path().join("vessels.db").display().to_string();
        let mut env = env_refs(&self.broker);
        env.extend([("MICRO_SERVER_NAME", self.vessel_name.as_str()), ("RUST_LOG", VESSEL_LOG)]);
        place.start("vessel-service", &["--fleet", &fleet, "--db", &db], &env)
    }

    /// consignment-service on the test's database, announcing `boot` so a restarted
    /// instance can be told from the one before it.
    fn consignment_service(&self, place: Place, boot: &str) -> Process {
        let db = self.db().display().to_string();
        let boot = format!("boot={boot}");
        let mut env = env_refs(&self.broker);
        env.extend([
            ("MICRO_SERVER_NAME", self.consignment_name.as_str()),
            ("MICRO_SERVER_METADATA", boot.as_str()),
            ("VESSEL_SERVICE", self.vessel_name.as_str()),
            ("MICRO_LOOKUP_TIMEOUT", "1500"),
        ]);
        place.start("consignment-service", &["--db", &db], &env)
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("consignments.db")
    }

    /// Creates the sample consignment through consignment-cli; returns the id it reports.
    async fn create_with_cli(&self) -> String {
        let run =
            shippy::run_cli(&self.consignment_name, &sample_consignment(), &[], &env_refs(&self.broker))
                .await;
        assert!(run.success, "consignment-cli failed:\n{}\n{}", run.stdout, run.stderr);
        run.created_id()
    }

    /// A client of the instance that announced `boot` only.
    fn shipping(&self, client: &Client, boot: &str) -> ShippingServiceClient<NamedChannel> {
        let filter = Filter::new().metadata("boot", boot);
        ShippingServiceClient::new(client.channel_with(&self.consignment_name, filter))
    }

    /// Waits until the instance of consignment-service that announced `boot` is registered.
    async fn wait_for_boot(&self, registry: &Arc<dyn Registry>, boot: &str) {
        let name = &self.consignment_name;
        poll_until(format!("{name} boot {boot} registering"), STARTUP, async || {
            let nodes = registry.lookup(name).await.unwrap_or_default();
            nodes.iter().any(|n| n.metadata.get("boot").map(String::as_str) == Some(boot)).then_some(())
        })
        .await
    }
}

/// The value of `name=value` in a log line's fields.
fn log_field(text: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    text.split_whitespace().find_map(|t| t.strip_prefix(&prefix)).map(|v| v.trim_matches('"').to_owned())
}

/// The message id of each line of `log` that says one of `markers`, in order.
fn message_ids_after(log: &str, markers: &[&str]) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let (_, fields) = markers.iter().find_map(|marker| line.split_once(marker))?;
            log_field(fields, "message_id")
        })
        .collect()
}

/// How often each message id was handled across `instances`' logs, and by which.
fn handled_counts(instances: &[&Process]) -> (BTreeMap<String, usize>, Vec<usize>) {
    let mut counts = BTreeMap::new();
    let mut per_instance = Vec::new();
    for instance in instances {
        let ids = message_ids_after(&instance.log(), &HANDLED_LINES);
        per_instance.push(ids.len());
        for id in ids {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    (counts, per_instance)
}

/// A small consignment numbered `i`, with a request of its own (idempotency key
/// `{prefix}-{i}`, 5 s deadline).
fn creation(prefix: &str, i: usize) -> tonic::Request<Consignment> {
    let consignment = Consignment {
        description: format!("{prefix} #{i}"),
        weight: 1,
        containers: vec![Container {
            id: format!("{i}"),
            customer_id: format!("cust{i}"),
            origin: "Derby".to_owned(),
            user_id: "events".to_owned(),
        }],
        ..Default::default()
    };
    let mut request = tonic::Request::new(consignment);
    request.set_timeout(Duration::from_secs(5));
    request.metadata_mut().insert(IDEMPOTENCY_KEY, format!("{prefix}-{i}").parse().expect("ascii key"));
    request
}

/// `count` creations, [`CONCURRENCY`] at a time; each must succeed. Returns the ids.
async fn create_many(
    shipping: &ShippingServiceClient<NamedChannel>,
    prefix: &str,
    count: usize,
) -> BTreeSet<String> {
    let ids: Vec<String> = futures::stream::iter(0..count)
        .map(|i| {
            let mut shipping = shipping.clone();
            async move {
                let reply = shipping.create_consignment(creation(prefix, i)).await;
                let reply = reply.unwrap_or_else(|status| panic!("creation #{i} failed: {status:?}"));
                reply.into_inner().consignment.expect("created consignment").id
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    ids.into_iter().collect()
}

/// Waits until vessel-service's `instances` together handled every one of `ids`, then
/// [`QUIET`] more, and returns how often each id was handled and each instance's share.
async fn wait_handled(
    instances: &[&Process],
    ids: &BTreeSet<String>,
) -> (BTreeMap<String, usize>, Vec<usize>) {
    let what = format!("{} events handled by vessel-service", ids.len());
    poll_until(what, ARRIVAL, async || {
        let (counts, _) = handled_counts(instances);
        ids.iter().all(|id| counts.contains_key(id)).then_some(())
    })
    .await;
    tokio::time::sleep(QUIET).await;
    handled_counts(instances)
}

/// Fails unless every one of `ids` was handled exactly once and nothing else was handled.
fn assert_each_handled_once(backend: &str, counts: &BTreeMap<String, usize>, ids: &BTreeSet<String>) {
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{backend}: events handled more than once in the queue group: {twice:?}");
    let handled: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(&handled, ids, "{backend}: the events handled are not the consignments created");
}

/// For a durable group, which delivers at least once: every one of `ids` was booked exactly
/// once across `instances` and nothing else was; a second delivery (a member slow to
/// acknowledge under load) finds it booked and books nothing, and such redeliveries are rare
/// (a group that did not share would deliver every event to both members).
fn assert_group_shared_and_booked_once(
    backend: &str,
    instances: &[&Process],
    counts: &BTreeMap<String, usize>,
    ids: &BTreeSet<String>,
) {
    let mut bookings: BTreeMap<String, usize> = BTreeMap::new();
    for instance in instances {
        for id in message_ids_after(&instance.log(), &[HANDLED_LINES[0]]) {
            *bookings.entry(id).or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = bookings.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{backend}: consignments booked more than once: {twice:?}");
    let booked: BTreeSet<String> = bookings.keys().cloned().collect();
    assert_eq!(&booked, ids, "{backend}: the consignments booked are not the ones created");
    let handled: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(&handled, ids, "{backend}: the events handled are not the consignments created");
    let redelivered: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        redelivered.len() <= ids.len() / 20,
        "{backend}: the group delivered {} of {} events more than once: {redelivered:?}",
        redelivered.len(),
        ids.len()
    );
    if !redelivered.is_empty() {
        eprintln!("{backend}: delivered again (and found booked): {redelivered:?}");
    }
}

// ---- default: the registry broker over mDNS, on a host of the test's own ----

/// `micro subscribe` on `host`, on the registry broker: a plain subscriber (no queue
/// group) that prints every event as a JSON line, up to `count`.
fn micro_subscribe(host: &Host, count: usize) -> Process {
    let count = count.to_string();
    let args = ["subscribe", TOPIC, "--count", count.as_str(), "--timeout", "300s"];
    host.start("micro", &args, &[("MICRO_BROKER", "registry")])
}

/// The events `micro subscribe` printed in `log` (its JSON lines; the body is base64).
fn printed_events(log: &str) -> Vec<Seen> {
    log.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            let event: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("micro subscribe line {line}: {err}"));
            let header = |name: &str| event["headers"][name].as_str().map(str::to_owned);
            let body = event["body_base64"].as_str().unwrap_or_else(|| panic!("no body_base64 in {line}"));
            Seen {
                message_id: header(headers::MESSAGE_ID),
                content_type: header(headers::CONTENT_TYPE),
                body: base64_decode(body).into(),
            }
        })
        .collect()
}

/// Standard base64 (with padding) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bytes = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0_u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c).unwrap_or_else(|| panic!("not base64: {text}"));
        buffer = (buffer << 6) | value as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            bytes.push((buffer >> bits) as u8);
        }
    }
    bytes
}

/// `micro subscribe` (asked for up to 2 events, so a duplicate would show) sees exactly one
/// `consignment.created` for one creation through consignment-cli.
#[test]
fn default_broker_one_cli_creation_gives_one_event_to_micro_subscribe() {
    init_logs();
    let network = Network::new(1);
    let host = network.host(0);
    let shippy = Shippy::new(broker_env("registry", None));
    let vessel = shippy.vessel_service(Place::On(host));
    let mut subscriber = micro_subscribe(host, 2);
    host.block_on(|| async {
        let registry = mdns();
        poll_until("micro subscribe in force", STARTUP, async || {
            subscriber.log().contains("subscribed to").then_some(())
        })
        .await;
        wait_for(&registry, &shippy.vessel_name, 1).await;
        // vessel-service's group and micro subscribe, before the publisher starts.
        wait_for(&registry, &topic_service_name(TOPIC), 2).await;
        let consignment = shippy.consignment_service(Place::On(host), "1");
        shippy.wait_for_boot(&registry, "1").await;

        let id = shippy.create_with_cli().await;
        poll_until(format!("micro subscribe printing {id}"), ARRIVAL, async || {
            printed_events(&subscriber.log())
                .iter()
                .any(|s| s.message_id.as_deref() == Some(&*id))
                .then_some(())
        })
        .await;
        wait_published(&consignment, &id).await;
        tokio::time::sleep(QUIET).await;
        let seen = printed_events(&subscriber.log());
        assert_eq!(seen.len(), 1, "exactly one {TOPIC} expected:\n{}", subscriber.log());
        seen[0].assert_of(&id);
        let (counts, _) = wait_handled(&[&vessel], &BTreeSet::from([id.clone()])).await;
        assert_eq!(counts.get(&id), Some(&1), "vessel-service handles it once:\n{}", vessel.log());
        let status = subscriber.terminate(Duration::from_secs(10)).await;
        assert!(status.success(), "micro subscribe ends cleanly on SIGTERM: {status}\n{}", subscriber.log());
    });
}

/// Waits until consignment-service's outbox relay logged `id` as published.
async fn wait_published(consignment: &Process, id: &str) {
    poll_until(format!("consignment-service publishing {id}"), ARRIVAL, async || {
        message_ids_after(&consignment.log(), &[PUBLISHED_LINE]).iter().any(|p| p == id).then_some(())
    })
    .await
}

/// Two vessel-service instances in one queue group (their shared name), 100 creations. The
/// registry broker delivers at most once (nothing kept); with both instances up and the
/// publisher's relay retrying a failed delivery, this asserts that each event is handled by
/// exactly one of the two, never both, and none is lost.
#[test]
fn default_broker_queue_group_of_two_handles_each_of_100_events_once() {
    init_logs();
    let network = Network::new(1);
    let host = network.host(0);
    let shippy = Shippy::new(broker_env("registry", None));
    let first = shippy.vessel_service(Place::On(host));
    let second = shippy.vessel_service(Place::On(host));
    host.block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &shippy.vessel_name, 2).await;
        wait_for(&registry, &topic_service_name(TOPIC), 2).await;
        let _consignment = shippy.consignment_service(Place::On(host), "1");
        shippy.wait_for_boot(&registry, "1").await;

        let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
        let ids = create_many(&shippy.shipping(&client, "1"), "queue", CREATIONS).await;
        assert_eq!(ids.len(), CREATIONS);
        let (counts, shares) = wait_handled(&[&first, &second], &ids).await;
        assert_each_handled_once("registry", &counts, &ids);
        eprintln!("registry broker: shares of the two instances {shares:?}");
    });
}

// ---- nats: a nats-server of the test's own ----

/// A broker that keeps messages, run for one test, with the plain client the test watches
/// it through from outside the project's code.
enum DurableBroker {
    /// A nats-server of the test's own.
    Nats(NatsServer),
    /// A virtual host of its own on the binary's shared RabbitMQ node: its `amqp://` address.
    RabbitMq(String),
}

impl DurableBroker {
    fn nats() -> Self {
        DurableBroker::Nats(NatsServer::start())
    }

    fn rabbitmq() -> Self {
        DurableBroker::RabbitMq(rabbitmq_vhost())
    }

    fn kind(&self) -> &'static str {
        match self {
            DurableBroker::Nats(_) => "nats",
            DurableBroker::RabbitMq(_) => "rabbitmq",
        }
    }

    fn address(&self) -> String {
        match self {
            DurableBroker::Nats(server) => server.address(),
            DurableBroker::RabbitMq(address) => address.clone(),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        broker_env(self.kind(), Some(&self.address()))
    }

    /// A subscriber outside the project's code, in force when this returns; `durable`
    /// keeps every event from then on whoever else is up. Call it once a vessel-service is
    /// registered: its subscription made the stream or the exchange.
    async fn outside_subscriber(&self, durable: bool) -> (Inbox, TaskGuard) {
        match (self, durable) {
            (DurableBroker::Nats(server), false) => nats_core_subscriber(&server.address()).await,
            (DurableBroker::Nats(server), true) => nats_durable_subscriber(&server.address()).await,
            (DurableBroker::RabbitMq(address), durable) => lapin_subscriber(address, durable).await,
        }
    }
}

/// One consignment-cli creation gives exactly one event to a plain client of `broker`, and
/// vessel-service handles it once.
async fn one_cli_creation_gives_one_event_outside(broker: DurableBroker) {
    init_logs();
    let registry = mdns();
    let shippy = Shippy::new(broker.env());
    let vessel = shippy.vessel_service(Place::Here);
    wait_for(&registry, &shippy.vessel_name, 1).await;
    let (inbox, _task) = broker.outside_subscriber(false).await;
    let consignment = shippy.consignment_service(Place::Here, "1");
    shippy.wait_for_boot(&registry, "1").await;

    let id = shippy.create_with_cli().await;
    inbox.wait_for(&id).await;
    wait_published(&consignment, &id).await;
    tokio::time::sleep(QUIET).await;
    let seen = inbox.of(&id);
    assert_eq!(seen.len(), 1, "{}: exactly one {TOPIC} of {id} expected: {seen:?}", broker.kind());
    seen[0].assert_of(&id);
    assert_eq!(inbox.all().len(), 1, "only the one creation's event expected");
    let (counts, _) = wait_handled(&[&vessel], &BTreeSet::from([id.clone()])).await;
    assert_eq!(counts.get(&id), Some(&1), "vessel-service handles it once:\n{}", vessel.log());
}

/// Two vessel-service instances share their group's durable consumer or queue on `broker`:
/// each of 100 events is booked by exactly one of them, and seldom delivered twice.
async fn durable_queue_group_of_two_shares_100_events_and_books_each_once(broker: DurableBroker) {
    init_logs();
    let registry = mdns();
    let shippy = Shippy::new(broker.env());
    let first = shippy.vessel_service(Place::Here);
    let second = shippy.vessel_service(Place::Here);
    let _consignment = shippy.consignment_service(Place::Here, "1");
    // Generous: two processes subscribing on the shared broker node first, on a busy machine.
    poll_until("both vessel-service instances registering", ARRIVAL, async || {
        registry.lookup(&shippy.vessel_name).await.ok().filter(|nodes| nodes.len() >= 2)
    })
    .await;
    shippy.wait_for_boot(&registry, "1").await;

    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let ids = create_many(&shippy.shipping(&client, "1"), "queue", CREATIONS).await;
    assert_eq!(ids.len(), CREATIONS);
    let (counts, shares) = wait_handled(&[&first, &second], &ids).await;
    assert_group_shared_and_booked_once(broker.kind(), &[&first, &second], &counts, &ids);
    eprintln!("{}: shares of the two instances {shares:?}", broker.kind());
}

/// consignment-service is SIGKILLed in the middle of a burst of creations and started
/// again on the same database: every stored consignment's event reaches a durable
/// subscriber of the test's own on `broker`, and any event delivered twice (published,
/// then killed before it was marked sent) carries the same message id, its consignment's id.
async fn sigkill_during_a_burst_delivers_every_stored_consignments_event(broker: DurableBroker) {
    init_logs();
    let registry = mdns();
    let shippy = Shippy::new(broker.env());
    let _vessel = shippy.vessel_service(Place::Here);
    let first = shippy.consignment_service(Place::Here, "1");
    wait_for(&registry, &shippy.vessel_name, 1).await;
    let (inbox, _task) = broker.outside_subscriber(true).await;
    shippy.wait_for_boot(&registry, "1").await;

    let client = Client::new(registry.clone())
        .idempotent_methods(proto::IDEMPOTENT_METHODS)
        .request_timeout(Duration::from_secs(5));
    let reported = burst_until_killed(&shippy.shipping(&client, "1"), first).await;

    let _second = shippy.consignment_service(Place::Here, "2");
    shippy.wait_for_boot(&registry, "2").await;
    check_every_stored_event_delivered(broker.kind(), &shippy, &client, &inbox, &reported).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_one_cli_creation_gives_one_event_to_a_plain_nats_subscriber() {
    one_cli_creation_gives_one_event_outside(DurableBroker::nats()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_one_cli_creation_gives_one_event_to_a_plain_lapin_subscriber() {
    one_cli_creation_gives_one_event_outside(DurableBroker::rabbitmq()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_durable_queue_group_of_two_shares_100_events_and_books_each_once() {
    durable_queue_group_of_two_shares_100_events_and_books_each_once(DurableBroker::nats()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_durable_queue_group_of_two_shares_100_events_and_books_each_once() {
    durable_queue_group_of_two_shares_100_events_and_books_each_once(DurableBroker::rabbitmq()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_sigkill_during_a_burst_delivers_every_stored_consignments_event() {
    sigkill_during_a_burst_delivers_every_stored_consignments_event(DurableBroker::nats()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_sigkill_during_a_burst_delivers_every_stored_consignments_event() {
    sigkill_during_a_burst_delivers_every_stored_consignments_event(DurableBroker::rabbitmq()).await;
}

/// [`BURST`] creations, [`CONCURRENCY`] at a time, with `target` SIGKILLed once
/// [`KILL_AFTER_STORED`] were answered OK; no creation starts after the kill. Returns the
/// ids answered OK (reported stored).
async fn burst_until_killed(
    shipping: &ShippingServiceClient<NamedChannel>,
    target: Process,
) -> BTreeSet<String> {
    let stored_ok = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let target = Arc::new(target);
    let reported: Vec<Option<String>> = futures::stream::iter(0..BURST)
        .map(|i| {
            let (mut shipping, stored_ok, killed, target) =
                (shipping.clone(), stored_ok.clone(), killed.clone(), target.clone());
            async move {
                if killed.load(Ordering::SeqCst) {
                    return None;
                }
                let reply = shipping.create_consignment(creation("burst", i)).await;
                let id = reply.ok().and_then(|r| r.into_inner().consignment).map(|c| c.id);
                if id.is_some()
                    && stored_ok.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER_STORED
                    && !killed.swap(true, Ordering::SeqCst)
                {
                    target.signal("KILL");
                }
                id
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert!(killed.load(Ordering::SeqCst), "the burst ended before the kill");
    let reported: BTreeSet<String> = reported.into_iter().flatten().collect();
    assert!(reported.len() >= KILL_AFTER_STORED, "only {} reported stored", reported.len());
    reported
}

/// After the restart: the consignments stored (listed by the restarted instance, which
/// reads the same database) include every one reported stored, and the durable subscriber
/// `inbox` saw an event for each stored one, none for anything else, each with message id =
/// consignment id, a duplicate carrying the same id as the first.
async fn check_every_stored_event_delivered(
    backend: &str,
    shippy: &Shippy,
    client: &Client,
    inbox: &Inbox,
    reported: &BTreeSet<String>,
) {
    let stored =
        shippy.shipping(client, "2").get_consignments(GetRequest {}).await.expect("list after restart");
    let stored: BTreeSet<String> = stored.into_inner().consignments.into_iter().map(|c| c.id).collect();
    let missing: Vec<_> = reported.difference(&stored).collect();
    assert!(missing.is_empty(), "{backend}: reported stored but not in the database: {missing:?}");

    inbox.wait_for_all(&stored).await;
    tokio::time::sleep(QUIET).await;
    let seen = inbox.all();
    let mut deliveries: BTreeMap<String, usize> = BTreeMap::new();
    for event in &seen {
        let id = event.consignment().id;
        event.assert_of(&id);
        *deliveries.entry(id).or_insert(0) += 1;
    }
    let delivered: BTreeSet<String> = deliveries.keys().cloned().collect();
    assert_eq!(delivered, stored, "{backend}: the events delivered are not the consignments stored");
    let duplicates = deliveries.values().filter(|n| **n > 1).count();
    eprintln!(
        "{backend}: {} reported stored, {} stored, {} events delivered, {duplicates} delivered more than once",
        reported.len(),
        stored.len(),
        seen.len()
    );
}

// ---- bookings: vessel-service's handling has an effect the next creation sees ----

/// The sample consignment has 3 containers; a vessel of 6 takes two. Once vessel-service
/// booked both (from their events), a third creation through consignment-cli is refused
/// with FAILED_PRECONDITION, saying the vessel is fully booked, and nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn nats_booked_vessel_refuses_the_creation_that_no_longer_fits() {
    init_logs();
    let registry = mdns();
    let server = NatsServer::start();
    let shippy = Shippy::with_vessel(broker_env("nats", Some(&server.address())), 6);
    let vessel = shippy.vessel_service(Place::Here);
    let _consignment = shippy.consignment_service(Place::Here, "1");
    wait_for(&registry, &shippy.vessel_name, 1).await;
    shippy.wait_for_boot(&registry, "1").await;

    let first = shippy.create_with_cli().await;
    let second = shippy.create_with_cli().await;
    let booked = BTreeSet::from([first, second]);
    let (counts, _) = wait_handled(&[&vessel], &booked).await;
    assert_each_handled_once("nats", &counts, &booked);

    let run =
        shippy::run_cli(&shippy.consignment_name, &sample_consignment(), &[], &env_refs(&shippy.broker))
            .await;
    assert!(!run.success, "a creation for a fully booked vessel must be refused: {}", run.stdout);
    assert!(
        run.stderr.contains("FAILED_PRECONDITION") && run.stderr.contains("fully booked"),
        "{}",
        run.stderr
    );
    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let stored = shippy.shipping(&client, "1").get_consignments(GetRequest {}).await.expect("list");
    let stored: BTreeSet<String> = stored.into_inner().consignments.into_iter().map(|c| c.id).collect();
    assert_eq!(stored, booked, "the refused creation must store nothing");
}

// ---- rabbitmq: one node per test binary, a virtual host per test ----

/// The exchange the rabbitmq broker publishes every topic through (a topic exchange).
const RABBITMQ_EXCHANGE: &str = "micro";
/// The program that manages a node, as Debian installs it (the one on PATH switches user).
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A virtual host of its own on the shared node, open to `guest`; returns the
/// `amqp://` address of it that services and the test's client take.
fn rabbitmq_vhost() -> String {
    let server = RabbitMqServer::shared();
    let vhost = unique_name("events");
    for args in [
        vec!["add_vhost", vhost.as_str()],
        vec!["set_permissions", "-p", vhost.as_str(), "guest", ".*", ".*", ".*"],
    ] {
        let output = std::process::Command::new(RABBITMQCTL)
            .args(["-q", "-n", server.node()])
            .args(&args)
            .envs(server.ctl_env())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {RABBITMQCTL}: {err}; apt-get install rabbitmq-server"));
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} on {} failed: {}{}",
            server.node(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    format!("amqp://guest:guest@{}/{vhost}", server.address())
}

/// A plain lapin client's queue bound to the `micro` exchange with routing key
/// [`TOPIC`], outside the project's code: a server-named, exclusive queue when not
/// `durable`, else the durable queue `e2e-outside` (kept while the test's client is away),
/// declared and bound before this returns. Each delivery is acknowledged once recorded.
async fn lapin_subscriber(address: &str, durable: bool) -> (Inbox, TaskGuard) {
    use lapin::{
        Connection, ConnectionProperties,
        options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
        types::FieldTable,
    };
    let connection = Connection::connect(address, ConnectionProperties::default())
        .await
        .unwrap_or_else(|err| panic!("rabbitmq at {address}: {err}"));
    let channel = connection.create_channel().await.expect("channel");
    let (name, options) = match durable {
        true => ("e2e-outside", QueueDeclareOptions { durable: true, ..Default::default() }),
        false => ("", QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }),
    };
    let queue = channel.queue_declare(name.into(), options, FieldTable::default()).await.expect("queue");
    channel
        .queue_bind(
            queue.name().clone(),
            RABBITMQ_EXCHANGE.into(),
            TOPIC.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|err| {
            panic!("bind to exchange {RABBITMQ_EXCHANGE} (declared by the services): {err}")
        });
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "e2e".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let inbox = Inbox::default();
    let filling = inbox.clone();
    let task = tokio::spawn(async move {
        let _connection = connection;
        while let Some(Ok(delivery)) = consumer.next().await {
            let properties = &delivery.properties;
            filling.push(Seen {
                message_id: properties.message_id().as_ref().map(|id| id.as_str().to_owned()),
                content_type: properties.content_type().as_ref().map(|ct| ct.as_str().to_owned()),
                body: delivery.data.clone().into(),
            });
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    });
    (inbox, TaskGuard(task))
}
