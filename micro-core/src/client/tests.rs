use std::{collections::HashMap, time::Duration};

use proto::vessel::{
    Response, Specification, Vessel,
    vessel_service_client::VesselServiceClient,
    vessel_service_server::{VesselService, VesselServiceServer},
};
use tonic::{Code, Request, Status};

use super::*;
use crate::{RunningServer, Server, config::ServerConfig, registry::MemoryRegistry};

/// Answers with a vessel whose id is the instance's label.
struct Labelled(String);

#[tonic::async_trait]
impl VesselService for Labelled {
    async fn find_available(&self, _: Request<Specification>) -> Result<tonic::Response<Response>, Status> {
        let vessel = Vessel { id: self.0.clone(), ..Default::default() };
        Ok(tonic::Response::new(Response { vessel: Some(vessel), vessels: vec![] }))
    }
}

fn loopback_config() -> ServerConfig {
    ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() }
}

async fn start(registry: &MemoryRegistry, name: &str, label: &str) -> RunningServer {
    Server::builder(name)
        .config(loopback_config())
        .registry(Arc::new(registry.clone()))
        .add_service(VesselServiceServer::new(Labelled(label.into())))
        .start()
        .await
        .unwrap()
}

async fn call(client: &mut VesselServiceClient<NamedChannel>) -> Result<String, Status> {
    let reply = client.find_available(Specification { capacity: 1, max_weight: 1 }).await?;
    Ok(reply.into_inner().vessel.unwrap().id)
}

async fn tally(client: &mut VesselServiceClient<NamedChannel>, calls: usize) -> HashMap<String, usize> {
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
    let client = Client::new(Arc::new(registry));
    let mut vessels = VesselServiceClient::new(client.channel("svc"));
    wait_for_instances(&client.channel("svc"), 3).await;
    let counts = tally(&mut vessels, 30).await;
    assert_eq!(counts, HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]));
}

#[tokio::test]
async fn channel_follows_instances_that_come_and_go() {
    let registry = MemoryRegistry::new();
    let first = start(&registry, "svc", "first").await;
    let client = Client::new(Arc::new(registry.clone()));
    let channel = client.channel("svc");
    let mut vessels = VesselServiceClient::new(channel.clone());
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
    let client = Client::new(Arc::new(MemoryRegistry::new())).lookup_timeout(Duration::from_millis(200));
    let mut vessels = VesselServiceClient::new(client.channel("vessel-service"));
    let started = Instant::now();
    let status = call(&mut vessels).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("vessel-service") && status.message().contains("memory"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn instance_that_refuses_connections_is_named_in_the_error() {
    let registry = MemoryRegistry::new();
    let dead = Node::new("svc", "127.0.0.1:9".parse().unwrap());
    registry.register(&dead, Duration::from_secs(30)).await.unwrap();
    let client = Client::new(Arc::new(registry));
    let status = call(&mut VesselServiceClient::new(client.channel("svc"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&dead.id) && status.message().contains("127.0.0.1:9"), "{status:?}");
}

async fn wait_for_instances(channel: &NamedChannel, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while channel.instances().len() != count {
        assert!(Instant::now() < deadline, "expected {count} instances, have {:?}", channel.instances());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
