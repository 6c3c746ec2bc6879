//! The adaptive limit: a gradient on the sampled minimum latency.
//!
//! Calls that finish are sampled in windows (at least [`WINDOW`] and [`WINDOW_SAMPLES`]
//! calls). A window's mean latency is compared with the baseline, the lowest window mean of
//! the last one to two [`BASELINE_PERIOD`]s (so a service that became slower for good is
//! measured afresh). While the window is within [`TOLERANCE`] times the baseline, calls are
//! not queueing, and the limit grows by its square root when the calls in flight came near
//! it; above that, calls are waiting for each other, and the limit shrinks by the ratio
//! (at most by half per window, smoothed). Under a spike the limit settles where latency is
//! about [`TOLERANCE`] times the unloaded one: the work goes on at full speed and the
//! calls beyond it are refused at once instead of waiting.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// The shortest sampling window.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// The fewest calls a window takes before it is judged.
pub(crate) const WINDOW_SAMPLES: u32 = 10;
/// How much slower than the baseline a window may be before the limit shrinks.
pub(crate) const TOLERANCE: f64 = 1.5;
/// How long a baseline lasts: the lowest window of the current and the previous period.
pub(crate) const BASELINE_PERIOD: Duration = Duration::from_secs(30);
/// How far one window moves the limit toward its new value.
const SMOOTHING: f64 = 0.5;
/// The most one window can shrink the limit by, before smoothing.
const MIN_GRADIENT: f64 = 0.5;

/// A concurrency limit learned from latency, between `min` and `max`.
pub(crate) struct Gradient {
    min: f64,
    max: f64,
    state: Mutex<State>,
}

struct State {
    limit: f64,
    window_started: Instant,
    samples: u32,
    /// Sum of the window's latencies, in seconds.
    sum: f64,
    /// The most calls in flight while the window ran.
    peak_in_flight: usize,
    /// The lowest window mean of this period and of the previous one, in seconds.
    baseline: Option<f64>,
    previous_baseline: Option<f64>,
    period_started: Instant,
}

impl Gradient {
    /// A limit that starts at `min`.
    pub(crate) fn new(min: usize, max: usize) -> Self {
        let now = Instant::now();
        Gradient {
            min: min as f64,
            max: max.max(min) as f64,
            state: Mutex::new(State {
                limit: min as f64,
                window_started: now,
                samples: 0,
                sum: 0.0,
                peak_in_flight: 0,
                baseline: None,
                previous_baseline: None,
                period_started: now,
            }),
        }
    }

    /// The current limit.
    pub(crate) fn limit(&self) -> usize {
        self.state.lock().expect("limit lock").limit as usize
    }

    /// Notes that `in_flight` calls are being served (a call was admitted).
    pub(crate) fn admitted(&self, in_flight: usize) {
        let mut state = self.state.lock().expect("limit lock");
        state.peak_in_flight = state.peak_in_flight.max(in_flight);
    }

    /// Takes the latency of a call that finished at `now`; returns the new limit when this
    /// sample closed a window.
    pub(crate) fn sample(&self, latency: Duration, now: Instant) -> Option<usize> {
        let mut state = self.state.lock().expect("limit lock");
        state.samples += 1;
        state.sum += latency.as_secs_f64();
        if state.samples < WINDOW_SAMPLES || now.saturating_duration_since(state.window_started) < WINDOW {
            return None;
        }
        let mean = state.sum / f64::from(state.samples);
        if now.saturating_duration_since(state.period_started) >= BASELINE_PERIOD {
            state.previous_baseline = state.baseline.take();
            state.period_started = now;
        }
        state.baseline = Some(state.baseline.map_or(mean, |b| b.min(mean)));
        let baseline = match state.previous_baseline {
            Some(previous) => previous.min(mean).min(state.baseline.unwrap_or(mean)),
            None => state.baseline.unwrap_or(mean),
        };
        let limit = state.limit;
        let gradient = (TOLERANCE * baseline / mean.max(f64::MIN_POSITIVE)).clamp(MIN_GRADIENT, 1.0);
        // Grow only when the limit was nearly used: an idle server proves nothing.
        let used = state.peak_in_flight as f64 * 2.0 >= limit;
        let target = if gradient >= 1.0 && used { limit + limit.sqrt() } else { limit * gradient };
        let next = (limit + (target - limit) * SMOOTHING).clamp(self.min, self.max);
        state.limit = next;
        state.window_started = now;
        state.samples = 0;
        state.sum = 0.0;
        state.peak_in_flight = 0;
        tracing::trace!(limit = next, mean_ms = mean * 1e3, baseline_ms = baseline * 1e3, "limit window");
        Some(next as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `windows` windows of calls taking `latency` with `in_flight` calls in flight.
    fn run(gradient: &Gradient, now: &mut Instant, windows: usize, latency: Duration, in_flight: usize) {
        for _ in 0..windows {
            for _ in 0..WINDOW_SAMPLES {
                gradient.admitted(in_flight);
                gradient.sample(latency, *now);
            }
            *now += WINDOW;
            gradient.admitted(in_flight);
            gradient.sample(latency, *now);
        }
    }

    #[test]
    fn the_limit_grows_while_latency_holds_and_only_when_used() {
        let gradient = Gradient::new(10, 1000);
        let mut now = Instant::now();
        run(&gradient, &mut now, 20, Duration::from_millis(5), 1);
        assert_eq!(gradient.limit(), 10, "an idle server keeps its limit");
        run(&gradient, &mut now, 20, Duration::from_millis(5), 1000);
        assert!(gradient.limit() > 50, "{}", gradient.limit());
    }

    #[test]
    fn queueing_shrinks_the_limit_to_where_latency_is_within_tolerance_and_never_below_min() {
        let gradient = Gradient::new(4, 1000);
        let mut now = Instant::now();
        run(&gradient, &mut now, 5, Duration::from_millis(10), 4);
        run(&gradient, &mut now, 40, Duration::from_millis(10), 400);
        let learned = gradient.limit();
        assert!(learned > 40, "{learned}");
        // Latency four times the baseline: calls wait; the limit comes down to the floor.
        run(&gradient, &mut now, 40, Duration::from_millis(40), learned);
        assert_eq!(gradient.limit(), 4);
        // Within tolerance again: it grows back.
        run(&gradient, &mut now, 40, Duration::from_millis(12), 1000);
        assert!(gradient.limit() > 20, "{}", gradient.limit());
    }

    #[test]
    fn a_service_that_became_slower_for_good_is_measured_afresh() {
        let gradient = Gradient::new(4, 1000);
        let mut now = Instant::now();
        run(&gradient, &mut now, 5, Duration::from_millis(10), 4);
        // Ten times slower from now on, whatever the load: after two baseline periods the
        // new latency is the baseline and the limit grows again.
        let windows = (2 * BASELINE_PERIOD.as_millis() / WINDOW.as_millis()) as usize + 2;
        run(&gradient, &mut now, windows, Duration::from_millis(100), 1000);
        let before = gradient.limit();
        run(&gradient, &mut now, 20, Duration::from_millis(100), 1000);
        assert!(gradient.limit() > before, "{before} -> {}", gradient.limit());
    }
}
