//! Outlier ejection: an instance that keeps failing is left out of picks for a while, each
//! ejection twice as long as the last (up to [`MAX_EJECT_TIME`]); one success forgives.
//! Failures that leave no doubt (a refused or timed-out connection, a connection that
//! failed its keepalive, an attempt still unanswered at the deadline) eject at once.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// The longest ejection.
pub(crate) const MAX_EJECT_TIME: Duration = Duration::from_secs(30);

/// How an attempt on an instance went, for ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It answered (any status but `UNAVAILABLE`).
    Answered,
    /// It failed; ejected after `eject_after` of these in a row.
    Failed,
    /// It is unreachable or not answering at all; ejected at once.
    Dead,
    /// It took no part (it refused the request with a GOAWAY): no change.
    Spared,
    /// It refused the call as overloaded, before starting it: no sign of failure, so
    /// neither counted nor forgiven (the strategy sees it instead).
    Refused,
}

/// Why an instance was last ejected, for `micro why` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectReason {
    /// Several failures in a row.
    ConsecutiveFailures,
    /// Unreachable: refused or timed-out connection, failed keepalive, or no answer by the
    /// deadline.
    Unreachable,
}

impl std::fmt::Display for EjectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EjectReason::ConsecutiveFailures => "failed several times in a row",
            EjectReason::Unreachable => "unreachable or not answering",
        })
    }
}

/// One instance's ejection state.
#[derive(Default)]
pub(crate) struct OutlierState {
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected: Mutex<Option<(Instant, EjectReason)>>,
}

/// When to eject and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EjectPolicy {
    pub(crate) after: u32,
    pub(crate) first_time: Duration,
}

impl OutlierState {
    /// Whether the instance is ejected at `now`.
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.ejection(now).is_some()
    }

    /// Until when and why the instance is ejected, if it is at `now`.
    pub(crate) fn ejection(&self, now: Instant) -> Option<(Instant, EjectReason)> {
        self.ejected.lock().expect("outlier lock").filter(|(until, _)| *until > now)
    }

    /// Takes an attempt's verdict; returns how long the instance is now ejected for, when
    /// this verdict ejects it.
    pub(crate) fn record(&self, verdict: Verdict, policy: EjectPolicy, now: Instant) -> Option<Duration> {
        let reason = match verdict {
            Verdict::Answered => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
                return None;
            }
            Verdict::Failed => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures < policy.after {
                    return None;
                }
                EjectReason::ConsecutiveFailures
            }
            Verdict::Dead => EjectReason::Unreachable,
            Verdict::Spared | Verdict::Refused => return None,
        };
        let mut ejected = self.ejected.lock().expect("outlier lock");
        if ejected.is_some_and(|(until, _)| until > now) {
            // Attempts that were in flight when it was ejected: no longer ejection.
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let ejections = self.ejections.fetch_add(1, Ordering::Relaxed);
        let time = (policy.first_time * 2u32.saturating_pow(ejections.min(10))).min(MAX_EJECT_TIME);
        *ejected = Some((now + time, reason));
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectPolicy = EjectPolicy { after: 3, first_time: Duration::from_secs(1) };

    #[test]
    fn failures_in_a_row_eject_and_a_success_forgives() {
        let state = OutlierState::default();
        let now = Instant::now();
        assert_eq!(state.record(Verdict::Failed, POLICY, now), None);
        assert_eq!(state.record(Verdict::Answered, POLICY, now), None);
        assert_eq!(state.record(Verdict::Failed, POLICY, now), None);
        assert_eq!(state.record(Verdict::Failed, POLICY, now), None);
        assert_eq!(state.record(Verdict::Failed, POLICY, now), Some(Duration::from_secs(1)));
        assert_eq!(state.ejection(now).map(|(_, why)| why), Some(EjectReason::ConsecutiveFailures));
        assert!(!state.is_ejected(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_dead_instance_is_ejected_at_once_for_twice_as_long_each_time() {
        let state = OutlierState::default();
        let now = Instant::now();
        assert_eq!(state.record(Verdict::Dead, POLICY, now), Some(Duration::from_secs(1)));
        // Late verdicts of attempts already in flight do not extend it.
        assert_eq!(state.record(Verdict::Dead, POLICY, now), None);
        let later = now + Duration::from_secs(2);
        assert_eq!(state.record(Verdict::Dead, POLICY, later), Some(Duration::from_secs(2)));
        assert_eq!(state.ejection(later).map(|(_, why)| why), Some(EjectReason::Unreachable));
    }
}
