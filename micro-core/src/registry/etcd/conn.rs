//! The connection to an etcd cluster: one client per endpoint, requests to one member at a
//! time, moving to the next when it fails.

use std::{
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use etcd_client::{Client, ConnectOptions};

use super::{CONNECT_TIMEOUT, KEEP_ALIVE, KIND, LEADER_POLL, LEADER_WAIT, REQUEST_TIMEOUT};
use crate::{Error, Result};

/// One client per endpoint, and the endpoint in use: requests go to one member at a time
/// and move to the next when it fails, as etcd's own Go client does.
pub(super) struct Conn {
    pub(super) endpoints: Vec<String>,
    /// The endpoints, comma-separated, for messages.
    pub(super) address: String,
    /// A client per endpoint, replaced by a fresh one (new connection) when it fails.
    pub(super) clients: Mutex<Vec<Client>>,
    /// The index of the endpoint in use.
    pub(super) current: AtomicUsize,
    /// Keys (with their revision) whose bad value was already warned about (the latest
    /// [`crate::registry::warned::MAX_WARNED`]).
    pub(super) warned: Mutex<crate::registry::warned::WarnedOnce<(String, i64)>>,
}

impl Conn {
    pub(super) async fn connect(endpoints: Vec<String>, address: String) -> Result<Conn> {
        let mut clients = Vec::new();
        for endpoint in &endpoints {
            clients.push(Self::client_for(endpoint, &address).await?);
        }
        Ok(Conn {
            endpoints,
            address,
            clients: Mutex::new(clients),
            current: AtomicUsize::new(0),
            warned: Mutex::default(),
        })
    }

    /// A client of `endpoint` alone; it connects on first use.
    pub(super) async fn client_for(endpoint: &str, address: &str) -> Result<Client> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1)
            .with_require_leader(true);
        Client::connect([endpoint], Some(options)).await.map_err(|err| Error::Registry {
            registry: KIND.to_string(),
            address: address.to_owned(),
            message: format!("could not set up the client of {endpoint}: {err}"),
            source: Some(Box::new(err)),
        })
    }

    /// The endpoint in use and its client.
    pub(super) fn current(&self) -> (usize, Client) {
        let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        (index, self.clients.lock().expect("etcd clients lock")[index].clone())
    }

    /// After a failure on endpoint `index`: its client is replaced by a fresh one (dropping a
    /// connection that may hang), and requests move to the next endpoint, unless another
    /// failure moved them already.
    pub(super) async fn failed(&self, index: usize) {
        let next = (index + 1) % self.endpoints.len();
        if self.current.compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            && self.endpoints.len() > 1
        {
            tracing::warn!(failed = %self.endpoints[index], next = %self.endpoints[next], "etcd: endpoint failed; moving to the next");
        }
        match Self::client_for(&self.endpoints[index], &self.address).await {
            Ok(fresh) => self.clients.lock().expect("etcd clients lock")[index] = fresh,
            Err(err) => {
                tracing::warn!(error = %crate::error::error_chain(&err), "etcd: could not make a fresh client")
            }
        }
    }

    /// Runs `request` with a deadline on the endpoint in use; on a failure moves to the next
    /// endpoint and tries again, once per endpoint (at least twice). Once a member that
    /// answers says the cluster has no leader (an election after the leader died), it goes on
    /// trying, with backoff, for up to [`LEADER_WAIT`]: a new leader keeps every lease alive,
    /// so a heartbeat that waits for it loses nothing. Returns the endpoint that answered, too.
    pub(super) async fn call_on<T, F, Fut>(&self, what: &str, request: F) -> Result<(usize, T)>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = crate::registry::Backoff::new(LEADER_POLL.0, LEADER_POLL.1);
        let mut attempts = 0;
        // Whether any member said the cluster has no leader during this call: then a dead
        // member refusing the next attempt does not end the wait for the new leader.
        let mut electing = false;
        loop {
            let (index, client) = self.current();
            let (no_leader, last) = match tokio::time::timeout(REQUEST_TIMEOUT, request(client)).await {
                Ok(Ok(value)) => return Ok((index, value)),
                Ok(Err(err)) => (is_no_leader(&err), self.error(what, err)),
                Err(_) => (false, self.timeout(what)),
            };
            attempts += 1;
            electing |= no_leader;
            if no_leader {
                // The member answered; only the cluster is between leaders.
                let _ = self.current.compare_exchange(
                    index,
                    (index + 1) % self.endpoints.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            } else {
                self.failed(index).await;
            }
            if attempts >= self.endpoints.len().max(2) {
                if !electing || started.elapsed() >= LEADER_WAIT {
                    return Err(last);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }

    /// [`Conn::call_on`] without the endpoint.
    pub(super) async fn call<T, F, Fut>(&self, what: &str, request: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(what, request).await.map(|(_, value)| value)
    }

    pub(super) fn error(&self, what: &str, err: etcd_client::Error) -> Error {
        const CHECK: &str = "is an etcd member running there? Set MICRO_REGISTRY_ADDRESS \
                             (--registry-address) to the cluster's client endpoints";
        let (message, source): (String, Option<crate::BoxError>) =
            match wrapped(&err).and_then(crate::error::unreachable_reason) {
                Some(reason) => (format!("{what}: {reason}; {CHECK}"), None),
                None => (format!("{what}: {err}; {CHECK}"), Some(Box::new(err))),
            };
        Error::Registry { registry: KIND.to_string(), address: self.address.clone(), message, source }
    }

    pub(super) fn timeout(&self, what: &str) -> Error {
        Error::Registry {
            registry: KIND.to_string(),
            address: self.address.clone(),
            message: format!(
                "{what}: no answer within {REQUEST_TIMEOUT:?}; is an etcd member running there, \
                 and does the cluster have a leader?"
            ),
            source: None,
        }
    }

    /// Warns once per key and revision that its value is not an instance.
    pub(super) fn warn_bad_value(&self, key: &str, revision: i64, reason: &str) {
        if self.warned.lock().expect("etcd warned lock").first_time((key.to_owned(), revision)) {
            tracing::warn!(%key, revision, reason, "etcd: skipped a value that is not a go-micro registry.Service with a node");
        }
    }
}

/// The error `err` wraps (the client's error type does not expose it as a source).
fn wrapped(err: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    match err {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::IoError(io) => Some(io),
        etcd_client::Error::TransportError(transport) => Some(transport),
        _ => None,
    }
}

/// Whether a member answered that the cluster has no leader (it is electing one).
fn is_no_leader(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Unavailable && status.message().contains("no leader"))
}
