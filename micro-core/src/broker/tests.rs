//! One test body, [`conformance`], run against every backend; real servers, no mocks.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::*;

/// A subscriber that forwards what it gets, tagged with its own name.
async fn forwarding(
    broker: &dyn Broker,
    topic: &str,
    options: SubscribeOptions,
    tag: &'static str,
    tx: mpsc::UnboundedSender<(&'static str, Message)>,
) -> Subscription {
    broker
        .subscribe(
            topic,
            options,
            handler(move |m| {
                let tx = tx.clone();
                async move { tx.send((tag, m)).map_err(Into::into) }
            }),
        )
        .await
        .expect("subscribe")
}

async fn collect<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(item)) => got.push(item),
            _ => panic!("only {} of {n} messages arrived within 10 s: {got:?}", got.len()),
        }
    }
    // Nothing more may come.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("an extra delivery: {extra:?}");
    }
    got
}

/// What every broker does: fan-out to plain subscribers, one delivery per queue group,
/// headers kept, typed helpers, malformed bodies dropped without blocking, unsubscribe on drop.
/// `settle` waits until the backend has the subscriptions made so far in force.
pub(crate) async fn conformance(broker: Arc<dyn Broker>, settle: impl AsyncFn()) {
    let suffix = format!("{:08x}", rand::random::<u32>());
    let topic = format!("conf.{suffix}");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let plain_a = forwarding(&*broker, &topic, SubscribeOptions::default(), "a", tx.clone()).await;
    let _plain_b = forwarding(&*broker, &topic, SubscribeOptions::default(), "b", tx.clone()).await;
    let group = SubscribeOptions::default().queue("workers");
    let _g1 = forwarding(&*broker, &topic, group.clone(), "g1", tx.clone()).await;
    let _g2 = forwarding(&*broker, &topic, group.clone(), "g2", tx.clone()).await;
    settle().await;

    // Headers survive, and each plain subscriber and one group member get the message.
    let message =
        Message::new(&topic, "one").header(headers::CONTENT_TYPE, "text/plain").header("x-custom", "1");
    broker.publish(message.clone()).await.expect("publish");
    let got = collect(&mut rx, 3).await;
    let mut tags: Vec<&str> = got.iter().map(|(tag, _)| *tag).collect();
    tags.sort();
    assert_eq!(&tags[..2], ["a", "b"], "{tags:?}");
    assert!(tags[2] == "g1" || tags[2] == "g2", "{tags:?}");
    for (_, m) in &got {
        assert_eq!((m.topic.as_str(), &m.body[..]), (topic.as_str(), &b"one"[..]));
        assert_eq!(m.id(), message.id());
        assert_eq!(m.content_type(), Some("text/plain"));
        assert_eq!(m.headers.get("x-custom"), Some("1"));
    }

    // A queue group gets each of 20 messages once.
    for i in 0..20 {
        broker.publish(Message::new(&topic, format!("{i}"))).await.expect("publish");
    }
    let got = collect(&mut rx, 60).await;
    let mut per_tag: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (tag, m) in got {
        per_tag.entry(tag).or_default().push(String::from_utf8(m.body.to_vec()).unwrap());
    }
    assert_eq!(per_tag["a"].len(), 20);
    assert_eq!(per_tag["b"].len(), 20);
    let mut group_got: Vec<u32> = ["g1", "g2"]
        .iter()
        .flat_map(|t| per_tag.get(t).cloned().unwrap_or_default())
        .map(|b| b.parse().unwrap())
        .collect();
    group_got.sort();
    assert_eq!(group_got, (0..20).collect::<Vec<_>>(), "each message once in the group");

    // Unsubscribing stops delivery.
    drop(plain_a);
    settle().await;
    broker.publish(Message::new(&topic, "after")).await.expect("publish");
    let mut tags: Vec<&str> = collect(&mut rx, 2).await.iter().map(|(tag, _)| *tag).collect();
    tags.sort();
    assert_eq!(tags[0], "b", "{tags:?}");

    // Typed: a malformed body is dropped (acked), the next good one still arrives.
    let typed = format!("typed.{suffix}");
    let (ttx, mut trx) = mpsc::unbounded_channel();
    let _typed =
        subscribe_proto(&*broker, &typed, SubscribeOptions::default().queue("t"), move |value: u64, m| {
            let ttx = ttx.clone();
            async move { ttx.send((value, m.content_type().map(str::to_owned))).map_err(Into::into) }
        })
        .await
        .expect("subscribe typed");
    settle().await;
    broker.publish(Message::new(&typed, vec![0xff_u8; 3])).await.expect("publish malformed");
    publish_proto(&*broker, &typed, Some("id-7".into()), &7_u64).await.expect("publish typed");
    let got = tokio::time::timeout(Duration::from_secs(10), trx.recv()).await.expect("typed arrives");
    assert_eq!(got, Some((7, Some(headers::PROTOBUF.to_owned()))));
}

