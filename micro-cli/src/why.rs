//! `micro why NAME`: explains discovery for a name, step by step, the way a client sees it.

use std::{sync::Arc, time::Duration};

use micro_core::{
    Client, NamedChannel, Node, Registry,
    config::{ClientConfig, RegistryKind, TlsConfig},
    error::error_chain,
    selector::Filter,
};
use serde::Serialize;
use tokio::time::Instant;

use crate::{exit::Failure, out};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The health check's gRPC path: safe to send twice, so probes are hedged like any
/// idempotent call.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// Probe calls through the client per instance, for its latency estimates and ejections.
const PROBES_PER_INSTANCE: usize = 3;

/// How long a health probe of one instance may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One instance and whether a call could go to it.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// The instance.
    pub node: Node,
    /// `SERVING`, `NOT_SERVING`, `UNKNOWN` or `UNREACHABLE: reason`.
    pub health: String,
    /// `pickable`, or why not.
    pub verdict: String,
    /// The client's latency estimate after the probe calls, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Why and for how much longer the client ejected it, if it did.
    pub ejected: Option<String>,
}

/// The whole explanation.
#[derive(Debug, Serialize)]
pub struct Explanation {
    name: String,
    registry: String,
    registry_address: String,
    lookup_ms: u128,
    lookup_error: Option<String>,
    instances: Vec<Verdict>,
    client_cache_known: usize,
    client_cache_ms: u128,
    strategy: String,
    probe_calls: usize,
    next_picks: Vec<String>,
    hints: Vec<String>,
    /// Why the look-up failed, for the exit code.
    #[serde(skip)]
    lookup_failure: Option<Failure>,
}

impl Explanation {
    /// Why a client could not call the name, if it could not: not found, registry
    /// unreachable, or found with no instance pickable.
    pub fn failure(self) -> Option<Failure> {
        if let Some(failure) = self.lookup_failure {
            return Some(failure);
        }
        let pickable = self.instances.iter().any(|v| v.verdict == "pickable");
        let verdicts: Vec<String> =
            self.instances.iter().map(|v| format!("{}: {}", v.node.id, v.verdict)).collect();
        (!pickable).then(|| {
            Failure::NotServing(format!(
                "{} has {} instance(s) in {} and none is pickable: {}",
                self.name,
                self.instances.len(),
                self.registry,
                verdicts.join("; ")
            ))
        })
    }
}

/// Asks `instance`'s grpc.health.v1 service about the whole server.
pub async fn probe(node: &Node, tls: Option<&TlsConfig>) -> String {
    let attempt = async {
        let channel =
            micro_core::client::connect_lazily(node, &probe_config(tls)).map_err(|e| error_chain(&*e))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map_err(|s| format!("{}: {}", micro_core::metrics::code_name(s.code()), s.message()))?;
        Ok::<_, String>(reply.into_inner().status())
    };
    match tokio::time::timeout(PROBE_TIMEOUT * 2, attempt).await {
        Ok(Ok(ServingStatus::Serving)) => "SERVING".into(),
        Ok(Ok(ServingStatus::NotServing)) => "NOT_SERVING".into(),
        Ok(Ok(other)) => format!("{other:?}").to_uppercase(),
        Ok(Err(reason)) => format!("UNREACHABLE: {reason}"),
        Err(_) => "UNREACHABLE: no answer within 2s".into(),
    }
}

fn filter_reason(
    filter: &Filter,
    wanted: &(Option<String>, Vec<(String, String)>),
    node: &Node,
) -> Option<String> {
    if filter.accepts(node) {
        return None;
    }
    if let Some(version) = &wanted.0
        && *version != node.version
    {
        return Some(format!("filtered out: version {:?}, wanted {version:?}", node.version));
    }
    let (key, value) = wanted.1.iter().find(|(k, v)| node.metadata.get(k) != Some(v))?;
    Some(match node.metadata.get(key) {
        Some(actual) => format!("filtered out: {key}={actual}, wanted {key}={value}"),
        None => format!("filtered out: no {key} label, wanted {key}={value}"),
    })
}

