//! `micro call` and `micro gateway` against servers that serve only
//! `grpc.reflection.v1alpha`, as grpc-go and Python's grpcio servers deployed before 2023 do:
//! a plain tonic server of the test's own (echo.proto, tonic-reflection's v1alpha service,
//! no v1), and grpc-go 1.33 (`e2e::interop::GoServer`), each registered in a real Consul
//! agent; `micro` runs as a real process.

use std::{process::Command, sync::Arc, time::Duration};

use e2e::{consul::ConsulAgent, discovery::wait_for, process::Process, unique_name};
use micro_core::{
    Node, Registry,
    config::{RegistryConfig, RegistryKind},
};
use test_proto::{Labelled, echo::echo_server::EchoServer};

const MICRO: &str = env!("CARGO_BIN_EXE_micro");

/// A tonic server of echo.proto with reflection v1alpha only, stopped when dropped.
struct V1AlphaServer {
    address: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl V1AlphaServer {
    async fn start() -> V1AlphaServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the echo descriptors");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(EchoServer::new(Labelled::new("alpha")))
            .add_service(reflection)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                stopped.await.unwrap_or(())
            });
        tokio::spawn(server);
        V1AlphaServer { address, _stop: stop }
    }
}

fn micro(agent: &str, args: &[&str]) -> std::process::Output {
    Command::new(MICRO)
        .args(args)
        .env("MICRO_REGISTRY", "consul")
        .env("MICRO_REGISTRY_ADDRESS", agent)
        .env_remove("RUST_LOG")
        .output()
        .expect("micro runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_call_and_the_gateway_reach_a_server_with_only_reflection_v1alpha() {
    let agent = ConsulAgent::start_async().await;
    let address = agent.http_address();
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(address.clone()),
        ..RegistryConfig::default()
    };
    let registry: Arc<dyn Registry> = config.connect().await.expect("the consul agent");
    let server = V1AlphaServer::start().await;
    let name = unique_name("alpha");
    // Registered once, without heartbeats: a TTL that outlasts the test on a busy machine.
    registry.register(&Node::new(&name, server.address), Duration::from_secs(900)).await.unwrap();
    wait_for(&registry, &name, 1).await;

    let called = tokio::task::block_in_place(|| {
        micro(&address, &["call", &name, "echo.Echo/Say", r#"{"text": "over v1alpha"}"#])
    });
    let (stdout, stderr) = (text(&called.stdout), text(&called.stderr));
    assert!(called.status.success(), "micro call failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("over v1alpha") && stdout.contains("alpha"), "{stdout}");

    let env = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", address.as_str())];
    let gateway = Process::start("micro", &["gateway", "--address", "127.0.0.1:0"], &env);
    let url = e2e::gateway::url_of(&gateway).await;
    let http = reqwest::Client::new();
    // Generous: the service's registration, then the gateway's next listing, on a busy machine.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let reply = loop {
        let response = http
            .post(format!("{url}/{name}/echo.Echo/Say"))
            .body(r#"{"text": "through the gateway"}"#)
            .send()
            .await
            .expect("the gateway answers");
        let (status, body) = (response.status(), response.text().await.expect("a body"));
        // Until the gateway's registry listing has the name, it answers 404.
        if status != reqwest::StatusCode::NOT_FOUND || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(e2e::calls::POLL_EVERY).await;
    };
    assert_eq!(reply.0, reqwest::StatusCode::OK, "{}", reply.1);
    assert!(reply.1.contains("through the gateway") && reply.1.contains("alpha"), "{}", reply.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_call_reaches_a_grpc_go_server_through_its_reflection_v1alpha() {
    let agent = ConsulAgent::start_async().await;
    let address = agent.http_address();
    let config = RegistryConfig {
        kind: RegistryKind::Consul,
        address: Some(address.clone()),
        ..RegistryConfig::default()
    };
    let registry: Arc<dyn Registry> = config.connect().await.expect("the consul agent");
    let server = e2e::interop::GoServer::start().await;
    let name = unique_name("go-health");
    // Registered once, without heartbeats: a TTL that outlasts the test on a busy machine.
    registry.register(&Node::new(&name, server.address), Duration::from_secs(900)).await.unwrap();
    wait_for(&registry, &name, 1).await;

    let called = tokio::task::block_in_place(|| {
        micro(&address, &["call", &name, "grpc.health.v1.Health/Check", "{}"])
    });
    let (stdout, stderr) = (text(&called.stdout), text(&called.stderr));
    assert!(called.status.success(), "micro call failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("SERVING"), "{stdout}");
}
