//! The dashboard at `/ui`: one dependency-free page (`page.html`, embedded in the binary)
//! and the JSON it polls, `/ui/state`: every registered service with its instances
//! (address, version, labels, health, draining or ejected, the client's latency estimate)
//! and its methods' calls per second, error ratio, p50 and p99 (read from the instances'
//! metrics, see `method_stats.rs`); and the registry broker's topics with their
//! subscribers. The page loads methods and schemas from `GET /{service}` and calls them
//! with `POST`. Its live feed follows a server-streaming method with `EventSource` on the
//! gateway's server-sent events (`GET /{service}/{package.Service}/{Method}?body=JSON`, see
//! `stream.rs`), newest reply first, the last 100 kept; `/ui?feed=SERVICE/package.Service/Method`
//! (and `&feed_body=JSON`) starts it once the page has loaded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    response::{Html, IntoResponse, Response},
    routing::get,
};
use http::header;
use micro_core::{
    Node,
    broker::{QUEUE_LABEL, TOPIC_LABEL},
};
use serde::Serialize;

use super::{Gateway, method_stats::MethodFigures, status::GatewayError};

/// The page, embedded at build time.
const PAGE: &str = include_str!("page.html");
/// How long a health answer is reused before the instance is asked again.
const HEALTH_FRESH_FOR: Duration = Duration::from_secs(2);
/// How long the page's state waits for a service's instances from the registry.
const LOOKUP_LIMIT: Duration = Duration::from_secs(1);

/// Health answers by instance id, with when they were taken; only instances the registry
/// lists stay.
#[derive(Default)]
pub struct HealthCache(Mutex<HashMap<String, (Instant, String)>>);

/// One instance as the page shows it.
#[derive(Debug, Serialize)]
struct InstanceState {
    id: String,
    address: String,
    version: String,
    labels: std::collections::BTreeMap<String, String>,
    health: String,
    draining: bool,
    ejected: Option<String>,
    latency_ms: Option<f64>,
}

/// One service as the page shows it.
#[derive(Debug, Serialize)]
struct ServiceState {
    name: String,
    instances: Vec<InstanceState>,
    methods: Vec<MethodFigures>,
}

/// One topic of the registry broker: its subscribers, each with its queue group if any.
#[derive(Debug, Serialize)]
struct TopicState {
    topic: String,
    subscribers: Vec<SubscriberState>,
}

#[derive(Debug, Serialize)]
struct SubscriberState {
    id: String,
    address: String,
    queue: Option<String>,
}

/// The routes of the dashboard.
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new().route("/ui", get(page)).route("/ui/", get(page)).route("/ui/state", get(state))
}

async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE)).into_response()
}

async fn state(State(gateway): State<Arc<Gateway>>) -> Result<Response, GatewayError> {
    let names = gateway.cache.list().await?;
    let services = futures::future::join_all(names.iter().map(|name| service_state(&gateway, name))).await;
    let live: Vec<&str> = services.iter().flat_map(|s| s.instances.iter().map(|i| i.id.as_str())).collect();
    gateway.health.0.lock().expect("health lock").retain(|id, _| live.contains(&id.as_str()));
    gateway.methods.retain(&live);
    let (topics, services): (Vec<ServiceState>, Vec<ServiceState>) =
        services.into_iter().partition(|s| s.instances.iter().any(|i| i.labels.contains_key(TOPIC_LABEL)));
    let topics: Vec<TopicState> = topics.into_iter().map(topic_state).collect();
    let registry = gateway.cache.registry();
    let body = serde_json::json!({
        "registry": format!("{} at {}", registry.kind(), registry.address()),
        "services": services,
        "topics": topics,
    });
    Ok(([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body.to_string())
        .into_response())
}

async fn service_state(gateway: &Gateway, name: &str) -> ServiceState {
    let Ok(entry) = gateway.cache.entry(name).await else {
        return ServiceState { name: name.to_owned(), instances: Vec::new(), methods: Vec::new() };
    };
    let mut views = entry.channel.inspect();
    if views.is_empty() {
        // A channel just made has not heard from the registry yet: ask it directly.
        let registry = gateway.cache.registry();
        let nodes = tokio::time::timeout(LOOKUP_LIMIT, registry.lookup(name)).await.ok().and_then(Result::ok);
        let nodes = nodes.unwrap_or_default();
        let methods = gateway.methods.service(&nodes).await;
        let instances =
            futures::future::join_all(nodes.into_iter().map(|node| instance(gateway, node, None, None)))
                .await;
        return ServiceState { name: name.to_owned(), instances, methods };
    }
    views.sort_by(|a, b| a.node.id.cmp(&b.node.id));
    let nodes: Vec<Node> = views.iter().map(|view| view.node.clone()).collect();
    let methods = gateway.methods.service(&nodes).await;
    let instances = futures::future::join_all(views.into_iter().map(|view| {
        let latency = view.load.latency.map(|l| l.as_secs_f64() * 1000.0);
        let ejected = view.ejected.map(|(left, why)| format!("{why}, {} ms more", left.as_millis()));
        instance(gateway, view.node, latency, ejected)
    }))
    .await;
    ServiceState { name: name.to_owned(), instances, methods }
}

/// A topic's subscribers, from the instances registered under its name.
fn topic_state(service: ServiceState) -> TopicState {
    let topic = service
        .instances
        .iter()
        .find_map(|i| i.labels.get(TOPIC_LABEL).cloned())
        .unwrap_or_else(|| service.name.trim_start_matches("broker.").to_owned());
    let mut subscribers: Vec<SubscriberState> = service
        .instances
        .into_iter()
        .map(|i| SubscriberState { queue: i.labels.get(QUEUE_LABEL).cloned(), id: i.id, address: i.address })
        .collect();
    subscribers.dedup_by(|a, b| a.id == b.id);
    TopicState { topic, subscribers }
}

async fn instance(
    gateway: &Gateway,
    node: Node,
    latency_ms: Option<f64>,
    ejected: Option<String>,
) -> InstanceState {
    let cached = gateway.health.0.lock().expect("health lock").get(&node.id).cloned();
    let health = match cached {
        Some((taken, health)) if taken.elapsed() < HEALTH_FRESH_FOR => health,
        _ => {
            let health = crate::why::probe(&node, gateway.tls.as_ref()).await;
            gateway
                .health
                .0
                .lock()
                .expect("health lock")
                .insert(node.id.clone(), (Instant::now(), health.clone()));
            health
        }
    };
    InstanceState {
        id: node.id,
        address: node.address.to_string(),
        version: node.version,
        labels: node.metadata,
        health,
        draining: node.draining,
        ejected,
        latency_ms,
    }
}