#[test]
fn decode_names_the_topic_the_id_and_the_type() {
    let message = Message::new("consignment.created", vec![0xff_u8; 2]).header(headers::MESSAGE_ID, "m-1");
    let err = decode::<u64>(&message).unwrap_err().to_string();
    assert!(err.contains("consignment.created") && err.contains("m-1") && err.contains("u64"), "{err}");
}

#[test]
fn long_or_odd_topics_get_a_valid_service_name() {
    assert_eq!(topic_service_name("consignment.created"), "broker.consignment.created");
    let odd = topic_service_name("Orders/EU");
    assert!(crate::registry::validate_service_name(&odd).is_ok(), "{odd}");
    assert_ne!(odd, topic_service_name("Orders/US"));
    assert!(crate::registry::validate_service_name(&topic_service_name(&"x".repeat(100))).is_ok());
}

#[tokio::test]
async fn memory_conformance() {
    conformance(Arc::new(MemoryBroker::new()), async || {}).await;
}

#[tokio::test]
async fn registry_conformance_over_real_grpc() {
    use crate::{Client, config::ServerConfig, registry::MemoryRegistry};
    let client = Client::new(Arc::new(MemoryRegistry::new()));
    let server = ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        drain_delay: Duration::ZERO,
        ..ServerConfig::default()
    };
    let broker = RegistryBroker::new(client).server_config(server);
    // The publisher follows the registry; give a change time to reach it.
    conformance(Arc::new(broker), async || tokio::time::sleep(Duration::from_millis(200)).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_subscriber_unsubscribing_finishes_the_delivery_in_flight_then_leaves() {
    use crate::{Client, config::ServerConfig, registry::MemoryRegistry};
    let registry: Arc<dyn crate::Registry> = Arc::new(MemoryRegistry::new());
    let server = ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        drain_delay: Duration::ZERO,
        ..ServerConfig::default()
    };
    let broker = Arc::new(RegistryBroker::new(Client::new(registry.clone())).server_config(server));
    let topic = format!("leaving.{:08x}", rand::random::<u32>());
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let subscription = broker
        .subscribe(
            &topic,
            SubscribeOptions::default(),
            handler(move |m: Message| {
                let (started_tx, done_tx) = (started_tx.clone(), done_tx.clone());
                async move {
                    let _ = started_tx.send(());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    done_tx.send(m.body).map_err(Into::into)
                }
            }),
        )
        .await
        .expect("subscribe");
    let publishing = {
        let (broker, topic) = (broker.clone(), topic.clone());
        tokio::spawn(async move { broker.publish(Message::new(&topic, "in flight")).await })
    };
    tokio::time::timeout(Duration::from_secs(10), started.recv()).await.expect("the handler starts");
    subscription.unsubscribe().await;
    assert_eq!(&done.try_recv().expect("handled before unsubscribe returned")[..], b"in flight");
    publishing.await.unwrap().expect("the delivery in flight was answered");
    let left = registry.lookup(&topic_service_name(&topic)).await.unwrap_or_default();
    assert!(left.is_empty(), "still registered after unsubscribe: {left:?}");
}

