//! What differs between the providers an endpoint may speak, in one place: how the upstream
//! key is sent and which headers go with it, how an answer's usage is read, which headers
//! calibrate the buckets, which 429s are not about the rate, and the shape of the errors the
//! proxy answers itself. Everything else on the request path is the same for every provider,
//! so adding one is adding a module beside `anthropic`, `azure` and `gemini` and its arms here.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use llmproxy_api::{KeyHeader, Provider};

use crate::protocol::ratelimit_headers::QuotaHeaders;
use crate::protocol::sse::SseTap;
use crate::protocol::tokens::{self, Usage};
use crate::protocol::{anthropic, gemini};

/// The header that carries the upstream key, and its value; `None` when the key cannot be a
/// header value.
pub(crate) fn key_header(
    provider: Provider,
    key_header: KeyHeader,
    key: &str,
) -> Option<(HeaderName, HeaderValue)> {
    let (name, value) = match (provider, key_header) {
        (Provider::Anthropic, _) => (HeaderName::from_static("x-api-key"), HeaderValue::from_str(key)),
        (Provider::OpenAi, KeyHeader::Bearer) | (Provider::Gemini, _) => {
            (header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {key}")))
        }
        (Provider::OpenAi, KeyHeader::ApiKey) | (Provider::Azure, _) => {
            (HeaderName::from_static("api-key"), HeaderValue::from_str(key))
        }
    };
    let mut value = value.ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

/// Headers the provider needs that a client may leave out: Anthropic refuses a request
/// without `anthropic-version`, and older SDKs (and curl users) send none.
pub(crate) fn complete_headers(provider: Provider, headers: &mut HeaderMap) {
    if provider == Provider::Anthropic && !headers.contains_key("anthropic-version") {
        headers.insert("anthropic-version", HeaderValue::from_static(anthropic::DEFAULT_VERSION));
    }
}

/// What the upstream's headers say of its quota, in the provider's own headers.
pub(crate) fn quota_headers(
    provider: Provider,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<QuotaHeaders> {
    match provider {
        // Azure sends the `remaining` ones only (and -1 for unknown, which is no count).
        Provider::OpenAi | Provider::Azure => QuotaHeaders::parse(headers),
        Provider::Anthropic => anthropic::quota_headers(headers, now),
        // Gemini sends none: its 429 bodies say what it needs (`retry_delay`, `exhaustion`).
        Provider::Gemini => None,
    }
}

/// The usage of a whole JSON answer.
pub(crate) fn usage_in_body(provider: Provider, body: &[u8]) -> Option<Usage> {
    match provider {
        Provider::OpenAi | Provider::Azure | Provider::Gemini => tokens::usage_in_body(body),
        Provider::Anthropic => anthropic::usage_in_body(body),
    }
}

/// A tap that reads the usage of a stream in the provider's events; `strip_usage_event` when
/// the proxy asked for OpenAI's usage event on the client's behalf.
pub(crate) fn sse_tap(provider: Provider, strip_usage_event: bool) -> SseTap {
    match provider {
        Provider::OpenAi | Provider::Azure | Provider::Gemini => SseTap::new(strip_usage_event),
        Provider::Anthropic => SseTap::anthropic(),
    }
}

/// A 429 that no wait in the queue fixes: the account is out of credit, a spend limit is
/// reached, or a long-window (daily) quota is spent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Exhaustion {
    /// Why, in metrics and status: `insufficient_quota`, `billing`, `spend_limit`,
    /// `requests_per_day`.
    pub(crate) reason: &'static str,
    /// Only the request's model is spent (a per-model daily quota), not the whole endpoint.
    pub(crate) model_only: bool,
    /// When the upstream's window resets, where it is known.
    pub(crate) reset: Option<SystemTime>,
}

/// Every `Exhaustion::reason`, for initialising metric series.
pub(crate) const EXHAUSTION_REASONS: [&str; 4] =
    ["insufficient_quota", "billing", "spend_limit", "requests_per_day"];

/// Whether a 429's body says a quota no wait fixes is spent, and which.
pub(crate) fn exhaustion(provider: Provider, body: &[u8], now: SystemTime) -> Option<Exhaustion> {
    let account = |reason| Some(Exhaustion { reason, model_only: false, reset: None });
    match provider {
        Provider::OpenAi | Provider::Azure => {
            let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
            match v.pointer("/error/code").and_then(|c| c.as_str())? {
                "insufficient_quota" => account("insufficient_quota"),
                "billing_hard_limit_reached" => account("billing"),
                _ => None,
            }
        }
        Provider::Anthropic => {
            let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
            let kind = v.pointer("/error/type").and_then(|c| c.as_str());
            let message = v.pointer("/error/message").and_then(|c| c.as_str()).unwrap_or_default();
            let message = message.to_ascii_lowercase();
            if ["spend limit", "usage limits", "credit balance"].iter().any(|m| message.contains(m)) {
                account("spend_limit")
            } else if kind.is_some_and(|k| k != "rate_limit_error") {
                account("billing")
            } else {
                None
            }
        }
        Provider::Gemini => gemini::quota_error(body).filter(|q| q.per_day).map(|_| Exhaustion {
            reason: "requests_per_day",
            model_only: true,
            reset: Some(gemini::day_ends(now)),
        }),
    }
}

/// How long a 429's body asks to wait, for a provider that says it there rather than in a
/// header (Gemini's `RetryInfo`).
pub(crate) fn retry_delay(provider: Provider, body: &[u8]) -> Option<Duration> {
    match provider {
        Provider::Gemini => gemini::quota_error(body)?.retry_delay,
        Provider::OpenAi | Provider::Azure | Provider::Anthropic => None,
    }
}

/// Which error shape a client of this request path reads: Anthropic's SDKs for the Messages
/// API, OpenAI's shape for everything else.
pub(crate) fn client_dialect(path: &str) -> Provider {
    let rest = path.strip_prefix("/v1").unwrap_or(path);
    if rest == "/messages" || rest.starts_with("/messages/") || rest.starts_with("/messages?") {
        Provider::Anthropic
    } else {
        Provider::OpenAi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_provider_takes_its_key_its_own_way() {
        let (name, value) = key_header(Provider::Anthropic, KeyHeader::Bearer, "sk-ant")
            .unwrap_or_else(|| (HeaderName::from_static("none"), HeaderValue::from_static("")));
        assert_eq!((name.as_str(), value.to_str().ok()), ("x-api-key", Some("sk-ant")));
        assert!(value.is_sensitive());
        let bearer = key_header(Provider::OpenAi, KeyHeader::Bearer, "sk")
            .map(|(n, v)| (n, v.to_str().map(str::to_owned)));
        assert_eq!(
            bearer.map(|(n, v)| (n.to_string(), v.ok())),
            Some(("authorization".into(), Some("Bearer sk".into())))
        );
        assert!(key_header(Provider::OpenAi, KeyHeader::ApiKey, "bad\nkey").is_none());
    }

    #[test]
    fn anthropic_gets_a_version_when_the_client_sends_none() {
        let mut h = HeaderMap::new();
        complete_headers(Provider::Anthropic, &mut h);
        assert_eq!(
            h.get("anthropic-version").and_then(|v| v.to_str().ok()),
            Some(anthropic::DEFAULT_VERSION)
        );
        let mut h = HeaderMap::new();
        h.insert("anthropic-version", HeaderValue::from_static("2025-01-01"));
        complete_headers(Provider::Anthropic, &mut h);
        assert_eq!(h.get("anthropic-version").and_then(|v| v.to_str().ok()), Some("2025-01-01"));
        let mut h = HeaderMap::new();
        complete_headers(Provider::OpenAi, &mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn only_rate_limit_429s_are_waited_out() {
        let now = SystemTime::now();
        let reason = |p, body: &[u8]| exhaustion(p, body, now).map(|e| (e.reason, e.model_only));
        let rate = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
        let spend = br#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified API usage limits (spend limit)."}}"#;
        let billing = br#"{"type":"error","error":{"type":"billing_error","message":"no"}}"#;
        assert_eq!(reason(Provider::Anthropic, rate), None);
        assert_eq!(reason(Provider::Anthropic, spend), Some(("spend_limit", false)));
        assert_eq!(reason(Provider::Anthropic, billing), Some(("billing", false)));
        assert_eq!(reason(Provider::Anthropic, b"<html>"), None);
        let credit = br#"{"error":{"code":"insufficient_quota"}}"#;
        assert_eq!(reason(Provider::OpenAi, credit), Some(("insufficient_quota", false)));
        assert_eq!(reason(Provider::Azure, credit), Some(("insufficient_quota", false)));
        assert_eq!(reason(Provider::OpenAi, br#"{"error":{"code":"rate_limit_exceeded"}}"#), None);
        let day = br#"[{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}]"#;
        let got = exhaustion(Provider::Gemini, day, now);
        assert_eq!(got.as_ref().map(|e| (e.reason, e.model_only)), Some(("requests_per_day", true)));
        assert!(got.and_then(|e| e.reset).is_some_and(|r| r > now));
        let minute = br#"{"error":{"code":429,"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"3s"}]}}"#;
        assert_eq!(reason(Provider::Gemini, minute), None);
        assert_eq!(retry_delay(Provider::Gemini, minute), Some(Duration::from_secs(3)));
        assert_eq!(retry_delay(Provider::OpenAi, minute), None);
    }

    #[test]
    fn messages_clients_read_anthropic_errors() {
        assert_eq!(client_dialect("/v1/messages"), Provider::Anthropic);
        assert_eq!(client_dialect("/v1/messages/count_tokens"), Provider::Anthropic);
        assert_eq!(client_dialect("/v1/messagesx"), Provider::OpenAi);
        assert_eq!(client_dialect("/v1/chat/completions"), Provider::OpenAi);
    }
}
