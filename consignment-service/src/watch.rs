//! `WatchConsignments`: consignments streamed as they are stored, read from the store that
//! every replica shares, so a watcher on any replica sees every creation, and a watcher
//! that reconnects with the id it saw last (`after_id`) loses nothing and sees nothing twice.
//!
//! One task per process follows the newest position in the store (at once after a creation
//! here, every [`POLL_INTERVAL`] for those of other replicas); each watcher reads pages
//! after its own position and hands them to its stream through a small buffer, so a slow
//! reader only makes its own task wait: nothing piles up in the server.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use proto::consignment::Consignment;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::Status;

use crate::{ConsignmentRepository, ConsignmentStream, RepositoryError};

/// How often the newest position is read, for creations on other replicas.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Consignments read at once by a watcher that is behind.
pub const PAGE: usize = 16;
/// Consignments a watcher holds for a reader that has not taken them yet.
pub const BUFFER: usize = 8;
/// The most watchers one process serves at once; the next is `RESOURCE_EXHAUSTED`.
pub const MAX_WATCHERS: usize = 256;

/// The watchers of one process and what wakes them.
pub(crate) struct Feed {
    repository: Arc<dyn ConsignmentRepository>,
    /// Notified after each creation in this process.
    stored: Arc<Notify>,
    /// The newest position known, followed by a task that lives as long as the feed.
    latest: OnceLock<(watch::Receiver<i64>, AbortOnDrop)>,
    watchers: Arc<Semaphore>,
}

/// A task aborted when its owner is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Feed {
    pub(crate) fn new(repository: Arc<dyn ConsignmentRepository>) -> Self {
        Feed {
            repository,
            stored: Arc::new(Notify::new()),
            latest: OnceLock::new(),
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
        }
    }

    /// Tells the watchers a consignment was stored here.
    pub(crate) fn stored(&self) {
        self.stored.notify_one();
    }

    /// A stream of the consignments stored after `after_id` (empty: from now on).
    pub(crate) async fn watch(&self, after_id: &str) -> Result<ConsignmentStream, Status> {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "consignment-service serves at most {MAX_WATCHERS} watchers at once; close one or watch \
                 another replica"
            ))
        })?;
        let position = match after_id {
            "" => self.repository.latest_position().await.map_err(unreadable)?,
            id => self.repository.position_of(id).await.map_err(unreadable)?.ok_or_else(|| {
                Status::not_found(format!(
                    "after_id {id:?} names no stored consignment; watch without after_id to start from now"
                ))
            })?,
        };
        tracing::info!(after = %after_id, position, "watcher opened");
        let latest = self.latest().clone();
        let (sender, receiver) = mpsc::channel(BUFFER);
        tokio::spawn(serve_watcher(self.repository.clone(), latest, position, sender, permit));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    fn latest(&self) -> &watch::Receiver<i64> {
        let (latest, _task) = self.latest.get_or_init(|| {
            let (sender, receiver) = watch::channel(0);
            let task = tokio::spawn(follow_latest(self.repository.clone(), self.stored.clone(), sender));
            (receiver, AbortOnDrop(task))
        });
        latest
    }
}

/// Keeps `latest` at the newest stored position.
async fn follow_latest(
    repository: Arc<dyn ConsignmentRepository>,
    stored: Arc<Notify>,
    latest: watch::Sender<i64>,
) {
    let mut failing = false;
    loop {
        match repository.latest_position().await {
            Ok(position) => {
                if failing {
                    tracing::info!(database = %repository.database(), "watchers read the database again");
                }
                failing = false;
                latest.send_if_modified(|known| {
                    let newer = position > *known;
                    if newer {
                        *known = position;
                    }
                    newer
                });
            }
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(database = %repository.database(), error = %micro_core::error::error_chain(&err), "watchers cannot read the database; retrying");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stored.notified() => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// Sends one watcher everything stored after `position`, page by page, as its reader takes
/// it; ends when the reader goes away.
async fn serve_watcher(
    repository: Arc<dyn ConsignmentRepository>,
    mut latest: watch::Receiver<i64>,
    mut position: i64,
    sender: mpsc::Sender<Result<Consignment, Status>>,
    _permit: OwnedSemaphorePermit,
) {
    loop {
        let page = match repository.stored_after(position, PAGE).await {
            Ok(page) => page,
            Err(err) => {
                let _ = sender.send(Err(unreadable(err))).await;
                return;
            }
        };
        if page.is_empty() {
            tokio::select! {
                newer = latest.wait_for(|latest| *latest > position) => if newer.is_err() { return },
                _ = sender.closed() => return,
            }
            continue;
        }
        for (at, consignment) in page {
            if sender.send(Ok(consignment)).await.is_err() {
                return;
            }
            position = at;
        }
    }
}

fn unreadable(err: RepositoryError) -> Status {
    Status::unavailable(format!(
        "consignment-service cannot read its database: {}; watch again (with after_id set to the last \
         consignment received) to resume",
        micro_core::error::error_chain(&err)
    ))
}
