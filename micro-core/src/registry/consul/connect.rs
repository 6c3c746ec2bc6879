//! Consul Connect, native: a process takes its leaf certificate and the CA roots from its
//! own agent, keeps them current with blocking queries (the agent renews the leaf before it
//! expires, and answers the query with the new one), and asks the agent whether each caller
//! may call (its intentions).
//!
//! - `GET /v1/agent/connect/ca/leaf/<name>`: `CertPEM`, `PrivateKeyPEM`, `ValidBefore`.
//! - `GET /v1/agent/connect/ca/roots`: `TrustDomain`, `Roots[].RootCert`.
//! - `POST /v1/agent/connect/authorize` with `Target`, `ClientCertURI`, `ClientCertSerial`:
//!   `Authorized`, `Reason`.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::registry::ConsulRegistry;
//! let consul = ConsulRegistry::builder().connect_native(true).build()?;
//! let tls = consul.connect_tls("vessel-service").await?;
//! # Ok(()) }
//! ```

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{REQUEST_TIMEOUT, WATCH_BACKOFF, WATCH_WAIT, agent::Agent, wire::go_duration};
use crate::{
    Result,
    auth::{Authorize, Decision},
    config::TlsConfig,
    registry::Backoff,
    tls::{Material, Renewer, TlsSource, Trust},
};

/// How long a process waits at start for the Connect CA to have a root.
const CA_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often it asks meanwhile.
const CA_READY_POLL: Duration = Duration::from_millis(100);

/// `GET /v1/agent/connect/ca/leaf/<name>`; fields not read are skipped.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Leaf {
    #[serde(rename = "CertPEM")]
    cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    private_key_pem: String,
    valid_before: String,
}

/// `GET /v1/agent/connect/ca/roots`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Roots {
    trust_domain: String,
    roots: Vec<Root>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Root {
    root_cert: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AuthorizeRequest<'a> {
    target: &'a str,
    #[serde(rename = "ClientCertURI")]
    client_cert_uri: &'a str,
    client_cert_serial: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AuthorizeAnswer {
    authorized: bool,
    #[serde(default)]
    reason: String,
}

/// `GET /v1/agent/self`, only the datacenter.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentSelf {
    config: AgentConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentConfig {
    datacenter: String,
}

impl Agent {
    /// A GET of `/<segments>` and the `X-Consul-Index` of its answer; with `index`, a
    /// blocking query that waits up to [`WATCH_WAIT`] for something newer.
    async fn blocking<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        segments: &[&str],
        index: Option<u64>,
    ) -> Result<(T, u64)> {
        let mut url = self.url(segments, false);
        let mut request = self.request_to(Method::GET, url.clone());
        if let Some(index) = index {
            url.query_pairs_mut()
                .append_pair("index", &index.to_string())
                .append_pair("wait", &go_duration(WATCH_WAIT));
            request =
                self.request_to(Method::GET, url).timeout(WATCH_WAIT + WATCH_WAIT / 16 + REQUEST_TIMEOUT);
        }
        let response = self.send(request).await.map_err(|failure| self.error(what, failure))?;
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = response.json().await.map_err(|err| {
            self.error(what, super::agent::Failure::Refused(format!("unexpected answer: {err}")))
        })?;
        Ok((body, index))
    }

    async fn leaf(&self, name: &str, index: Option<u64>) -> Result<(Leaf, u64)> {
        let what = format!("Connect leaf certificate of {name}");
        self.blocking(&what, &["v1", "agent", "connect", "ca", "leaf", name], index).await
    }

    async fn roots(&self, index: Option<u64>) -> Result<(Roots, u64)> {
        self.blocking("Connect CA roots", &["v1", "agent", "connect", "ca", "roots"], index).await
    }

    /// The roots, once there are any: a Connect CA comes up shortly after its leader, and
    /// until then no leaf is signed (`CA root is nil`).
    async fn first_roots(&self) -> Result<(Roots, u64)> {
        let deadline = tokio::time::Instant::now() + CA_READY_TIMEOUT;
        loop {
            let (roots, index) = self.roots(None).await?;
            if !roots.roots.is_empty() {
                return Ok((roots, index));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(self.error(
                    "Connect CA roots",
                    super::agent::Failure::Refused(format!(
                        "none after {CA_READY_TIMEOUT:?}: is Connect enabled on the servers (connect {{ enabled = true }})?"
                    )),
                ));
            }
            tokio::time::sleep(CA_READY_POLL).await;
        }
    }

    async fn own_datacenter(&self) -> Result<String> {
        let request = self.request(Method::GET, &["v1", "agent", "self"], false);
        let answer: AgentSelf = self.json("agent self", request).await?;
        Ok(answer.config.datacenter)
    }
}

