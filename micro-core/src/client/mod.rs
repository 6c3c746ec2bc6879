//! Calling services by name: [`Client::channel`] turns a name into a channel that every
//! tonic-generated client accepts, picks an instance per call and follows the registry as
//! instances come and go.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{client::Client, config::RegistryConfig};
//! use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
//!
//! let registry = RegistryConfig::default().connect().await?;
//! let client = Client::new(registry);
//! let mut vessels = VesselServiceClient::new(client.channel("vessel-service"));
//! let reply = vessels.find_available(Specification { capacity: 3, max_weight: 55_000 }).await;
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tonic::{body::Body, transport::Channel};
use tower::{Service, ServiceExt};

use crate::{
    BoxError, Error,
    config::DEFAULT_LOOKUP_TIMEOUT_MS,
    registry::{Change, Node, Registry},
    selector::{RoundRobin, Strategy},
};

/// Default time to establish a TCP connection to an instance.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a watch that ended is started again.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// Makes [`NamedChannel`]s over one registry. Cheap to clone; channels for the same name
/// are shared.
#[derive(Clone)]
pub struct Client {
    registry: Arc<dyn Registry>,
    strategy: Arc<dyn Fn() -> Arc<dyn Strategy> + Send + Sync>,
    lookup_timeout: Duration,
    connect_timeout: Duration,
    channels: Arc<Mutex<HashMap<String, NamedChannel>>>,
}

impl Client {
    /// A client over `registry`: round robin, 3 s look-up timeout, 2 s connect timeout.
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Client {
            registry,
            strategy: Arc::new(|| Arc::new(RoundRobin::new())),
            lookup_timeout: Duration::from_millis(DEFAULT_LOOKUP_TIMEOUT_MS),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            channels: Arc::default(),
        }
    }

    /// The strategy each new channel gets its own instance of. Default: [`RoundRobin`].
    pub fn strategy<S: Strategy>(mut self, make: impl Fn() -> S + Send + Sync + 'static) -> Self {
        self.strategy = Arc::new(move || Arc::new(make()));
        self
    }

    /// How long a call waits for a first instance of its name. Default: 3 s.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// How long connecting to an instance may take. Default: 2 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The registry this client resolves names in.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// A channel to the service `name`, following its instances. Needs a tokio runtime.
    pub fn channel(&self, name: &str) -> NamedChannel {
        let mut channels = self.channels.lock().expect("client channels lock");
        channels
            .entry(name.to_owned())
            .or_insert_with(|| {
                NamedChannel::new(
                    name,
                    self.registry.clone(),
                    (self.strategy)(),
                    self.lookup_timeout,
                    self.connect_timeout,
                )
            })
            .clone()
    }
}

/// A `tower::Service` for gRPC calls to every instance of one name.
///
/// Each call goes to the instance the strategy picks among those currently registered. A
/// background task follows the registry's watch for as long as any clone of the channel
/// lives, so calls never query the registry themselves.
#[derive(Clone)]
pub struct NamedChannel {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    registry_kind: &'static str,
    instances: watch::Receiver<Arc<Instances>>,
    strategy: Arc<dyn Strategy>,
    lookup_timeout: Duration,
    follower: AbortHandle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The instances a channel can pick from, with a connection handle each.
#[derive(Default)]
struct Instances {
    nodes: Vec<Node>,
    channels: Vec<Channel>,
}

impl NamedChannel {
    fn new(
        name: &str,
        registry: Arc<dyn Registry>,
        strategy: Arc<dyn Strategy>,
        lookup_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        let (sender, instances) = watch::channel(Arc::new(Instances::default()));
        let registry_kind = registry.kind();
        let follower = tokio::spawn(follow_registry(name.to_owned(), registry, sender, connect_timeout));
        NamedChannel {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                registry_kind,
                instances,
                strategy,
                lookup_timeout,
                follower: follower.abort_handle(),
            }),
        }
    }

    /// The service name this channel calls.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The instances currently known for the name.
    pub fn instances(&self) -> Vec<Node> {
        self.shared.instances.borrow().nodes.clone()
    }
}

impl Shared {
    /// Picks an instance, waiting up to the look-up timeout when none is known yet.
    async fn pick(&self) -> Result<(Node, Channel), Error> {
        let mut instances = self.instances.clone();
        let deadline = Instant::now() + self.lookup_timeout;
        loop {
            {
                let current = instances.borrow_and_update();
                if let Some(index) = self.strategy.pick(&current.nodes) {
                    return Ok((current.nodes[index].clone(), current.channels[index].clone()));
                }
            }
            match tokio::time::timeout_at(deadline, instances.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::NoInstance {
                        service: self.name.clone(),
                        registry: self.registry_kind.into(),
                    });
                }
            }
        }
    }

    async fn call(self: Arc<Self>, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (node, mut channel) = self.pick().await.map_err(into_status)?;
        tracing::debug!(service = %self.name, node = %node.id, address = %node.address, "picked");
        let transport_error = |source: BoxError| {
            let err = Error::Transport {
                service: self.name.clone(),
                node: node.id.clone(),
                address: node.address,
                registry: self.registry_kind.into(),
                source,
            };
            tracing::warn!(error = %crate::error::error_chain(&err), "call failed");
            into_status(err)
        };
        let ready = channel.ready().await.map_err(|e| transport_error(e.into()))?;
        ready.call(request).await.map_err(|e| transport_error(e.into()))
    }
}

fn into_status(err: Error) -> BoxError {
    Box::new(tonic::Status::from(err))
}

impl Service<http::Request<Body>> for NamedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.shared.clone().call(request))
    }
}

/// Applies the registry's changes for `name` to the channel's instances until the channel
/// is dropped; a watch that ends or fails is started again, keeping the instances known.
async fn follow_registry(
    name: String,
    registry: Arc<dyn Registry>,
    instances: watch::Sender<Arc<Instances>>,
    connect_timeout: Duration,
) {
    let mut known: Vec<(Node, Channel)> = Vec::new();
    loop {
        let mut changes = registry.watch(&name);
        while let Some(change) = changes.next().await {
            match change {
                Ok(Change::Insert(id, node)) => {
                    let channel = match connect_lazily(&node, connect_timeout) {
                        Ok(channel) => channel,
                        Err(err) => {
                            tracing::warn!(service = %name, node = %id, error = %err, "unusable address");
                            continue;
                        }
                    };
                    known.retain(|(n, _)| n.id != id);
                    known.push((node, channel));
                    known.sort_by(|a, b| a.0.id.cmp(&b.0.id));
                }
                Ok(Change::Remove(id)) => known.retain(|(n, _)| n.id != id),
                Err(err) => {
                    tracing::warn!(service = %name, registry = registry.kind(), error = %err, "watch failed; keeping known instances");
                    break;
                }
            }
            let (nodes, channels) = known.iter().cloned().unzip();
            tracing::debug!(service = %name, instances = known.len(), "instances changed");
            if instances.send(Arc::new(Instances { nodes, channels })).is_err() {
                return;
            }
        }
        tokio::time::sleep(REWATCH_DELAY).await;
        tracing::warn!(service = %name, registry = registry.kind(), "watch restarted");
    }
}

fn connect_lazily(node: &Node, connect_timeout: Duration) -> Result<Channel, BoxError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", node.address))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests;
