//! Round robin: each instance in turn. The default.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, Strategy};

/// Calls each instance in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// Starts at the first instance.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for RoundRobin {
    fn pick(&self, candidates: &Candidates<'_>) -> Option<usize> {
        match candidates.len() {
            0 => None,
            len => Some(self.next.fetch_add(1, Ordering::Relaxed) % len),
        }
    }
}