/// A registry whose look-ups are slow and counted.
struct SlowLookups {
    inner: crate::registry::MemoryRegistry,
    lookups: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl crate::Registry for SlowLookups {
    fn kind(&self) -> crate::config::RegistryKind {
        crate::config::RegistryKind::Memory
    }
    fn address(&self) -> String {
        "slow".into()
    }
    async fn register(&self, node: &crate::Node, ttl: Duration) -> crate::Result<()> {
        self.inner.register(node, ttl).await
    }
    async fn deregister(&self, node: &crate::Node) -> crate::Result<()> {
        self.inner.deregister(node).await
    }
    async fn lookup(&self, name: &str) -> crate::Result<Vec<crate::Node>> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.inner.lookup(name).await
    }
    async fn list_services(&self) -> crate::Result<Vec<String>> {
        self.inner.list_services().await
    }
    fn watch(
        &self,
        name: &str,
    ) -> futures::stream::BoxStream<
        'static,
        crate::Result<crate::registry::Change<crate::registry::NodeId, crate::Node>>,
    > {
        self.inner.watch(name)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_publish_asks_the_registry_once_per_topic_then_follows_it() {
    use crate::{Client, config::ServerConfig};
    let registry =
        Arc::new(SlowLookups { inner: crate::registry::MemoryRegistry::new(), lookups: Default::default() });
    let server = ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        drain_delay: Duration::ZERO,
        ..ServerConfig::default()
    };
    let broker = RegistryBroker::new(Client::new(registry.clone())).server_config(server);
    let topic = format!("nobody.{:08x}", rand::random::<u32>());
    for _ in 0..3 {
        broker.publish(Message::new(&topic, "dropped")).await.expect("no subscriber: dropped, not an error");
    }
    let lookups = registry.lookups.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(lookups, 1, "three publishes with no subscriber asked the registry {lookups} times");
    // A subscriber that comes later is found: the topic's channel follows the registry.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _late = forwarding(&broker, &topic, SubscribeOptions::default(), "late", tx).await;
    let mut delivered = false;
    for _ in 0..50 {
        broker.publish(Message::new(&topic, "found")).await.expect("publish");
        if tokio::time::timeout(Duration::from_millis(100), rx.recv()).await.is_ok() {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "the late subscriber was never found");
}

#[tokio::test]
async fn durable_subscribers_are_refused_where_nothing_is_kept() {
    let broker = MemoryBroker::new();
    let err = broker
        .subscribe("t", SubscribeOptions::default().durable(), handler(|_| async { Ok(()) }))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nats") && err.contains("rabbitmq"), "{err}");
    let limited = SubscribeOptions::default().queue("g").max_deliveries(3);
    let err = broker.subscribe("t", limited, handler(|_| async { Ok(()) })).await.unwrap_err().to_string();
    assert!(err.contains("nats") && err.contains("rabbitmq"), "a delivery limit is refused too: {err}");
}

/// A handler whose first attempt at every message fails; later ones forward its id.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
fn failing_once(
    tag: &'static str,
    tx: &mpsc::UnboundedSender<(&'static str, String)>,
    failed: &Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
) -> Handler {
    let (tx, failed) = (tx.clone(), failed.clone());
    handler(move |m: Message| {
        let tx = tx.clone();
        let id = m.id().unwrap().to_owned();
        let first = failed.lock().unwrap().insert(id.clone());
        async move {
            if first {
                return Err("first attempt fails".into());
            }
            tx.send((tag, id)).map_err(Into::into)
        }
    })
}

/// What a broker that keeps messages does: a failed handler's message is delivered again
/// until it succeeds, each message to one member of the durable group; a durable subscriber
/// needs a group; the group keeps messages while no member is there, and a malformed body
/// among them is dropped without blocking the rest.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
async fn durable_conformance(broker: Arc<dyn Broker>) {
    let topic = format!("durable.{:08x}", rand::random::<u32>());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let failed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let options = SubscribeOptions::default().queue("workers").durable();
    let _a =
        broker.subscribe(&topic, options.clone(), failing_once("a", &tx, &failed)).await.expect("durable");
    let _b =
        broker.subscribe(&topic, options.clone(), failing_once("b", &tx, &failed)).await.expect("durable");
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(publish_proto(&*broker, &topic, None, &(i as u64)).await.expect("publish"));
    }
    let mut got: Vec<String> = collect(&mut rx, 10).await.into_iter().map(|(_, id)| id).collect();
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "every message handled once after its redelivery");
    assert_eq!(failed.lock().unwrap().len(), 10, "each first attempt failed");
    let refused = broker
        .subscribe(&topic, SubscribeOptions::default().durable(), failing_once("c", &tx, &failed))
        .await;
    assert!(refused.unwrap_err().to_string().contains("queue group"));

    let kept = format!("kept.{:08x}", rand::random::<u32>());
    let durable = SubscribeOptions::default().queue("keepers").durable();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let typed = |tx: mpsc::UnboundedSender<u64>| {
        move |value: u64, _m: Message| {
            let tx = tx.clone();
            async move { tx.send(value).map_err(Into::into) }
        }
    };
    let away = subscribe_proto(&*broker, &kept, durable.clone(), typed(tx.clone())).await.expect("subscribe");
    drop(away);
    // Published while no member is there: a malformed body, then two good ones.
    broker.publish(Message::new(&kept, vec![0xff_u8; 3])).await.expect("publish malformed");
    for value in [1_u64, 2] {
        publish_proto(&*broker, &kept, None, &value).await.expect("publish");
    }
    let _back = subscribe_proto(&*broker, &kept, durable, typed(tx)).await.expect("subscribe again");
    let mut got = collect(&mut rx, 2).await;
    got.sort();
    assert_eq!(got, [1, 2], "kept while away; the malformed one dropped, not blocking the queue");
}

/// A durable group with a delivery limit gives up on a message its handler keeps failing:
/// after exactly that many deliveries it goes to the topic's dead letters, with its body, id
/// and headers saying where from and why, and is kept there until read; the messages after
/// it are handled meanwhile. A limit needs a durable group and at least one delivery.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
async fn dead_letter_conformance(broker: Arc<dyn Broker>) {
    let kind = broker.kind();
    let topic = format!("poison.{:08x}", rand::random::<u32>());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let attempts = Arc::new(std::sync::Mutex::new(0_u32));
    let counted = attempts.clone();
    let limited = SubscribeOptions::default().queue("workers").durable().max_deliveries(3);
    let poisoned = handler(move |m: Message| {
        let tx = tx.clone();
        let poison = &m.body[..] == b"poison";
        if poison {
            *counted.lock().unwrap() += 1;
        }
        async move {
            if poison {
                return Err("cannot digest poison".into());
            }
            tx.send(m.body).map_err(Into::into)
        }
    });
    let _workers = broker.subscribe(&topic, limited, poisoned).await.expect("subscribe with a limit");
    let poison = Message::new(&topic, "poison");
    let poison_id = poison.id().unwrap().to_owned();
    broker.publish(poison).await.expect("publish");
    for i in 0..5 {
        broker.publish(Message::new(&topic, format!("fine {i}"))).await.expect("publish");
    }
    assert_eq!(collect(&mut rx, 5).await.len(), 5, "{kind}: the messages after the poison are handled");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while *attempts.lock().unwrap() < 3 {
        assert!(std::time::Instant::now() < deadline, "{kind}: the poison was not delivered three times");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Longer than either backend's pause before delivering a failed message again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(*attempts.lock().unwrap(), 3, "{kind}: delivered three times, then given up");

    // Nobody read the dead letters while they came: they were kept.
    let (dead_tx, mut dead_rx) = mpsc::unbounded_channel();
    let keepers = SubscribeOptions::default().queue(DEAD_LETTERS).durable();
    let _reader = forwarding(&*broker, &dead_letter_topic(&topic), keepers, "dead", dead_tx).await;
    let (_, dead) = collect(&mut dead_rx, 1).await.remove(0);
    assert_eq!(dead.topic, format!("{topic}.dead"), "{kind}");
    assert_eq!(&dead.body[..], b"poison", "{kind}");
    assert_eq!(dead.id(), Some(poison_id.as_str()), "{kind}: the dead letter keeps the message id");
    let header = |name: &str| dead.headers.get(name).unwrap_or_default().to_owned();
    assert_eq!(header(headers::DEAD_LETTER_TOPIC), topic, "{kind}");
    assert_eq!(header(headers::DEAD_LETTER_GROUP), "workers", "{kind}");
    assert_eq!(header(headers::DELIVERY_COUNT), "3", "{kind}");
    assert!(dead.headers.keys().all(|key| !key.starts_with("x-micro-")), "{kind}: {:?}", dead.headers);
    assert!(
        header(headers::DEAD_LETTER_ERROR).contains("cannot digest poison"),
        "{kind}: {:?}",
        dead.headers
    );
    // Far fewer topics than the metrics' cap are used in this test binary.
    let page = crate::metrics::metrics().render_as(crate::metrics::Format::Prometheus);
    let counted =
        format!(r#"micro_broker_published_total{{broker="{kind}",topic="{topic}.dead",result="ok"}} 1"#);
    assert!(page.contains(&counted), "{kind}: the dead letter is counted as a publish: {counted}");

    let ok = || handler(|_| async { Ok(()) });
    let not_durable = SubscribeOptions::default().queue("workers").max_deliveries(3);
    let err = broker.subscribe(&topic, not_durable, ok()).await.unwrap_err().to_string();
    assert!(err.contains(&topic) && err.contains("durable group"), "{kind}: {err}");
    let zero = SubscribeOptions::default().queue("workers").durable().max_deliveries(0);
    let err = broker.subscribe(&topic, zero, ok()).await.unwrap_err().to_string();
    assert!(err.contains(&topic) && err.contains("at least 1"), "{kind}: {err}");
}

/// A member of a durable group whose subscription is dropped gives back what it holds, the
/// message its cancelled handler was running included: another member gets every message
/// soon, not after an ack wait, and each once.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
async fn handover_conformance(broker: Arc<dyn Broker>) {
    let topic = format!("handover.{:08x}", rand::random::<u32>());
    let group = SubscribeOptions::default().queue("handover").durable();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let stuck = broker
        .subscribe(
            &topic,
            group.clone(),
            handler(move |_m: Message| {
                let started_tx = started_tx.clone();
                async move {
                    let _ = started_tx.send(());
                    std::future::pending::<()>().await;
                    Ok(())
                }
            }),
        )
        .await
        .expect("subscribe");
    let mut ids = Vec::new();
    for i in 0..20 {
        let message = Message::new(&topic, format!("{i}"));
        ids.push(message.id().unwrap().to_owned());
        broker.publish(message).await.expect("publish");
    }
    tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .expect("the first member starts a handler");
    // Let it pull what it can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stuck);
    let dropped_at = std::time::Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _second = forwarding(&*broker, &topic, group, "second", tx).await;
    let mut got: Vec<String> =
        collect(&mut rx, 20).await.into_iter().map(|(_, m)| m.id().unwrap().to_owned()).collect();
    let handed_over = dropped_at.elapsed();
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "every message reaches the second member once");
    assert!(
        handed_over < Duration::from_secs(5),
        "{}: the dropped member's messages took {handed_over:?} to reach the other (held until an ack wait?)",
        broker.kind()
    );
    eprintln!("{}: handed over in {handed_over:?}", broker.kind());
}

/// A broker server that a test stops and starts again on the same port and store.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
trait Restartable {
    fn address(&self) -> String;
    fn stop(&mut self);
    fn restart(&mut self);
}

#[cfg(feature = "nats")]
impl Restartable for e2e::nats::NatsServer {
    fn address(&self) -> String {
        e2e::nats::NatsServer::address(self)
    }
    fn stop(&mut self) {
        e2e::nats::NatsServer::stop(self);
    }
    fn restart(&mut self) {
        e2e::nats::NatsServer::restart(self);
    }
}

#[cfg(feature = "rabbitmq")]
impl Restartable for e2e::rabbitmq::RabbitMqServer {
    fn address(&self) -> String {
        e2e::rabbitmq::RabbitMqServer::address(self)
    }
    fn stop(&mut self) {
        e2e::rabbitmq::RabbitMqServer::stop(self);
    }
    fn restart(&mut self) {
        e2e::rabbitmq::RabbitMqServer::restart(self);
    }
}

/// The server goes away and comes back: a publish that cannot wait for it (`impatient`,
/// a second client with a 500 ms publish timeout) fails naming the broker, the topic, the
/// message id and the address; publishes made meanwhile by `broker` succeed after the
/// reconnect or fail clearly, and every one that succeeded reaches the durable group; both
/// the durable and the plain subscription are back by themselves.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
async fn restart_conformance(
    broker: Arc<dyn Broker>,
    impatient: Arc<dyn Broker>,
    server: &mut impl Restartable,
) {
    let kind = broker.kind();
    let topic = format!("restart.{:08x}", rand::random::<u32>());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let durable = SubscribeOptions::default().queue("keepers").durable();
    let _durable = forwarding(&*broker, &topic, durable, "durable", tx.clone()).await;
    let _plain = forwarding(&*broker, &topic, SubscribeOptions::default(), "plain", tx.clone()).await;
    broker.publish(Message::new(&topic, "before")).await.expect("publish before");
    assert_eq!(collect(&mut rx, 2).await.len(), 2);

    server.stop();
    let lost = Message::new(&topic, "lost");
    let err = impatient.publish(lost.clone()).await.expect_err("no server within 500 ms").to_string();
    for part in [kind, topic.as_str(), lost.id().unwrap(), server.address().as_str()] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    // Gone before the server is back, so nothing it may have buffered goes out.
    drop(impatient);
    let during: Vec<_> = (0..3)
        .map(|i| {
            let broker = broker.clone();
            let topic = topic.clone();
            tokio::spawn(async move { broker.publish(Message::new(&topic, format!("during-{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    let mut sent = 0;
    for publish in during {
        match publish.await.unwrap() {
            Ok(()) => sent += 1,
            Err(err) => {
                let err = err.to_string();
                assert!(err.contains(kind) && err.contains(&topic), "{err}");
            }
        }
    }
    let arrived = collect(&mut rx, 2 * sent).await;
    assert!(arrived.iter().all(|(_, m)| m.body.starts_with(b"during-")), "{arrived:?}");
    let durable_got = arrived.iter().filter(|(tag, _)| *tag == "durable").count();
    assert_eq!(durable_got, sent, "{kind}: every publish that succeeded reached the durable group");

    broker.publish(Message::new(&topic, "after")).await.expect("publish after the restart");
    let mut tags: Vec<&str> = collect(&mut rx, 2).await.iter().map(|(tag, _)| *tag).collect();
    tags.sort();
    assert_eq!(tags, ["durable", "plain"], "{kind}: both subscriptions came back by themselves");
}

#[cfg(feature = "nats")]
mod nats {
    use super::*;
    use e2e::nats::NatsServer;

    async fn broker(server: &NatsServer) -> Arc<NatsBroker> {
        Arc::new(NatsBroker::connect(&server.address()).await.expect("connect to nats-server"))
    }

    #[tokio::test]
    async fn nats_conformance() {
        let server = NatsServer::start();
        conformance(broker(&server).await, async || {}).await;
    }

    #[tokio::test]
    async fn nats_connect_fails_clearly_without_a_server() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = NatsBroker::connect(&format!("127.0.0.1:{port}"))
            .await
            .err()
            .expect("nothing listens")
            .to_string();
        assert!(err.contains("nats") && err.contains(&port.to_string()), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn members_starting_together_all_attach_to_one_new_stream_and_consumer() {
        let server = NatsServer::start();
        let topic = format!("together.{:08x}", rand::random::<u32>());
        let mut brokers = Vec::new();
        for _ in 0..4 {
            brokers.push(broker(&server).await);
        }
        let group = SubscribeOptions::default().queue("together").durable();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let subscribing = brokers.iter().map(|broker| {
            let (topic, group, tx) = (topic.clone(), group.clone(), tx.clone());
            async move {
                broker
                    .subscribe(
                        &topic,
                        group,
                        handler(move |m| {
                            let tx = tx.clone();
                            async move { tx.send(m.body).map_err(Into::into) }
                        }),
                    )
                    .await
            }
        });
        let subscriptions: Vec<_> = futures::future::join_all(subscribing)
            .await
            .into_iter()
            .map(|outcome| outcome.expect("every member attaches, whichever made the stream"))
            .collect();
        brokers[0].publish(Message::new(&topic, "once")).await.expect("publish");
        assert_eq!(&collect(&mut rx, 1).await[0][..], b"once", "one member of the group gets it");
        drop(subscriptions);
    }

    #[tokio::test]
    async fn nats_durable_conformance() {
        let server = NatsServer::start();
        durable_conformance(broker(&server).await).await;
    }

    #[tokio::test]
    async fn nats_a_message_whose_handler_keeps_failing_goes_to_the_dead_letters() {
        let server = NatsServer::start();
        dead_letter_conformance(broker(&server).await).await;
    }

    #[tokio::test]
    async fn nats_a_dropped_durable_member_hands_over_what_it_holds() {
        let server = NatsServer::start();
        handover_conformance(broker(&server).await).await;
    }

    #[tokio::test]
    async fn a_handler_running_past_the_ack_wait_keeps_its_message() {
        let server = NatsServer::start();
        let broker = Arc::new(
            NatsBroker::connect(&server.address()).await.expect("connect").ack_wait(Duration::from_secs(1)),
        );
        let topic = format!("long.{:08x}", rand::random::<u32>());
        let group = SubscribeOptions::default().queue("slow").durable();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let slow = |tag: &'static str| {
            let tx = tx.clone();
            handler(move |m: Message| {
                let tx = tx.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    tx.send((tag, m)).map_err(Into::into)
                }
            })
        };
        let _a = broker.subscribe(&topic, group.clone(), slow("a")).await.expect("subscribe");
        let _b = broker.subscribe(&topic, group, slow("b")).await.expect("subscribe");
        broker.publish(Message::new(&topic, "long")).await.expect("publish");
        // Handled once: the server did not give it to the other member after 1 s.
        let got = collect(&mut rx, 1).await;
        assert_eq!(&got[0].1.body[..], b"long");
        assert!(
            tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.is_err(),
            "delivered again while its handler was still running"
        );
    }

    #[tokio::test]
    async fn a_restarted_server_loses_no_subscription_and_no_durable_message() {
        let mut server = NatsServer::start();
        let broker = broker(&server).await;
        let impatient = NatsBroker::connect(&server.address())
            .await
            .expect("connect")
            .publish_timeout(Duration::from_millis(500));
        restart_conformance(broker, Arc::new(impatient), &mut server).await;
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use super::*;
    use e2e::rabbitmq::RabbitMqServer;

    async fn broker(server: &RabbitMqServer) -> Arc<RabbitMqBroker> {
        Arc::new(RabbitMqBroker::connect(&server.address()).await.expect("connect to rabbitmq-server"))
    }

    #[tokio::test]
    async fn rabbitmq_conformance() {
        let broker = broker(RabbitMqServer::shared()).await;
        conformance(broker.clone(), async || {}).await;
        let nobody = Message::new(format!("nobody.{:08x}", rand::random::<u32>()), "x");
        broker.publish(nobody).await.expect("a topic no queue is bound to accepts the message");
    }

    #[tokio::test]
    async fn rabbitmq_connect_fails_clearly_without_a_server() {
        let port = e2e::free_port();
        let err = RabbitMqBroker::connect(&format!("127.0.0.1:{port}"))
            .await
            .err()
            .expect("nothing listens")
            .to_string();
        assert!(err.contains("rabbitmq") && err.contains(&port.to_string()), "{err}");
        let url = format!("amqp://user:secret@127.0.0.1:{port}/%2f");
        let err = RabbitMqBroker::connect(&url).await.err().expect("nothing listens").to_string();
        assert!(err.contains(&port.to_string()) && !err.contains("secret"), "{err}");
    }

    #[tokio::test]
    async fn rabbitmq_durable_conformance() {
        durable_conformance(broker(RabbitMqServer::shared()).await).await;
    }

    #[tokio::test]
    async fn rabbitmq_a_message_whose_handler_keeps_failing_goes_to_the_dead_letters() {
        dead_letter_conformance(broker(RabbitMqServer::shared()).await).await;
    }

    #[tokio::test]
    async fn rabbitmq_a_dropped_durable_member_hands_over_what_it_holds() {
        handover_conformance(broker(RabbitMqServer::shared()).await).await;
    }

    #[tokio::test]
    async fn a_durable_and_a_plain_member_cannot_share_a_group() {
        let broker = broker(RabbitMqServer::shared()).await;
        let topic = format!("mixed.{:08x}", rand::random::<u32>());
        let (tx, _rx) = mpsc::unbounded_channel();
        let failed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let durable = SubscribeOptions::default().queue("workers").durable();
        let _a = broker.subscribe(&topic, durable, failing_once("a", &tx, &failed)).await.expect("durable");
        let mixed = broker
            .subscribe(&topic, SubscribeOptions::default().queue("workers"), failing_once("d", &tx, &failed))
            .await;
        let err = mixed.unwrap_err().to_string();
        assert!(
            err.contains("rabbitmq") && err.contains(&topic) && err.contains("durable and a non-durable"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_restarted_server_loses_no_subscription_and_no_durable_message() {
        let mut server = RabbitMqServer::start();
        let broker = broker(&server).await;
        let impatient = RabbitMqBroker::connect(&server.address())
            .await
            .expect("connect")
            .publish_timeout(Duration::from_millis(500));
        restart_conformance(broker, Arc::new(impatient), &mut server).await;
    }
}
