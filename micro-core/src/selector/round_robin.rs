//! Round robin: each instance in turn. The default.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Strategy;
use crate::registry::Node;

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
    fn pick(&self, nodes: &[Node]) -> Option<usize> {
        if nodes.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % nodes.len())
    }
}
