//! Power of two choices: of two instances drawn at random, the one with fewer calls in
//! flight. Steers away from slow instances without tracking every instance's load.

use std::sync::Mutex;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{Candidates, Strategy};

/// Picks the less loaded of two random instances.
#[derive(Debug)]
pub struct PowerOfTwoChoices {
    rng: Mutex<StdRng>,
}

impl Default for PowerOfTwoChoices {
    fn default() -> Self {
        Self::new()
    }
}

impl PowerOfTwoChoices {
    /// Seeded from the operating system.
    pub fn new() -> Self {
        Self::from_rng(StdRng::from_os_rng())
    }

    /// With the given generator, e.g. a fixed seed in tests.
    pub fn from_rng(rng: StdRng) -> Self {
        PowerOfTwoChoices { rng: Mutex::new(rng) }
    }
}

impl Strategy for PowerOfTwoChoices {
    fn pick(&self, candidates: &Candidates<'_>) -> Option<usize> {
        let len = candidates.len();
        if len < 2 {
            return (len == 1).then_some(0);
        }
        let (a, b) = two_distinct(&self.rng, len);
        Some(if candidates.in_flight(b) < candidates.in_flight(a) { b } else { a })
    }
}

/// Two distinct indices below `len` (at least 2), drawn at random.
pub(super) fn two_distinct(rng: &Mutex<StdRng>, len: usize) -> (usize, usize) {
    let mut rng = rng.lock().expect("rng lock");
    let a = rng.random_range(0..len);
    let b = (a + rng.random_range(1..len)) % len;
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{registry::Node, selector::Load};

    #[test]
    fn a_loaded_instance_gets_few_picks() {
        let nodes: Vec<Node> = (1..=3).map(|p| Node::new("svc", ([127, 0, 0, 1], p).into())).collect();
        let loads = [0, 0, 50].map(|in_flight| Load { in_flight, latency: None });
        let eligible = [0, 1, 2];
        let strategy = PowerOfTwoChoices::from_rng(StdRng::seed_from_u64(3));
        let mut counts = [0usize; 3];
        for _ in 0..3_000 {
            counts[strategy.pick(&Candidates::with_loads(&nodes, &loads, &eligible)).unwrap()] += 1;
        }
        // The loaded one wins only when drawn twice, which p2c never does: it draws two distinct.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > 1_200 && counts[1] > 1_200, "{counts:?}");
    }
}
