//! The request path: check the request, wait for admission, send it upstream, retry transient
//! failures with back-off, and hand the response to the relay.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header, request};
use serde_json::Value;
use tokio::time::Instant;

use crate::cache;
use crate::error::ApiError;
use crate::lookup::{self, Lookup};
use crate::record::{Outcome, RequestRecord};
use crate::relay::{Fill, Relay, Tap};
use crate::retry::{self, RetryReason};
use crate::server::Proxy;
use crate::sse::SseTap;
use crate::{tokens, upstream};
use llmproxy_api::Policy;

/// Finishes the record if the handler is dropped early (the client went away while queued).
pub(crate) struct Pending {
    record: Option<RequestRecord>,
    proxy: Arc<Proxy>,
}

impl Pending {
    pub(crate) fn record(&mut self) -> &mut RequestRecord {
        self.record.get_or_insert_with(|| RequestRecord::new("", "", String::new()))
    }

    /// Answer with the proxy's own error and finish the record.
    fn fail(&mut self, err: ApiError, outcome: Outcome) -> Response {
        let rec = self.record();
        rec.status = err.status.as_u16();
        rec.outcome = outcome;
        self.finish();
        err.into_response()
    }

    pub(crate) fn finish(&mut self) {
        if let Some(rec) = self.record.take() {
            rec.finish(self.proxy.metrics());
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(rec) = &mut self.record {
            rec.outcome = Outcome::ClientClosed;
            rec.status = 499;
        }
        self.finish();
    }
}

/// The request as it will be sent upstream, every attempt alike.
struct Outgoing {
    method: http::Method,
    url: String,
    headers: HeaderMap,
    body: Bytes,
    /// The proxy added `stream_options.include_usage`, so it removes the usage event again.
    strip_usage_event: bool,
}

/// axum handler for `/v1/{*rest}`.
pub(crate) async fn handle(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| proxy.request_id(), str::to_owned);
    let record = RequestRecord::new(parts.method.as_str(), parts.uri.path(), request_id.clone());
    let mut pending = Pending { record: Some(record), proxy: Arc::clone(&proxy) };
    let mut resp = forward(&proxy, &mut pending, parts, body).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn forward(proxy: &Arc<Proxy>, pending: &mut Pending, parts: request::Parts, body: Body) -> Response {
    let policy = proxy.policy();
    let limit = proxy.options.max_request_bytes;
    let too_large = || {
        let msg = format!("request body exceeds the proxy's limit of {limit} bytes");
        ApiError::invalid(StatusCode::PAYLOAD_TOO_LARGE, msg, Some("request_too_large"))
    };
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return pending.fail(too_large(), Outcome::BadRequest);
    }
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return pending.fail(too_large(), Outcome::BadRequest),
        Err(_) => {
            let err = ApiError::invalid(StatusCode::BAD_REQUEST, "could not read the request body", None);
            return pending.fail(err, Outcome::BadRequest);
        }
    };

    let rest = parts.uri.path().strip_prefix("/v1").unwrap_or_default();
    let mut json = None;
    if is_json(&parts.headers, &body) {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => json = Some(v),
            Ok(_) => {
                let err =
                    ApiError::invalid(StatusCode::BAD_REQUEST, "request body must be a JSON object", None);
                return pending.fail(err, Outcome::BadRequest);
            }
            Err(e) => {
                let err = ApiError::invalid(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"), None);
                return pending.fail(err, Outcome::BadRequest);
            }
        }
    }

    let options = &proxy.options;
    let rec = pending.record();
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
    let mut fill = None;
    if let Some(v) =
        json.as_ref().filter(|_| parts.method == http::Method::POST && cache::cacheable_path(rest))
    {
        let key = cache::key(&policy.upstream.url, parts.method.as_str(), &format!("{rest}{query}"), v);
        match lookup::lookup(proxy, &policy, pending, key, &parts.headers, !strip_usage_event).await {
            Lookup::Answered(resp) => return resp,
            Lookup::Fill(f) => fill = Some(f),
            Lookup::Skip => {}
        }
    }
    let out = Outgoing {
        method: parts.method,
        url: format!("{}{rest}{query}", policy.upstream.url),
        headers: parts.headers,
        body,
        strip_usage_event,
    };
    attempt_loop(proxy, &policy, pending, &out, &mut fill).await
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

