//! Gemini's OpenAI-compatible API on the wire, where it differs from OpenAI's: it sends no
//! rate-limit headers, so its 429 body is the only word on its quota (`google.rpc.RetryInfo`
//! for the wait, `google.rpc.QuotaFailure` for which quota), and its daily quotas reset at
//! midnight US Pacific time.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::protocol::ratelimit_headers::MAX_UPSTREAM_DELAY;

/// The time zone of Gemini's day.
const PACIFIC: &str = "America/Los_Angeles";

/// What a Gemini 429 says of the quota it hit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct QuotaError {
    /// `RetryInfo.retryDelay`: how long until the request may succeed.
    pub(crate) retry_delay: Option<Duration>,
    /// A `QuotaFailure` violation names a per-day quota: no queue waits that out.
    pub(crate) per_day: bool,
}

/// Read a 429 body: `{"error": {...}}`, or the same wrapped in a JSON array (the
/// OpenAI-compatible endpoint sends either). `details[]` entries come in any order (a `Help`
/// entry first, often), so each is found by its `@type`. `None` when the body is not Gemini's
/// error shape.
pub(crate) fn quota_error(body: &[u8]) -> Option<QuotaError> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let error = match &v {
        Value::Array(items) => items.first()?.get("error")?,
        v => v.get("error")?,
    };
    let mut out = QuotaError::default();
    for detail in error.get("details").and_then(Value::as_array).into_iter().flatten() {
        let kind = detail.get("@type").and_then(Value::as_str).unwrap_or_default();
        if kind.ends_with("google.rpc.RetryInfo") {
            out.retry_delay = detail.get("retryDelay").and_then(Value::as_str).and_then(parse_delay);
        } else if kind.ends_with("google.rpc.QuotaFailure") {
            let violations = detail.get("violations").and_then(Value::as_array).into_iter().flatten();
            out.per_day |= violations.filter_map(|v| v.get("quotaId")?.as_str()).any(is_per_day);
        }
    }
    Some(out)
}

/// Whether a quota id names a daily quota (`GenerateRequestsPerDayPerProjectPerModel-FreeTier`).
fn is_per_day(quota_id: &str) -> bool {
    quota_id.contains("PerDay")
}

/// A protobuf JSON duration (`"3s"`, `"0.5s"`, `"43.2s"`), capped; `None` when malformed.
fn parse_delay(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::from_secs_f64(secs.min(MAX_UPSTREAM_DELAY.as_secs_f64())))
}

/// When the Gemini day that holds `now` ends: the next midnight in US Pacific time (23 or 25
/// hours after the last one on the days the clocks change).
pub(crate) fn day_ends(now: SystemTime) -> SystemTime {
    let next = || -> Option<SystemTime> {
        let tz = jiff::tz::db().get(PACIFIC).ok()?;
        let today = jiff::Timestamp::try_from(now).ok()?.to_zoned(tz.clone()).date();
        let midnight = today.tomorrow().ok()?.to_zoned(tz).ok()?;
        Some(SystemTime::from(midnight.timestamp()))
    };
    // The bundled time zone database always has Pacific time; a day from now if not.
    next().unwrap_or(now + Duration::from_secs(86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_DAY: &str = r#"[{"error": {"code": 429, "message": "You exceeded your current quota.",
        "status": "RESOURCE_EXHAUSTED", "details": [
          {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Learn more", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
          {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaDimensions": {"model": "gemini-2.0-flash", "location": "global"}, "quotaValue": "200"}]},
          {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "43s"}]}}]"#;

    #[test]
    fn reads_the_quota_from_the_body_in_either_wrapping_and_any_order() {
        let q = quota_error(PER_DAY.as_bytes());
        assert_eq!(q, Some(QuotaError { retry_delay: Some(Duration::from_secs(43)), per_day: true }));
        let minute = r#"{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"},
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]}]}}"#;
        let q = quota_error(minute.as_bytes());
        assert_eq!(q, Some(QuotaError { retry_delay: Some(Duration::from_millis(2500)), per_day: false }));
        assert_eq!(quota_error(b"<html>"), None);
        assert_eq!(quota_error(b"[]"), None);
        let odd = r#"{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "-3s"}, 5, {"violations": 1}]}}"#;
        assert_eq!(quota_error(odd.as_bytes()), Some(QuotaError::default()));
        assert_eq!(parse_delay("1e9s"), Some(MAX_UPSTREAM_DELAY));
    }

    #[test]
    fn the_day_ends_at_pacific_midnight_daylight_saving_or_not() {
        let at = |s: &str| SystemTime::from(s.parse::<jiff::Timestamp>().unwrap_or_default());
        // 2026-12-02 10:00 UTC is 02:00 PST: the day ends at 08:00 UTC (midnight PST, UTC-8).
        assert_eq!(day_ends(at("2026-12-02T10:00:00Z")), at("2026-12-03T08:00:00Z"));
        // In July, PDT (UTC-7).
        assert_eq!(day_ends(at("2026-07-01T06:59:59Z")), at("2026-07-01T07:00:00Z"));
        // The day the clocks go back has 25 hours.
        assert_eq!(day_ends(at("2026-11-01T07:30:00Z")), at("2026-11-02T08:00:00Z"));
    }
}
