//! `micro publish` and `micro subscribe` as real processes: over the default registry broker
//! on mDNS, a real nats-server and a real RabbitMQ; typed (`--type`/`--from`) into a prost
//! subscriber; queue groups; durable subscribers; dead letters read back and redelivered;
//! bad input that publishes nothing; exit codes.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use e2e::{
    discovery::{mdns, wait_for},
    nats::NatsServer,
    process::{Process, binary},
    rabbitmq::RabbitMqServer,
    unique_name,
};
use micro_core::{
    Client,
    broker::{
        Broker, Message, NatsBroker, RabbitMqBroker, RegistryBroker, SubscribeOptions, Subscription, handler,
        subscribe_proto, topic_service_name,
    },
};
use proto::consignment::Consignment;
use serde_json::Value;

/// How long a subscriber may take to subscribe, or a message to arrive.
const PATIENCE: Duration = Duration::from_secs(30);

/// `micro ARGS` with `env`, to completion: (exit code, stdout, stderr).
fn micro(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output =
        Command::new(binary("micro")).args(args).envs(env.iter().copied()).output().expect("micro runs");
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    (output.status.code(), text(output.stdout), text(output.stderr))
}

/// `micro publish` that must succeed; returns the message id it printed.
fn publish(args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = micro(&[&["publish"], args].concat(), env);
    assert_eq!(code, Some(0), "micro publish {args:?}: {out}{err}");
    let id = out.trim().to_owned();
    assert_eq!(out.lines().count(), 1, "one line, the id: {out:?}");
    id
}

/// A running `micro subscribe`, its stdout lines as they come; killed when dropped.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Subscriber {
    /// Starts `micro subscribe ARGS` and waits for its `subscribed to` line on stderr.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Subscriber {
        Subscriber::spawn(args, env, true)
    }

    /// As [`Subscriber::start`], with stdout a pipe whose reader is gone (`| head` done).
    fn start_into_closed_pipe(args: &[&str], env: &[(&str, &str)]) -> Subscriber {
        Subscriber::spawn(args, env, false)
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], read_stdout: bool) -> Subscriber {
        let mut child = Command::new(binary("micro"))
            .arg("subscribe")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("micro subscribe starts");
        let (sender, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        if read_stdout {
            std::thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|l| sender.send(l)));
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        let (subscribed, is_subscribed) = mpsc::channel();
        let reader = BufReader::new(child.stderr.take().expect("stderr"));
        let seen = stderr.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if line.starts_with("subscribed to ") {
                    let _ = subscribed.send(());
                }
                seen.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let subscriber = Subscriber { child, lines, stderr };
        if is_subscribed.recv_timeout(PATIENCE).is_err() {
            panic!("micro subscribe {args:?} did not subscribe: {}", subscriber.stderr());
        }
        subscriber
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit; returns its status and every line not yet read.
    fn wait(mut self) -> (ExitStatus, Vec<Value>) {
        let stderr = self.stderr();
        let status = wait_exit(&mut self.child, &stderr);
        let lines = self.lines.iter().map(|l| serde_json::from_str(&l).expect("one JSON line")).collect();
        (status, lines)
    }

    /// SIGTERM, then [`Subscriber::wait`].
    fn terminate(self) -> (ExitStatus, Vec<Value>) {
        let killed = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {}", self.child.id());
        self.wait()
    }
}