async fn attempt_loop(
    proxy: &Arc<Proxy>,
    policy: &Policy,
    pending: &mut Pending,
    out: &Outgoing,
    fill: &mut Option<Fill>,
) -> Response {
    let started = pending.record().started;
    let deadline = started + policy.queue.max_wait;
    let reserve = pending.record().estimate.total();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        // A retry was admitted once already: the queue bound is for new arrivals, not for it.
        let max_queue = if attempt == 1 { policy.queue.max_size } else { usize::MAX };
        let mut permit = match proxy.admission.admit(reserve, deadline, max_queue).await {
            Ok(p) => p,
            Err(rejection) => {
                let outcome = if rejection.queue_full { Outcome::QueueFull } else { Outcome::QueueTimeout };
                return pending.fail(ApiError::throttled(&rejection, policy.queue.max_wait), outcome);
            }
        };
        let rec = pending.record();
        rec.attempts = attempt;
        rec.queue_wait += permit.waited;

        let headers = upstream::request_headers(&out.headers, proxy.api_key().as_deref());
        let send =
            proxy.client.request(out.method.clone(), &out.url).headers(headers).body(out.body.clone()).send();
        let sent = Instant::now();
        let result = tokio::time::timeout(policy.upstream.timeout, send).await;
        let latency = sent.elapsed();
        pending.record().upstream_latency = Some(latency);
        let metrics = proxy.metrics();
        metrics.upstream_latency.observe(latency.as_secs_f64());

        let (reason, hint, last) = match result {
            Ok(Ok(resp)) => {
                let status = resp.status();
                metrics.upstream_responses.with_label_values(&[status.as_str()]).inc();
                if status == StatusCode::UNAUTHORIZED {
                    // The upstream refused the proxy's key, not the client's: say so, and never
                    // relay its body (OpenAI's quotes part of the key).
                    permit.settle(0);
                    let _ = tokio::time::timeout(Duration::from_secs(1), resp.bytes()).await;
                    return pending.fail(ApiError::upstream_auth(), Outcome::UpstreamError);
                }
                let Some(reason) = RetryReason::for_status(status) else {
                    return relay(proxy, pending, out, resp, permit, policy.upstream.timeout, fill.take());
                };
                let hint = retry::upstream_delay(status, resp.headers(), SystemTime::now());
                (reason, hint, Ok(resp))
            }
            Ok(Err(e)) => {
                metrics.upstream_responses.with_label_values(&["connect_error"]).inc();
                (RetryReason::Connect, None, Err(e.without_url().to_string()))
            }
            Err(_) => {
                metrics.upstream_responses.with_label_values(&["timeout"]).inc();
                (RetryReason::Timeout, None, Err(format!("no response within {:?}", policy.upstream.timeout)))
            }
        };
        // A refused attempt generated nothing: give its tokens back, keep the request counted.
        // A timed-out one may have been worked on upstream, so its reservation stays spent.
        if reason != RetryReason::Timeout {
            permit.settle(0);
        }
        let delay = hint.unwrap_or_else(|| retry::backoff(&policy.retry, attempt, fastrand::f64()));
        let resume = Instant::now().checked_add(delay);
        if reason == RetryReason::RateLimited
            && let Some(until) = resume
        {
            // The upstream's window is spent for everyone: hold the whole queue, not just us.
            proxy.admission.pause_until(until);
        }
        let can_retry = attempt < policy.retry.max_attempts && resume.is_some_and(|r| r < deadline);
        if !can_retry {
            return match last {
                Ok(resp) => relay(proxy, pending, out, resp, permit, policy.upstream.timeout, fill.take()),
                Err(msg) => {
                    let (status, what) = match reason {
                        RetryReason::Timeout => (StatusCode::GATEWAY_TIMEOUT, "did not answer in time"),
                        _ => (StatusCode::BAD_GATEWAY, "could not be reached"),
                    };
                    let text = format!("the upstream API {what} after {attempt} attempt(s): {msg}");
                    pending.fail(ApiError::upstream(status, text), Outcome::UpstreamError)
                }
            };
        }
        drop(permit);
        if let Ok(resp) = last {
            // Read the small error body so the connection can be reused.
            let _ = tokio::time::timeout(Duration::from_secs(1), resp.bytes()).await;
        }
        metrics.retries.with_label_values(&[reason.label()]).inc();
        pending.record().retry_reasons.push(reason.label());
        if reason != RetryReason::RateLimited {
            tokio::time::sleep(delay).await;
        }
    }
}

fn relay(
    proxy: &Arc<Proxy>,
    pending: &mut Pending,
    out: &Outgoing,
    resp: reqwest::Response,
    permit: crate::queue::Permit,
    idle_timeout: Duration,
    fill: Option<Fill>,
) -> Response {
    let status = resp.status();
    let mut headers = upstream::response_headers(resp.headers());
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let tap = if is_sse { Tap::Sse(SseTap::new(out.strip_usage_event)) } else { Tap::body() };
    if is_sse {
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut record = pending.record.take().unwrap_or_else(|| RequestRecord::new("", "", String::new()));
    record.status = status.as_u16();
    record.outcome = Outcome::for_status(status.as_u16());
    if let Ok(v) = HeaderValue::from_str(&record.attempts.to_string()) {
        headers.insert("x-llmproxy-attempts", v);
    }
    if let Some(how) = record.cache {
        headers.insert("x-llmproxy-cache", HeaderValue::from_static(how));
    }
    let body = Relay::new(resp, tap, idle_timeout, permit, record, Arc::clone(proxy), fill).into_body();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
