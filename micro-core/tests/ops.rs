//! The ops surface of a running server: health flips on drain, metrics count calls.

use std::{sync::Arc, time::Duration};

use micro_core::{Client, Server, config::ServerConfig, labels, registry::MemoryRegistry};
use test_proto::{
    Labelled,
    echo::{Message, echo_client::EchoClient, echo_server::EchoServer},
    say,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn config() -> ServerConfig {
    ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        metrics_address: Some("127.0.0.1:0".parse().unwrap()),
        drain_delay: Duration::from_millis(800),
        ..ServerConfig::default()
    }
}

async fn health_of(address: std::net::SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest { service: service.into() };
    health.check(request).await.unwrap().into_inner().status()
}

#[tokio::test]
async fn health_is_serving_once_registered_and_not_serving_while_draining() {
    let registry = MemoryRegistry::new();
    let server = Server::builder("fleet")
        .config(config())
        .registry(Arc::new(registry))
        .add_service(EchoServer::new(Labelled::new("a")))
        .start()
        .await
        .unwrap();
    let address = server.local_addr();
    assert_eq!(health_of(address, "").await, ServingStatus::Serving);
    assert_eq!(health_of(address, test_proto::SERVICE_NAME).await, ServingStatus::Serving);

    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(health_of(address, "").await, ServingStatus::NotServing);
    assert_eq!(health_of(address, test_proto::SERVICE_NAME).await, ServingStatus::NotServing);
    stopping.await.unwrap().unwrap();
}

fn counter(scrape: &str, name: &str, labels: &[&str]) -> u64 {
    scrape
        .lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn a_scrape_after_n_calls_counts_n_by_method_and_status() {
    let registry = MemoryRegistry::new();
    let server = Server::builder("counted")
        .config(config())
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(Labelled::new("a")))
        .start()
        .await
        .unwrap();
    let metrics_address =
        server.node().metadata.get(labels::METRICS).expect("the metrics address is announced").clone();

    let client = Client::new(Arc::new(registry));
    let mut echo = EchoClient::new(client.channel("counted"));
    for _ in 0..7 {
        echo.say(say("hello")).await.unwrap();
    }
    for _ in 0..3 {
        let status = echo.say(Message { fail: true, ..say("no") }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }

    let scrape =
        reqwest::get(format!("http://{metrics_address}/metrics")).await.unwrap().text().await.unwrap();
    let method = r#"method="/echo.Echo/Say""#;
    assert_eq!(counter(&scrape, "micro_server_requests_total", &[method, r#"code="OK""#]), 7, "{scrape}");
    assert_eq!(
        counter(&scrape, "micro_server_requests_total", &[method, r#"code="FAILED_PRECONDITION""#]),
        3
    );
    assert_eq!(counter(&scrape, "micro_server_request_duration_seconds_count", &[method]), 10);
    assert_eq!(counter(&scrape, "micro_server_requests_in_flight", &[method]), 0);
    assert_eq!(counter(&scrape, "micro_client_attempts_total", &[r#"service="counted""#]), 10);
    assert!(
        counter(&scrape, "micro_registry_events_total", &[r#"service="counted""#, r#"event="register""#])
            >= 1
    );
    server.stop().await.unwrap();
}
