//! Latency-aware power of two choices: of two instances drawn at random, the one with the
//! lower cost, the cost being its peak-EWMA latency times (calls in flight + 1), as
//! Finagle's and Linkerd's balancers weigh them. A slow instance loses nearly every draw;
//! an instance not measured yet is free while idle and costs the most while it has a call
//! in flight, so a new or hung instance gets one call at a time until it answers.

use std::{sync::Mutex, time::Duration};

use rand::{SeedableRng, rngs::StdRng};

use super::{Candidates, Load, Strategy, least_loaded::two_distinct};

/// Picks the cheaper of two random instances by latency times load.
#[derive(Debug)]
pub struct PeakEwma {
    rng: Mutex<StdRng>,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

impl PeakEwma {
    /// Seeded from the operating system.
    pub fn new() -> Self {
        Self::from_rng(StdRng::from_os_rng())
    }

    /// With the given generator, e.g. a fixed seed in tests.
    pub fn from_rng(rng: StdRng) -> Self {
        PeakEwma { rng: Mutex::new(rng) }
    }
}

/// The cost of sending one more call to an instance with `load`.
fn cost(load: Load) -> f64 {
    match load.latency {
        Some(latency) => latency.max(Duration::from_micros(1)).as_secs_f64() * (load.in_flight + 1) as f64,
        None if load.in_flight == 0 => 0.0,
        None => f64::MAX,
    }
}

impl Strategy for PeakEwma {
    fn pick(&self, candidates: &Candidates<'_>) -> Option<usize> {
        let len = candidates.len();
        if len < 2 {
            return (len == 1).then_some(0);
        }
        let (a, b) = two_distinct(&self.rng, len);
        Some(if cost(candidates.load(b)) < cost(candidates.load(a)) { b } else { a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Node;

    fn shares(loads: &[Load]) -> Vec<usize> {
        let nodes: Vec<Node> =
            (1..=loads.len() as u16).map(|p| Node::new("svc", ([127, 0, 0, 1], p).into())).collect();
        let eligible: Vec<usize> = (0..loads.len()).collect();
        let strategy = PeakEwma::from_rng(StdRng::seed_from_u64(7));
        let mut counts = vec![0; loads.len()];
        for _ in 0..3_000 {
            counts[strategy.pick(&Candidates::with_loads(&nodes, loads, &eligible)).unwrap()] += 1;
        }
        counts
    }

    fn measured(millis: u64, in_flight: usize) -> Load {
        Load { in_flight, latency: Some(Duration::from_millis(millis)) }
    }

    #[test]
    fn a_slow_instance_loses_every_draw() {
        let counts = shares(&[measured(1, 0), measured(1, 0), measured(10, 0)]);
        assert_eq!(counts[2], 0, "{counts:?}");
    }

    #[test]
    fn equal_instances_share_evenly() {
        let counts = shares(&[measured(1, 0), measured(1, 0), measured(1, 0)]);
        assert!(counts.iter().all(|&c| (850..=1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn an_unmeasured_instance_gets_one_call_at_a_time() {
        let idle = shares(&[measured(1, 0), Load { in_flight: 0, latency: None }]);
        assert_eq!(idle, [0, 3_000], "an idle new instance wins, to be measured");
        let busy = shares(&[measured(1, 3), Load { in_flight: 1, latency: None }]);
        assert_eq!(busy, [3_000, 0], "with a call in flight and no answer yet it loses");
    }
}
