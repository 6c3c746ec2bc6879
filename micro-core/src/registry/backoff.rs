//! Exponential backoff with jitter, for retrying a registry: after an agent restarts, every
//! client and service retries, and without jitter they would all retry in lockstep.
//!
//! # Examples
//! ```
//! use std::time::Duration;
//! use micro_core::registry::Backoff;
//! let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
//! let first = backoff.next_delay();
//! assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
//! ```

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Delays that double from `first` up to `max`; each one actually waited is drawn
/// uniformly from its upper half ("equal jitter"), so retries spread out but never come
/// sooner than half the nominal delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    nominal: Duration,
    rng: StdRng,
}

impl Backoff {
    /// A backoff from `first` doubling up to `max`, with a randomly seeded generator.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self::from_rng(first, max, StdRng::from_rng(&mut rand::rng()))
    }

    /// A backoff whose jitter comes from `rng` (a fixed seed in tests).
    pub fn from_rng(first: Duration, max: Duration, rng: StdRng) -> Self {
        Backoff { first, max, nominal: first, rng }
    }

    /// The delay to wait now, between half the nominal delay and all of it; the nominal
    /// delay then doubles, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal;
        self.nominal = (nominal * 2).min(self.max);
        let half = nominal / 2;
        let jitter = self.rng.random_range(0..=(nominal - half).as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    /// Starts again from the first delay, after a success.
    pub fn reset(&mut self) {
        self.nominal = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> Backoff {
        Backoff::from_rng(Duration::from_millis(500), Duration::from_secs(30), StdRng::seed_from_u64(seed))
    }

    #[test]
    fn delays_double_to_the_maximum_within_their_upper_half() {
        let mut backoff = seeded(7);
        let mut nominal = Duration::from_millis(500);
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} outside [{:?}, {nominal:?}]",
                nominal / 2
            );
            nominal = (nominal * 2).min(Duration::from_secs(30));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(500));
    }

    #[test]
    fn retries_of_many_clients_do_not_move_in_lockstep() {
        // Ten clients that lost their agent at the same moment: their third retries spread out.
        let third: Vec<Duration> = (0..10)
            .map(|seed| {
                let mut backoff = seeded(seed);
                (0..3).map(|_| backoff.next_delay()).last().unwrap()
            })
            .collect();
        let spread = third.iter().max().unwrap().saturating_sub(*third.iter().min().unwrap());
        assert!(
            spread >= Duration::from_millis(200),
            "third retries within {spread:?} of each other: {third:?}"
        );
    }
}
