//! What every subscriber in a broker figure runs: each body carries the moment it was
//! published, so the subscriber sees its latency; arrivals are counted for the waits.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;

/// Size of every body the figures publish: an 8-byte publish time and padding.
pub const BODY_SIZE: usize = 256;

/// The receiving end of one side of a broker figure (shared by its publisher and subscriber).
pub struct Probe {
    base: Instant,
    arrived: watch::Sender<u64>,
    /// Nanoseconds from `base` to the latest arrival.
    last_arrival: AtomicU64,
    recording: AtomicBool,
    latencies: Mutex<Vec<f64>>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            base: Instant::now(),
            arrived: watch::Sender::new(0),
            last_arrival: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            latencies: Mutex::new(Vec::new()),
        }
    }
}

impl Probe {
    /// Nanoseconds since this probe was made.
    pub fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// A body stamped with this moment.
    pub fn body(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(BODY_SIZE);
        body.put_u64_le(self.now());
        body.resize(BODY_SIZE, 0xa5);
        body.freeze()
    }

    /// Called by the subscriber for each body it gets.
    pub fn arrived(&self, body: &[u8]) {
        let now = self.now();
        if self.recording.load(Ordering::Relaxed)
            && let Some(stamp) = body.get(..8)
        {
            let sent = u64::from_le_bytes(stamp.try_into().unwrap_or_default());
            let latency = now.saturating_sub(sent) as f64 / 1e3;
            if let Ok(mut latencies) = self.latencies.lock() {
                latencies.push(latency);
            }
        }
        self.last_arrival.fetch_max(now, Ordering::Relaxed);
        self.arrived.send_modify(|count| *count += 1);
    }

    /// Arrivals so far.
    pub fn count(&self) -> u64 {
        *self.arrived.borrow()
    }

    /// When the latest arrival was, in nanoseconds from this probe's making.
    pub fn last_arrival(&self) -> u64 {
        self.last_arrival.load(Ordering::Relaxed)
    }

    /// Waits until `count` bodies arrived in all; `false` past `limit`.
    pub async fn wait_for(&self, count: u64, limit: Duration) -> bool {
        let mut arrived = self.arrived.subscribe();
        tokio::time::timeout(limit, arrived.wait_for(|n| *n >= count)).await.is_ok_and(|r| r.is_ok())
    }

    /// Starts keeping each arrival's latency (microseconds).
    pub fn record(&self) {
        self.latencies.lock().expect("latencies lock").clear();
        self.recording.store(true, Ordering::Relaxed);
    }

    /// Stops keeping latencies and returns those kept.
    pub fn recorded(&self) -> Vec<f64> {
        self.recording.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.latencies.lock().expect("latencies lock"))
    }
}
