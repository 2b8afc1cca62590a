//! Intake: read the client's request within its bounds, check it, estimate its tokens, and
//! prepare what is sent upstream and what identifies it in the cache.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header, request};
use llmproxy_api::Policy;
use serde_json::Value;

use super::record::RecordGuard;
use crate::cache::{self, Key};
use crate::error::ApiError;
use crate::state::Proxy;
use crate::tokens;

/// The request as it will be sent upstream, every attempt alike.
pub(crate) struct Outgoing {
    pub(crate) method: http::Method,
    pub(crate) url: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The proxy added `stream_options.include_usage`, so it removes the usage event again.
    pub(crate) strip_usage_event: bool,
}

/// A request that passed intake.
pub(crate) struct Intake {
    /// What goes upstream.
    pub(crate) out: Outgoing,
    /// The cache key, for cacheable requests.
    pub(crate) cache_key: Option<Key>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::invalid(StatusCode::BAD_REQUEST, message, None)
}

/// Read and check the request; fills the record as it learns about the request.
pub(crate) async fn read(
    proxy: &Proxy,
    policy: &Policy,
    parts: request::Parts,
    body: Body,
    record: &mut RecordGuard,
) -> Result<Intake, ApiError> {
    let options = proxy.options();
    let limit = options.max_request_bytes;
    let too_large = || {
        let msg = format!("request body exceeds the proxy's limit of {limit} bytes");
        ApiError::invalid(StatusCode::PAYLOAD_TOO_LARGE, msg, Some("request_too_large"))
    };
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return Err(too_large()),
        Err(_) => return Err(bad_request("could not read the request body")),
    };

    let rest = parts.uri.path().strip_prefix("/v1").unwrap_or_default();
    let mut json = None;
    if is_json(&parts.headers, &body) {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => json = Some(v),
            Ok(_) => return Err(bad_request("request body must be a JSON object")),
            Err(e) => return Err(bad_request(format!("invalid JSON body: {e}"))),
        }
    }

    let rec = record.get();
    rec.logged = options.record_percent >= 100 || fastrand::u8(0..100) < options.record_percent;
    rec.client = options
        .client_id_header
        .as_ref()
        .and_then(|h| parts.headers.get(h)?.to_str().ok())
        .or_else(|| json.as_ref()?.get("user")?.as_str())
        .map(|c| c.chars().take(128).collect());

    let mut strip_usage_event = false;
    let mut body = body;
    if let Some(v) = json.as_mut() {
        rec.model = v.get("model").and_then(Value::as_str).map(str::to_owned);
        rec.stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        rec.estimate = tokens::estimate(rest, v, policy.limits.default_max_tokens);
        if rec.logged {
            rec.prompt_hash = cache::prompt_hash(v);
        }
        if rec.stream && (rest == "/chat/completions" || rest == "/completions") && ask_for_usage(v) {
            strip_usage_event = true;
            body = Bytes::from(serde_json::to_vec(v).unwrap_or_default());
        }
    }
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let cache_key = json
        .as_ref()
        .filter(|_| parts.method == http::Method::POST && cache::cacheable_path(rest))
        .map(|v| cache::key(&policy.upstream.url, parts.method.as_str(), &format!("{rest}{query}"), v));
    Ok(Intake {
        out: Outgoing {
            method: parts.method,
            url: format!("{}{rest}{query}", policy.upstream.url),
            headers: parts.headers,
            body,
            strip_usage_event,
        },
        cache_key,
    })
}

/// Ask the upstream to report usage at the end of a stream; true if the request did not.
fn ask_for_usage(v: &mut Value) -> bool {
    let asked = v.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    if asked {
        return false;
    }
    match v.get_mut("stream_options") {
        Some(Value::Object(opts)) => {
            opts.insert("include_usage".into(), Value::Bool(true));
        }
        _ => {
            v["stream_options"] = serde_json::json!({"include_usage": true});
        }
    }
    true
}

fn is_json(headers: &HeaderMap, body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    match headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) => ct.trim_start().to_ascii_lowercase().starts_with("application/json"),
        None => body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.to_string().contains("length limit exceeded") {
            return true;
        }
        source = err.source();
    }
    false
}
