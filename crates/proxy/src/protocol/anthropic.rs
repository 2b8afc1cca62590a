//! Anthropic's Messages API on the wire: its usage (in a JSON answer and in the stream's
//! `message_start` / `message_delta` events), its `anthropic-ratelimit-*` headers and its error
//! shape. Read without building a JSON tree; anything of an unexpected shape is skipped, never
//! an error, since the answer goes to the client whatever the proxy makes of it.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use serde::Deserialize;

use crate::protocol::ratelimit_headers::{MAX_UPSTREAM_DELAY, QuotaHeaders, count, header};
use crate::protocol::tokens::{Lenient, Usage};

/// The `anthropic-version` sent when the client sends none: the one every SDK release accepts.
pub(crate) const DEFAULT_VERSION: &str = "2023-06-01";

/// `usage` of an answer or an event: every field optional.
#[derive(Deserialize, Default)]
struct Fields {
    #[serde(default)]
    input_tokens: Lenient<u64>,
    #[serde(default)]
    output_tokens: Lenient<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Lenient<u64>,
    #[serde(default)]
    cache_read_input_tokens: Lenient<u64>,
}

impl Fields {
    /// Lay these fields over `u` (a later event's counts replace an earlier one's).
    fn over(self, mut u: Usage) -> Usage {
        if let Some(v) = self.input_tokens.0 {
            u.prompt = v;
        }
        if let Some(v) = self.output_tokens.0 {
            u.completion = v;
        }
        if let Some(v) = self.cache_creation_input_tokens.0 {
            u.cache_write = v;
        }
        if let Some(v) = self.cache_read_input_tokens.0 {
            u.cache_read = v;
        }
        u
    }

    fn any(&self) -> bool {
        self.input_tokens.0.is_some()
            || self.output_tokens.0.is_some()
            || self.cache_creation_input_tokens.0.is_some()
            || self.cache_read_input_tokens.0.is_some()
    }
}

/// The usage of a whole JSON answer (`{"type":"message",...,"usage":{...}}`).
pub(crate) fn usage_in_body(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Top {
        #[serde(default)]
        usage: Lenient<Fields>,
    }
    let f = serde_json::from_slice::<Top>(body).ok()?.usage.0?;
    f.any().then(|| f.over(Usage::default()))
}

/// What a stream's events said so far: input usage from `message_start`, the output count
/// from each `message_delta` (cumulative: the last wins), and whether `message_stop` came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StreamUsage {
    /// Usage so far; `None` until an event carried some.
    pub usage: Option<Usage>,
    /// `message_stop` was seen: the stream ended cleanly.
    pub done: bool,
}

impl StreamUsage {
    /// Look at one event's `data:` payload.
    pub(crate) fn event(&mut self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Event {
            #[serde(default, rename = "type")]
            kind: Lenient<String>,
            #[serde(default)]
            message: Lenient<Message>,
            #[serde(default)]
            usage: Lenient<Fields>,
        }
        #[derive(Deserialize)]
        struct Message {
            #[serde(default)]
            usage: Lenient<Fields>,
        }
        // Only the events that matter are parsed; the text deltas (most of a stream) are not.
        let wanted = [&b"\"message_start\""[..], b"\"message_delta\"", b"\"message_stop\""];
        if !wanted.iter().any(|w| memchr::memmem::find(payload, w).is_some()) {
            return;
        }
        let Ok(e) = serde_json::from_slice::<Event>(payload) else { return };
        let fields = match e.kind.0.as_deref() {
            Some("message_start") => e.message.0.and_then(|m| m.usage.0),
            Some("message_delta") => e.usage.0,
            Some("message_stop") => {
                self.done = true;
                None
            }
            _ => None,
        };
        if let Some(f) = fields.filter(Fields::any) {
            self.usage = Some(f.over(self.usage.unwrap_or_default()));
        }
    }
}

