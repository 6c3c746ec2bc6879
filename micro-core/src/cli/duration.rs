//! Duration flags: a whole number with a unit (`500ms`, `30s`, `2m`, `1h`), or a bare number
//! in the setting's own unit, as before units were accepted (`MICRO_REGISTER_TTL=30` is
//! still 30 seconds, `MICRO_CLIENT_REQUEST_TIMEOUT=5000` still 5000 milliseconds).
//!
//! # Examples
//! ```
//! use std::time::Duration;
//! use micro_core::cli::{Millis, Seconds};
//! assert_eq!(Duration::from("30".parse::<Seconds>().unwrap()), Duration::from_secs(30));
//! assert_eq!(Duration::from("500ms".parse::<Seconds>().unwrap()), Duration::from_millis(500));
//! assert_eq!(Duration::from("2m".parse::<Millis>().unwrap()), Duration::from_secs(120));
//! assert_eq!(Seconds::from_units(30).to_string(), "30"); // how clap prints a default
//! ```

use std::{fmt, str::FromStr, time::Duration};

/// A duration flag whose bare numbers count units of `MILLIS_PER_UNIT` milliseconds; see
/// the module docs. Displayed as a bare number when whole in its unit, so clap prints a
/// `DEFAULT_*` constant as it always did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationArg<const MILLIS_PER_UNIT: u64>(pub Duration);

/// A duration flag whose bare numbers are milliseconds.
pub type Millis = DurationArg<1>;
/// A duration flag whose bare numbers are seconds.
pub type Seconds = DurationArg<1000>;

impl<const M: u64> DurationArg<M> {
    /// `units` of this flag's unit, e.g. a `DEFAULT_*` constant.
    pub const fn from_units(units: u64) -> Self {
        DurationArg(Duration::from_millis(units * M))
    }

    fn unit_name() -> &'static str {
        if M == 1000 { "seconds" } else { "milliseconds" }
    }
}

impl<const M: u64> From<DurationArg<M>> for Duration {
    fn from(arg: DurationArg<M>) -> Duration {
        arg.0
    }
}

impl<const M: u64> FromStr for DurationArg<M> {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "expected a whole number with a unit (500ms, 30s, 2m, 1h), or a bare number of {}; got {text:?}",
                Self::unit_name()
            )
        };
        let trimmed = text.trim();
        let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(digits);
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let millis_per = match unit.trim() {
            "" => M,
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(invalid()),
        };
        let millis = number.checked_mul(millis_per).ok_or_else(invalid)?;
        Ok(DurationArg(Duration::from_millis(millis)))
    }
}

impl<const M: u64> fmt::Display for DurationArg<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis.is_multiple_of(u128::from(M)) && self.0.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}", millis / u128::from(M))
        } else {
            write!(f, "{millis}ms")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_accepted_and_bare_numbers_keep_their_unit() {
        let secs = |t: &str| t.parse::<Seconds>().map(Duration::from);
        let millis = |t: &str| t.parse::<Millis>().map(Duration::from);
        assert_eq!(secs("30"), Ok(Duration::from_secs(30)));
        assert_eq!(secs("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(secs("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(secs("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(secs("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(millis("500"), Ok(Duration::from_millis(500)));
        assert_eq!(millis("2s"), Ok(Duration::from_secs(2)));
        for bad in ["", "ms", "1.5s", "-1", "3 days", "10x"] {
            let err = secs(bad).unwrap_err();
            assert!(err.contains("500ms") && err.contains("seconds"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn defaults_print_as_bare_numbers() {
        assert_eq!(Seconds::from_units(30).to_string(), "30");
        assert_eq!(Millis::from_units(500).to_string(), "500");
        assert_eq!("500ms".parse::<Seconds>().unwrap().to_string(), "500ms");
    }
}
