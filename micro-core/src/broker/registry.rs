//! The zero set-up broker, as go-micro's default is: no broker server at all.
//!
//! Each subscription serves a small gRPC endpoint ([`DELIVER_PATH`]) and registers it in the
//! service registry (mDNS by default) as an instance of the topic's broker service
//! ([`topic_service_name`]), labelled with its topic, its queue group and its id. A publish
//! looks the topic's subscribers up and calls every plain subscriber and one member of each
//! queue group, through the SDK's [`Client`] (balancing, ejection, deadlines) like any call.
//!
//! **At most once, nothing kept**: a subscriber that is down, or not yet discovered, misses
//! the message; a failed handler is logged, not retried. For durable events use nats.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{Client, broker::{Broker, Message, RegistryBroker}, config::RegistryConfig};
//!
//! let registry = RegistryConfig::default().connect().await?; // mDNS
//! let broker = RegistryBroker::new(Client::new(registry));
//! broker.publish(Message::new("consignment.created", "…")).await?;
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Mutex, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::{body::Body, server::NamedService};

use super::{Broker, Handler, Message, SubscribeOptions, Subscription, refuse_durable, run_handler};
use crate::{
    Client, Error, NamedChannel, Result, Server,
    config::ServerConfig,
    registry::{MAX_SERVICE_NAME_LEN, validate_service_name},
    selector::Filter,
};

/// The gRPC service subscribers serve.
pub const DELIVER_SERVICE: &str = "micro.broker.Broker";
/// The method a publish calls on a subscriber.
pub const DELIVER_PATH: &str = "/micro.broker.Broker/Deliver";
/// Metadata label: the topic a subscriber listens to.
pub const TOPIC_LABEL: &str = "broker-topic";
/// Metadata label: the subscriber's queue group (absent for a plain subscriber).
pub const QUEUE_LABEL: &str = "broker-queue";
/// Metadata label: the subscription's own id.
pub const SUBSCRIBER_LABEL: &str = "broker-subscriber";
/// Prefix of the registry name under which a topic's subscribers register.
pub const SERVICE_PREFIX: &str = "broker.";

/// The registry name of `topic`'s subscribers: `broker.<topic>` when that is a valid
/// service name, else `broker.` and a 16-digit FNV-1a hash of the topic.
pub fn topic_service_name(topic: &str) -> String {
    let plain = format!("{SERVICE_PREFIX}{topic}");
    if plain.len() <= MAX_SERVICE_NAME_LEN && validate_service_name(&plain).is_ok() {
        return plain;
    }
    let hash = topic
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{SERVICE_PREFIX}{hash:016x}")
}

/// The wire form of a delivery: the message as one protobuf.
#[derive(Clone, PartialEq, prost::Message)]
struct Delivery {
    #[prost(string, tag = "1")]
    topic: String,
    #[prost(btree_map = "string, string", tag = "2")]
    headers: BTreeMap<String, String>,
    #[prost(bytes = "bytes", tag = "3")]
    body: bytes::Bytes,
}

/// The subscriber's answer: the handler succeeded.
#[derive(Clone, PartialEq, prost::Message)]
struct Ack {}

