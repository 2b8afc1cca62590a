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

/// Why a 429 is one no wait in the queue fixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// OpenAI's and Azure's `insufficient_quota`: the account is out of credit.
    InsufficientQuota,
    /// A billing problem (OpenAI's `billing_hard_limit_reached`, Anthropic's `billing_error`).
    Billing,
    /// Anthropic's spend limit (or usage limits, or credit balance).
    SpendLimit,
    /// A daily quota (Gemini's per-day `quotaId`).
    RequestsPerDay,
}

impl Reason {
    /// Every reason, for initialising metric series.
    pub(crate) const ALL: [Reason; 4] =
        [Reason::InsufficientQuota, Reason::Billing, Reason::SpendLimit, Reason::RequestsPerDay];

    /// Its name in metrics and status.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::InsufficientQuota => "insufficient_quota",
            Reason::Billing => "billing",
            Reason::SpendLimit => "spend_limit",
            Reason::RequestsPerDay => "requests_per_day",
        }
    }

    /// What is spent, in a client's error message.
    pub(crate) fn what(self) -> &'static str {
        match self {
            Reason::InsufficientQuota => "its account's credit",
            Reason::Billing => "its billing",
            Reason::SpendLimit => "its spend limit",
            Reason::RequestsPerDay => "its daily quota",
        }
    }
}

/// A 429 that no wait in the queue fixes: the account is out of credit, a spend limit is
/// reached, or a long-window (daily) quota is spent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Exhaustion {
    pub(crate) reason: Reason,
    /// Only the request's model is spent (a per-model daily quota), not the whole endpoint.
    pub(crate) model_only: bool,
    /// When the upstream's window resets, where it is known.
    pub(crate) reset: Option<SystemTime>,
}

/// What a 429's body says, read once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TooMany {
    /// A quota no wait fixes is spent.
    Exhausted(Exhaustion),
    /// A rate limit: wait, for as long as the body asks where it says (Gemini's `RetryInfo`;
    /// the other providers say it in headers).
    Wait(Option<Duration>),
}

/// Read a 429's body: a quota no wait fixes, or a rate limit to wait out.
pub(crate) fn too_many(provider: Provider, body: &[u8], now: SystemTime) -> TooMany {
    let account = |reason| TooMany::Exhausted(Exhaustion { reason, model_only: false, reset: None });
    let json = || serde_json::from_slice::<serde_json::Value>(body).ok();
    match provider {
        Provider::OpenAi | Provider::Azure => {
            let v = json();
            match v.as_ref().and_then(|v| v.pointer("/error/code")?.as_str()) {
                Some("insufficient_quota") => account(Reason::InsufficientQuota),
                Some("billing_hard_limit_reached") => account(Reason::Billing),
                _ => TooMany::Wait(None),
            }
        }
        Provider::Anthropic => {
            let v = json().unwrap_or_default();
            let kind = v.pointer("/error/type").and_then(|c| c.as_str());
            let message = v.pointer("/error/message").and_then(|c| c.as_str()).unwrap_or_default();
            let message = message.to_ascii_lowercase();
            if ["spend limit", "usage limits", "credit balance"].iter().any(|m| message.contains(m)) {
                account(Reason::SpendLimit)
            } else if kind.is_some_and(|k| k != "rate_limit_error") {
                account(Reason::Billing)
            } else {
                TooMany::Wait(None)
            }
        }
        Provider::Gemini => match gemini::quota_error(body) {
            Some(q) if q.per_day => TooMany::Exhausted(Exhaustion {
                reason: Reason::RequestsPerDay,
                model_only: true,
                reset: Some(gemini::day_ends(now)),
            }),
            q => TooMany::Wait(q.and_then(|q| q.retry_delay)),
        },
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
        let reason = |p, body: &[u8]| match too_many(p, body, now) {
            TooMany::Exhausted(e) => Some((e.reason.label(), e.model_only)),
            TooMany::Wait(_) => None,
        };
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
        assert_eq!(reason(Provider::Gemini, day), Some(("requests_per_day", true)));
        let TooMany::Exhausted(got) = too_many(Provider::Gemini, day, now) else { panic!("a spent day") };
        assert!(got.reset.is_some_and(|r| r > now));
        let minute = br#"{"error":{"code":429,"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"3s"}]}}"#;
        assert_eq!(too_many(Provider::Gemini, minute, now), TooMany::Wait(Some(Duration::from_secs(3))));
        assert_eq!(too_many(Provider::OpenAi, minute, now), TooMany::Wait(None));
    }

    #[test]
    fn messages_clients_read_anthropic_errors() {
        assert_eq!(client_dialect("/v1/messages"), Provider::Anthropic);
        assert_eq!(client_dialect("/v1/messages/count_tokens"), Provider::Anthropic);
        assert_eq!(client_dialect("/v1/messagesx"), Provider::OpenAi);
        assert_eq!(client_dialect("/v1/chat/completions"), Provider::OpenAi);
    }
}