fn wait_exit(child: &mut Child, stderr: &str) -> ExitStatus {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "micro subscribe did not exit: {stderr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One publish with an id and a header reaches `micro subscribe --count 1`, printed as one
/// JSON line, and the subscriber exits 0; a second subscriber with a `--queue` each.
fn publish_reaches_subscribers(env: &[(&str, &str)]) {
    let topic = unique_name("greetings");
    let subscriber = Subscriber::start(&[&topic, "--count", "1"], env);
    let id =
        publish(&[&topic, r#"{"text": "hello", "n": [1, 2]}"#, "--id", "m-1", "--header", "who=test"], env);
    assert_eq!(id, "m-1");
    let (status, lines) = subscriber.wait();
    assert!(status.success(), "{status}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["topic"], topic.as_str(), "{line}");
    assert_eq!(line["message_id"], "m-1", "{line}");
    assert_eq!(line["headers"]["who"], "test", "{line}");
    assert_eq!(line["headers"]["content-type"], "application/json", "{line}");
    assert_eq!(line["body_json"]["text"], "hello", "{line}");
    assert_eq!(line["body_json"]["n"][1], 2, "{line}");

    let fresh = publish(&[&unique_name("nobody-listens"), "{}"], env);
    assert_eq!(fresh.len(), 32, "a fresh id is 32 hex digits: {fresh}");
}

/// Reads what `members` print until they have printed `total` lines between them, or
/// [`PATIENCE`] has passed; the lines of each member, in order.
fn read_lines_until(members: &[&Subscriber], total: usize) -> Vec<Vec<Value>> {
    let mut printed: Vec<Vec<Value>> = members.iter().map(|_| Vec::new()).collect();
    let deadline = std::time::Instant::now() + PATIENCE;
    while printed.iter().map(Vec::len).sum::<usize>() < total && std::time::Instant::now() < deadline {
        let mut any = false;
        for (member, lines) in members.iter().zip(&mut printed) {
            while let Ok(line) = member.lines.try_recv() {
                lines.push(serde_json::from_str(&line).expect("one JSON line"));
                any = true;
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    printed
}

/// Two `micro subscribe --queue` processes share one group: each message reaches one of them.
fn queue_members_get_each_message_once(env: &[(&str, &str)], in_registry: bool) {
    let topic = unique_name("work");
    let a = Subscriber::start(&[&topic, "--queue", "workers"], env);
    let b = Subscriber::start(&[&topic, "--queue", "workers"], env);
    if in_registry {
        // Both members are announced before the first publish looks them up.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async { wait_for(&mdns(), &topic_service_name(&topic), 2).await });
    }
    let sent: Vec<String> = (0..6)
        .map(|i| publish(&[&topic, &format!("{{\"job\": {i}}}"), "--id", &format!("job-{i}")], env))
        .collect();
    // A message still on its way at SIGTERM is lost on an at-most-once broker, so the group
    // is stopped only once it has printed as many lines as were sent.
    let mut printed = read_lines_until(&[&a, &b], sent.len());
    let (status_a, rest_a) = a.terminate();
    let (status_b, rest_b) = b.terminate();
    let lines_b: Vec<Value> = printed.pop().unwrap().into_iter().chain(rest_b).collect();
    let lines_a: Vec<Value> = printed.pop().unwrap().into_iter().chain(rest_a).collect();
    assert!(status_a.success() && status_b.success(), "SIGTERM ends both cleanly: {status_a} {status_b}");
    let mut received: Vec<String> =
        lines_a.iter().chain(&lines_b).map(|l| l["message_id"].as_str().unwrap().to_owned()).collect();
    received.sort();
    assert_eq!(received, sent, "each message once across the group: a {lines_a:?} b {lines_b:?}");
}

#[test]
fn publish_and_subscribe_on_the_registry_broker_over_mdns() {
    e2e::require_private_netns();
    publish_reaches_subscribers(&[]);
}

#[test]
fn queue_group_members_share_the_messages_on_the_registry_broker() {
    e2e::require_private_netns();
    queue_members_get_each_message_once(&[], true);
}

#[test]
fn publish_and_subscribe_on_nats() {
    e2e::require_private_netns();
    let server = NatsServer::start();
    let address = server.address();
    let env = [("MICRO_BROKER", "nats"), ("MICRO_BROKER_ADDRESS", address.as_str())];
    publish_reaches_subscribers(&env);
    queue_members_get_each_message_once(&env, false);
}

#[test]
fn a_durable_subscriber_on_nats_gets_what_was_published_while_it_was_away() {
    e2e::require_private_netns();
    let server = NatsServer::start();
    let address = server.address();
    durable_subscriber_gets_what_came_while_away(&[
        ("MICRO_BROKER", "nats"),
        ("MICRO_BROKER_ADDRESS", &address),
    ]);
}

#[test]
fn publish_and_subscribe_on_rabbitmq() {
    e2e::require_private_netns();
    let server = RabbitMqServer::start();
    let address = server.address();
    let env = [("MICRO_BROKER", "rabbitmq"), ("MICRO_BROKER_ADDRESS", address.as_str())];
    publish_reaches_subscribers(&env);
    queue_members_get_each_message_once(&env, false);
    durable_subscriber_gets_what_came_while_away(&env);
}

/// A `--durable --queue` subscriber's second run gets each message published while it was away.
fn durable_subscriber_gets_what_came_while_away(env: &[(&str, &str)]) {
    let topic = unique_name("orders");
    let durable = [topic.as_str(), "--queue", "keeper", "--durable", "--count", "1"];
    // The first run makes the consumer; then three messages while no one listens.
    let first = Subscriber::start(&durable, env);
    publish(&[&topic, r#"{"n": 0}"#, "--id", "n-0"], env);
    assert!(first.wait().0.success());
    for n in 1..=3 {
        publish(&[&topic, &format!("{{\"n\": {n}}}"), "--id", &format!("n-{n}")], env);
    }
    let again = [topic.as_str(), "--queue", "keeper", "--durable", "--count", "3"];
    let (status, lines) = Subscriber::start(&again, env).wait();
    assert!(status.success(), "{status}");
    let mut received: Vec<&str> = lines.iter().map(|l| l["message_id"].as_str().unwrap()).collect();
    received.sort_unstable();
    assert_eq!(received, ["n-1", "n-2", "n-3"], "what came while it was away, each once");
}

/// A group that gives up after 2 deliveries while its handler fails, then is mended.
struct Billing {
    mended: Arc<AtomicBool>,
    /// Failed attempts per message id.
    failures: Arc<Mutex<HashMap<String, u32>>>,
    handled: tokio::sync::mpsc::UnboundedReceiver<String>,
    _subscription: Subscription,
}

impl Billing {
    async fn subscribe(broker: &dyn Broker, topic: &str) -> Billing {
        let (mended, failures) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(HashMap::new())));
        let (done, handled) = tokio::sync::mpsc::unbounded_channel();
        let (mended_, failures_) = (mended.clone(), failures.clone());
        let ledger = handler(move |m: Message| {
            let id = m.id().unwrap_or("-").to_owned();
            let outcome = if mended_.load(Ordering::SeqCst) {
                done.send(id).map_err(Into::into)
            } else {
                *failures_.lock().unwrap().entry(id).or_insert(0) += 1;
                Err("the ledger is closed".into())
            };
            async move { outcome }
        });
        let limited = SubscribeOptions::default().queue("billing").durable().max_deliveries(2);
        let subscription = broker.subscribe(topic, limited, ledger).await.expect("subscribe");
        Billing { mended, failures, handled, _subscription: subscription }
    }

    /// Waits until each of `ids` failed twice, so went to the dead letters.
    async fn given_up(&self, ids: &[&str]) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !ids.iter().all(|id| self.failures.lock().unwrap().get(*id) == Some(&2)) {
            assert!(
                std::time::Instant::now() < deadline,
                "not given up: {:?}",
                self.failures.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `micro ARGS` on a blocking thread, as these async tests need.
async fn micro_async(args: Vec<String>, env: Vec<(&'static str, String)>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        micro(&args, &env)
    })
    .await
    .expect("micro runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_read_with_micro_subscribe_and_put_back_with_micro_redeliver() {
    e2e::require_private_netns();
    let nats = NatsServer::start();
    let brokers: [(&str, String, Arc<dyn Broker>); 2] = [
        ("nats", nats.address(), Arc::new(NatsBroker::connect(&nats.address()).await.expect("nats"))),
        (
            "rabbitmq",
            RabbitMqServer::shared().address(),
            Arc::new(RabbitMqBroker::connect(&RabbitMqServer::shared().address()).await.expect("rabbitmq")),
        ),
    ];
    for (kind, address, broker) in brokers {
        let topic = unique_name("payments");
        let mut billing = Billing::subscribe(&*broker, &topic).await;
        let env = vec![("MICRO_BROKER", kind.to_owned()), ("MICRO_BROKER_ADDRESS", address)];
        let run = |args: &[&str]| micro_async(args.iter().map(|a| a.to_string()).collect(), env.clone());

        let (code, _, err) = run(&["publish", &topic, r#"{"amount": 3}"#, "--id", "pay-1"]).await;
        assert_eq!(code, Some(0), "{kind}: {err}");
        let (code, out, err) = run(&["subscribe", &topic, "--dead-letters", "--count", "1"]).await;
        assert_eq!(code, Some(0), "{kind}: {err}");
        let dead: Value = serde_json::from_str(out.trim()).expect("one JSON line");
        assert_eq!(dead["message_id"], "pay-1", "{kind}: {dead}");
        assert_eq!(dead["topic"], format!("{topic}.dead"), "{kind}: {dead}");
        assert_eq!(dead["body_json"]["amount"], 3, "{kind}: {dead}");
        let headers = &dead["headers"];
        assert_eq!(headers["dead-letter-topic"], topic.as_str(), "{kind}: {dead}");
        assert_eq!(headers["dead-letter-group"], "billing", "{kind}: {dead}");
        assert_eq!(headers["delivery-count"], "2", "{kind}: {dead}");
        assert!(
            headers["dead-letter-error"].as_str().unwrap().contains("the ledger is closed"),
            "{kind}: {dead}"
        );

        // Two more given up on; the handler is mended; `micro redeliver` puts them back.
        for id in ["pay-2", "pay-3"] {
            let (code, _, err) = run(&["publish", &topic, r#"{"amount": 5}"#, "--id", id]).await;
            assert_eq!(code, Some(0), "{kind}: {err}");
        }
        billing.given_up(&["pay-2", "pay-3"]).await;
        billing.mended.store(true, Ordering::SeqCst);
        let (code, out, err) = run(&["redeliver", &topic, "--idle", "3s"]).await;
        assert_eq!(code, Some(0), "{kind}: {err}");
        let mut printed: Vec<&str> = out.lines().collect();
        printed.sort_unstable();
        assert_eq!(printed, ["pay-2", "pay-3"], "{kind}: {err}");
        assert!(err.contains("redelivered 2 dead letter(s)"), "{kind}: {err}");
        let mut handled = Vec::new();
        while handled.len() < 2 {
            let next = tokio::time::timeout(PATIENCE, billing.handled.recv()).await;
            handled.push(next.expect("redelivered in time").expect("billing runs"));
        }
        handled.sort();
        assert_eq!(handled, ["pay-2", "pay-3"], "{kind}: the mended group handled them");
        let (code, out, _) =
            run(&["subscribe", &topic, "--dead-letters", "--count", "1", "--timeout", "1s"]).await;
        assert_eq!((code, out.as_str()), (Some(7), ""), "{kind}: no dead letter is left");
    }
}

#[test]
fn without_enough_messages_the_timeout_exits_7_and_a_missing_broker_exits_6() {
    e2e::require_private_netns();
    let topic = unique_name("quiet");
    let (code, out, err) = micro(&["subscribe", &topic, "--count", "1", "--timeout", "300ms"], &[]);
    assert_eq!(code, Some(7), "{out}{err}");
    assert!(out.is_empty() && err.contains("0 of 1 message(s)") && err.contains(&topic), "{err}");

    let (code, _, err) = micro(&["subscribe", &topic, "--timeout", "200ms"], &[]);
    assert_eq!(code, Some(0), "without --count the timeout just ends it: {err}");

    let nowhere = format!("127.0.0.1:{}", e2e::free_port());
    let env = [("MICRO_BROKER", "nats"), ("MICRO_BROKER_ADDRESS", nowhere.as_str())];
    let (code, out, err) = micro(&["publish", &topic, "{}"], &env);
    assert_eq!(code, Some(6), "{out}{err}");
    assert!(out.is_empty() && err.contains("broker nats") && err.contains(&nowhere), "{err}");

    let closed = Subscriber::start_into_closed_pipe(&[&topic], &[]);
    // The publish may fail: the subscriber could not print it, so it did not acknowledge it.
    let _ = micro(&["publish", &topic, "{}"], &[]);
    let stderr = closed.stderr();
    let (status, _) = closed.wait();
    assert!(status.success(), "a closed stdout ends it quietly: {status} {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (code, _, err) = micro(&["subscribe", &topic, "--durable"], &[]);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("durabl"), "the registry broker keeps nothing: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_publish_reaches_a_prost_subscriber_and_bad_input_publishes_nothing() {
    let registry = mdns();
    let service = unique_name("shippy-types");
    let _types = Process::start("fault-server", &[], &[("FAULT_NAME", &service)]);
    wait_for(&registry, &service, 1).await;

    // A typed subscriber, as vessel-service has: subscribe_proto decodes a prost Consignment.
    let topic = unique_name("consignment.created");
    let broker = RegistryBroker::new(Client::new(registry.clone()));
    let (seen, mut consignments) = tokio::sync::mpsc::unbounded_channel();
    let _typed = subscribe_proto(
        &broker,
        &topic,
        SubscribeOptions::default().queue("typed"),
        move |c: Consignment, m| {
            let _ = seen.send((c, m.content_type().map(str::to_owned)));
            async { Ok(()) }
        },
    )
    .await
    .expect("typed subscriber");
    let (topic_, service_) = (topic.clone(), service.clone());
    let printer = tokio::task::spawn_blocking(move || {
        Subscriber::start(
            &[&topic_, "--count", "1", "--type", "consignment.Consignment", "--from", &service_],
            &[],
        )
    })
    .await
    .unwrap();
    wait_for(&registry, &topic_service_name(&topic), 2).await;

    let blocking = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || micro(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
    };
    let args = |extra: &[&str]| -> Vec<String> {
        ["publish", topic.as_str()].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    // Bad input: each a clear error, none published (the subscribers' first message is the good one).
    let (code, out, err) = blocking(args(&["{\"id\": "])).await.unwrap();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("message JSON") && err.contains("line 1"), "{err}");
    let (code, _, err) =
        blocking(args(&["{}", "--type", "consignment.Nope", "--from", &service])).await.unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("consignment.Nope") && err.contains(&service),
        "names the type and the service: {err}"
    );
    let (code, _, err) =
        blocking(args(&[r#"{"colour": "red"}"#, "--type", "consignment.Consignment", "--from", &service]))
            .await
            .unwrap();
    assert_eq!(code, Some(1), "{err}");
    for part in ["colour", "consignment.Consignment", service.as_str()] {
        assert!(err.contains(part), "{part}: {err}");
    }
    let (code, _, err) = blocking(args(&["{}", "--type", "consignment.Consignment"])).await.unwrap();
    assert_eq!(code, Some(2), "--type needs --from: {err}");

    let json = r#"{"id": "c-typed", "description": "typed", "weight": 550, "vessel_id": "vessel001", "containers": [{"id": "k1"}]}"#;
    let (code, out, err) =
        blocking(args(&[json, "--type", "consignment.Consignment", "--from", &service, "--id", "c-typed"]))
            .await
            .unwrap();
    assert_eq!((code, out.trim()), (Some(0), "c-typed"), "{err}");

    let (consignment, content_type) = tokio::time::timeout(PATIENCE, consignments.recv())
        .await
        .expect("the typed subscriber got it")
        .unwrap();
    assert_eq!((consignment.id.as_str(), consignment.weight), ("c-typed", 550));
    assert_eq!((consignment.vessel_id.as_str(), consignment.containers.len()), ("vessel001", 1));
    assert_eq!(content_type.as_deref(), Some("application/protobuf"));

    let (status, lines) = tokio::task::spawn_blocking(move || printer.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["message_id"], "c-typed", "{line}");
    assert_eq!(line["body_proto"]["id"], "c-typed", "decoded by --type: {line}");
    assert_eq!(line["body_proto"]["vesselId"], "vessel001", "{line}");
    assert!(consignments.try_recv().is_err(), "nothing else was published");
}