/// The encoded descriptor set of [`DELIVER_SERVICE`] (`micro/broker.proto`), given to each
/// subscriber's server so its calls get their own method label and span name, and
/// reflection describes them.
pub fn deliver_descriptor_set() -> &'static [u8] {
    static ENCODED: OnceLock<Vec<u8>> = OnceLock::new();
    ENCODED.get_or_init(|| {
        use prost::Message as _;
        use prost_types::{
            DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet, MessageOptions,
            MethodDescriptorProto, ServiceDescriptorProto,
            field_descriptor_proto::{Label, Type},
        };
        let field = |name: &str, number: i32, kind: Type, label: Label, type_name: Option<&str>| {
            FieldDescriptorProto {
                name: Some(name.into()),
                number: Some(number),
                label: Some(label as i32),
                r#type: Some(kind as i32),
                type_name: type_name.map(Into::into),
                json_name: Some(name.into()),
                ..Default::default()
            }
        };
        let headers_entry = DescriptorProto {
            name: Some("HeadersEntry".into()),
            field: vec![
                field("key", 1, Type::String, Label::Optional, None),
                field("value", 2, Type::String, Label::Optional, None),
            ],
            options: Some(MessageOptions { map_entry: Some(true), ..Default::default() }),
            ..Default::default()
        };
        let delivery = DescriptorProto {
            name: Some("Delivery".into()),
            field: vec![
                field("topic", 1, Type::String, Label::Optional, None),
                field(
                    "headers",
                    2,
                    Type::Message,
                    Label::Repeated,
                    Some(".micro.broker.Delivery.HeadersEntry"),
                ),
                field("body", 3, Type::Bytes, Label::Optional, None),
            ],
            nested_type: vec![headers_entry],
            ..Default::default()
        };
        let ack = DescriptorProto { name: Some("Ack".into()), ..Default::default() };
        let service = ServiceDescriptorProto {
            name: Some("Broker".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Deliver".into()),
                input_type: Some(".micro.broker.Delivery".into()),
                output_type: Some(".micro.broker.Ack".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let file = FileDescriptorProto {
            name: Some("micro/broker.proto".into()),
            package: Some("micro.broker".into()),
            message_type: vec![delivery, ack],
            service: vec![service],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        FileDescriptorSet { file: vec![file] }.encode_to_vec()
    })
}

/// A topic's routes unused for this long are dropped, and with them their channels'
/// registry follows; the next publish to the topic looks it up afresh.
pub const ROUTE_IDLE: Duration = Duration::from_secs(300);
/// The most topics whose routes are kept; past it, the least recently used topic's go.
pub const MAX_ROUTED_TOPICS: usize = 1024;

/// Publishes to and subscribes through the service registry of a [`Client`].
pub struct RegistryBroker {
    client: Client,
    server: ServerConfig,
    /// Channels kept alive per topic, so their registry follow survives between publishes:
    /// at most [`MAX_ROUTED_TOPICS`], none idle for over [`ROUTE_IDLE`].
    routes: Mutex<HashMap<String, Routes>>,
}

struct Routes {
    /// The last publish to the topic.
    used: Instant,
    all: NamedChannel,
    targets: HashMap<String, NamedChannel>,
    /// Whether the registry was asked once; from then on `all` follows the topic's
    /// subscribers, so a publish that finds none returns at once.
    looked_up: bool,
}

impl RegistryBroker {
    /// A broker over `client`'s registry; subscribers serve on [`ServerConfig::default`]
    /// (every interface, a free port, announced as the server's advertise rule says), over
    /// TLS with the client's certificate when it has one.
    pub fn new(client: Client) -> Self {
        // A client with a certificate of its own: subscribers serve TLS with it, so
        // publishers that call over TLS reach them, and they register its name as theirs
        // to check (the `tls-name` label).
        let tls = client.tls_config().filter(|tls| tls.material().identity.is_some()).cloned();
        let server = ServerConfig { drain_delay: Duration::ZERO, tls, ..ServerConfig::default() };
        RegistryBroker { client, server, routes: Mutex::new(HashMap::new()) }
    }

    /// Where subscribers listen and how they register. Default: [`ServerConfig::default`]
    /// without a drain delay; without TLS of its own, `config` keeps the client's.
    pub fn server_config(mut self, mut config: ServerConfig) -> Self {
        if config.tls.is_none() {
            config.tls = self.server.tls.take();
        }
        self.server = config;
        self
    }

    fn error(&self, message: impl Into<String>, source: Option<crate::BoxError>) -> Error {
        Error::Broker { broker: self.kind().into(), address: self.address(), message: message.into(), source }
    }

    /// The channels to deliver `topic`'s message on: one per plain subscriber, one per queue group.
    async fn targets(&self, topic: &str) -> Result<Vec<(String, NamedChannel)>> {
        let name = topic_service_name(topic);
        let (all, looked_up) = {
            let mut routes = self.routes.lock().expect("broker routes lock");
            let now = Instant::now();
            if !routes.contains_key(topic) {
                evict_routes(&mut routes, now);
            }
            let entry = routes.entry(topic.to_owned()).or_insert_with(|| Routes {
                used: now,
                all: self.client.channel_with(&name, Filter::new().metadata(TOPIC_LABEL, topic)),
                targets: HashMap::new(),
                looked_up: false,
            });
            entry.used = now;
            (entry.all.clone(), std::mem::replace(&mut entry.looked_up, true))
        };
        let mut nodes = all.instances();
        if nodes.is_empty() && !looked_up {
            // The topic's first publish: ask the registry (its look-up waits for a first
            // instance); later ones trust the channel, which follows the registry since.
            nodes = match self.client.registry().lookup(&name).await {
                Ok(nodes) => nodes,
                Err(Error::NoInstance { .. }) => Vec::new(),
                Err(err) => return Err(err),
            };
            nodes.retain(|n| n.metadata.get(TOPIC_LABEL).map(String::as_str) == Some(topic));
        }
        let mut wanted: BTreeMap<String, Filter> = BTreeMap::new();
        for node in nodes.iter().filter(|n| !n.draining) {
            let base = Filter::new().metadata(TOPIC_LABEL, topic);
            match (node.metadata.get(QUEUE_LABEL), node.metadata.get(SUBSCRIBER_LABEL)) {
                (Some(queue), _) => {
                    wanted.insert(format!("queue {queue}"), base.metadata(QUEUE_LABEL, queue));
                }
                (None, Some(id)) => {
                    wanted.insert(format!("subscriber {id}"), base.metadata(SUBSCRIBER_LABEL, id));
                }
                (None, None) => {}
            }
        }
        let mut routes = self.routes.lock().expect("broker routes lock");
        let entry = routes.entry(topic.to_owned()).or_insert_with(|| Routes {
            used: Instant::now(),
            all: all.clone(),
            targets: HashMap::new(),
            looked_up: true,
        });
        entry.targets.retain(|key, _| wanted.contains_key(key));
        Ok(wanted
            .into_iter()
            .map(|(key, filter)| {
                let channel = entry
                    .targets
                    .entry(key.clone())
                    .or_insert_with(|| self.client.channel_with(&name, filter))
                    .clone();
                (key, channel)
            })
            .collect())
    }
}

/// Before a new topic's routes are added: drops those idle for over [`ROUTE_IDLE`], then
/// the least recently used while [`MAX_ROUTED_TOPICS`] are held. Their channels stop
/// following the registry once the last clone (a publish in flight) is gone.
fn evict_routes(routes: &mut HashMap<String, Routes>, now: Instant) {
    routes.retain(|_, routes| now.saturating_duration_since(routes.used) < ROUTE_IDLE);
    while routes.len() >= MAX_ROUTED_TOPICS {
        let Some(oldest) = routes.iter().min_by_key(|(_, r)| r.used).map(|(topic, _)| topic.clone()) else {
            break;
        };
        tracing::debug!(topic = %oldest, "broker routes evicted: the most topics are routed");
        routes.remove(&oldest);
    }
}

impl RegistryBroker {
    /// The topics whose routes are held now.
    pub fn routed_topics(&self) -> usize {
        self.routes.lock().expect("broker routes lock").len()
    }
}

async fn deliver(channel: NamedChannel, delivery: Delivery) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Delivery, Ack>::default();
    let path = http::uri::PathAndQuery::from_static(DELIVER_PATH);
    grpc.unary(tonic::Request::new(delivery), path, codec).await.map(drop)
}

#[async_trait]
impl Broker for RegistryBroker {
    fn kind(&self) -> &'static str {
        "registry"
    }

    fn address(&self) -> String {
        format!("registry {} at {}", self.client.registry().kind(), self.client.registry().address())
    }

    async fn send(&self, message: Message) -> Result<()> {
        let targets = self.targets(&message.topic).await?;
        let message_id = message.id().unwrap_or("-").to_owned();
        if targets.is_empty() {
            tracing::debug!(topic = %message.topic, %message_id, "no subscriber: message dropped");
            return Ok(());
        }
        let delivery =
            Delivery { topic: message.topic.clone(), headers: message.headers.into(), body: message.body };
        let calls = targets.into_iter().map(|(key, channel)| {
            let delivery = delivery.clone();
            async move { (key, deliver(channel, delivery).await) }
        });
        let failed: Vec<String> = futures::future::join_all(calls)
            .await
            .into_iter()
            .filter_map(|(key, outcome)| outcome.err().map(|status| format!("{key}: {}", status.message())))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(self.error(
                format!(
                    "topic {} message {message_id}: not delivered to {}",
                    message.topic,
                    failed.join("; ")
                ),
                None,
            ))
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription> {
        // Nothing is kept, so nothing is delivered again either.
        if options.durable || options.max_deliveries.is_some() {
            return Err(refuse_durable(self));
        }
        let id = format!("{:016x}", rand::random::<u64>());
        let mut server = Server::builder(topic_service_name(topic))
            .metadata(TOPIC_LABEL, topic)
            .metadata(SUBSCRIBER_LABEL, &id)
            .config(self.server.clone())
            .registry(self.client.registry().clone())
            .file_descriptor_set(deliver_descriptor_set())
            .add_service(DeliverServer { handler });
        if let Some(queue) = &options.queue {
            server = server.metadata(QUEUE_LABEL, queue);
        }
        let running = server.start().await?;
        tracing::info!(%topic, queue = options.queue.as_deref().unwrap_or(""), address = %running.node().address, "subscribed");
        // Dropping the subscription drops `stop`: the endpoint deregisters, lets deliveries in
        // flight finish and closes; `unsubscribe().await` returns once it has.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let topic_owned = topic.to_owned();
        let stopping = tokio::spawn(async move {
            let _ = stopped.await;
            if let Err(err) = running.stop().await {
                tracing::warn!(topic = %topic_owned, error = %crate::error::error_chain(&err), "subscriber endpoint did not stop cleanly");
            }
        });
        Ok(Subscription::new(topic, options.queue, stop).stopping_with(stopping))
    }
}

/// The subscriber's gRPC endpoint: runs the handler, answers OK once it succeeded.
#[derive(Clone)]
struct DeliverServer {
    handler: Handler,
}

impl NamedService for DeliverServer {
    const NAME: &'static str = DELIVER_SERVICE;
}

struct DeliverMethod(Handler);

impl tonic::server::UnaryService<Delivery> for DeliverMethod {
    type Response = Ack;
    type Future = BoxFuture<'static, Result<tonic::Response<Ack>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Delivery>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move {
            let Delivery { topic, headers, body } = request.into_inner();
            let message_id = headers.get(super::headers::MESSAGE_ID).cloned().unwrap_or_default();
            if run_handler(
                "registry",
                &handler,
                Message { topic: topic.clone(), headers: headers.into(), body },
            )
            .await
            .is_ok()
            {
                Ok(tonic::Response::new(Ack {}))
            } else {
                Err(tonic::Status::unknown(format!("topic {topic} message {message_id}: the handler failed")))
            }
        })
    }
}

impl tower::Service<http::Request<Body>> for DeliverServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let handler = self.handler.clone();
        Box::pin(async move {
            if request.uri().path() != DELIVER_PATH {
                return Ok(tonic::Status::unimplemented(request.uri().path().to_owned()).into_http());
            }
            let codec = tonic_prost::ProstCodec::<Ack, Delivery>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(DeliverMethod(handler), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn the_descriptor_set_describes_the_deliver_method_the_server_routes() {
        let set = prost_types::FileDescriptorSet::decode(deliver_descriptor_set()).unwrap();
        let file = &set.file[0];
        let paths: Vec<String> = file.service[0]
            .method
            .iter()
            .map(|m| format!("/{}.{}/{}", file.package(), file.service[0].name(), m.name()))
            .collect();
        assert_eq!(paths, [DELIVER_PATH]);
        assert_eq!(format!("{}.{}", file.package(), file.service[0].name()), DELIVER_SERVICE);
    }
}
