//! vessel-service as a real process over mDNS, inside the private namespace
//! (`scripts/netns-run cargo test -p vessel-service --test bookings`): `consignment.created`
//! events published through the default registry broker book the vessel until
//! `FindAvailable` stops offering it, the same event twice books once, and the bookings
//! survive a SIGKILL and a restart on the same `--db`.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use e2e::{
    calls::poll_until,
    discovery::{STARTUP, mdns},
    process::Process,
    unique_name,
};
use futures::{StreamExt, stream::BoxStream};
use micro_core::{
    Client, NamedChannel, Node, Registry,
    broker::{RegistryBroker, publish_proto, topic_service_name},
    registry::{Change, NodeId},
    selector::Filter,
};
use proto::{
    consignment::{Consignment, Container},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use serde_json::Value;

const TOPIC: &str = "consignment.created";

/// The test's view of the registry: the topic's subscribers narrowed to the instance under
/// test, so what the test publishes reaches it and no other test's vessel-service that
/// shares the namespace (and the queue group).
struct OnlySubscriberAt {
    inner: Arc<dyn Registry>,
    subscriber: SocketAddr,
}

impl OnlySubscriberAt {
    fn keeps(&self, node: &Node) -> bool {
        node.name != topic_service_name(TOPIC) || node.address == self.subscriber
    }
}

#[async_trait]
impl Registry for OnlySubscriberAt {
    fn kind(&self) -> micro_core::config::RegistryKind {
        self.inner.kind()
    }

    fn address(&self) -> String {
        self.inner.address()
    }

    async fn register(&self, node: &Node, ttl: Duration) -> micro_core::Result<()> {
        self.inner.register(node, ttl).await
    }

    async fn deregister(&self, node: &Node) -> micro_core::Result<()> {
        self.inner.deregister(node).await
    }

    async fn lookup(&self, name: &str) -> micro_core::Result<Vec<Node>> {
        let mut nodes = self.inner.lookup(name).await?;
        nodes.retain(|node| self.keeps(node));
        Ok(nodes)
    }

    async fn list_services(&self) -> micro_core::Result<Vec<String>> {
        self.inner.list_services().await
    }

    fn watch(&self, name: &str) -> BoxStream<'static, micro_core::Result<Change<NodeId, Node>>> {
        let (topic_service, subscriber) = (topic_service_name(TOPIC), self.subscriber);
        self.inner
            .watch(name)
            .filter(move |change| {
                let other_subscriber = matches!(change, Ok(Change::Insert(_, node))
                    if node.name == topic_service && node.address != subscriber);
                std::future::ready(!other_subscriber)
            })
            .boxed()
    }
}

/// vessel-service with `fleet` and `--db db`, announcing `boot` as metadata so the test can
/// tell a restarted instance from the one before it. Logs in JSON, read by the test.
fn vessel_service(name: &str, fleet: &Path, db: &Path, boot: &str) -> Process {
    Process::start(
        "vessel-service",
        &["--fleet", &fleet.display().to_string(), "--db", &db.display().to_string()],
        &[
            ("MICRO_SERVER_NAME", name),
            ("MICRO_SERVER_METADATA", &format!("boot={boot}")),
            ("MICRO_LOG_FORMAT", "json"),
            ("MICRO_BROKER", "registry"),
        ],
    )
}

/// The fields of `process`'s JSON log lines whose message is `message`.
fn log_lines(process: &Process, message: &str) -> Vec<Value> {
    process
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|line| line.get("fields").cloned())
        .filter(|fields| fields["message"] == message)
        .collect()
}

/// Waits until `process` has subscribed and its subscriber is in the registry, then returns
/// a broker that publishes to that subscriber alone.
async fn broker_to(registry: &Arc<dyn Registry>, process: &Process) -> RegistryBroker {
    let subscriber: SocketAddr = poll_until("vessel-service subscribing", STARTUP, async || {
        log_lines(process, "subscribed")
            .iter()
            .find(|fields| fields["topic"] == TOPIC)
            .and_then(|fields| fields["address"].as_str()?.parse().ok())
    })
    .await;
    let only = Arc::new(OnlySubscriberAt { inner: registry.clone(), subscriber });
    let topic_service = topic_service_name(TOPIC);
    poll_until(format!("{topic_service} at {subscriber} registering"), STARTUP, async || {
        only.lookup(&topic_service).await.ok().filter(|nodes| !nodes.is_empty())
    })
    .await;
    RegistryBroker::new(Client::new(only))
}

/// A client of the instance of `name` that announced `boot`, once it is registered.
async fn vessels_of(
    registry: &Arc<dyn Registry>,
    name: &str,
    boot: &str,
) -> VesselServiceClient<NamedChannel> {
    poll_until(format!("{name} boot {boot} registering"), STARTUP, async || {
        let nodes = registry.lookup(name).await.unwrap_or_default();
        nodes.iter().any(|node| node.metadata.get("boot").map(String::as_str) == Some(boot)).then_some(())
    })
    .await;
    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    VesselServiceClient::new(client.channel_with(name, Filter::new().metadata("boot", boot)))
}