/// The material of a leaf and the roots.
fn material(leaf: &Leaf, roots: &Roots) -> Material {
    let ca: String = roots.roots.iter().map(|root| format!("{}\n", root.root_cert.trim_end())).collect();
    Material {
        identity: Some((leaf.cert_pem.clone().into_bytes(), leaf.private_key_pem.clone().into_bytes())),
        ca: Some(ca.into_bytes()),
    }
}

impl super::ConsulRegistry {
    /// TLS for the service `name` under Consul Connect: its leaf certificate and the CA
    /// roots from the agent, kept current by a task (blocking queries; it stops with the
    /// last clone of the config); clients check that a server's SPIFFE id is Connect's for
    /// the name they call; servers require client certificates and ask the agent about each
    /// caller (intentions, answers kept [`crate::auth::authorize::ANSWER_TTL`]). Needs a
    /// tokio runtime, and Connect enabled on the agent (`connect { enabled = true }`; dev
    /// agents have it).
    pub async fn connect_tls(&self, name: &str) -> Result<TlsConfig> {
        let agent = self.agent.clone();
        let datacenter = match &agent.datacenter {
            Some(datacenter) => datacenter.clone(),
            None => agent.own_datacenter().await?,
        };
        let (roots, roots_index) = agent.first_roots().await?;
        let (leaf, leaf_index) = agent.leaf(name, None).await?;
        let trust = Trust::ConsulConnect { trust_domain: roots.trust_domain.clone(), datacenter };
        tracing::info!(service = %name, valid_before = %leaf.valid_before, trust = ?trust, "Consul Connect certificate");
        let initial = material(&leaf, &roots);
        let follow = {
            let (agent, name) = (agent.clone(), name.to_owned());
            move |renewer| renew(agent, name, renewer, (leaf, leaf_index), (roots, roots_index))
        };
        let source = TlsSource::renewed(initial, trust, follow)?
            .authorize(Arc::new(Intentions { agent, target: name.to_owned() }));
        Ok(TlsConfig::from_source(source))
    }
}

/// Follows the leaf and the roots with blocking queries, each renewal put in force.
async fn renew(agent: Arc<Agent>, name: String, renewer: Renewer, leaf: (Leaf, u64), roots: (Roots, u64)) {
    let (leaf_index, roots_index) = (leaf.1, roots.1);
    let current = Mutex::new((leaf.0, roots.0));
    let put_in_force = |current: &(Leaf, Roots)| {
        if let Err(err) = renewer.renew(material(&current.0, &current.1)) {
            tracing::error!(service = %name, error = %crate::error::error_chain(&err), "Consul Connect certificate not usable: the one in force stays");
        }
    };
    let follow_leaf = async {
        let mut index = leaf_index;
        let mut backoff = Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1);
        loop {
            match agent.leaf(&name, Some(index)).await {
                Ok((leaf, next)) => {
                    backoff.reset();
                    if next != index {
                        tracing::info!(service = %name, valid_before = %leaf.valid_before, "Consul Connect certificate renewed");
                        let mut current = current.lock().expect("connect lock");
                        current.0 = leaf;
                        put_in_force(&current);
                    }
                    index = super::watch::next_index(index, next);
                }
                Err(err) => {
                    tracing::warn!(service = %name, error = %crate::error::error_chain(&err), "Consul Connect certificate: query failed; trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    };
    let follow_roots = async {
        let mut index = roots_index;
        let mut backoff = Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1);
        loop {
            match agent.roots(Some(index)).await {
                Ok((roots, next)) => {
                    backoff.reset();
                    if next != index {
                        tracing::info!(service = %name, roots = roots.roots.len(), "Consul Connect CA roots changed");
                        let mut current = current.lock().expect("connect lock");
                        current.1 = roots;
                        put_in_force(&current);
                    }
                    index = super::watch::next_index(index, next);
                }
                Err(err) => {
                    tracing::warn!(service = %name, error = %crate::error::error_chain(&err), "Consul Connect CA roots: query failed; trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    };
    tokio::join!(follow_leaf, follow_roots);
}

/// The agent's intentions for the service `target`.
struct Intentions {
    agent: Arc<Agent>,
    target: String,
}

#[async_trait]
impl Authorize for Intentions {
    async fn authorize(&self, caller: &str, serial: &str) -> Result<Decision> {
        let body =
            AuthorizeRequest { target: &self.target, client_cert_uri: caller, client_cert_serial: serial };
        let request =
            self.agent.request(Method::POST, &["v1", "agent", "connect", "authorize"], false).json(&body);
        let answer: AuthorizeAnswer = self.agent.json("Connect authorize", request).await?;
        Ok(Decision { allowed: answer.authorized, reason: answer.reason })
    }

    fn authority(&self) -> String {
        format!("Consul intentions of {}", self.target)
    }
}
