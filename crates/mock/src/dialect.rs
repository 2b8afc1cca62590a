//! What differs between the APIs the mock speaks at the gate (OpenAI's, and as Azure OpenAI
//! and Gemini answer it; Anthropic's): how the key is sent, the shape of an error body and the
//! rate-limit headers. The gate itself is shared.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;
use tokio::time::Instant;

use crate::quota::{Quota, go_duration};
use crate::{Flavor, Mock, lock};

/// Which provider's API a request is answered in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    Azure,
    Gemini,
    Anthropic,
}

/// Anthropic's error types, by the status it answers them with.
const ANTHROPIC_TYPES: &[(&str, u16)] = &[
    ("invalid_request_error", 400),
    ("authentication_error", 401),
    ("billing_error", 402),
    ("permission_error", 403),
    ("not_found_error", 404),
    ("request_too_large", 413),
    ("rate_limit_error", 429),
    ("api_error", 500),
    ("timeout_error", 504),
    ("overloaded_error", 529),
];

/// Anthropic's error type for a status without one of its own.
pub(crate) fn anthropic_type(status: StatusCode) -> &'static str {
    let code = status.as_u16();
    match ANTHROPIC_TYPES.iter().find(|(_, s)| *s == code) {
        Some((t, _)) => t,
        None if status.is_client_error() => "invalid_request_error",
        None => "api_error",
    }
}

/// `{"type":"error","error":{"type":T,"message":M}}` with a `request-id`, as Anthropic answers.
pub(crate) fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut().insert("request-id", request_id());
    resp
}

/// OpenAI's `{"error":{"message","type","param","code"}}`.
pub(crate) fn openai_error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// A fresh `req_...` id (Anthropic's `request-id` header): unique per process, not secret.
pub(crate) fn request_id() -> HeaderValue {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    HeaderValue::from_str(&format!("req_mock{n:016x}")).unwrap_or(HeaderValue::from_static("req_mock"))
}

/// Anthropic's error for an injected `Fault::Status`.
pub(crate) fn anthropic_fault(status: StatusCode, code: Option<&str>) -> Response {
    let (kind, message) = fault_kind(status, code);
    anthropic_error(status, kind, message)
}

/// The type and message of an injected Anthropic error: `code`, when it names one of
/// Anthropic's error types (optionally as `"type: message"`), sets them; else the status does.
fn fault_kind(status: StatusCode, code: Option<&str>) -> (&str, &str) {
    let (named, message) = match code.map(|c| c.split_once(':').unwrap_or((c, ""))) {
        Some((t, m)) if ANTHROPIC_TYPES.iter().any(|(k, _)| *k == t.trim()) => (Some(t.trim()), m.trim()),
        _ => (None, ""),
    };
    let kind = named.unwrap_or_else(|| anthropic_type(status));
    (kind, if message.is_empty() { default_message(kind) } else { message })
}

fn default_message(kind: &str) -> &'static str {
    match kind {
        "overloaded_error" => "Overloaded",
        "rate_limit_error" => "This request would exceed your rate limit. Please try again later.",
        "authentication_error" => "invalid x-api-key",
        "permission_error" => "Your API key does not have permission to use the specified resource.",
        "not_found_error" => "Not found",
        "request_too_large" => "Request exceeds the maximum allowed number of bytes.",
        "billing_error" => "Your credit balance is too low to access the Anthropic API.",
        "timeout_error" => "Request timed out",
        "invalid_request_error" => "Invalid request",
        _ => "Internal server error",
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    header_str(headers, header::AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer "))
}

/// A header's value, if it is text.
pub(crate) fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    header_str(headers, name).map(str::to_owned)
}

/// When a full bucket is reached again, as Anthropic's `-reset` headers say it.
fn reset_at(q: &Quota, now: Instant) -> String {
    rfc3339(SystemTime::now() + q.reset(now))
}

/// Gemini's 429 body for quota `quota_id`, wrapped in an array as its OpenAI-compatible endpoint
/// sends it, a `Help` entry before the two that matter.
pub(crate) fn gemini_quota_error(quota_id: &str, model: &str, retry_delay: Duration) -> Response {
    let body = json!([{"error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                             "quotaId": quota_id, "quotaDimensions": {"model": model, "location": "global"}}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo",
             "retryDelay": format!("{}s", retry_delay.as_secs_f64().ceil().max(1.0))},
        ],
    }}]);
    (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
}

/// OpenAI's answer for an account out of credit (a 429 that no wait fixes).
pub(crate) fn insufficient_quota() -> Response {
    openai_error(
        StatusCode::TOO_MANY_REQUESTS,
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        Some("insufficient_quota"),
    )
}

impl Dialect {
    /// The dialect of the OpenAI-shaped routes for a mock of `flavor`.
    pub(crate) fn openai(flavor: Flavor) -> Self {
        match flavor {
            Flavor::OpenAi => Self::OpenAi,
            Flavor::Azure => Self::Azure,
            Flavor::Gemini => Self::Gemini,
        }
    }

    /// The key a client sent: OpenAI's bearer token or Azure's `api-key`; Azure OpenAI's
    /// `api-key` only; Anthropic's `x-api-key` or a bearer token (its SDK's `auth_token`).
    pub(crate) fn key(self, headers: &HeaderMap) -> Option<String> {
        let key = match self {
            Self::OpenAi => bearer(headers).or_else(|| header_str(headers, "api-key")),
            Self::Azure => header_str(headers, "api-key"),
            Self::Gemini => bearer(headers),
            Self::Anthropic => header_str(headers, "x-api-key").or_else(|| bearer(headers)),
        };
        key.map(str::to_owned)
    }

