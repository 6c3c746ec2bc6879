//! What a channel learns of latency: a peak-EWMA estimate per instance, which the
//! latency-aware strategy weighs, and a recent quantile per name, which sets the hedge delay.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// How fast an estimate forgets (e^-1 per 5 s): a peak fades over a few seconds, and an
/// idle instance's estimate decays toward zero at that pace, so a once-slow instance is
/// tried again. Linkerd and Finagle take 10 s; half that recovers sooner from one hiccup.
const DECAY: Duration = Duration::from_secs(5);

/// A peak-sensitive moving average of one instance's latency: a sample above the estimate
/// replaces it at once; lower samples pull it down slowly. `None` until the second answer:
/// the first one on a new connection also paid for the TCP and HTTP/2 handshakes.
#[derive(Default)]
pub(crate) struct PeakEwma {
    /// The estimate in nanoseconds and when it was last updated.
    state: Mutex<Option<(f64, Instant)>>,
    /// Whether the first answer, which is not taken, has come.
    warm: AtomicBool,
}

impl PeakEwma {
    /// The estimate at `now`, decayed for the time since the last sample.
    pub(crate) fn estimate(&self, now: Instant) -> Option<Duration> {
        let state = *self.state.lock().expect("latency lock");
        state.map(|(nanos, updated)| Duration::from_nanos((nanos * decay(now, updated)) as u64))
    }

    /// Takes an answered attempt's latency into the estimate.
    pub(crate) fn observe(&self, now: Instant, latency: Duration) {
        if !self.warm.swap(true, Ordering::Relaxed) {
            return;
        }
        let sample = latency.as_nanos() as f64;
        let mut state = self.state.lock().expect("latency lock");
        *state = Some(match *state {
            Some((nanos, updated)) => {
                // Toward the sample as time passes; a sample above the estimate at once.
                let weight = decay(now, updated);
                if sample > nanos * weight {
                    (sample, now)
                } else {
                    (nanos * weight + sample * (1.0 - weight), now)
                }
            }
            None => (sample, now),
        });
    }

    /// Whether the instance has answered since it was new or last reset.
    pub(crate) fn has_answered(&self) -> bool {
        self.warm.load(Ordering::Relaxed)
    }

    /// Forgets every sample: the instance is measured afresh, as a new one would be.
    pub(crate) fn reset(&self) {
        *self.state.lock().expect("latency lock") = None;
        self.warm.store(false, Ordering::Relaxed);
    }

    /// Raises the estimate to `latency` if it is lower: an attempt that failed or was given
    /// up on after this long says the instance is at least this slow, never faster.
    pub(crate) fn raise(&self, now: Instant, latency: Duration) {
        let sample = latency.as_nanos() as f64;
        let mut state = self.state.lock().expect("latency lock");
        let decayed = state.map_or(0.0, |(nanos, updated)| nanos * decay(now, updated));
        if sample > decayed {
            *state = Some((sample, now));
        }
    }
}

/// The weight an estimate last updated at `updated` keeps at `now`.
fn decay(now: Instant, updated: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(updated).as_secs_f64();
    (-elapsed / DECAY.as_secs_f64()).exp()
}

/// Buckets of the latency histogram, each 1.25 times the one before, from 50 µs: the last
/// one starts above a minute.
const BUCKETS: usize = 64;
const FIRST_BUCKET_NANOS: f64 = 50_000.0;
const BUCKET_RATIO: f64 = 1.25;
/// Samples before the first quantile is known, and per window after that.
const FIRST_WINDOW: u32 = 16;
const WINDOW: u32 = 256;

/// A quantile of the latencies a name answered with recently, recomputed every window of
/// samples from a histogram: recording is two atomic additions.
pub(crate) struct LatencyWindow {
    quantile: f64,
    counts: [AtomicU32; BUCKETS],
    samples: AtomicU32,
    /// The last window's quantile in nanoseconds; 0 before the first window closes.
    last: AtomicU64,
}

impl LatencyWindow {
    /// A window that reports `quantile` (0 to 1) of its samples.
    pub(crate) fn new(quantile: f64) -> Self {
        LatencyWindow {
            quantile,
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
            samples: AtomicU32::new(0),
            last: AtomicU64::new(0),
        }
    }