fn consignment(id: &str, vessel: &str, containers: usize, weight: i32) -> Consignment {
    Consignment {
        id: id.to_owned(),
        description: format!("consignment {id}"),
        weight,
        vessel_id: vessel.to_owned(),
        containers: (0..containers)
            .map(|i| Container {
                id: format!("{id}-{i}"),
                customer_id: "cust".into(),
                origin: "Derby".into(),
                user_id: "u".into(),
            })
            .collect(),
        reservation_id: String::new(),
    }
}

/// Publishes `consignment` as consignment-service's outbox does (message id = consignment
/// id). The registry broker returns once the subscriber's handler succeeded.
async fn publish(broker: &RegistryBroker, consignment: &Consignment) {
    publish_proto(broker, TOPIC, Some(consignment.id.clone()), consignment)
        .await
        .unwrap_or_else(|err| panic!("publishing {}: {err}", consignment.id));
}

/// FindAvailable for `capacity` containers and `max_weight`: the vessel's id, or the status.
async fn find(
    vessels: &mut VesselServiceClient<NamedChannel>,
    capacity: i32,
    max_weight: i32,
) -> Result<String, tonic::Status> {
    let reply = vessels.find_available(Specification { capacity, max_weight }).await?;
    Ok(reply.into_inner().vessel.expect("a vessel in an OK answer").id)
}

#[tokio::test(flavor = "multi_thread")]
async fn events_book_the_vessel_until_it_is_full_once_each_and_across_a_restart() {
    let registry = mdns();
    let name = unique_name("vessel");
    // A vessel of its own, so events other tests publish in the namespace cannot fill it.
    let vessel = unique_name("ship");
    let dir = tempfile::tempdir().unwrap();
    let (fleet, db) = (dir.path().join("fleet.json"), dir.path().join("vessels.db"));
    std::fs::write(
        &fleet,
        format!(
            r#"[{{"id": "{vessel}", "name": "Test", "capacity": 5, "max_weight": 1000, "available": true}}]"#
        ),
    )
    .unwrap();

    let mut first = vessel_service(&name, &fleet, &db, "1");
    let mut vessels = vessels_of(&registry, &name, "1").await;
    let broker = broker_to(&registry, &first).await;
    assert_eq!(find(&mut vessels, 5, 1000).await.unwrap(), vessel, "empty: the whole vessel is offered");

    // 2 containers and 400 booked: 3 containers and 600 left.
    let c1 = consignment(&unique_name("c"), &vessel, 2, 400);
    publish(&broker, &c1).await;
    assert_eq!(find(&mut vessels, 3, 600).await.unwrap(), vessel);
    let status = find(&mut vessels, 4, 1).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let status = find(&mut vessels, 1, 601).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "weight counts too: {status:?}");

    // The same event twice more (a redelivery, a duplicate): nothing more is booked.
    publish(&broker, &c1).await;
    publish(&broker, &c1).await;
    assert_eq!(find(&mut vessels, 3, 600).await.unwrap(), vessel, "booked once");
    let booked = log_lines(&first, "consignment booked");
    let of_c1: Vec<_> = booked.iter().filter(|fields| fields["consignment"] == c1.id.as_str()).collect();
    assert_eq!(of_c1.len(), 1, "one `consignment booked` line for {}: {booked:?}", c1.id);
    let line = of_c1[0];
    assert_eq!(
        [
            &line["vessel"],
            &line["containers"],
            &line["weight"],
            &line["booked_containers"],
            &line["capacity"]
        ],
        [&Value::from(vessel.as_str()), &Value::from(2), &Value::from(400), &Value::from(2), &Value::from(5)],
        "{line}"
    );

    // The last 3 slots: full by containers, with weight to spare.
    let c2 = consignment(&unique_name("c"), &vessel, 3, 100);
    publish(&broker, &c2).await;
    let status = find(&mut vessels, 1, 1).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("fully booked"), "{status:?}");

    // SIGKILL, then a new process on the same file: still full, and c1 still booked once.
    first.signal("KILL");
    first.wait(Duration::from_secs(10)).await;
    let second = vessel_service(&name, &fleet, &db, "2");
    let mut vessels = vessels_of(&registry, &name, "2").await;
    let broker = broker_to(&registry, &second).await;
    let status = find(&mut vessels, 1, 1).await.unwrap_err();
    assert!(status.message().contains("fully booked"), "bookings lost in the restart: {status:?}");
    publish(&broker, &c1).await;
    let booked = log_lines(&second, "consignment booked");
    assert!(booked.iter().all(|fields| fields["consignment"] != c1.id.as_str()), "{booked:?}");
}
