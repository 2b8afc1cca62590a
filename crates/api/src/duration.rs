//! Go-style duration strings (`500ms`, `30s`, `5m`, `1h30m`), as Kubernetes users write them.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The schema pattern for a non-negative Go duration; the same strings CEL's `duration()` accepts.
pub const PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// A duration that keeps the user's spelling (`5m` stays `5m` on the way back out) so that
/// manifests, server-side apply and status messages show what the user wrote.
#[derive(Clone, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: time::Duration,
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {text:?}: expected a number and a unit such as 500ms, 30s, 5m or 1h30m")]
pub struct ParseDurationError {
    text: String,
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

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError { text: text.to_owned() };
        // kube's parser follows Go's time.ParseDuration; we refuse signs and empty strings on top.
        if text.is_empty() || text.starts_with(['-', '+']) {
            return Err(err());
        }
        let parsed: kube::core::Duration = text.parse().map_err(|_| err())?;
        Ok(Self { text: text.to_owned(), value: parsed.into() })
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
        s.parse::<Duration>().map(|d| d.get()).unwrap_or_else(|e| panic!("{e}"))
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
    fn refuses_nonsense() {
        for bad in ["", "30", "5 m", "-1s", "+1s", "1d", "abc", "s"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn keeps_the_users_spelling() {
        let v: Duration = serde_json::from_str("\"5m\"").unwrap_or_else(|e| panic!("{e}"));
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
