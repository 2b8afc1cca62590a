//! Go-style duration strings (`500ms`, `30s`, `5m`, `1h30m`), as Kubernetes users write them.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The schema pattern for a non-negative Go duration; the same strings CEL's `duration()` accepts.
pub(crate) const PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// A duration that keeps the user's spelling (`5m` stays `5m` on the way back out) so that
/// manifests, server-side apply and status messages show what the user wrote.
#[derive(Clone, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: time::Duration,
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDurationError {
    /// Not a Go duration.
    #[error("invalid duration {0:?}: expected a number and a unit such as 500ms, 30s, 5m or 1h30m")]
    Invalid(String),
    /// A Go duration, but beyond what a duration can hold.
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

impl Duration {
    /// Build from a std duration; the text is the shortest exact Go spelling.
    pub fn from_std(value: time::Duration) -> Self {
        Self { text: format_go(value), value }
    }

    /// The value as a std duration, for timers.
    pub fn get(&self) -> time::Duration {
        self.value
    }

    /// The text as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Go's spelling for whole units: `2s`, `5m`, `1h30m`, `250ms`.
fn format_go(d: time::Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Nanoseconds per unit of a Go duration.
fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Go's `time.ParseDuration` for non-negative values, with checked arithmetic: a value too
/// large for a duration is an error, never a panic or a wrap.
fn parse_go(text: &str) -> Option<time::Duration> {
    if text == "0" {
        return Some(time::Duration::ZERO);
    }
    let mut rest = text;
    let mut total: u128 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(f) => {
                let len = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
                f.split_at(len)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per = unit_nanos(unit)?;
        // Leading zeros cannot overflow; other digits beyond 39 always would.
        let int = int.trim_start_matches('0');
        let whole: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        total = total.checked_add(whole.checked_mul(per)?)?;
        // Fractions: digits past the 20th are below a nanosecond of any unit.
        let mut scale: u128 = 1;
        let mut fraction: u128 = 0;
        for d in frac.bytes().take(20) {
            fraction = fraction * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        total = total.checked_add(fraction.checked_mul(per)? / scale)?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    let nanos = u32::try_from(total % 1_000_000_000).ok()?;
    Some(time::Duration::new(secs, nanos))
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let value = parse_go(text).ok_or_else(|| {
            // Well-formed but unparseable can only mean overflow.
            if parse_go(&text.replace(|c: char| c.is_ascii_digit(), "0")).is_some() {
                ParseDurationError::TooLarge(text.to_owned())
            } else {
                ParseDurationError::Invalid(text.to_owned())
            }
        })?;
        Ok(Self { text: text.to_owned(), value })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> time::Duration {
        s.parse::<Duration>().map(|d| d.get()).unwrap()
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(d("500ms"), time::Duration::from_millis(500));
        assert_eq!(d("30s"), time::Duration::from_secs(30));
        assert_eq!(d("5m"), time::Duration::from_secs(300));
        assert_eq!(d("1h30m"), time::Duration::from_secs(5400));
        assert_eq!(d("1.5s"), time::Duration::from_millis(1500));
        assert_eq!(d("0"), time::Duration::ZERO);
    }

    #[test]
    fn huge_values_are_errors_not_panics() {
        assert_eq!(d("3000000000000000h").as_secs(), 10_800_000_000_000_000_000);
        for bad in ["6000000000000000h", "99999999999999999999999999999999999999999h", "5124095576030432h"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be refused");
        }
        assert_eq!(d("0000000000000000000000000000000000000000001s"), time::Duration::from_secs(1));
        assert_eq!(d("1h1m1s1ms1us1ns"), time::Duration::new(3661, 1_001_001));
        assert_eq!(d(".5s"), time::Duration::from_millis(500));
        assert_eq!(d("1.000000000000000000000000001h"), time::Duration::from_secs(3600));
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["", "30", "5 m", "-1s", "+1s", "1d", "abc", "s", ".s", "1.s5", "1..5s", "1e5s", "1s2"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn keeps_the_users_spelling() {
        let v: Duration = serde_json::from_str("\"5m\"").unwrap();
        assert_eq!(serde_json::to_string(&v).ok().as_deref(), Some("\"5m\""));
    }

    #[test]
    fn formats_like_go() {
        let f = |ms| Duration::from_std(time::Duration::from_millis(ms)).to_string();
        assert_eq!(f(0), "0s");
        assert_eq!(f(250), "250ms");
        assert_eq!(f(2000), "2s");
        assert_eq!(f(300_000), "5m");
        assert_eq!(f(5_430_000), "1h30m30s");
    }
}
