//! The SDK's client against a gRPC server it did not write: Python's grpcio (gRPC C-core,
//! Debian's `python3-grpcio`, installed by `scripts/install-test-deps`), serving echo.proto
//! from `tests/interop/echo_server.py` with gRPC's default keepalive policy: a ping without
//! calls allowed every 5 minutes, GOAWAY `too_many_pings` after two strikes.
//!
//! Each reply names the connection it came on (the server's `context.peer()`), so the tests
//! see whether calls kept one connection. The other way round, a grpcio client
//! (`tests/interop/echo_client.py`) finds an SDK server by name in a real Consul agent and
//! calls it.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use micro_core::{Client, NamedChannel, Node, Registry, registry::MemoryRegistry};
use test_proto::{echo::echo_client::EchoClient, say};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};
use tonic::Code;

/// How long the connection is watched, idle between calls.
const WATCHED: Duration = Duration::from_secs(30);
/// The pause between two calls: the connection is idle meanwhile.
const CALL_EVERY: Duration = Duration::from_secs(8);
/// The Python interpreter with grpcio: `INTEROP_PYTHON`, else Debian's.
const DEFAULT_PYTHON: &str = "/usr/bin/python3";

/// The interpreter, once it is known to import grpc.
fn python() -> String {
    let python = std::env::var("INTEROP_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.into());
    let has_grpc = std::process::Command::new(&python).args(["-c", "import grpc"]).output();
    assert!(
        has_grpc.is_ok_and(|out| out.status.success()),
        "{python} cannot import grpc: apt-get install python3-grpcio (scripts/install-test-deps does)"
    );
    python
}

/// A running `echo_server.py`, killed when dropped; its stderr (C-core's keepalive trace)
/// goes to a log file.
struct PythonServer {
    address: std::net::SocketAddr,
    log: PathBuf,
    _child: Child,
}

impl PythonServer {
    async fn start() -> PythonServer {
        let python = python();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/echo_server.py");
        let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-logs");
        std::fs::create_dir_all(&logs).expect("a log folder");
        let log = logs.join(format!("grpcio-{}.log", std::process::id()));
        let mut child = Command::new(&python)
            .arg(&script)
            .env("GRPC_VERBOSITY", "debug")
            .env("GRPC_TRACE", "http_keepalive")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("python starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the grpcio server starts within 30 s")
            .expect("its stdout")
            .expect("a line");
        let port: u16 = line.trim_start_matches("listening on ").parse().expect("listening on PORT");
        PythonServer { address: ([127, 0, 0, 1], port).into(), log, _child: child }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn channel_to(server: &PythonServer) -> NamedChannel {
    let registry = MemoryRegistry::new();
    registry.register(&Node::new("py-echo", server.address), Duration::from_secs(300)).await.unwrap();
    let client = Client::new(Arc::new(registry)).idempotent_methods(test_proto::IDEMPOTENT_METHODS);
    client.channel("py-echo")
}

/// The connection each reply names.
async fn peer(echo: &mut EchoClient<NamedChannel>) -> String {
    echo.say(say("ping")).await.expect("no call fails").into_inner().instance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_to_a_grpcio_server_lives_through_idle_and_busy_periods() {
    let server = PythonServer::start().await;
    let mut echo = EchoClient::new(channel_to(&server).await);
    let started = Instant::now();
    let mut peers = vec![peer(&mut echo).await];
    while started.elapsed() < WATCHED {
        // Idle: no call in flight, so no ping may go.
        tokio::time::sleep(CALL_EVERY).await;
        // Busy: a burst of calls.
        for _ in 0..50 {
            peers.push(peer(&mut echo).await);
        }
    }
    peers.dedup();
    let log = server.log();
    assert_eq!(peers.len(), 1, "calls came on new connections: {peers:?}; server log:\n{log}");
    let lower = log.to_lowercase();
    assert!(!lower.contains("too_many_pings") && !lower.contains("goaway"), "server log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_servers_status_codes_and_the_callers_deadline_are_understood() {
    let server = PythonServer::start().await;
    let mut echo = EchoClient::new(channel_to(&server).await);
    let mut failing = say("refuse");
    failing.fail = true;
    let status = echo.say(failing).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "asked to fail");

    let mut slow = tonic::Request::new(test_proto::echo::Message { delay_ms: 3_000, ..say("slow") });
    slow.set_timeout(Duration::from_millis(300));
    let status = echo.say(slow).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_finds_an_sdk_server_by_name_and_understands_its_codes_and_deadlines() {
    use micro_core::{
        Server,
        config::{RegistryConfig, RegistryKind, ServerConfig},
    };
    let agent = e2e::consul::ConsulAgent::start_async().await;
    let consul = agent.http_address();
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(consul.clone()),
        ..RegistryConfig::default()
    };
    let registry: Arc<dyn Registry> = config.connect().await.expect("the consul agent");
    let name = e2e::unique_name("rust-echo");
    let _server = Server::builder(&name)
        .config(ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() })
        .registry(registry.clone())
        .add_service(test_proto::echo::echo_server::EchoServer::new(test_proto::Labelled::new("rust")))
        .start()
        .await
        .expect("the SDK server starts");
    e2e::discovery::wait_for(&registry, &name, 1).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/echo_client.py");
    let output =
        Command::new(python()).arg(&script).args([&consul, &name]).output().await.expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "echo_client.py failed:\n{stdout}\n{stderr}");
    let answers: Vec<serde_json::Value> =
        stdout.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect();
    let answer = |call: &str| answers.iter().find(|a| a["call"] == call).cloned().unwrap_or_default();
    assert_eq!(answer("plain")["text"], "from python", "{stdout}");
    assert_eq!(answer("plain")["instance"], "rust", "{stdout}");
    assert_eq!(answer("fail")["code"], "FAILED_PRECONDITION", "{stdout}");
    assert_eq!(answer("slow")["code"], "DEADLINE_EXCEEDED", "{stdout}");
}
