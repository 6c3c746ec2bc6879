//! A server leaves nothing running behind it: dropped, stopped, or failing half-way through
//! its start; and a user label cannot claim a label the SDK reserves.

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use e2e::calls::poll_until;
use micro_core::{
    Error, Registry, RunningServer, Server,
    config::ServerConfig,
    labels,
    registry::{ConsulRegistry, MemoryRegistry},
};
use test_proto::{Labelled, echo::echo_server::EchoServer};

/// A loopback address nothing listens on (the port was free a moment ago).
fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Whether something accepts connections at `address`.
async fn listening(address: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(address).await.is_ok()
}

fn config() -> ServerConfig {
    ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        metrics_address: Some("127.0.0.1:0".parse().unwrap()),
        register_ttl: Duration::from_secs(5),
        register_interval: Duration::from_millis(100),
        ..ServerConfig::default()
    }
}

async fn start(
    registry: Arc<dyn Registry>,
    name: &str,
    config: ServerConfig,
) -> micro_core::Result<RunningServer> {
    Server::builder(name)
        .config(config)
        .registry(registry)
        .add_service(EchoServer::new(Labelled::new("a")))
        .start()
        .await
}

#[tokio::test]
async fn dropping_a_running_server_deregisters_it_and_stops_everything_it_started() {
    let registry = MemoryRegistry::new();
    let server = start(Arc::new(registry.clone()), "dropped", config()).await.unwrap();
    let (grpc, metrics) = (server.local_addr(), server.metrics_addr().expect("metrics are served"));
    assert!(listening(grpc).await && listening(metrics).await);
    assert_eq!(registry.lookup("dropped").await.unwrap().len(), 1);

    drop(server);
    assert!(registry.lookup("dropped").await.is_err(), "deregistered as it is dropped");
    poll_until("the gRPC listener closing", Duration::from_secs(2), async || {
        (!listening(grpc).await).then_some(())
    })
    .await;
    poll_until("the metrics endpoint closing", Duration::from_secs(2), async || {
        (!listening(metrics).await).then_some(())
    })
    .await;
    // Several heartbeat intervals later, no heartbeat has registered it again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(registry.lookup("dropped").await.is_err(), "a heartbeat outlived the dropped server");
}

#[tokio::test]
async fn stop_closes_the_metrics_endpoint_with_the_server() {
    let registry = Arc::new(MemoryRegistry::new());
    let server =
        start(registry, "stopped", ServerConfig { drain_delay: Duration::ZERO, ..config() }).await.unwrap();
    let metrics = server.metrics_addr().expect("metrics are served");
    assert!(listening(metrics).await);
    server.stop().await.unwrap();
    assert!(!listening(metrics).await, "the metrics endpoint outlived its server");
}

#[tokio::test]
async fn a_taken_metrics_port_is_its_own_error_and_leaves_nothing_behind() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken.local_addr().unwrap();
    let grpc = free_address();
    let registry = MemoryRegistry::new();
    let config = ServerConfig { address: grpc, metrics_address: Some(metrics), ..config() };
    let err =
        start(Arc::new(registry.clone()), "metrics-taken", config).await.err().expect("the port is taken");
    assert!(matches!(err, Error::MetricsBind { address, .. } if address == metrics), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&metrics.to_string()) && text.contains("MICRO_METRICS_ADDRESS"), "{text}");
    assert!(!text.contains("MICRO_SERVER_ADDRESS"), "{text}");
    assert!(TcpListener::bind(grpc).is_ok(), "the gRPC listener outlived the failed start");
    assert!(registry.lookup("metrics-taken").await.is_err());
}

#[tokio::test]
async fn a_failed_registration_leaves_no_listener_and_no_metrics_endpoint() {
    let nowhere = free_address();
    let consul = ConsulRegistry::builder().address(nowhere.to_string()).build().unwrap();
    let (grpc, metrics) = (free_address(), free_address());
    let config = ServerConfig { address: grpc, metrics_address: Some(metrics), ..config() };
    let err = start(Arc::new(consul), "unregistered", config).await.err().expect("no agent listens");
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    assert!(TcpListener::bind(grpc).is_ok(), "the gRPC listener outlived the failed start");
    assert!(TcpListener::bind(metrics).is_ok(), "the metrics endpoint outlived the failed start");
}

#[tokio::test]
async fn a_user_label_cannot_claim_a_reserved_one() {
    for label in [labels::HEALTH, labels::TLS, labels::METRICS, labels::DRAINING] {
        let registry = MemoryRegistry::new();
        let err = Server::builder("labelled")
            .config(ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() })
            .metadata(label, "grpc")
            .registry(Arc::new(registry.clone()))
            .start()
            .await
            .err()
            .unwrap_or_else(|| panic!("the reserved label {label:?} was accepted"));
        let text = err.to_string();
        assert!(text.contains(&format!("{label:?}")) && text.contains("reserved"), "{text}");
        assert!(registry.lookup("labelled").await.is_err());
    }
}

#[tokio::test]
async fn the_server_marks_itself_with_the_reserved_labels() {
    let registry = Arc::new(MemoryRegistry::new());
    let server = start(registry, "marked", config()).await.unwrap();
    let metadata = &server.node().metadata;
    assert_eq!(metadata.get(labels::HEALTH).map(String::as_str), Some(labels::HEALTH_GRPC));
    assert_eq!(metadata.get(labels::METRICS), Some(&server.metrics_addr().unwrap().to_string()));
    assert_eq!(metadata.get(labels::TLS), None, "plaintext");
    server.stop().await.unwrap();
}
