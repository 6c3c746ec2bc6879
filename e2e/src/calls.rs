//! What tests share about waiting and calling: poll until something holds, and a paced
//! stream of calls with a tally of who answered when and what failed.
//!
//! # Examples
//! ```no_run
//! # async fn demo(channel: micro_core::NamedChannel) {
//! use std::time::Duration;
//! use e2e::calls::{CallStream, poll_until};
//! use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
//!
//! let vessels = VesselServiceClient::new(channel);
//! let stream = CallStream::start(2, Duration::from_millis(10), 1_000, move || {
//!     let mut vessels = vessels.clone();
//!     async move {
//!         let reply = vessels.find_available(Specification::default()).await?;
//!         Ok(reply.into_inner().vessel.unwrap_or_default().id)
//!     }
//! });
//! poll_until("100 calls", Duration::from_secs(10), async || (stream.done() >= 100).then_some(())).await;
//! let tally = stream.finish().await;
//! tally.assert_no_failures();
//! # }
//! ```

use std::{
    collections::HashMap,
    fmt::Display,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};

/// How often [`poll_until`] checks again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// Checks `check` every [`POLL_EVERY`] until it gives a value, and returns it; fails the
/// test, naming `what`, after `limit`.
pub async fn poll_until<T>(
    what: impl Display,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not reached within {limit:?}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The outcome of a [`CallStream`]: who answered when, and every failure.
#[derive(Debug, Default)]
pub struct Tally {
    /// The label each successful call answered with, and when.
    pub served: Vec<(String, Instant)>,
    /// Each failed call's status.
    pub failures: Vec<tonic::Status>,
}

impl Tally {
    /// Fails the test when any call failed, showing the first failure.
    pub fn assert_no_failures(&self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} calls failed, e.g. {:?}",
            self.failures.len(),
            self.failures.len() + self.served.len(),
            self.failures.first()
        );
    }

    /// How many calls each label answered.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (label, _) in &self.served {
            *counts.entry(label.clone()).or_default() += 1;
        }
        counts
    }
}

#[derive(Default)]
struct Shared {
    tally: Mutex<Tally>,
    started: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
}

/// `workers` callers, each pausing `pace` between calls, until `total` calls were made or
/// the stream is finished. A call answers with a label (an instance's) or a status.
pub struct CallStream {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl CallStream {
    /// Starts the callers; `call` makes one call.
    pub fn start<F, Fut>(workers: usize, pace: Duration, total: usize, call: F) -> CallStream
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<String, tonic::Status>> + Send,
    {
        let shared = Arc::new(Shared::default());
        let workers = (0..workers)
            .map(|_| {
                let (shared, call) = (shared.clone(), call.clone());
                tokio::spawn(async move {
                    while !shared.stop.load(Ordering::Relaxed)
                        && shared.started.fetch_add(1, Ordering::SeqCst) < total
                    {
                        let outcome = call().await;
                        {
                            let mut tally = shared.tally.lock().expect("tally lock");
                            match outcome {
                                Ok(label) => tally.served.push((label, Instant::now())),
                                Err(status) => tally.failures.push(status),
                            }
                        }
                        shared.done.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(pace).await;
                    }
                })
            })
            .collect();
        CallStream { shared, workers }
    }

    /// Calls finished so far, served or failed.
    pub fn done(&self) -> usize {
        self.shared.done.load(Ordering::SeqCst)
    }

    /// Calls served so far.
    pub fn served(&self) -> usize {
        self.shared.tally.lock().expect("tally lock").served.len()
    }

    /// Waits until `count` calls have finished; fails the test if the stream stalls for 30 s.
    pub async fn until_done(&self, count: usize) {
        poll_until(format!("{count} calls done"), Duration::from_secs(30), async || {
            (self.done() >= count).then_some(())
        })
        .await;
    }

    /// Lets the callers run to `total`, then returns the tally.
    pub async fn join(mut self) -> Tally {
        for worker in self.workers.drain(..) {
            worker.await.expect("a caller panicked");
        }
        std::mem::take(&mut *self.shared.tally.lock().expect("tally lock"))
    }

    /// Stops the callers after their current call and returns the tally.
    pub async fn finish(self) -> Tally {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.join().await
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
    }
}
