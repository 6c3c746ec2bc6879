//! What a client does when instances refuse its calls as overloaded, and when it refuses
//! calls itself (adaptive throttling).

use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::set::Attempts;
use crate::client::{channel::ChannelCore, endpoints::Endpoint};

impl ChannelCore {
    /// `endpoint` refused a call as overloaded: it looks slower to the latency-aware
    /// strategy, twice as slow each time it refuses again (from the name's recent p95 or
    /// [`MIN_REFUSAL_PENALTY`], up to [`MAX_REFUSAL_PENALTY`]), and the estimate decays back
    /// as it would after any slow answer, so it is tried again a few seconds later.
    pub(super) fn refused_by(&self, endpoint: &Endpoint) {
        let now = Instant::now();
        let known = endpoint.stats.latency.estimate(now).unwrap_or_default();
        let recent = self.latencies.quantile().unwrap_or_default();
        let penalty = (known.max(recent) * 2).clamp(MIN_REFUSAL_PENALTY, MAX_REFUSAL_PENALTY);
        endpoint.stats.latency.raise(now, penalty);
        tracing::debug!(service = %self.name, node = %endpoint.node.id, ?penalty, "refused as overloaded");
    }

    /// The status of a call every instance tried refused as overloaded.
    pub(super) fn refused_everywhere(&self, attempts: &Attempts, method: &str) -> Status {
        let tried: Vec<String> =
            attempts.endpoints.iter().map(|e| format!("{} at {}", e.node.id, e.node.address)).collect();
        crate::Error::Overloaded {
            service: self.name.clone(),
            reason: format!(
                "every instance tried refused {method} over its concurrency limit ({}), and no other \
                 instance is left to try; the call was not started anywhere. Add instances or send \
                 fewer calls",
                tried.join(", ")
            ),
        }
        .into()
    }

    /// The status of a call this client refused itself (adaptive throttling).
    pub(super) fn throttled(&self, method: &str) -> Status {
        crate::Error::Overloaded {
            service: self.name.clone(),
            reason: format!(
                "{method} was not sent: its instances refused many recent calls as overloaded, so this \
                 client refuses {:.0}% of calls to them itself until they accept more \
                 (adaptive throttling, MICRO_CLIENT_THROTTLE)",
                self.throttle.probability() * 100.0
            ),
        }
        .into()
    }
}

/// The least an overload refusal makes its instance look slow.
const MIN_REFUSAL_PENALTY: Duration = Duration::from_millis(10);
/// The most an overload refusal makes its instance look slow.
const MAX_REFUSAL_PENALTY: Duration = Duration::from_secs(2);
