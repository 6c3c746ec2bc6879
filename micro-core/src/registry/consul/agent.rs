//! The typed HTTP client for the few endpoints of a Consul agent this backend uses.

use std::{collections::BTreeMap, time::Duration};

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::{
    KIND, REQUEST_TIMEOUT,
    wire::{ConnectRegistration, ServiceEntry, ServiceRegistration, check_id, checks, go_duration},
};
use crate::{Error, Result, labels, registry::Node};

/// The typed HTTP client for the few endpoints used.
pub(super) struct Agent {
    pub(super) http: reqwest::Client,
    pub(super) base: Url,
    /// `host:port`, for messages.
    pub(super) address: String,
    pub(super) token: Option<String>,
    pub(super) datacenter: Option<String>,
    /// Registers services as Connect-native (`Connect: {Native: true}`).
    pub(super) connect_native: bool,
}

/// Why a request did not give what was asked.
pub(super) enum Failure {
    /// No connection, or no answer in time.
    Unreachable(reqwest::Error),
    /// The agent answered with a status other than 2xx, and this body.
    Status(StatusCode, String),
    /// The agent answered, but not with what was expected.
    Refused(String),
}

impl Agent {
    /// The URL of `/<segments>`, with `dc` when it reads the `catalog`.
    pub(super) fn url(&self, segments: &[&str], catalog: bool) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in build").pop_if_empty().extend(segments);
        if let (true, Some(dc)) = (catalog, &self.datacenter) {
            url.query_pairs_mut().append_pair("dc", dc);
        }
        url
    }

    /// A request to `url` with the token and the usual timeout.
    pub(super) fn request_to(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, url).timeout(REQUEST_TIMEOUT);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        request
    }

    /// A request to `/<segments>`, with `dc` when it reads the `catalog`.
    pub(super) fn request(
        &self,
        method: Method,
        segments: &[&str],
        catalog: bool,
    ) -> reqwest::RequestBuilder {
        self.request_to(method, self.url(segments, catalog))
    }

    pub(super) async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let response = request.send().await.map_err(Failure::Unreachable)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(Failure::Status(status, body.trim().to_owned()))
    }

    pub(super) async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T> {
        let response = self.send(request).await.map_err(|failure| self.error(what, failure))?;
        response
            .json()
            .await
            .map_err(|err| self.error(what, Failure::Refused(format!("unexpected answer: {err}"))))
    }

    pub(super) fn error(&self, what: &str, failure: Failure) -> Error {
        let (message, source): (String, Option<crate::BoxError>) = match failure {
            Failure::Unreachable(err) => {
                const CHECK: &str = "is a Consul agent running there? \
                                     Set MICRO_REGISTRY_ADDRESS (--registry-address) to its HTTP address";
                match crate::error::unreachable_reason(&err) {
                    Some(reason) => (format!("{what}: {reason}; {CHECK}"), None),
                    None if err.is_timeout() => (format!("{what}: no answer in time; {CHECK}"), None),
                    None => {
                        let cause = root_cause(&err);
                        (format!("{what}: could not connect ({cause}); {CHECK}"), Some(Box::new(err)))
                    }
                }
            }
            Failure::Status(status, body) => {
                let hint = match status {
                    StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                        "; check the ACL token (CONSUL_HTTP_TOKEN, --consul-token)"
                    }
                    _ => "",
                };
                (format!("{what}: the agent answered {status}: {body}{hint}"), None)
            }
            Failure::Refused(message) => (format!("{what}: {message}"), None),
        };
        Error::Registry { registry: KIND.to_string(), address: self.address.clone(), message, source }
    }

    /// PUT /v1/agent/service/register with a TTL check that starts out passing.
    pub(super) async fn register(&self, node: &Node, ttl: Duration) -> Result<(), Failure> {
        let mut meta: BTreeMap<&str, &str> =
            node.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        meta.insert(labels::VERSION, &node.version);
        if node.draining {
            meta.insert(labels::DRAINING, labels::FLAG_ON);
        }
        let tags =
            if node.version.is_empty() { Vec::new() } else { vec![format!("version={}", node.version)] };
        let registration = ServiceRegistration {
            id: &node.id,
            name: &node.name,
            tags,
            address: node.address.ip().to_string(),
            port: node.address.port(),
            meta,
            checks: checks(node, ttl, self.connect_native),
            connect: self.connect_native.then_some(ConnectRegistration { native: true }),
        };
        let request = self.request(Method::PUT, &["v1", "agent", "service", "register"], false);
        self.send(request.json(&registration)).await.map(drop)
    }

    /// PUT /v1/agent/check/pass/<check id>.
    pub(super) async fn pass(&self, node_id: &str) -> Result<(), Failure> {
        let check = check_id(node_id);
        let request = self.request(Method::PUT, &["v1", "agent", "check", "pass", &check], false);
        self.send(request).await.map(drop)
    }

    /// GET /v1/health/service/<name>?passing: the passing instances and the index to block on
    /// next. With `index`, waits up to `wait` for something newer.
    pub(super) async fn passing(
        &self,
        name: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, Vec<Node>), Failure> {
        let mut url = self.url(&["v1", "health", "service", name], true);
        url.query_pairs_mut().append_key_only("passing");
        if let Some(index) = index {
            url.query_pairs_mut()
                .append_pair("index", &index.to_string())
                .append_pair("wait", &go_duration(wait));
        }
        let mut request = self.request_to(Method::GET, url);
        if index.is_some() {
            // Consul adds up to wait/16 of jitter before it answers an idle query.
            request = request.timeout(wait + wait / 16 + REQUEST_TIMEOUT);
        }
        let response = self.send(request).await?;
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let entries: Vec<ServiceEntry> =
            response.json().await.map_err(|err| Failure::Refused(format!("unexpected answer: {err}")))?;
        let mut nodes: Vec<Node> = entries.into_iter().filter_map(ServiceEntry::into_node).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((index, nodes))
    }
}

/// The innermost cause of an error, e.g. `Connection refused (os error 111)`.
pub(super) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
