//! Uniform random choice.

use std::sync::Mutex;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{Candidates, Strategy};

/// Picks an instance uniformly at random.
#[derive(Debug)]
pub struct Random {
    rng: Mutex<StdRng>,
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

impl Random {
    /// Seeded from the operating system.
    pub fn new() -> Self {
        Self::from_rng(StdRng::from_os_rng())
    }

    /// With the given generator, e.g. a fixed seed in tests.
    pub fn from_rng(rng: StdRng) -> Self {
        Random { rng: Mutex::new(rng) }
    }
}

impl Strategy for Random {
    fn pick(&self, candidates: &Candidates<'_>) -> Option<usize> {
        match candidates.len() {
            0 => None,
            len => Some(self.rng.lock().expect("rng lock").random_range(0..len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Node;

    #[test]
    fn shares_are_even_within_tolerance() {
        let nodes: Vec<Node> = (1..=3).map(|p| Node::new("svc", ([127, 0, 0, 1], p).into())).collect();
        let strategy = Random::from_rng(StdRng::seed_from_u64(7));
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[strategy.pick(&Candidates::of(&nodes)).unwrap()] += 1;
        }
        for count in counts {
            assert!((9_000..=11_000).contains(&count), "{counts:?}");
        }
        assert_eq!(strategy.pick(&Candidates::of(&[])), None);
    }
}
