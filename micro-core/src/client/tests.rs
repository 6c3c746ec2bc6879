use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use test_proto::{
    echo::{Message, Reply, echo_client::EchoClient, echo_server::EchoServer},
    say,
};
use tonic::{Code, Request, Status};

use tokio::time::Instant;

use super::*;
use crate::{
    RunningServer, Server,
    config::{ClientConfig, Hedge, ServerConfig},
    registry::MemoryRegistry,
    registry::Node,
    selector::StrategyKind,
};

/// How a test server answers both of `echo.proto`'s methods.
#[tonic::async_trait]
trait Answer: Send + Sync + 'static {
    async fn answer(&self, request: Request<Message>) -> Result<tonic::Response<Reply>, Status>;
}

/// Serves `echo.Echo` with an [`Answer`].
struct Serve<A>(A);

#[tonic::async_trait]
impl<A: Answer> test_proto::echo::echo_server::Echo for Serve<A> {
    async fn say(&self, request: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        self.0.answer(request).await
    }

    async fn record(&self, request: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        self.0.answer(request).await
    }
}

/// A reply naming the instance that gave it.
fn reply_from(instance: impl Into<String>) -> Result<tonic::Response<Reply>, Status> {
    Ok(tonic::Response::new(Reply { text: String::new(), instance: instance.into() }))
}

/// `echo.proto`'s idempotent method.
const SAY: &str = "/echo.Echo/Say";

fn loopback_config() -> ServerConfig {
    ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() }
}

async fn start(registry: &MemoryRegistry, name: &str, label: &str) -> RunningServer {
    Server::builder(name)
        .config(loopback_config())
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(test_proto::Labelled::new(label)))
        .start()
        .await
        .unwrap()
}

async fn call(client: &mut EchoClient<NamedChannel>) -> Result<String, Status> {
    let reply = client.say(say("hello")).await?;
    Ok(reply.into_inner().instance)
}

async fn tally(client: &mut EchoClient<NamedChannel>, calls: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..calls {
        *counts.entry(call(client).await.unwrap()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_spreads_calls_evenly() {
    let registry = MemoryRegistry::new();
    let _servers = [
        start(&registry, "svc", "a").await,
        start(&registry, "svc", "b").await,
        start(&registry, "svc", "c").await,
    ];
    let config = ClientConfig { strategy: StrategyKind::RoundRobin, ..ClientConfig::default() };
    let client = Client::new(Arc::new(registry)).config(config);
    let mut vessels = EchoClient::new(client.channel("svc"));
    wait_for_instances(&client.channel("svc"), 3).await;
    let counts = tally(&mut vessels, 30).await;
    assert_eq!(counts, HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]));
}

#[tokio::test]
async fn channel_follows_instances_that_come_and_go() {
    let registry = MemoryRegistry::new();
    let first = start(&registry, "svc", "first").await;
    let config = ClientConfig { strategy: StrategyKind::RoundRobin, ..ClientConfig::default() };
    let client = Client::new(Arc::new(registry.clone())).config(config);
    let channel = client.channel("svc");
    let mut vessels = EchoClient::new(channel.clone());
    assert_eq!(call(&mut vessels).await.unwrap(), "first");

    let _second = start(&registry, "svc", "second").await;
    wait_for_instances(&channel, 2).await;
    assert_eq!(tally(&mut vessels, 4).await.len(), 2, "the new instance gets calls");

    first.stop().await.unwrap();
    wait_for_instances(&channel, 1).await;
    assert_eq!(tally(&mut vessels, 4).await, HashMap::from([("second".into(), 4)]));
}

#[tokio::test]
async fn unknown_name_fails_unavailable_within_the_lookup_timeout() {
    // A call that waited for its whole deadline would end `DEADLINE_EXCEEDED` instead.
    let client = Client::new(Arc::new(MemoryRegistry::new()))
        .lookup_timeout(Duration::from_millis(200))
        .request_timeout(Duration::from_secs(120));
    let mut vessels = EchoClient::new(client.channel("vessel-service"));
    let status = call(&mut vessels).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("vessel-service") && status.message().contains("memory"), "{status:?}");
}