/// Builds the explanation for `name` as seen through `registry`.
pub async fn explain(
    registry: Arc<dyn Registry>,
    name: &str,
    (version, metadata): (Option<String>, Vec<(String, String)>),
    client_config: ClientConfig,
    tls: Option<TlsConfig>,
) -> Explanation {
    let mut filter = Filter::new();
    if let Some(v) = &version {
        filter = filter.version(v.clone());
    }
    for (k, v) in &metadata {
        filter = filter.metadata(k.clone(), v.clone());
    }
    let wanted = (version, metadata);
    let started = Instant::now();
    // Fails at once, with the closest registered name, when the registry lists others.
    let lookup = crate::lookup::find(&registry, name).await;
    let lookup_ms = started.elapsed().as_millis();
    let mut hints = Vec::new();
    let mut lookup_failure = None;
    let (nodes, lookup_error) = match lookup {
        Ok(nodes) => (nodes, None),
        Err(failure) => {
            if let Failure::NotFound(_) = failure {
                let names = registry.list_services().await.unwrap_or_default();
                if let Some(near) = crate::lookup::suggestion(name, &names) {
                    hints.push(format!("did you mean {near}? similar names registered: [{near:?}]"));
                } else if !names.is_empty() {
                    hints.push(format!("names registered: {names:?}"));
                }
            }
            hints.push(match registry.kind() {
                RegistryKind::Mdns => "mDNS sees one network segment: is the service on this one, with multicast allowed (not behind a Docker bridge or firewall)? Otherwise use MICRO_REGISTRY=consul".into(),
                RegistryKind::Consul => format!("is the service's check passing? see http://{}/v1/health/checks/{name}", registry.address()),
                RegistryKind::Etcd => format!(
                    "is the instance's lease alive? `etcdctl --endpoints {} get --prefix /micro/registry/{name}/` lists what is registered; a key goes when its lease (MICRO_REGISTER_TTL) runs out without a heartbeat",
                    registry.address()
                ),
                RegistryKind::Dns => format!(
                    "the platform registers here, not the service: does `_grpc._tcp.{name}` (MICRO_DNS_TEMPLATE, MICRO_DNS_DOMAIN) have SRV or A records at {}? A Kubernetes headless Service needs a port named grpc",
                    registry.address()
                ),
                RegistryKind::Memory => "the memory registry only holds services of this process".into(),
            });
            let message = failure.message().to_owned();
            lookup_failure = Some(failure);
            (Vec::new(), Some(message))
        }
    };

    let mut instances = Vec::new();
    for node in nodes {
        let health = probe(&node, tls.as_ref()).await;
        let verdict = if let Some(reason) = filter_reason(&filter, &wanted, &node) {
            reason
        } else if node.draining {
            "excluded: draining (shutting down)".into()
        } else if health.starts_with("UNREACHABLE") {
            "would be ejected: its first call fails to connect".into()
        } else if health == "NOT_SERVING" {
            "excluded: health NOT_SERVING".into()
        } else {
            "pickable".into()
        };
        instances.push(Verdict { node, health, verdict, latency_ms: None, ejected: None });
    }

    let client =
        Client::new(registry.clone()).config(client_config).tls(tls).idempotent_methods(&[HEALTH_CHECK]);
    let channel = client.channel_with(name, filter);
    let cache_started = Instant::now();
    let expected = instances.len();
    while channel.instances().len() < expected && cache_started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let client_cache_ms = cache_started.elapsed().as_millis();
    let pickable: Vec<String> =
        instances.iter().filter(|v| v.verdict == "pickable").map(|v| v.node.id.clone()).collect();
    // The client learns latency and ejects by calling: a few health checks through the
    // channel, picked, hedged and judged as any call would be.
    let probe_calls = if pickable.is_empty() { 0 } else { PROBES_PER_INSTANCE * expected };
    probe_through(&channel, probe_calls).await;
    for view in channel.inspect() {
        if let Some(verdict) = instances.iter_mut().find(|v| v.node.id == view.node.id) {
            verdict.latency_ms = view.load.latency.map(|l| l.as_secs_f64() * 1000.0);
            verdict.ejected = view.ejected.map(|(left, why)| format!("{why}, {} ms more", left.as_millis()));
        }
    }
    let next_picks = channel.next_picks(pickable.len().max(1) * 2).into_iter().map(|node| node.id).collect();
    if pickable.is_empty() && lookup_error.is_none() {
        hints.push("no instance can take calls: see each verdict".into());
    }
    Explanation {
        lookup_failure,
        name: name.to_owned(),
        registry: registry.kind().to_string(),
        registry_address: registry.address(),
        lookup_ms,
        lookup_error,
        client_cache_known: channel.instances().len(),
        client_cache_ms,
        strategy: channel.strategy().to_owned(),
        probe_calls,
        instances,
        next_picks,
        hints,
    }
}

/// Prints the explanation for people.
pub fn print(explanation: &Explanation) {
    let e = explanation;
    out::line(format!(
        "registry {} at {}: looked up {:?} in {} ms",
        e.registry, e.registry_address, e.name, e.lookup_ms
    ));
    if let Some(error) = &e.lookup_error {
        out::line(format!("  {error}"));
    }
    for v in &e.instances {
        let latency = v.latency_ms.map_or("not measured".to_owned(), |ms| format!("{ms:.2} ms"));
        let ejected = v.ejected.as_ref().map_or(String::new(), |why| format!("; ejected: {why}"));
        out::line(format!(
            "  {} at {} version {:?} health {}: {}; latency {latency}{ejected}",
            v.node.id, v.node.address, v.node.version, v.health, v.verdict
        ));
    }
    out::line(format!(
        "client cache: {} instance(s) known after {} ms",
        e.client_cache_known, e.client_cache_ms
    ));
    if !e.next_picks.is_empty() {
        out::line(format!(
            "next picks ({}, after {} probe calls): {}",
            e.strategy,
            e.probe_calls,
            e.next_picks.join(", ")
        ));
    }
    for hint in &e.hints {
        out::line(format!("hint: {hint}"));
    }
}

/// Settings for a probe: a short connect timeout, the caller's TLS.
fn probe_config(tls: Option<&TlsConfig>) -> micro_core::config::ClientConfig {
    micro_core::config::ClientConfig {
        connect_timeout: PROBE_TIMEOUT,
        tls: tls.cloned(),
        ..Default::default()
    }
}

/// Sends `calls` health checks through `channel`, one after another, ignoring their results:
/// what matters is what the channel learns of each instance.
async fn probe_through(channel: &NamedChannel, calls: usize) {
    let mut health = HealthClient::new(channel.clone());
    for _ in 0..calls {
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.set_timeout(PROBE_TIMEOUT);
        let _ = health.check(request).await;
    }
}
