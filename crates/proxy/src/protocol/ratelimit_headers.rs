//! The upstream's own word about its quota: `x-ratelimit-limit-*` (the limit per minute),
//! `x-ratelimit-remaining-*` (what can be spent now) and `x-ratelimit-reset-*` (time until the
//! bucket is full again), as OpenAI sends them on every answer and Azure OpenAI sends the
//! `remaining` ones.

use std::time::Duration;

use http::HeaderMap;

/// The longest duration taken from an upstream header; anything longer is nonsense or hostile.
pub(crate) const MAX_UPSTREAM_DELAY: Duration = Duration::from_secs(3600);

/// What one answer's headers said; every field is optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QuotaHeaders {
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-requests`.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-reset-tokens`.
    pub reset_tokens: Option<Duration>,
    /// Input tokens per minute (Anthropic's `anthropic-ratelimit-input-tokens-limit`).
    pub limit_input_tokens: Option<u64>,
    /// Input tokens that may be spent now.
    pub remaining_input_tokens: Option<u64>,
    /// Until the input token bucket is full again.
    pub reset_input_tokens: Option<Duration>,
    /// Output tokens per minute (Anthropic's `anthropic-ratelimit-output-tokens-limit`).
    pub limit_output_tokens: Option<u64>,
    /// Output tokens that may be spent now.
    pub remaining_output_tokens: Option<u64>,
    /// Until the output token bucket is full again.
    pub reset_output_tokens: Option<Duration>,
}

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// A header's value as a count; `None` when absent or not a non-negative integer.
pub(crate) fn count(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name)?.parse().ok()
}

/// A reset as OpenAI spells it (`1s`, `6m0s`, `20ms`) or as plain seconds (`1.5`), capped.
pub(crate) fn reset(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let text = header(headers, name)?;
    let d = match text.parse::<llmproxy_api::Duration>() {
        Ok(d) => d.get(),
        Err(_) => {
            let secs = text.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0)?;
            Duration::from_secs_f64(secs.min(MAX_UPSTREAM_DELAY.as_secs_f64()))
        }
    };
    Some(d.min(MAX_UPSTREAM_DELAY))
}

impl QuotaHeaders {
    /// Read the headers; `None` when the answer carries none of them.
    pub(crate) fn parse(headers: &HeaderMap) -> Option<Self> {
        let q = Self {
            limit_requests: count(headers, "x-ratelimit-limit-requests"),
            limit_tokens: count(headers, "x-ratelimit-limit-tokens"),
            remaining_requests: count(headers, "x-ratelimit-remaining-requests"),
            remaining_tokens: count(headers, "x-ratelimit-remaining-tokens"),
            reset_requests: reset(headers, "x-ratelimit-reset-requests"),
            reset_tokens: reset(headers, "x-ratelimit-reset-tokens"),
            ..Self::default()
        };
        (q != Self::default()).then_some(q)
    }

    /// Whether they say what remains of a quota (what a correction needs).
    pub(crate) fn says_remaining(&self) -> bool {
        self.remaining_requests.is_some()
            || self.remaining_tokens.is_some()
            || self.reset_requests.is_some()
            || self.reset_tokens.is_some()
            || self.remaining_input_tokens.is_some()
            || self.remaining_output_tokens.is_some()
            || self.reset_input_tokens.is_some()
            || self.reset_output_tokens.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_openai_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-reset-requests", "12ms"),
            ("x-ratelimit-limit-tokens", "160000"),
            ("x-ratelimit-remaining-tokens", " 159980 "),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let q = QuotaHeaders::parse(&h).unwrap_or_default();
        assert_eq!(q.limit_requests, Some(5000));
        assert_eq!(q.remaining_tokens, Some(159_980));
        assert_eq!(q.reset_requests, Some(Duration::from_millis(12)));
        assert_eq!(q.reset_tokens, Some(Duration::from_secs(360)));
        assert!(q.says_remaining());
    }

    #[test]
    fn absent_garbage_and_absurd_values() {
        assert_eq!(QuotaHeaders::parse(&headers(&[("content-type", "x")])), None);
        let q = QuotaHeaders::parse(&headers(&[
            ("x-ratelimit-remaining-tokens", "-5"),
            ("x-ratelimit-reset-tokens", "99999999h"),
            ("x-ratelimit-reset-requests", "1.5"),
            ("x-ratelimit-limit-tokens", "10"),
        ]))
        .unwrap_or_default();
        assert_eq!(q.remaining_tokens, None);
        assert_eq!(q.reset_tokens, Some(MAX_UPSTREAM_DELAY));
        assert_eq!(q.reset_requests, Some(Duration::from_millis(1500)));
        // Azure sends -1 where it does not know: no count, never a limit of nothing.
        let azure = QuotaHeaders::parse(&headers(&[
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-remaining-requests", "99"),
        ]))
        .unwrap_or_default();
        assert_eq!((azure.remaining_requests, azure.remaining_tokens), (Some(99), None));
        let only_limit = QuotaHeaders { limit_tokens: Some(10), ..QuotaHeaders::default() };
        assert!(!only_limit.says_remaining());
    }
}