/// The error `type` Anthropic gives a status, for errors the proxy itself answers.
pub(crate) fn error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 411 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error body in Anthropic's shape, so that its SDKs raise their own exception types.
pub(crate) fn error_body(status: u16, message: &str) -> serde_json::Value {
    serde_json::json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// When the upstream says a bucket is full again (an RFC 3339 time), as a wait from `now`. A
/// time in whole seconds (as Anthropic sends it) is rounded up by as much as a second: the
/// earliest reading is taken, since a bucket of one second's worth would otherwise look a
/// whole bucket emptier than it is.
fn reset_at(headers: &HeaderMap, name: &str, now: SystemTime) -> Option<Duration> {
    let at: jiff::Timestamp = header(headers, name)?.parse().ok()?;
    let now = jiff::Timestamp::try_from(now).ok()?;
    let wait = Duration::try_from(now.duration_until(at)).unwrap_or(Duration::ZERO);
    let rounding = if at.subsec_nanosecond() == 0 { Duration::from_secs(1) } else { Duration::ZERO };
    Some(wait.saturating_sub(rounding).min(MAX_UPSTREAM_DELAY))
}

/// `anthropic-ratelimit-*`: requests, input tokens, output tokens and (the combined) tokens,
/// each with its limit, what remains and when it is full again; `None` when none is there.
pub(crate) fn quota_headers(headers: &HeaderMap, now: SystemTime) -> Option<QuotaHeaders> {
    let h = |kind: &str, what: &str| format!("anthropic-ratelimit-{kind}-{what}");
    let q = QuotaHeaders {
        limit_requests: count(headers, &h("requests", "limit")),
        remaining_requests: count(headers, &h("requests", "remaining")),
        reset_requests: reset_at(headers, &h("requests", "reset"), now),
        limit_tokens: count(headers, &h("tokens", "limit")),
        remaining_tokens: count(headers, &h("tokens", "remaining")),
        reset_tokens: reset_at(headers, &h("tokens", "reset"), now),
        limit_input_tokens: count(headers, &h("input-tokens", "limit")),
        remaining_input_tokens: count(headers, &h("input-tokens", "remaining")),
        reset_input_tokens: reset_at(headers, &h("input-tokens", "reset"), now),
        limit_output_tokens: count(headers, &h("output-tokens", "limit")),
        remaining_output_tokens: count(headers, &h("output-tokens", "remaining")),
        reset_output_tokens: reset_at(headers, &h("output-tokens", "reset"), now),
    };
    (q != QuotaHeaders::default()).then_some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_an_answer_counts_cache_reads_apart() {
        let body = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"\"usage\""}],
            "usage":{"input_tokens":12,"output_tokens":30,"cache_creation_input_tokens":5,"cache_read_input_tokens":100}}"#;
        let u = usage_in_body(body).unwrap_or_default();
        assert_eq!((u.prompt, u.completion, u.cache_write, u.cache_read), (12, 30, 5, 100));
        assert_eq!(u.input(), 17, "cache reads do not count toward input tokens per minute");
        assert_eq!(usage_in_body(br#"{"usage":"n/a"}"#), None);
        assert_eq!(usage_in_body(b"not json"), None);
    }

    #[test]
    fn a_stream_takes_input_from_its_start_and_output_from_its_last_delta() {
        let mut s = StreamUsage::default();
        for event in [
            r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"cache_read_input_tokens":7,"output_tokens":1}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"message_delta usage"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":15}}"#,
        ] {
            s.event(event.as_bytes());
        }
        let u = s.usage.unwrap_or_default();
        assert_eq!((u.prompt, u.cache_read, u.completion), (25, 7, 15));
        assert!(!s.done);
        s.event(br#"{"type":"message_stop"}"#);
        assert!(s.done);
        s.event(br#"{"type":"message_delta","usage":[1]}"#);
        assert_eq!(s.usage.map(|u| u.completion), Some(15), "a malformed event changes nothing");
    }

    #[test]
    fn rate_limit_headers_with_rfc3339_resets() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |secs: u64| {
            jiff::Timestamp::try_from(now + Duration::from_secs(secs))
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("anthropic-ratelimit-requests-limit", "50".to_owned()),
            ("anthropic-ratelimit-requests-remaining", "49".to_owned()),
            ("anthropic-ratelimit-requests-reset", at(1)),
            ("anthropic-ratelimit-input-tokens-limit", "30000".to_owned()),
            ("anthropic-ratelimit-input-tokens-remaining", "29000".to_owned()),
            ("anthropic-ratelimit-output-tokens-limit", "8000".to_owned()),
            ("anthropic-ratelimit-output-tokens-remaining", "7500".to_owned()),
            ("anthropic-ratelimit-output-tokens-reset", at(4)),
            ("anthropic-ratelimit-tokens-reset", "yesterday".to_owned()),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let q = quota_headers(&h, now).unwrap_or_default();
        assert_eq!((q.limit_requests, q.remaining_requests), (Some(50), Some(49)));
        assert_eq!(q.reset_requests, Some(Duration::ZERO), "a whole-second time may be a second early");
        assert_eq!((q.limit_input_tokens, q.remaining_input_tokens), (Some(30000), Some(29000)));
        assert_eq!((q.limit_output_tokens, q.remaining_output_tokens), (Some(8000), Some(7500)));
        assert_eq!(q.reset_output_tokens, Some(Duration::from_secs(3)));
        assert_eq!(q.reset_tokens, None, "an unreadable reset is ignored");
        assert_eq!(quota_headers(&HeaderMap::new(), now), None);
    }

    #[test]
    fn errors_in_anthropics_shape() {
        let e = error_body(429, "wait");
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["type"], "rate_limit_error");
        assert_eq!(error_type(400), "invalid_request_error");
        assert_eq!(error_type(529), "overloaded_error");
        assert_eq!(error_type(502), "api_error");
    }
}
