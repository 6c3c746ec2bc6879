//! Selection strategies: which instance of a name serves the next call.
//!
//! # Examples
//! ```
//! use micro_core::{registry::Node, selector::{RoundRobin, Strategy}};
//! let nodes: Vec<Node> = (1..=3).map(|p| Node::new("svc", ([127, 0, 0, 1], p).into())).collect();
//! let strategy = RoundRobin::new();
//! let picks: Vec<usize> = (0..4).filter_map(|_| strategy.pick(&nodes)).collect();
//! assert_eq!(picks, [0, 1, 2, 0]);
//! ```

use crate::registry::Node;

mod random;
mod round_robin;

pub use random::Random;
pub use round_robin::RoundRobin;

/// Picks one of the candidate instances for a call.
pub trait Strategy: Send + Sync + 'static {
    /// The index in `nodes` of the instance to call; `None` when `nodes` is empty.
    fn pick(&self, nodes: &[Node]) -> Option<usize>;
}
