//! The proxy's own error responses, in the shape of the API the client speaks so that its SDK
//! parses and retries them: OpenAI's `{"error": {"message", "type", "param", "code"}}`, or
//! Anthropic's `{"type": "error", "error": {"type", "message"}}` for the Messages API.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use llmproxy_api::Provider;
use serde_json::json;

use crate::admission::limiter::Limit;
use crate::admission::queue::Rejection;
use crate::protocol::anthropic;
use crate::telemetry::labels::Outcome;

/// An error the proxy answers itself.
/// A request the proxy answers itself: the error the client gets and the outcome it is counted as.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) error: ApiError,
    pub(crate) outcome: Outcome,
}

impl Refusal {
    pub(crate) fn new(error: ApiError, outcome: Outcome) -> Self {
        Self { error, outcome }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable, never containing a key or prompt text.
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, `rate_limit_error`, `api_error`, ...).
    pub kind: &'static str,
    /// OpenAI's `code` (`rate_limit_exceeded`, ...), if any.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After`, for 429s.
    pub retry_after: Option<Duration>,
}

/// A wait in whole seconds, rounded up: a client that waits what Retry-After says is not early.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl ApiError {
    /// 400 and friends: the client's request is wrong.
    pub(crate) fn invalid(
        status: StatusCode,
        message: impl Into<String>,
        code: Option<&'static str>,
    ) -> Self {
        Self { status, message: message.into(), kind: "invalid_request_error", code, retry_after: None }
    }

    /// 502/504: the upstream could not be reached or did not answer in time.
    pub(crate) fn upstream(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "api_error",
            code: Some("upstream_unavailable"),
            retry_after: None,
        }
    }

    /// Upstream endpoint `name` answered 401 to the proxy's own key: nothing the client can fix.
    pub(crate) fn upstream_auth(name: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: format!(
                "the upstream API (endpoint {name:?}) rejected llmproxy's API key; whoever runs this proxy \
                 must fix its apiKeySecretRef (standalone: --secrets-dir, --upstream-api-key-file or \
                 LLMPROXY_UPSTREAM_API_KEY)"
            ),
            kind: "authentication_error",
            code: Some("upstream_auth_failed"),
            retry_after: None,
        }
    }

    /// 503 while the LlmQuota grant this proxy draws on is withdrawn: its owner must grant it
    /// again (or the LlmProxy must stop naming it) before anything is admitted.
    pub(crate) fn quota_withdrawn(reason: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("llmproxy admits no requests: {reason}"),
            kind: "api_error",
            code: Some("quota_not_granted"),
            retry_after: Some(Duration::from_secs(5)),
        }
    }

    /// The upstream reported spent the quota a request needs (`why`: which, until when): a 429
    /// at once, the upstream's words in the message where it gave any.
    pub(crate) fn exhausted(r: &Rejection, why: &[String]) -> Self {
        let mut e = Self::throttled(r, Duration::ZERO);
        if !why.is_empty() {
            e.message = format!("llmproxy did not send the request: {}", why.join("; "));
        }
        e
    }

    /// 429 from the proxy's own queue, naming the limit that held the request.
    pub(crate) fn throttled(r: &Rejection, waited_for: Duration) -> Self {
        if matches!(
            r.limit,
            Limit::UpstreamExhausted
                | Limit::RequestsPerDay
                | Limit::UpstreamRequestsPerDay
                | Limit::ModelRequestsPerDay
        ) && !r.queue_full
        {
            let secs = whole_seconds(r.retry_after);
            let (kind, code) = match r.limit {
                Limit::UpstreamExhausted => ("insufficient_quota", "upstream_quota_exhausted"),
                _ => ("rate_limit_error", "requests_per_day_exceeded"),
            };
            return Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "llmproxy did not send the request: {} is spent; no queue waits that out (try again in {secs}s)",
                    r.limit
                ),
                kind,
                code: Some(code),
                retry_after: Some(r.retry_after),
            };
        }
        let message = if r.queue_full {
            format!("llmproxy queue is full: too many requests are already waiting for {}", r.limit)
        } else {
            format!(
                "llmproxy could not admit the request within queue.maxWait ({}s, waited {:.1}s): held by {}",
                waited_for.as_secs_f64(),
                r.waited.as_secs_f64(),
                r.limit
            )
        };
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded"),
            retry_after: Some(r.retry_after),
        }
    }
}

impl ApiError {
    /// The response, in the error shape of the API the client speaks (`dialect`), so that its
    /// SDK raises its own exception types.
    pub(crate) fn response(self, dialect: Provider) -> Response {
        let body = match dialect {
            Provider::OpenAi | Provider::Azure | Provider::Gemini => {
                json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
            }
            Provider::Anthropic => anthropic::error_body(self.status.as_u16(), &self.message),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up, for clients that read Retry-After; milliseconds for
            // those (the OpenAI SDKs) that read retry-after-ms first.
            let secs = whole_seconds(after);
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            resp.headers_mut().insert("retry-after-ms", HeaderValue::from(after.as_millis().max(1) as u64));
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response(Provider::OpenAi)
    }
}
