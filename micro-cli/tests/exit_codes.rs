//! Every exit code `micro` documents, each caused by a real situation: a real Consul dev
//! agent, a real vessel-service process, a sidecar registration pointing at a closed port,
//! and a server in this process that serves no reflection. Also: typo suggestions in every
//! command that takes a name, answered at once; no panic when stdout is a closed pipe.

use std::{
    process::{Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use e2e::{consul::ConsulAgent, discovery::wait_for, process::Process, unique_name};
use micro_core::{
    Registry, Server,
    config::{RegistryConfig, RegistryKind},
};

const MICRO: &str = env!("CARGO_BIN_EXE_micro");

/// `micro ARGS` against the agent, with `env` added; waits for it to exit.
fn micro(agent: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let started = Instant::now();
    let mut command = Command::new(MICRO);
    command
        .args(args)
        .env("MICRO_REGISTRY", "consul")
        .env("MICRO_REGISTRY_ADDRESS", agent)
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("micro runs");
    eprintln!("micro {args:?}: {:?} in {:?}", output.status.code(), started.elapsed());
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32, stderr_has: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stdout:\n{}\nstderr:\n{stderr}", text(&output.stdout));
    assert!(stderr.contains(stderr_has), "expected {stderr_has:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

async fn consul(agent: &ConsulAgent) -> Arc<dyn Registry> {
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(agent.http_address()),
        ..RegistryConfig::default()
    };
    config.connect().await.expect("consul registry")
}

/// A loopback port that nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_exit_code_is_caused_by_its_situation() {
    let agent = ConsulAgent::start();
    let address = agent.http_address();
    let addr = address.as_str();
    let registry = consul(&agent).await;
    let consul_env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", addr)];

    // A serving vessel-service.
    let vessels = unique_name("vessels");
    let mut env = consul_env.to_vec();
    env.push(("MICRO_SERVER_NAME", &vessels));
    let _vessel = Process::start("vessel-service", &[], &env);
    wait_for(&registry, &vessels, 1).await;

    // A sidecar registration of a port where nothing listens: found, but not serving. Its
    // TTL and heartbeat come from the environment.
    let sidecar = unique_name("sidecar");
    let port = closed_port().to_string();
    let target = format!("127.0.0.1:{port}");
    let mut env = consul_env.to_vec();
    env.extend([("MICRO_REGISTER_TTL", "10"), ("MICRO_REGISTER_INTERVAL", "3")]);
    let register =
        Process::spawn("micro-register", Command::new(MICRO), &["register", &sidecar, &target], &env);
    wait_for(&registry, &sidecar, 1).await;
    // The line comes just after the registration is made.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !register.log().contains("TTL 10 s, heartbeat every 3 s") {
        assert!(Instant::now() < deadline, "{}", register.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let checks = e2e_http_get(addr, "/v1/agent/checks");
    assert!(
        checks.contains(&format!("\"ServiceName\": \"{sidecar}\"")) && checks.contains("\"Type\": \"ttl\""),
        "{checks}"
    );

    // A server that serves no reflection for its service.
    let bare = unique_name("bare");
    let fleet = vessel_service::VesselHandler::new(
        vessel_service::Fleet::default(),
        std::sync::Arc::new(vessel_service::store::SqliteStore::in_memory().unwrap()),
    );
    let running = Server::builder(&bare)
        .registry(registry.clone())
        .config(micro_core::config::ServerConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .add_service(proto::vessel::vessel_service_server::VesselServiceServer::new(fleet))
        .start()
        .await
        .expect("bare server starts");
    wait_for(&registry, &bare, 1).await;

    // 0: found and serving.
    assert_exit(&micro(addr, &["health", &vessels], &[]), 0, "");
    let find = ["call", &vessels, "vessel.VesselService/FindAvailable"];
    let ok = micro(addr, &[&find[..], &[r#"{"capacity": 3, "max_weight": 55000}"#]].concat(), &[]);
    assert_exit(&ok, 0, "");
    assert!(text(&ok.stdout).contains("vessel001"), "{}", text(&ok.stdout));

    // 1: bad input.
    assert_exit(&micro(addr, &[&find[..], &["{not json"]].concat(), &[]), 1, "request JSON");

    // 2: usage.
    assert_exit(&micro(addr, &["describe", &vessels, "--no-such-flag"], &[]), 2, "--no-such-flag");

    // 3: not found, with the registered name for a one-letter typo, in every command that
    // takes a name, without waiting for the look-up timeout (set to 10 minutes here, so a
    // command that waited for it is caught by a generous bound).
    let typo = vessels.replacen("vessels", "vesels", 1);
    for command in ["describe", "health", "call", "why"] {
        let mut args = vec![command, &typo];
        if command == "call" {
            args.push("vessel.VesselService/FindAvailable");
        }
        let started = Instant::now();
        let output = micro(addr, &args, &[("MICRO_LOOKUP_TIMEOUT", "600000")]);
        let hint = format!("did you mean {vessels}?");
        let shown = if command == "why" { text(&output.stdout) } else { text(&output.stderr) };
        assert_eq!(output.status.code(), Some(3), "{command}: {shown}{}", text(&output.stderr));
        assert!(shown.contains(&hint), "{command}: {shown}");
        assert!(started.elapsed() < Duration::from_secs(60), "{command} took {:?}", started.elapsed());
    }
    // watch keeps watching the name asked for (it may come), with the suggestion.
    let watch = Process::spawn("micro-watch", Command::new(MICRO), &["watch", &typo], &consul_env);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !watch.log().contains(&format!("did you mean {vessels}?")) {
        assert!(Instant::now() < deadline, "{}", watch.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(watch);
    let output = micro(addr, &["wait", &typo], &[("MICRO_LOOKUP_TIMEOUT", "300")]);
    assert_exit(&output, 3, &format!("did you mean {vessels}?"));
    let output = micro(addr, &["describe", "no-such-service"], &[("MICRO_LOOKUP_TIMEOUT", "300")]);
    assert_exit(&output, 3, "no instance of no-such-service in registry consul");

    // 4: found but not serving; health says what it saw.
    let output = micro(addr, &["health", &sidecar], &[]);
    assert_exit(&output, 4, "but none is SERVING");
    assert!(text(&output.stderr).contains("UNREACHABLE"), "{}", text(&output.stderr));
    assert_exit(&micro(addr, &["why", &sidecar], &[]), 4, "none is pickable");
    // describe only describes: 0.
    assert_exit(&micro(addr, &["describe", &sidecar], &[]), 0, "");

    // 5: registry unreachable.
    let nowhere = format!("127.0.0.1:{}", closed_port());
    let output = micro(&nowhere, &["describe", &vessels], &[]);
    assert_exit(&output, 5, "consul");

    // 64 + code: the call failed. FAILED_PRECONDITION (9) from the service …
    let output = micro(addr, &[&find[..], &[r#"{"capacity": 9999, "max_weight": 1}"#]].concat(), &[]);
    assert_exit(&output, 64 + 9, "FAILED_PRECONDITION");
    // … UNAVAILABLE (14) from an instance nothing listens on …
    let output = micro(addr, &["call", &sidecar, "vessel.VesselService/FindAvailable"], &[]);
    assert_exit(&output, 64 + 14, "UNAVAILABLE");
    // … NOT_FOUND (5) from reflection that does not know the service, saying what to add.
    let output = micro(addr, &["call", &bare, "vessel.VesselService/FindAvailable"], &[]);
    assert_exit(&output, 64 + 5, ".file_descriptor_set(");

    // Consul's own entry is not a gRPC service: not shown as UNREACHABLE.
    let output = micro(addr, &["describe", "consul"], &[]);
    assert_exit(&output, 0, "");
    assert!(!text(&output.stdout).contains("UNREACHABLE"), "{}", text(&output.stdout));
    assert!(text(&output.stdout).contains("Consul's own entry"), "{}", text(&output.stdout));

    running.stop().await.expect("bare server stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_stdout_ends_every_printing_command_quietly() {
    let agent = ConsulAgent::start();
    let address = agent.http_address();
    let addr = address.as_str();
    let registry = consul(&agent).await;
    let name = unique_name("vessels");
    let env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", addr), ("MICRO_SERVER_NAME", &name)];
    let _vessel = Process::start("vessel-service", &[], &env);
    wait_for(&registry, &name, 1).await;

    let find = r#"{"capacity": 3, "max_weight": 55000}"#;
    let commands: Vec<Vec<&str>> = vec![
        vec!["services"],
        vec!["services", "--output", "json"],
        vec!["describe", &name],
        vec!["describe", &name, "--output", "json"],
        vec!["health", &name],
        vec!["call", &name, "vessel.VesselService/FindAvailable", find],
        vec!["why", &name],
        vec!["why", &name, "--output", "json"],
        vec!["watch", &name],
        vec!["watch"],
        vec!["config"],
        vec!["--help"],
    ];
    for args in commands {
        // Like `micro … | head -0`: the reader is gone before the first line is written.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut command = Command::new(MICRO);
        command
            .args(&args)
            .env("MICRO_REGISTRY", "consul")
            .env("MICRO_REGISTRY_ADDRESS", addr)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped());
        let output = command.output().unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "micro {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "micro {args:?}: {stderr}");
    }

    // Through a real `head -1`, as a script would.
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; \"{MICRO}\" describe {name} --output json | head -1"))
        .env("MICRO_REGISTRY", "consul")
        .env("MICRO_REGISTRY_ADDRESS", addr)
        .output()
        .unwrap();
    assert!(
        output.status.success() && !text(&output.stderr).contains("panicked"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(text(&output.stdout), "[\n");
}

#[test]
fn an_empty_registry_is_said_not_silent() {
    let output = Command::new(MICRO).args(["services"]).env("MICRO_REGISTRY", "memory").output().unwrap();
    assert_exit(&output, 0, "no services registered in registry memory");
    assert!(output.stdout.is_empty(), "stdout stays a clean list: {}", text(&output.stdout));
    let output = Command::new(MICRO).arg("--version").output().unwrap();
    assert_eq!(text(&output.stdout).trim(), format!("micro {}", env!("CARGO_PKG_VERSION")));
}

/// GET `path` from the Consul agent at `address` over plain HTTP/1.0; the body.
fn e2e_http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}