    /// The answer to a wrong or missing key.
    pub(crate) fn unauthorized(self) -> Response {
        match self {
            Self::OpenAi | Self::Azure | Self::Gemini => openai_error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Self::Anthropic => {
                anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key")
            }
        }
    }

    /// The answer to an injected `Fault::Status`.
    pub(crate) fn fault(self, status: StatusCode, code: Option<&str>) -> Response {
        match self {
            Self::OpenAi | Self::Azure | Self::Gemini => openai_error(
                status,
                "The server had an error while processing your request.",
                "server_error",
                code,
            ),
            Self::Anthropic => anthropic_fault(status, code),
        }
    }

    /// A 429 for a model refused whatever the quota.
    pub(crate) fn model_refused(self) -> Response {
        match self {
            Self::OpenAi | Self::Azure | Self::Gemini => openai_error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for this model. Please try again later.",
                "requests",
                Some("rate_limit_exceeded"),
            ),
            Self::Anthropic => anthropic_fault(StatusCode::TOO_MANY_REQUESTS, None),
        }
    }

    /// A 429 for the bucket `what` (`requests`, `tokens`, `input tokens`, `output tokens`) of
    /// `limit` per minute, which has room again after `wait`.
    pub(crate) fn limited(self, what: &str, limit: u64, wait: Duration, model: &str) -> Response {
        match self {
            Self::OpenAi => {
                let msg =
                    format!("Rate limit reached for {what}. Please try again in {}.", go_duration(wait));
                openai_error(StatusCode::TOO_MANY_REQUESTS, &msg, what, Some("rate_limit_exceeded"))
            }
            Self::Azure => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let msg = format!(
                    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API have exceeded \
                     the {what} per minute rate limit of your current pricing tier. Please retry after {secs} seconds."
                );
                let body = json!({"error": {"code": "429", "message": msg}});
                (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
            }
            Self::Gemini => {
                let id = if what == "requests" {
                    "GenerateRequestsPerMinutePerProjectPerModel"
                } else {
                    "GenerateContentInputTokensPerModelPerMinute"
                };
                gemini_quota_error(id, model, wait)
            }
            Self::Anthropic => {
                let msg = format!(
                    "This request would exceed the rate limit for your organization of {limit} {what} per \
                     minute. Please reduce the prompt length or the maximum tokens requested, or try again later."
                );
                anthropic_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", &msg)
            }
        }
    }

    /// The rate-limit headers for the configured limits: OpenAI's `x-ratelimit-*` (reset as a
    /// duration) or Anthropic's `anthropic-ratelimit-*` (reset as an RFC 3339 time).
    pub(crate) fn rate_headers(self, mock: &Mock, now: Instant) -> HeaderMap {
        let mut h = HeaderMap::new();
        let limits = lock(&mock.limits);
        let mut put = |name: String, value: String| {
            if let (Ok(n), Ok(v)) = (http::HeaderName::try_from(name), HeaderValue::from_str(&value)) {
                h.insert(n, v);
            }
        };
        let buckets = match self {
            Self::OpenAi | Self::Azure => vec![("requests", &limits.requests), ("tokens", &limits.tokens)],
            Self::Gemini => Vec::new(),
            Self::Anthropic => vec![
                ("requests", &limits.requests),
                ("input-tokens", &limits.input_tokens),
                ("output-tokens", &limits.output_tokens),
                ("tokens", &limits.tokens),
            ],
        };
        for (what, q) in buckets {
            let Some(q) = q else { continue };
            match self {
                Self::OpenAi => {
                    put(format!("x-ratelimit-limit-{what}"), q.limit.to_string());
                    put(format!("x-ratelimit-remaining-{what}"), q.remaining(now).to_string());
                    put(format!("x-ratelimit-reset-{what}"), go_duration(q.reset(now)));
                }
                Self::Azure => put(format!("x-ratelimit-remaining-{what}"), q.remaining(now).to_string()),
                Self::Gemini => {}
                Self::Anthropic => {
                    put(format!("anthropic-ratelimit-{what}-limit"), q.limit.to_string());
                    put(format!("anthropic-ratelimit-{what}-remaining"), q.remaining(now).to_string());
                    put(format!("anthropic-ratelimit-{what}-reset"), reset_at(q, now));
                }
            }
        }
        h
    }
}

/// `t` as RFC 3339 in UTC to the second, rounded up (`2026-12-02T06:40:12Z`).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    let (y, m, d) = civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s % 3600 / 60, s % 60)
}

/// Year, month, day of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_by_hand() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_798_785_612), "2027-01-01T06:40:12Z");
        assert_eq!(at(1_796_193_612), "2026-12-02T06:40:12Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1500)), "1970-01-01T00:00:02Z");
    }

    #[test]
    fn fault_code_names_the_type() {
        let t = |status: u16, code: Option<&'static str>| {
            fault_kind(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), code)
        };
        assert_eq!(t(529, None), ("overloaded_error", "Overloaded"));
        assert_eq!(t(503, None).0, "api_error");
        assert_eq!(t(418, None).0, "invalid_request_error");
        assert_eq!(t(429, Some("insufficient_quota")).0, "rate_limit_error");
        assert_eq!(
            t(429, Some("rate_limit_error: spend limit reached")),
            ("rate_limit_error", "spend limit reached")
        );
        assert_eq!(t(400, Some("billing_error")), ("billing_error", default_message("billing_error")));
    }
}