    /// Records an answered attempt's latency.
    pub(crate) fn record(&self, latency: Duration) {
        self.counts[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        let samples = self.samples.fetch_add(1, Ordering::AcqRel) + 1;
        let window = if self.last.load(Ordering::Relaxed) == 0 { FIRST_WINDOW } else { WINDOW };
        if samples == window {
            self.close_window();
        }
    }

    /// The quantile of the last closed window; `None` before there was one.
    pub(crate) fn quantile(&self) -> Option<Duration> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    fn close_window(&self) {
        let counts: Vec<u32> = self.counts.iter().map(|count| count.swap(0, Ordering::Relaxed)).collect();
        self.samples.store(0, Ordering::Release);
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let rank = ((total as f64) * self.quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, &count) in counts.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                self.last.store(bucket_upper_nanos(index).max(1), Ordering::Relaxed);
                return;
            }
        }
    }
}

fn bucket(latency: Duration) -> usize {
    let nanos = latency.as_nanos() as f64;
    if nanos <= FIRST_BUCKET_NANOS {
        return 0;
    }
    ((nanos / FIRST_BUCKET_NANOS).ln() / BUCKET_RATIO.ln()).ceil().min((BUCKETS - 1) as f64) as usize
}

fn bucket_upper_nanos(index: usize) -> u64 {
    (FIRST_BUCKET_NANOS * BUCKET_RATIO.powi(index as i32)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_sample_raises_the_estimate_at_once_and_fast_ones_lower_it_slowly() {
        let ewma = PeakEwma::default();
        let start = Instant::now();
        ewma.observe(start, Duration::from_secs(1));
        assert_eq!(ewma.estimate(start), None, "the first answer paid for the handshakes");
        ewma.observe(start, Duration::from_millis(1));
        ewma.observe(start, Duration::from_millis(100));
        assert_eq!(ewma.estimate(start), Some(Duration::from_millis(100)));
        let later = start + Duration::from_millis(10);
        ewma.observe(later, Duration::from_millis(1));
        let estimate = ewma.estimate(later).unwrap();
        assert!(estimate > Duration::from_millis(90), "{estimate:?}");
    }

    #[test]
    fn an_idle_estimate_decays_so_the_instance_is_tried_again() {
        let ewma = PeakEwma::default();
        let start = Instant::now();
        ewma.observe(start, Duration::from_millis(100));
        ewma.observe(start, Duration::from_millis(100));
        let estimate = ewma.estimate(start + DECAY * 3).unwrap();
        assert!(estimate < Duration::from_millis(6), "{estimate:?}");
    }

    #[test]
    fn a_failure_only_ever_raises_the_estimate() {
        let ewma = PeakEwma::default();
        let start = Instant::now();
        ewma.observe(start, Duration::from_millis(50));
        ewma.observe(start, Duration::from_millis(50));
        ewma.raise(start, Duration::from_millis(1));
        assert_eq!(ewma.estimate(start), Some(Duration::from_millis(50)));
        ewma.raise(start, Duration::from_millis(500));
        assert_eq!(ewma.estimate(start), Some(Duration::from_millis(500)));
    }

    #[test]
    fn the_window_reports_its_quantile_within_a_bucket() {
        let window = LatencyWindow::new(0.95);
        for _ in 0..FIRST_WINDOW - 1 {
            window.record(Duration::from_millis(2));
        }
        assert_eq!(window.quantile(), None);
        window.record(Duration::from_millis(2));
        let first = window.quantile().unwrap();
        assert!(first >= Duration::from_millis(2) && first < Duration::from_micros(2_500), "{first:?}");
        // 95 fast and 5 slow of every hundred: the 95th percentile is still fast.
        for i in 0..WINDOW {
            window.record(Duration::from_millis(if i % 100 < 95 { 1 } else { 80 }));
        }
        let p95 = window.quantile().unwrap();
        assert!(p95 >= Duration::from_millis(1) && p95 < Duration::from_micros(1_250), "{p95:?}");
    }
}
