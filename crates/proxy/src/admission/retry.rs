//! When to retry an upstream attempt and how long to wait first. The upstream's own word
//! (`retry-after-ms`, `Retry-After`, `x-ratelimit-reset-*`) beats the computed back-off.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use llmproxy_api::policy::RetryPolicy;

/// Why an attempt is retried; a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// Upstream 429.
    RateLimited,
    /// Upstream 408.
    RequestTimeout,
    /// Upstream 500, 502, 503, 504 or 529 (Anthropic's overloaded).
    ServerError,
    /// No connection could be made, or it broke before the response headers.
    Connect,
    /// No response headers within `upstream.timeout`.
    Timeout,
}

impl RetryReason {
    /// Every reason, for initialising metric series.
    pub const ALL: [RetryReason; 5] = [
        RetryReason::RateLimited,
        RetryReason::RequestTimeout,
        RetryReason::ServerError,
        RetryReason::Connect,
        RetryReason::Timeout,
    ];

    /// The reason for an upstream status, if that status is worth retrying. Other 4xx are the
    /// client's fault and never retried.
    pub fn for_status(status: StatusCode) -> Option<Self> {
        match status.as_u16() {
            429 => Some(Self::RateLimited),
            408 => Some(Self::RequestTimeout),
            // 529: Anthropic's overloaded_error, the provider busy rather than the request wrong.
            500 | 502 | 503 | 504 | 529 => Some(Self::ServerError),
            _ => None,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "status_429",
            Self::RequestTimeout => "status_408",
            Self::ServerError => "status_5xx",
            Self::Connect => "connect_error",
            Self::Timeout => "timeout",
        }
    }
}

/// The computed back-off before retry number `retry` (1 for the first retry):
/// `initialBackoff * multiplier^(retry-1)`, capped at `maxBackoff`; with jitter, a uniformly
/// random point in its upper half (`unit` in [0, 1) picks it, so tests choose).
pub(crate) fn backoff(policy: &RetryPolicy, retry: u32, unit: f64) -> Duration {
    let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let raw = policy.initial_backoff.as_secs_f64() * policy.multiplier.powi(exp);
    let capped = raw.min(policy.max_backoff.as_secs_f64());
    let secs = if policy.jitter { capped * (0.5 + 0.5 * unit.clamp(0.0, 1.0)) } else { capped };
    Duration::from_secs_f64(secs.max(0.0))
}

pub(crate) use crate::protocol::ratelimit_headers::MAX_UPSTREAM_DELAY;
use crate::protocol::ratelimit_headers::header;

fn seconds(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::from_secs_f64(secs.min(MAX_UPSTREAM_DELAY.as_secs_f64())))
}

/// How long the upstream asked us to wait, if it said so. Order: `retry-after-ms`, then
/// `Retry-After` (seconds or an HTTP date); on a 429 only, then the `x-ratelimit-reset-*` of
/// the quota that is at 0 (OpenAI sends those headers on every answer, so on anything else they
/// say nothing about this failure).
pub(crate) fn upstream_delay(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    // OpenAI's and Azure's milliseconds first (Azure sends both spellings).
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(d) =
            header(headers, name).and_then(|v| v.parse::<f64>().ok()).and_then(|ms| seconds(ms / 1000.0))
        {
            return Some(d);
        }
    }
    if let Some(v) = header(headers, "retry-after") {
        if let Ok(secs) = v.parse::<f64>() {
            return seconds(secs);
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_UPSTREAM_DELAY));
        }
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let exhausted = |name: &str| header(headers, name).and_then(|v| v.parse::<u64>().ok()) == Some(0);
    let reset = |name: &str| crate::protocol::ratelimit_headers::reset(headers, name);
    let requests =
        exhausted("x-ratelimit-remaining-requests").then(|| reset("x-ratelimit-reset-requests")).flatten();
    let tokens =
        exhausted("x-ratelimit-remaining-tokens").then(|| reset("x-ratelimit-reset-tokens")).flatten();
    requests.max(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(8),
            multiplier: 2.0,
            jitter,
            budget_ratio: 0.2,
            budget_min_per_second: 1,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy(false);
        let got: Vec<u64> = (1..=5).map(|n| backoff(&p, n, 0.0).as_secs()).collect();
        assert_eq!(got, [2, 4, 8, 8, 8]);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let p = policy(true);
        assert_eq!(backoff(&p, 2, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&p, 2, 0.5), Duration::from_secs(3));
        assert!(backoff(&p, 2, 0.999_999) < Duration::from_secs(4));
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for code in [429, 408, 500, 502, 503, 504] {
            assert!(
                RetryReason::for_status(StatusCode::from_u16(code).unwrap_or_default()).is_some(),
                "{code}"
            );
        }
        for code in [200, 400, 401, 403, 404, 409, 413, 422, 501] {
            assert!(
                RetryReason::for_status(StatusCode::from_u16(code).unwrap_or_default()).is_none(),
                "{code}"
            );
        }
    }

    #[test]
    fn upstream_delay_precedence() {
        let now = SystemTime::now();
        let d = |h: &HeaderMap| upstream_delay(StatusCode::TOO_MANY_REQUESTS, h, now);
        let ms = headers(&[("retry-after-ms", "1500"), ("retry-after", "7")]);
        assert_eq!(d(&ms), Some(Duration::from_millis(1500)));
        let azure = headers(&[("x-ms-retry-after-ms", "2500"), ("retry-after", "3")]);
        assert_eq!(d(&azure), Some(Duration::from_millis(2500)));
        assert_eq!(d(&headers(&[("retry-after", "7")])), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let got = d(&headers(&[("retry-after", &date)])).unwrap_or_default();
        assert!(got > Duration::from_secs(28) && got <= Duration::from_secs(30), "{got:?}");
        let resets = headers(&[
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(d(&resets), Some(Duration::from_secs(360)), "the exhausted quota's reset");
        let not_exhausted =
            headers(&[("x-ratelimit-remaining-requests", "5"), ("x-ratelimit-reset-requests", "20ms")]);
        assert_eq!(d(&not_exhausted), None);
        assert_eq!(d(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn reset_headers_say_nothing_about_server_errors() {
        let h = headers(&[("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "45s")]);
        assert_eq!(upstream_delay(StatusCode::SERVICE_UNAVAILABLE, &h, SystemTime::now()), None);
        let h = headers(&[("retry-after", "3")]);
        assert_eq!(
            upstream_delay(StatusCode::SERVICE_UNAVAILABLE, &h, SystemTime::now()),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn absurd_delays_are_capped_not_fatal() {
        let now = SystemTime::now();
        for v in ["1e20", "99999999999"] {
            let got = upstream_delay(StatusCode::TOO_MANY_REQUESTS, &headers(&[("retry-after", v)]), now);
            assert_eq!(got, Some(MAX_UPSTREAM_DELAY), "{v}");
        }
        assert_eq!(
            upstream_delay(StatusCode::TOO_MANY_REQUESTS, &headers(&[("retry-after-ms", "-5")]), now),
            None
        );
    }
}
