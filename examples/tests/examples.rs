//! The examples as real processes against each other: over mDNS in the private namespace,
//! the one-line service on a real Consul agent with only environment variables, and a
//! greeting announced as an event that the one-line subscriber prints.

use std::{process::Command, time::Duration};

use e2e::{
    consul::ConsulAgent,
    discovery::{mdns, wait_for},
    process::{Process, binary},
    unique_name,
};
use micro_core::{
    broker::topic_service_name,
    config::{RegistryConfig, RegistryKind},
};

const GREETER_SERVER: &str = env!("CARGO_BIN_EXE_greeter-server");
const GREETER_CLIENT: &str = env!("CARGO_BIN_EXE_greeter-client");
const GREETER_LISTENER: &str = env!("CARGO_BIN_EXE_greeter-listener");
const VESSEL_FINDER: &str = env!("CARGO_BIN_EXE_vessel-finder");

/// Runs `program` with `args` and `env` to its end: (exit code, stdout, stderr).
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(program);
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap_or_else(|err| panic!("{program}: {err}"));
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn greeter_client_greets_through_greeter_server_over_mdns() {
    let registry = mdns();
    let name = unique_name("greeter");
    let _server =
        Process::spawn("greeter-server", Command::new(GREETER_SERVER), &[], &[("MICRO_SERVER_NAME", &name)]);
    wait_for(&registry, &name, 1).await;
    let (code, out, err) = run(GREETER_CLIENT, &["you", "--to", &name], &[]);
    assert_eq!((code, out.as_str()), (Some(0), "Hello, you!\n"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_one_line_service_started_with_an_argument_of_its_own_starts_and_uses_it() {
    let registry = mdns();
    let name = unique_name("greeter");
    let _server = Process::spawn(
        "greeter-server",
        Command::new(GREETER_SERVER),
        &["Howdy"],
        &[("MICRO_SERVER_NAME", &name)],
    );
    wait_for(&registry, &name, 1).await;
    let (code, out, err) = run(GREETER_CLIENT, &["you", "--to", &name], &[]);
    assert_eq!((code, out.as_str()), (Some(0), "Howdy, you!\n"), "{err}");
}

#[test]
fn help_of_the_one_line_service_says_what_it_is_and_starts_nothing() {
    let env = [("MICRO_REGISTRY", "memory"), ("MICRO_SERVER_ADDRESS", "127.0.0.1:0")];
    let (code, out, err) = run(GREETER_SERVER, &["--help"], &env);
    assert_eq!(code, Some(0), "{out}{err}");
    let first = out.lines().next().unwrap_or_default();
    let expected = format!(
        "greeter {}: a micro service (the program greeter-server) serving greeter.Greeter.",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(first, expected, "{out}");
    assert!(out.contains("MICRO_REGISTRY") && out.contains("\"memory\" (set)"), "{out}");
    assert!(out.contains("MICRO_BROKER "), "{out}");
    assert!(out.lines().count() < 120, "one line a variable: {out}");
    assert!(!err.contains("listening") && !err.contains("registered"), "started nothing: {err}");
}

#[test]
fn a_bad_variable_stops_the_one_line_service_naming_the_variable() {
    let (code, out, err) = run(GREETER_SERVER, &[], &[("MICRO_REGISTRY", "zookeeper")]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("zookeeper") && err.contains("MICRO_REGISTRY"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_announced_greeting_reaches_the_one_line_subscriber_on_the_default_broker() {
    let registry = mdns();
    let name = unique_name("greeter");
    let _server =
        Process::spawn("greeter-server", Command::new(GREETER_SERVER), &[], &[("MICRO_SERVER_NAME", &name)]);
    // Process::spawn picks the memory broker unless told otherwise.
    let default_broker = [("MICRO_BROKER", "registry")];
    let listener = Process::spawn("greeter-listener", Command::new(GREETER_LISTENER), &[], &default_broker);
    wait_for(&registry, &name, 1).await;
    // The listener subscribed before it registered, so once it is found it is listening.
    wait_for(&registry, &topic_service_name("greeter.greeted"), 1).await;
    let (code, out, err) = run(GREETER_CLIENT, &["eve", "--to", &name, "--announce"], &default_broker);
    assert_eq!((code, out.as_str()), (Some(0), "Hello, eve!\n"), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listener.log().contains("eve was greeted") {
        assert!(std::time::Instant::now() < deadline, "the listener printed no greeting: {}", listener.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn vessel_finder_finds_a_vessel_through_vessel_service_over_mdns() {
    let registry = mdns();
    let name = unique_name("vessel");
    let _vessel = Process::start("vessel-service", &[], &[("MICRO_SERVER_NAME", &name)]);
    wait_for(&registry, &name, 1).await;
    let args = ["--vessel-service", &name, "--capacity", "3", "--max-weight", "55000"];
    let (code, out, err) = run(VESSEL_FINDER, &args, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("vessel001 "), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_one_line_service_honours_consul_its_address_and_rust_log() {
    let agent = ConsulAgent::start();
    let address = agent.http_address();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let name = unique_name("greeter");
    let env = [
        ("MICRO_REGISTRY", "consul"),
        ("MICRO_REGISTRY_ADDRESS", address.as_str()),
        ("MICRO_SERVER_ADDRESS", listen.as_str()),
        ("MICRO_SERVER_NAME", name.as_str()),
        // Only the example's own debug lines: none of micro_core's info lines.
        ("RUST_LOG", "greeter_server=debug"),
    ];
    let server = Process::spawn("greeter-server", Command::new(GREETER_SERVER), &[], &env);

    let consul =
        RegistryConfig { kind: RegistryKind::Consul, address: Some(address.clone()), ..Default::default() };
    let registry = consul.connect().await.unwrap();
    let node = wait_for(&registry, &name, 1).await.remove(0);
    assert_eq!(node.address.to_string(), listen, "registered in Consul at MICRO_SERVER_ADDRESS");

    // `micro call` learns the types by reflection: the example gave its descriptor set.
    let micro = binary("micro");
    let call = ["call", &name, "greeter.Greeter/SayHello", r#"{"name": "consul"}"#];
    let consul_env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", address.as_str())];
    let (code, out, err) = run(micro.to_str().unwrap(), &call, &consul_env);
    assert_eq!(code, Some(0), "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["message"], "Hello, consul!");

    // RUST_LOG chose what is logged.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !server.log().contains("greeting") {
        assert!(std::time::Instant::now() < deadline, "no debug line of greeter_server: {}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !server.log().contains("registered"),
        "micro_core's info lines are filtered out: {}",
        server.log()
    );

    // The same client example reaches it through Consul too.
    let (code, out, err) = run(GREETER_CLIENT, &["consul", "--to", &name], &consul_env);
    assert_eq!((code, out.as_str()), (Some(0), "Hello, consul!\n"), "{err}");
}
