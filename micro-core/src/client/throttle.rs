//! Adaptive throttling per name, as in Google's SRE book: when the instances of a name
//! refuse calls as overloaded (`RESOURCE_EXHAUSTED`), the client refuses some calls itself,
//! before sending them, with the probability `max(0, (requests - K * accepts) / (requests + 1))`
//! over the last [`WINDOW`], once it holds at least [`MIN_REQUESTS`] calls (so one refusal
//! on a quiet channel refuses nothing). `requests` counts every call, those the client
//! refused itself included; `accepts` the calls that did not end refused over a server's
//! concurrency limit (any answer or other failure counts as accepted, a `RESOURCE_EXHAUSTED`
//! of the application's own too: only overload refusals throttle).
//!
//! It counts calls, not attempts: a call one instance refused and another served was
//! accepted, so a fleet with room somewhere is never throttled, and a fleet that is all
//! overloaded receives about `K` times what it serves, not a storm. A call is counted when
//! it ends, so calls still in flight never look refused. With `K = 2` nothing is refused
//! locally until half the calls end refused.

use std::{sync::Mutex, time::Duration};

use rand::Rng;
use tokio::time::Instant;

/// How far back the counts go.
pub(crate) const WINDOW: Duration = Duration::from_secs(5);
/// Fewer calls than this in the window never throttle.
pub(crate) const MIN_REQUESTS: u64 = 10;
/// Buckets of the window: each covers `WINDOW / BUCKETS`.
const BUCKETS: usize = 10;

/// The requests and accepts of one name over the last [`WINDOW`].
pub(crate) struct Throttle {
    /// `K`; 0 turns throttling off.
    ratio: f64,
    state: Mutex<Counts>,
}

struct Counts {
    /// `(requests, accepts)` per bucket, a ring.
    buckets: [(u64, u64); BUCKETS],
    /// The bucket of the current time slice.
    current: usize,
    /// When the current bucket began.
    started: Instant,
}

impl Counts {
    /// Moves the ring on to `now`, emptying the buckets of the slices that passed.
    fn advance(&mut self, now: Instant) {
        let slice = WINDOW / BUCKETS as u32;
        let passed = (now.saturating_duration_since(self.started).as_nanos() / slice.as_nanos()) as usize;
        if passed == 0 {
            return;
        }
        for step in 1..=passed.min(BUCKETS) {
            self.buckets[(self.current + step) % BUCKETS] = (0, 0);
        }
        self.current = (self.current + passed) % BUCKETS;
        self.started += slice * passed as u32;
    }

    fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(r, a), (br, ba)| (r + br, a + ba))
    }
}

impl Throttle {
    /// A throttle refusing locally once requests exceed `ratio` times accepts; `ratio` 0
    /// never refuses.
    pub(crate) fn new(ratio: f64) -> Self {
        Throttle {
            ratio,
            state: Mutex::new(Counts { buckets: [(0, 0); BUCKETS], current: 0, started: Instant::now() }),
        }
    }

    /// The probability of refusing a request now.
    pub(crate) fn probability(&self) -> f64 {
        if self.ratio <= 0.0 {
            return 0.0;
        }
        let mut counts = self.state.lock().expect("throttle lock");
        counts.advance(Instant::now());
        let (requests, accepts) = counts.totals();
        probability(self.ratio, requests, accepts)
    }

    /// Decides whether a call goes: `false` means refuse it locally, and counts it as a
    /// request that was not accepted. A call that goes is counted by [`Throttle::finished`].
    pub(crate) fn admit(&self) -> bool {
        self.admit_with(rand::rng().random_range(0.0..1.0))
    }

    /// [`Throttle::admit`] with the random draw `draw` (0 to 1) given.
    fn admit_with(&self, draw: f64) -> bool {
        if self.ratio <= 0.0 {
            return true;
        }
        let mut counts = self.state.lock().expect("throttle lock");
        counts.advance(Instant::now());
        let (requests, accepts) = counts.totals();
        let admitted = draw >= probability(self.ratio, requests, accepts);
        if !admitted {
            let current = counts.current;
            counts.buckets[current].0 += 1;
        }
        admitted
    }

    /// Counts a call that went and has ended: `accepted` unless it ended refused as
    /// overloaded.
    pub(crate) fn finished(&self, accepted: bool) {
        if self.ratio <= 0.0 {
            return;
        }
        let mut counts = self.state.lock().expect("throttle lock");
        counts.advance(Instant::now());
        let current = counts.current;
        counts.buckets[current].0 += 1;
        counts.buckets[current].1 += u64::from(accepted);
    }
}

fn probability(ratio: f64, requests: u64, accepts: u64) -> f64 {
    if requests < MIN_REQUESTS {
        return 0.0;
    }
    ((requests as f64 - ratio * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn nothing_is_refused_while_at_least_half_is_accepted() {
        let throttle = Throttle::new(2.0);
        for i in 0..1_000 {
            assert!(throttle.admit_with(0.0));
            throttle.finished(i % 2 == 0);
        }
        assert_eq!(throttle.probability(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_raise_the_probability_and_it_is_forgotten_after_the_window() {
        let throttle = Throttle::new(2.0);
        for _ in 0..900 {
            assert!(throttle.admit_with(1.0));
            throttle.finished(false);
        }
        // Nothing accepted: almost every call is refused locally, and counted.
        assert!(throttle.probability() > 0.99, "{}", throttle.probability());
        assert!(!throttle.admit_with(0.5));
        // A tenth accepted: p = 1 - 2 * 0.1.
        for _ in 0..99 {
            throttle.finished(true);
        }
        assert!((throttle.probability() - 0.8).abs() < 0.01, "{}", throttle.probability());
        tokio::time::advance(WINDOW + Duration::from_millis(1)).await;
        assert_eq!(throttle.probability(), 0.0);
        assert!(Throttle::new(0.0).admit_with(0.0), "0 turns it off");
        // A quiet channel: a few refusals refuse nothing locally.
        let quiet = Throttle::new(2.0);
        for _ in 0..MIN_REQUESTS - 1 {
            quiet.finished(false);
        }
        assert_eq!(quiet.probability(), 0.0);
    }
}
