//! Reading a name's instances and following them from the revision that read saw.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};

use super::{conn::Conn, wire::node_of};
use crate::Result;
use crate::registry::{Change, Node, NodeId};

/// Every instance under `prefix`, by key, and the revision of the read.
pub(super) async fn read_prefix(conn: &Conn, prefix: &str) -> Result<(i64, Vec<(String, Node)>)> {
    let answer = conn
        .call("look-up", |mut c| {
            let prefix = prefix.to_owned();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
    let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
    let nodes = answer
        .kvs()
        .iter()
        .filter_map(|kv| node_of(conn, kv).map(|node| (String::from_utf8_lossy(kv.key()).into_owned(), node)))
        .collect();
    Ok((revision, nodes))
}

pub(super) struct WatchState {
    pub(super) conn: Arc<Conn>,
    pub(super) name: String,
    pub(super) prefix: String,
    /// The instances known, by key.
    pub(super) known: BTreeMap<String, Node>,
    /// The last revision reflected in `known`; `None`: read afresh.
    pub(super) revision: Option<i64>,
    /// The open watch and the endpoint it runs on.
    pub(super) stream: Option<(usize, WatchStream)>,
    pub(super) pending: VecDeque<Change<NodeId, Node>>,
    /// The wait before the next try after a failure: jittered, so every watcher of a
    /// cluster that came back does not return at the same moment.
    pub(super) backoff: crate::registry::Backoff,
    pub(super) failing: bool,
}

impl WatchState {
    pub(super) async fn next_change(&mut self) -> Change<NodeId, Node> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return change;
            }
            if let Err(err) = self.step().await {
                let endpoint = self.stream.take().map_or(self.conn.current().0, |(index, _)| index);
                let retry_in = self.backoff.next_delay();
                tracing::warn!(service = %self.name, error = %crate::error::error_chain(&err), ?retry_in, "etcd: watch failed; keeping known instances");
                self.failing = true;
                self.conn.failed(endpoint).await;
                tokio::time::sleep(retry_in).await;
            }
        }
    }

    /// Reads, opens the watch, or takes one answer of it.
    pub(super) async fn step(&mut self) -> Result<()> {
        let Some(revision) = self.revision else {
            let (revision, found) = read_prefix(&self.conn, &self.prefix).await?;
            self.replace(found.into_iter().collect());
            self.revision = Some(revision);
            return Ok(());
        };
        let Some((_, stream)) = &mut self.stream else {
            let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(revision + 1);
            let stream = self
                .conn
                .call_on("watch", |mut c| {
                    let (prefix, options) = (self.prefix.clone(), options.clone());
                    async move { c.watch(prefix, Some(options)).await }
                })
                .await?;
            self.stream = Some(stream);
            return Ok(());
        };
        let answer = stream.message().await.map_err(|err| self.conn.error("watch", err))?;
        let Some(answer) = answer else {
            return Err(self.conn.error("watch", etcd_client::Error::WatchError("the stream ended".into())));
        };
        if self.failing {
            self.failing = false;
            tracing::info!(service = %self.name, address = %self.conn.address, "etcd: watch answers again");
        }
        self.backoff.reset();
        if answer.canceled() || answer.compact_revision() > 0 {
            tracing::warn!(service = %self.name, compacted = answer.compact_revision(), reason = %answer.cancel_reason(), "etcd: watch cancelled; reading afresh");
            self.stream = None;
            self.revision = None;
            return Ok(());
        }
        let mut last = None;
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(Some(kv.mod_revision()));
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let node = match event.event_type() {
                EventType::Put => node_of(&self.conn, kv),
                EventType::Delete => None,
            };
            self.apply(key, node);
        }
        let progress = answer.header().map(|h| h.revision()).filter(|_| answer.events().is_empty());
        if let Some(revision) = last.or(progress) {
            self.revision = Some(revision.max(self.revision.unwrap_or(0)));
        }
        Ok(())
    }

    /// Records what `key` holds now (`None`: nothing usable) and queues the change.
    pub(super) fn apply(&mut self, key: String, node: Option<Node>) {
        match node {
            Some(node) => {
                if self.known.get(&key) != Some(&node) {
                    if let Some(old) = self.known.get(&key).filter(|old| old.id != node.id) {
                        self.pending.push_back(Change::Remove(old.id.clone()));
                    }
                    self.pending.push_back(Change::Insert(node.id.clone(), node.clone()));
                    self.known.insert(key, node);
                }
            }
            None => {
                if let Some(old) = self.known.remove(&key) {
                    self.pending.push_back(Change::Remove(old.id));
                }
            }
        }
    }

    /// Makes `known` what a fresh read found, queueing the difference.
    pub(super) fn replace(&mut self, found: BTreeMap<String, Node>) {
        let gone: Vec<String> = self.known.keys().filter(|k| !found.contains_key(*k)).cloned().collect();
        for key in gone {
            self.apply(key, None);
        }
        for (key, node) in found {
            self.apply(key, Some(node));
        }
    }
}
