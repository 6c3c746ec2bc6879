//! The SDK's client against grpc-go 1.33 (`e2e::interop::GoServer`: the standard health
//! service, reflection v1alpha, grpc-go's default keepalive policy: a ping without calls
//! allowed every 5 minutes, GOAWAY `too_many_pings` after two strikes).

use std::{sync::Arc, time::Duration};

use e2e::interop::GoServer;
use micro_core::{Client, NamedChannel, Node, Registry, registry::MemoryRegistry};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long the connection is watched, idle between calls.
const WATCHED: Duration = Duration::from_secs(30);
/// The pause between two calls: the connection is idle meanwhile.
const CALL_EVERY: Duration = Duration::from_secs(8);

async fn channel_to(server: &GoServer) -> NamedChannel {
    let registry = MemoryRegistry::new();
    registry.register(&Node::new("go-health", server.address), Duration::from_secs(300)).await.unwrap();
    Client::new(Arc::new(registry)).channel("go-health")
}

async fn check(health: &mut HealthClient<NamedChannel>, service: &str) -> Result<i32, tonic::Status> {
    let request = HealthCheckRequest { service: service.into() };
    Ok(health.check(request).await?.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_to_a_grpc_go_server_lives_through_idle_and_busy_periods() {
    let server = GoServer::start().await;
    let mut health = HealthClient::new(channel_to(&server).await);
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < WATCHED {
        // Busy: a burst of calls.
        for _ in 0..50 {
            assert_eq!(check(&mut health, "").await.expect("no call fails"), ServingStatus::Serving as i32);
            calls += 1;
        }
        // Idle: no call in flight, so no ping may go.
        tokio::time::sleep(CALL_EVERY).await;
    }
    assert_eq!(check(&mut health, "").await.expect("no call fails"), ServingStatus::Serving as i32);
    let log = server.log();
    assert_eq!(server.accepted(), 1, "{calls} calls came on {} connections; log:\n{log}", server.accepted());
    assert!(!log.contains("too many pings"), "log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_go_servers_status_codes_are_understood() {
    let server = GoServer::start().await;
    let mut health = HealthClient::new(channel_to(&server).await);
    let status = check(&mut health, "no.such.Service").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(server.accepted(), 1);
}
