//! Warnings given once per thing the network named (a bad record, a bad value), remembering
//! at most a fixed number of them: past [`MAX_WARNED`], the oldest is forgotten and may be
//! warned about again, so a registry full of bad entries costs bounded memory.

use std::{
    collections::{HashSet, VecDeque},
    hash::Hash,
};

/// The most things remembered as already warned about.
pub(crate) const MAX_WARNED: usize = 1024;

/// What was already warned about, oldest first.
pub(crate) struct WarnedOnce<T> {
    seen: HashSet<T>,
    order: VecDeque<T>,
    limit: usize,
}

impl<T: Hash + Eq + Clone> Default for WarnedOnce<T> {
    fn default() -> Self {
        Self::with_limit(MAX_WARNED)
    }
}

impl<T: Hash + Eq + Clone> WarnedOnce<T> {
    /// Remembers at most `limit` things (at least one).
    pub(crate) fn with_limit(limit: usize) -> Self {
        WarnedOnce { seen: HashSet::new(), order: VecDeque::new(), limit: limit.max(1) }
    }

    /// Whether `item` is new, so its warning is due; it is remembered from now on.
    pub(crate) fn first_time(&mut self, item: T) -> bool {
        if self.seen.contains(&item) {
            return false;
        }
        if self.order.len() >= self.limit
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(item.clone());
        self.order.push_back(item);
        true
    }

    /// Whether `item` is remembered.
    pub(crate) fn contains(&self, item: &T) -> bool {
        self.seen.contains(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thing_is_warned_about_once_and_memory_stays_bounded() {
        let mut warned = WarnedOnce::with_limit(3);
        assert!(warned.first_time("a"));
        assert!(!warned.first_time("a"));
        for item in ["b", "c", "d"] {
            assert!(warned.first_time(item));
        }
        assert_eq!(warned.order.len(), 3);
        assert_eq!(warned.seen.len(), 3);
        assert!(warned.first_time("a"), "the oldest was forgotten");
        assert!(!warned.first_time("d"));
    }

    #[test]
    fn a_flood_of_distinct_things_keeps_only_the_limit() {
        let mut warned = WarnedOnce::default();
        for i in 0..10 * MAX_WARNED {
            assert!(warned.first_time(i));
        }
        assert_eq!(warned.seen.len(), MAX_WARNED);
    }
}
