//! Deadlines: the one a caller puts on a request (`grpc-timeout`), the one each attempt
//! carries to the server, and a timer that keeps tokio from waking its time driver per call.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tonic::body::Body;

/// The request header that carries a call's deadline to the server.
pub(crate) const GRPC_TIMEOUT_HEADER: HeaderName = HeaderName::from_static("grpc-timeout");

/// While a channel lives, a timer of its runtime is always due within this period. Each
/// call's deadline is a timer (tonic's, from `grpc-timeout`), and tokio wakes its parked
/// time driver (a syscall and a thread wake-up) whenever a new timer is due before every
/// other; with this one pending, a deadline longer than the period never is.
pub(crate) const TIMER_ANCHOR_PERIOD: Duration = Duration::from_secs(1);

/// Keeps a timer of the current runtime due within [`TIMER_ANCHOR_PERIOD`], for as long as
/// it runs (see there): a server's runtime gets one per server, since tonic's server times
/// every call that carries `grpc-timeout`.
pub(crate) async fn anchor_timers() {
    let mut anchor = tokio::time::interval(TIMER_ANCHOR_PERIOD);
    anchor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        anchor.tick().await;
    }
}

/// The precision of `grpc-timeout` as [`grpc_timeout`] writes it: whole milliseconds,
/// rounded down.
pub(crate) const GRPC_TIMEOUT_RESOLUTION: Duration = Duration::from_millis(1);

/// The deadline the caller put on the request as `grpc-timeout`, if any.
pub(crate) fn requested_timeout(request: &http::Request<Body>) -> Option<Duration> {
    let value = request.headers().get(GRPC_TIMEOUT_HEADER)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `remaining` in gRPC's `grpc-timeout` form: at most 8 digits and a unit.
pub(crate) fn grpc_timeout(remaining: Duration) -> HeaderValue {
    use std::io::Write;
    let millis = remaining.as_millis();
    // Written on the stack: one copy into the header, no string per call.
    let mut text = [0_u8; 24];
    let mut free = &mut text[..];
    let written = if millis < 100_000_000 {
        write!(free, "{}m", millis.max(1))
    } else {
        write!(free, "{}S", remaining.as_secs())
    };
    written.expect("a u64 and a unit fit in 24 bytes");
    let length = 24 - free.len();
    HeaderValue::from_bytes(&text[..length]).expect("digits and a unit")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> http::Request<Body> {
        let mut request = http::Request::new(Body::empty());
        request.headers_mut().insert(GRPC_TIMEOUT_HEADER, HeaderValue::from_str(value).unwrap());
        request
    }

    #[test]
    fn grpc_timeout_round_trips_through_the_header() {
        for timeout in [Duration::from_millis(1), Duration::from_millis(2500), Duration::from_secs(200_000)] {
            let value = grpc_timeout(timeout);
            assert_eq!(requested_timeout(&with_timeout(value.to_str().unwrap())), Some(timeout));
        }
        assert_eq!(requested_timeout(&with_timeout("3x")), None);
        assert_eq!(requested_timeout(&with_timeout("")), None);
    }
}