#[tokio::test]
async fn instance_that_refuses_connections_is_named_in_the_error() {
    let registry = MemoryRegistry::new();
    let dead = Node::new("svc", "127.0.0.1:9".parse().unwrap());
    registry.register(&dead, Duration::from_secs(30)).await.unwrap();
    let client = Client::new(Arc::new(registry));
    let status = call(&mut EchoClient::new(client.channel("svc"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&dead.id) && status.message().contains("127.0.0.1:9"), "{status:?}");
}

async fn wait_for_instances(channel: &NamedChannel, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while channel.instances().len() != count {
        assert!(Instant::now() < deadline, "expected {count} instances, have {:?}", channel.instances());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Answers `UNAVAILABLE` and counts the calls it got.
struct Refusing(Arc<AtomicUsize>);

#[tonic::async_trait]
impl Answer for Refusing {
    async fn answer(&self, _: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable("overloaded"))
    }
}

/// Sleeps before answering.
struct Slow(Duration);

#[tonic::async_trait]
impl Answer for Slow {
    async fn answer(&self, _: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        tokio::time::sleep(self.0).await;
        reply_from("")
    }
}

/// Answers with the request id it saw, after asking `next` (when set) the same question.
struct Relay {
    next: Option<NamedChannel>,
}

#[tonic::async_trait]
impl Answer for Relay {
    async fn answer(&self, request: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        if let Some(next) = &self.next {
            return EchoClient::new(next.clone()).say(say("relayed")).await;
        }
        let seen = request
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        reply_from(seen)
    }
}

async fn start_with<S: Answer>(
    registry: &MemoryRegistry,
    name: &str,
    service: S,
    version: &str,
) -> RunningServer {
    Server::builder(name)
        .version(version)
        .config(loopback_config())
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(Serve(service)))
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn refused_connection_is_retried_elsewhere_and_the_instance_ejected() {
    let registry = MemoryRegistry::new();
    let dead = Node::new("svc", "127.0.0.1:9".parse().unwrap());
    registry.register(&dead, Duration::from_secs(30)).await.unwrap();
    let _live = start(&registry, "svc", "live").await;
    // No idempotent methods: only a request that never reached a server may be retried.
    let client = Client::new(Arc::new(registry));
    let channel = client.channel("svc");
    wait_for_instances(&channel, 2).await;
    let mut vessels = EchoClient::new(channel.clone());
    for _ in 0..10 {
        assert_eq!(call(&mut vessels).await.unwrap(), "live");
    }
    let pickable: Vec<String> = channel.pickable().into_iter().map(|n| n.id).collect();
    assert!(!pickable.contains(&dead.id), "the refusing instance should be ejected: {pickable:?}");
}

#[tokio::test]
async fn unavailable_after_sending_is_retried_only_when_idempotent() {
    let registry = MemoryRegistry::new();
    let refused = Arc::new(AtomicUsize::new(0));
    let _bad = start_with(&registry, "svc", Refusing(refused.clone()), "").await;
    let _good = start(&registry, "svc", "good").await;
    let plain = Client::new(Arc::new(registry.clone()))
        .config(ClientConfig { eject_after: 100, ..Default::default() });
    wait_for_instances(&plain.channel("svc"), 2).await;
    let vessels = EchoClient::new(plain.channel("svc"));
    let results: Vec<_> = futures::future::join_all((0..2).map(|_| {
        let mut v = vessels.clone();
        async move { call(&mut v).await }
    }))
    .await;
    let failures = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failures, 1, "the call to the refusing instance must not be resent: {results:?}");
    assert_eq!(refused.load(Ordering::SeqCst), 1);

    let idempotent = Client::new(Arc::new(registry)).idempotent_methods(test_proto::IDEMPOTENT_METHODS);
    let mut vessels = EchoClient::new(idempotent.channel("svc"));
    wait_for_instances(&idempotent.channel("svc"), 2).await;
    for _ in 0..6 {
        assert_eq!(call(&mut vessels).await.unwrap(), "good");
    }
}

#[tokio::test]
async fn deadline_ends_the_call_at_about_the_deadline() {
    let registry = MemoryRegistry::new();
    let _slow = start_with(&registry, "svc", Slow(Duration::from_secs(5)), "").await;
    let client = Client::new(Arc::new(registry)).request_timeout(Duration::from_millis(300));
    let mut vessels = EchoClient::new(client.channel("svc"));
    let started = Instant::now();
    // Past the deadline the call is not answered at all: the server would answer after 5 s.
    let status = call(&mut vessels).await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The client's words, whichever timer fired first (the server keeps the deadline too).
    assert!(status.message().contains("exceeded its 300ms deadline"), "{status:?}");
    assert!(elapsed >= Duration::from_millis(290), "ended before its deadline: {elapsed:?}");
}

#[tokio::test]
async fn version_filter_never_calls_another_version() {
    let registry = MemoryRegistry::new();
    let _v1 = start_with(&registry, "svc", Delayed::new("v1", Duration::ZERO), "1").await;
    let _v2 = start_with(&registry, "svc", Delayed::new("v2", Duration::ZERO), "2").await;
    let client = Client::new(Arc::new(registry));
    let channel = client.channel_with("svc", crate::selector::Filter::new().version("2"));
    wait_for_instances(&channel, 2).await;
    let counts = tally(&mut EchoClient::new(channel), 20).await;
    assert_eq!(counts, HashMap::from([("v2".into(), 20)]));
}

#[tokio::test]
async fn draining_instance_is_not_picked_while_it_still_serves() {
    let registry = MemoryRegistry::new();
    let config = ServerConfig { drain_delay: Duration::from_secs(5), ..loopback_config() };
    let leaving = Server::builder("svc")
        .config(config)
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(test_proto::Labelled::new("leaving")))
        .start()
        .await
        .unwrap();
    let _staying = start(&registry, "svc", "staying").await;
    let client = Client::new(Arc::new(registry));
    let channel = client.channel("svc");
    wait_for_instances(&channel, 2).await;
    let stopping = tokio::spawn(leaving.stop());
    // The server keeps serving for its whole drain delay, which bounds the wait.
    let deadline = Instant::now() + Duration::from_secs(5);
    while channel.pickable().len() != 1 {
        assert!(Instant::now() < deadline, "draining was not seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!stopping.is_finished(), "the draining server must still be serving");
    let counts = tally(&mut EchoClient::new(channel), 6).await;
    assert_eq!(counts, HashMap::from([("staying".into(), 6)]));
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn request_id_travels_across_hops() {
    let registry = MemoryRegistry::new();
    let client = Client::new(Arc::new(registry.clone()));
    let _back = start_with(&registry, "back", Relay { next: None }, "").await;
    let _front = start_with(&registry, "front", Relay { next: Some(client.channel("back")) }, "").await;
    let mut front = EchoClient::new(client.channel("front"));
    let mut request = Request::new(say("hello"));
    request.metadata_mut().insert("x-request-id", "order-42".parse().unwrap());
    let reply = front.say(request).await.unwrap();
    assert_eq!(reply.into_inner().instance, "order-42");
}

/// Answers with its label after a delay, counting the calls that reach it.
#[derive(Clone)]
struct Delayed {
    label: &'static str,
    delay: Duration,
    arrived: Arc<AtomicUsize>,
}

impl Delayed {
    fn new(label: &'static str, delay: Duration) -> Self {
        Delayed { label, delay, arrived: Arc::default() }
    }

    fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Answer for Delayed {
    async fn answer(&self, _: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        reply_from(self.label)
    }
}

#[tokio::test]
async fn a_reconfigured_clone_gets_a_channel_with_its_own_settings() {
    let registry = MemoryRegistry::new();
    let _slow = start_with(&registry, "svc", Delayed::new("slow", Duration::from_millis(300)), "1").await;
    let base = Client::new(Arc::new(registry));
    let mut patient = EchoClient::new(base.channel("svc"));
    assert_eq!(call(&mut patient).await.unwrap(), "slow");

    let mut hasty = EchoClient::new(base.clone().request_timeout(Duration::from_millis(100)).channel("svc"));
    let status = call(&mut hasty).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(call(&mut patient).await.unwrap(), "slow", "the first client keeps its settings");
}

#[tokio::test]
async fn the_registry_follower_ends_with_the_last_clone_of_its_channel() {
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    let client = Client::new(registry.clone());
    let before = Arc::strong_count(&registry);
    let channel = client.channel("svc");
    let copy = channel.clone();
    assert_eq!(Arc::strong_count(&registry), before + 1, "the follower holds the registry");
    drop(channel);
    tokio::task::yield_now().await;
    assert_eq!(Arc::strong_count(&registry), before + 1, "a clone still lives");
    drop(copy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&registry) > before {
        assert!(Instant::now() < deadline, "the follower outlived its channel");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let again = client.channel("svc");
    assert_eq!(Arc::strong_count(&registry), before + 1, "a new channel, with a new follower");
    drop(again);
}

fn hedging_client(registry: &MemoryRegistry, hedge: Hedge) -> Client {
    let config = ClientConfig { strategy: StrategyKind::RoundRobin, hedge, ..ClientConfig::default() };
    Client::new(Arc::new(registry.clone())).config(config)
}

#[tokio::test]
async fn an_idempotent_call_not_answered_in_time_is_hedged_to_another_instance() {
    let registry = MemoryRegistry::new();
    let slow = Delayed::new("slow", Duration::from_secs(3));
    let fast = Delayed::new("fast", Duration::ZERO);
    let _servers = [
        start_with(&registry, "svc", slow.clone(), "1").await,
        start_with(&registry, "svc", fast.clone(), "1").await,
    ];
    let client =
        hedging_client(&registry, Hedge::After(Duration::from_millis(50))).idempotent_methods(&[SAY]);
    let channel = client.channel("svc");
    wait_for_instances(&channel, 2).await;
    let mut vessels = EchoClient::new(channel);
    // Unhedged, a call sent to the slow instance would be answered by it, after 3 s.
    for _ in 0..4 {
        assert_eq!(call(&mut vessels).await.unwrap(), "fast");
    }
    assert!(slow.arrived() >= 1, "round robin sent the slow instance a first attempt");
}

#[tokio::test]
async fn a_call_that_may_not_be_sent_twice_is_never_hedged() {
    let registry = MemoryRegistry::new();
    let slow = Delayed::new("slow", Duration::from_millis(150));
    let fast = Delayed::new("fast", Duration::ZERO);
    let _servers = [
        start_with(&registry, "svc", slow.clone(), "1").await,
        start_with(&registry, "svc", fast.clone(), "1").await,
    ];
    let client = hedging_client(&registry, Hedge::After(Duration::from_millis(10)));
    let channel = client.channel("svc");
    wait_for_instances(&channel, 2).await;
    let mut vessels = EchoClient::new(channel);
    for _ in 0..6 {
        call(&mut vessels).await.unwrap();
    }
    assert_eq!((slow.arrived(), fast.arrived()), (3, 3), "each call reached one instance once");
}

#[tokio::test]
async fn a_hung_instance_costs_no_call_and_is_ejected() {
    let registry = MemoryRegistry::new();
    let hung = Delayed::new("hung", Duration::from_secs(3600));
    let _servers = [
        start_with(&registry, "svc", hung.clone(), "1").await,
        start_with(&registry, "svc", Delayed::new("a", Duration::ZERO), "1").await,
        start_with(&registry, "svc", Delayed::new("b", Duration::ZERO), "1").await,
    ];
    let client = Client::new(Arc::new(registry)).idempotent_methods(&[SAY]);
    let channel = client.channel("svc");
    wait_for_instances(&channel, 3).await;
    let mut vessels = EchoClient::new(channel.clone());
    // A call left on the hung instance would fail at its deadline.
    for _ in 0..60 {
        assert_ne!(call(&mut vessels).await.unwrap(), "hung");
    }
    assert!(hung.arrived() >= 1, "the hung instance was tried");
    let views = channel.inspect();
    let ejected: Vec<&str> =
        views.iter().filter(|v| v.ejected.is_some()).map(|v| v.node.id.as_str()).collect();
    assert_eq!(ejected.len(), 1, "the hung instance alone is ejected: {views:?}");
    assert!(hung.arrived() <= 10, "the hung instance kept getting calls: {}", hung.arrived());
}

#[tokio::test]
async fn the_default_strategy_sends_a_slow_instance_few_calls() {
    let registry = MemoryRegistry::new();
    // Fifty times slower: a busy machine adds tens of milliseconds to every answer, which
    // must not make the slow one look like the others.
    let slow = Delayed::new("slow", Duration::from_millis(250));
    let _servers = [
        start_with(&registry, "svc", slow.clone(), "1").await,
        start_with(&registry, "svc", Delayed::new("a", Duration::from_millis(5)), "1").await,
        start_with(&registry, "svc", Delayed::new("b", Duration::from_millis(5)), "1").await,
    ];
    let client = Client::new(Arc::new(registry)).idempotent_methods(&[SAY]);
    let channel = client.channel("svc");
    wait_for_instances(&channel, 3).await;
    let mut vessels = EchoClient::new(channel);
    let mut answered_by_slow = 0;
    for _ in 0..200 {
        answered_by_slow += usize::from(call(&mut vessels).await.unwrap() == "slow");
    }
    // What callers feel: few answers from the slow one. Its arrivals include the hedges that
    // fan out to it when a busy machine makes the fast ones late, so their bound is looser.
    assert!(answered_by_slow < 10, "the slow instance answered {answered_by_slow} of 200 calls");
    assert!(slow.arrived() < 34, "the slow instance got {} of 200 attempts", slow.arrived());
}

/// Answers at once with the text tonic's server gives a call that outlived its
/// `grpc-timeout`, as a handler of its own.
struct CancelsWithTimeoutText(Arc<AtomicUsize>);

#[tonic::async_trait]
impl Answer for CancelsWithTimeoutText {
    async fn answer(&self, _: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(Status::cancelled("Timeout expired"))
    }
}

#[tokio::test]
async fn a_handlers_cancelled_timeout_expired_is_its_answer_not_a_deadline() {
    let registry = MemoryRegistry::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let _server = start_with(&registry, "svc", CancelsWithTimeoutText(calls.clone()), "1").await;
    let client = Client::new(Arc::new(registry)).idempotent_methods(&[SAY]);
    let channel = client.channel("svc");
    let status = call(&mut EchoClient::new(channel.clone())).await.unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired", "the handler's own words reach the caller");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "an answer is not retried");
    assert!(channel.inspect().iter().all(|view| view.ejected.is_none()), "an answer ejects nobody");
}

/// Holds `Record` calls whose text is `hold` until released; answers the others at once.
struct Holding {
    arrived: tokio::sync::Semaphore,
    release: tokio::sync::Semaphore,
}

#[tonic::async_trait]
impl Answer for Arc<Holding> {
    async fn answer(&self, request: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        if request.get_ref().text == "hold" {
            self.arrived.add_permits(1);
            self.release.acquire().await.expect("open").forget();
        }
        reply_from("holding")
    }
}

/// One address whose connections can be sent away, as a server that rotates its
/// connections does: each generation of tonic server takes the connections accepted while
/// it is current; [`RotatingServer::rotate`] shuts the current one down gracefully (a
/// GOAWAY; calls in flight finish) and gives new connections to a fresh one.
struct RotatingServer {
    address: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    rotations: tokio::sync::mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RotatingServer {
    async fn start(answer: Arc<Holding>) -> RotatingServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (rotations, mut rotate) = tokio::sync::mpsc::unbounded_channel();
        let counted = accepted.clone();
        let task = tokio::spawn(async move {
            let mut generations = tokio::task::JoinSet::new();
            loop {
                let (connections, incoming) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<_>>();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tonic::transport::Server::builder()
                    .add_service(EchoServer::new(Serve(answer.clone())))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnboundedReceiverStream::new(incoming),
                        async move { stopped.await.unwrap_or(()) },
                    );
                generations.spawn(server);
                loop {
                    tokio::select! {
                        Ok((stream, _)) = listener.accept() => {
                            counted.fetch_add(1, Ordering::SeqCst);
                            let _ = connections.send(Ok(stream));
                        }
                        Some(()) = rotate.recv() => {
                            let _ = stop.send(());
                            break;
                        }
                    }
                }
            }
        });
        RotatingServer { address, accepted, rotations, task }
    }

    fn rotate(&self) {
        self.rotations.send(()).expect("the server runs");
    }
}

impl Drop for RotatingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_goaway_lets_calls_in_flight_finish_sends_new_ones_on_a_new_connection_and_ejects_nobody() {
    let registry = MemoryRegistry::new();
    let holding = Arc::new(Holding {
        arrived: tokio::sync::Semaphore::new(0),
        release: tokio::sync::Semaphore::new(0),
    });
    let server = RotatingServer::start(holding.clone()).await;
    let node = Node::new("goaway-svc", server.address);
    registry.register(&node, Duration::from_secs(30)).await.unwrap();
    // `Record` may not be sent twice: only a call the server refused may go again.
    let client = Client::new(Arc::new(registry));
    let channel = client.channel("goaway-svc");
    let mut echo = EchoClient::new(channel.clone());
    echo.record(say("first")).await.unwrap();
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);

    let mut held_echo = echo.clone();
    let held = tokio::spawn(async move { held_echo.record(say("hold")).await });
    let arrived = tokio::time::timeout(Duration::from_secs(5), holding.arrived.acquire()).await;
    arrived.expect("the held call reaches the server").unwrap().forget();
    server.rotate();

    // Calls go on while the first connection drains; each must succeed, and soon they
    // arrive on a second connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut calls_after = 0;
    while server.accepted.load(Ordering::SeqCst) < 2 || calls_after < 20 {
        assert!(Instant::now() < deadline, "no second connection after {calls_after} calls");
        echo.record(say("after")).await.expect("a call after the GOAWAY");
        calls_after += 1;
    }
    assert!(!held.is_finished(), "the call in flight is still held");
    holding.release.add_permits(1);
    let reply = tokio::time::timeout(Duration::from_secs(5), held).await.expect("the held call ends");
    reply.unwrap().expect("the call in flight when the GOAWAY came finishes");
    let views = channel.inspect();
    assert!(views.iter().all(|view| view.ejected.is_none()), "a GOAWAY ejects nobody: {views:?}");
}

#[tokio::test]
async fn the_attempt_series_of_an_instance_that_left_are_dropped() {
    let registry = MemoryRegistry::new();
    let name = "series-svc";
    let leaving = start(&registry, name, "leaving").await;
    let client = Client::new(Arc::new(registry.clone()));
    let channel = client.channel(name);
    let mut vessels = EchoClient::new(channel.clone());
    call(&mut vessels).await.unwrap();
    let node = channel.instances()[0].id.clone();
    let labels = crate::metrics::AttemptLabels { service: name.into(), node, result: "ok".into() };
    assert!(crate::metrics::metrics().client_attempts.get(&labels).is_some());

    leaving.stop().await.unwrap();
    wait_for_instances(&channel, 0).await;
    assert!(
        crate::metrics::metrics().client_attempts.get(&labels).is_none(),
        "the series outlived its instance"
    );
}

/// Holds every call until released; remembers the connections calls came on.
#[derive(Default)]
struct HoldCalls {
    held: AtomicUsize,
    peers: std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>,
    release: tokio::sync::Notify,
    released: std::sync::atomic::AtomicBool,
}

#[tonic::async_trait]
impl Answer for Arc<HoldCalls> {
    async fn answer(&self, request: Request<Message>) -> Result<tonic::Response<Reply>, Status> {
        self.peers.lock().unwrap().extend(request.remote_addr());
        self.held.fetch_add(1, Ordering::SeqCst);
        while !self.released.load(Ordering::SeqCst) {
            let notified = self.release.notified();
            if self.released.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        reply_from("held")
    }
}

/// Opened connections to the only instance of `channel`.
fn connections_opened(channel: &NamedChannel) -> usize {
    channel.core.endpoints.borrow().endpoints[0].connections.opened()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_in_flight_open_more_connections_up_to_the_limit_and_one_caller_keeps_one() {
    let registry = MemoryRegistry::new();
    let hold = Arc::new(HoldCalls::default());
    let _server = start_with(&registry, "svc", hold.clone(), "1.0.0").await;
    let client = Client::new(Arc::new(registry)).config(ClientConfig {
        connections: 3,
        hedge: Hedge::Off,
        request_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    });

    // One caller, one call at a time: one connection.
    let sequential = client.channel("svc");
    wait_for_instances(&sequential, 1).await;
    hold.released.store(true, Ordering::SeqCst);
    let mut one = EchoClient::new(sequential.clone());
    for _ in 0..20 {
        call(&mut one).await.unwrap();
    }
    assert_eq!(connections_opened(&sequential), 1);
    assert_eq!(hold.peers.lock().unwrap().len(), 1, "one connection carried them all");

    // 40 calls at once on a channel of their own: a connection per 8 in flight, at most 3.
    hold.released.store(false, Ordering::SeqCst);
    hold.held.store(0, Ordering::SeqCst);
    hold.peers.lock().unwrap().clear();
    let busy = client.channel("svc");
    wait_for_instances(&busy, 1).await;
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut echo = EchoClient::new(busy.clone());
            tokio::spawn(async move { call(&mut echo).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while hold.held.load(Ordering::SeqCst) < 40 {
        assert!(Instant::now() < deadline, "only {} calls arrived", hold.held.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(connections_opened(&busy), 3);
    assert_eq!(hold.peers.lock().unwrap().len(), 3, "three connections carried the calls");
    hold.released.store(true, Ordering::SeqCst);
    hold.release.notify_waiters();
    for call in calls {
        call.await.unwrap().expect("every held call answered");
    }
}

#[test]
fn connections_per_instance_are_checked() {
    for connections in [0, crate::config::MAX_CONNECTIONS + 1] {
        let config = ClientConfig { connections, ..ClientConfig::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("MICRO_CLIENT_CONNECTIONS"), "{err}");
    }
}
