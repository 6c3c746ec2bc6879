//! Figure 9, registry: `RegistryBroker` (subscribers in a memory registry, deliveries over
//! gRPC) against a plain tonic unary call carrying the same fields (topic, message id,
//! body) to one subscriber's server, its transport without the broker.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
use micro_core::{
    Client,
    broker::{RegistryBroker, SubscribeOptions, headers, new_message_id},
    config::ServerConfig,
    registry::MemoryRegistry,
};
use tonic::{
    codegen::{Context, Poll, Service, http},
    server::NamedService,
    transport::Channel,
};
use tonic_prost::ProstCodec;

use super::{Baseline, Probe, Publish, Side, Task, contest, sdk_side, topic};
use crate::load::raw_channel;

const SERVICE: &str = "bench.Events";
const DELIVER_PATH: &str = "/bench.Events/Deliver";

/// The plain call's request: the same fields the broker's delivery carries.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(string, tag = "1")]
    topic: String,
    #[prost(btree_map = "string, string", tag = "2")]
    headers: BTreeMap<String, String>,
    #[prost(bytes = "bytes", tag = "3")]
    body: Bytes,
}

/// The plain call's answer: handled.
#[derive(Clone, PartialEq, prost::Message)]
struct Handled {}

/// The plain subscriber: a tonic server whose one unary method hands the body to the probe.
#[derive(Clone)]
struct EventsServer(Arc<Probe>);

impl NamedService for EventsServer {
    const NAME: &'static str = SERVICE;
}

struct DeliverMethod(Arc<Probe>);

impl tonic::server::UnaryService<Event> for DeliverMethod {
    type Response = Handled;
    type Future = std::future::Ready<Result<tonic::Response<Handled>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Event>) -> Self::Future {
        self.0.arrived(&request.into_inner().body);
        std::future::ready(Ok(tonic::Response::new(Handled {})))
    }
}

impl Service<http::Request<tonic::body::Body>> for EventsServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let probe = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != DELIVER_PATH {
                return Ok(tonic::Status::unimplemented(request.uri().path().to_owned()).into_http());
            }
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Handled, Event>::default());
            Ok(grpc.unary(DeliverMethod(probe), request).await)
        })
    }
}

struct TonicPublisher {
    channel: Channel,
    topic: String,
}

impl Publish for TonicPublisher {
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let mut grpc = tonic::client::Grpc::new(self.channel.clone());
            grpc.ready().await?;
            let event = Event {
                topic: self.topic.clone(),
                headers: BTreeMap::from([(headers::MESSAGE_ID.to_owned(), new_message_id())]),
                body,
            };
            let path = http::uri::PathAndQuery::from_static(DELIVER_PATH);
            grpc.unary(tonic::Request::new(event), path, ProstCodec::<Event, Handled>::default()).await?;
            Ok(())
        })
    }
}

async fn tonic_side() -> anyhow::Result<Side> {
    let probe = Arc::new(Probe::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tonic::transport::Server::builder().add_service(EventsServer(probe.clone()));
    let serving = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(err) = server.serve_with_incoming(incoming).await {
            eprintln!("[9 broker registry] the plain tonic subscriber stopped: {err}");
        }
    });
    let channel = raw_channel(address).await?;
    Ok(Side::new(TonicPublisher { channel, topic: topic("registry-plain") }, probe, Task(serving)))
}

/// The registry broker's figures.
pub async fn run() -> anyhow::Result<()> {
    let client = Client::new(Arc::new(MemoryRegistry::new()));
    let server = ServerConfig {
        address: "127.0.0.1:0".parse()?,
        drain_delay: Duration::ZERO,
        ..ServerConfig::default()
    };
    let broker = Arc::new(RegistryBroker::new(client).server_config(server));
    let sdk = sdk_side(broker, &topic("registry"), SubscribeOptions::default()).await?;
    let baseline = Baseline {
        prefix: "broker_registry".into(),
        is: "a plain tonic unary call with the same topic, id and body to one subscriber's server".into(),
        side: tonic_side().await?,
    };
    contest("registry", sdk, vec![baseline]).await
}
