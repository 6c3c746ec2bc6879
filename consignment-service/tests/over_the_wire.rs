//! consignment-service and vessel-service as real tonic servers on loopback, in this process,
//! over the memory registry: validation, the request size cap and idempotent creation as a
//! client sees them.

use std::sync::Arc;

use consignment_service::{
    IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER, MAX_REQUEST_BYTES, ShippingHandler, SqliteRepository,
    request_size_layer,
};
use micro_core::{Client, RunningServer, Server, config::ServerConfig, registry::MemoryRegistry};
use proto::{
    consignment::{
        Consignment, Container, GetRequest, Response, shipping_service_client::ShippingServiceClient,
    },
    vessel::vessel_service_server::VesselServiceServer,
};
use tonic::{Code, Request, Status};
use vessel_service::{Fleet, VesselHandler, store::SqliteStore};

struct Shippy {
    shipping: ShippingServiceClient<micro_core::NamedChannel>,
    _servers: Vec<RunningServer>,
}

fn loopback() -> ServerConfig {
    ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() }
}

/// vessel-service with the default fleet and consignment-service over an in-memory database.
async fn shippy() -> Shippy {
    let registry = Arc::new(MemoryRegistry::new());
    let vessels = Server::builder("vessel-service")
        .config(loopback())
        .registry(registry.clone())
        .add_service(VesselServiceServer::new(VesselHandler::new(
            Fleet::default(),
            Arc::new(SqliteStore::in_memory().unwrap()),
        )))
        .start()
        .await
        .unwrap();
    let client = Client::new(registry.clone()).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let handler = ShippingHandler::new(
        Arc::new(SqliteRepository::in_memory().unwrap()),
        client.channel("vessel-service"),
        std::time::Duration::from_secs(5),
    );
    let consignments = Server::builder("consignment-service")
        .config(loopback())
        .registry(registry)
        .layer(request_size_layer())
        .add_service(handler.into_service())
        .start()
        .await
        .unwrap();
    Shippy {
        shipping: ShippingServiceClient::new(client.channel("consignment-service")),
        _servers: vec![vessels, consignments],
    }
}

fn consignment(description: &str, containers: usize) -> Consignment {
    Consignment {
        description: description.to_owned(),
        weight: 1000,
        containers: (0..containers)
            .map(|i| Container {
                customer_id: format!("cust{i}"),
                origin: "Derby".to_owned(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn with_key(consignment: Consignment, key: &str) -> Request<Consignment> {
    let mut request = Request::new(consignment);
    request.metadata_mut().insert(IDEMPOTENCY_KEY_HEADER, key.parse().unwrap());
    request
}

impl Shippy {
    async fn create(&self, request: Request<Consignment>) -> Result<tonic::Response<Response>, Status> {
        self.shipping.clone().create_consignment(request).await
    }

    async fn stored(&self) -> Vec<Consignment> {
        self.shipping.clone().get_consignments(GetRequest {}).await.unwrap().into_inner().consignments
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_fields_are_invalid_argument_naming_each_and_nothing_is_stored() {
    let shippy = shippy().await;
    let mut bad = consignment(&"d".repeat(1025), 3);
    bad.weight = -1;
    bad.containers[1].customer_id.clear();
    bad.containers[2].origin.clear();
    let status = shippy.create(Request::new(bad)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "weight: must be positive, got -1; description: at most 1024 bytes, got 1025; \
         containers[1].customer_id: required; containers[2].origin: required"
    );
    let status = shippy.create(Request::new(consignment("empty", 0))).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "containers: at least one container is required")
    );
    assert!(shippy.stored().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_4_mib_is_resource_exhausted() {
    let shippy = shippy().await;
    // 10,000 containers with long origins: well over 4 MiB, yet every field valid.
    let mut big = consignment("big", 10_000);
    for container in &mut big.containers {
        container.origin = "o".repeat(500);
    }
    let status = shippy.create(Request::new(big)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&format!("the limit is {MAX_REQUEST_BYTES} bytes")), "{status:?}");
    assert!(shippy.stored().await.is_empty());
    // Just under the limit is read and handled: here no vessel has room for 10,000 containers.
    let mut near = consignment("near", 10_000);
    for container in &mut near.containers {
        container.origin = "o".repeat(350);
    }
    let status = shippy.create(Request::new(near)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_key_returns_the_first_result_and_stores_once() {
    let shippy = shippy().await;
    let first = shippy.create(with_key(consignment("once", 2), "run-1")).await.unwrap();
    assert!(first.metadata().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
    let first = first.into_inner().consignment.unwrap();
    for _ in 0..3 {
        let again = shippy.create(with_key(consignment("once", 2), "run-1")).await.unwrap();
        assert_eq!(again.metadata().get(IDEMPOTENT_REPLAYED_HEADER).unwrap(), "true");
        assert_eq!(again.into_inner().consignment.unwrap(), first);
    }
    assert_eq!(shippy.stored().await, vec![first.clone()]);

    // The same key with another consignment is refused, not answered with the old one.
    let status = shippy.create(with_key(consignment("other", 1), "run-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains(&first.id) && status.message().contains("new key"), "{status:?}");

    // Without a key, or with another key, a second identical consignment is a new one.
    shippy.create(Request::new(consignment("once", 2))).await.unwrap();
    shippy.create(with_key(consignment("once", 2), "run-2")).await.unwrap();
    assert_eq!(shippy.stored().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_with_one_key_store_once() {
    let shippy = Arc::new(shippy().await);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let shippy = shippy.clone();
            tokio::spawn(async move { shippy.create(with_key(consignment("racing", 3), "race")).await })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().unwrap().into_inner().consignment.unwrap().id);
    }
    assert_eq!(ids.len(), 1, "every caller gets the one stored consignment");
    assert_eq!(shippy.stored().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_key_is_invalid_argument() {
    let shippy = shippy().await;
    let status = shippy.create(with_key(consignment("x", 1), &"k".repeat(129))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with(IDEMPOTENCY_KEY_HEADER), "{status:?}");
}
