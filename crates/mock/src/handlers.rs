//! The mock's OpenAI endpoints: chat completions (JSON and SSE), completions, embeddings,
//! responses, models; plus `/mock/stats` and `/mock/faults` for out-of-process control.

// Handlers return a ready `Response` as their error: large, but built once per failed request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::quota::go_duration;
use crate::{Fault, Mock, MockConfig, Seen, lock};

/// Cancelling it closes the connection the request came on (a fault the mock can play).
#[derive(Clone)]
pub(crate) struct Kill(pub(crate) tokio_util::sync::CancellationToken);

pub(crate) fn router(mock: Arc<Mock>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/mock/stats", get(stats))
        .route("/mock/faults", post(faults))
        .route("/mock/limits", post(set_limits))
        .route("/mock/models", post(set_model))
        .fallback(not_found)
        // Large prompts are part of the test workloads; axum's default limit is 2 MB.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(mock)
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// An answer given before the request body was read.
pub(crate) fn early(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::PAYLOAD_TOO_LARGE);
    error(code, "Request too large for this server.", "invalid_request_error", Some("request_too_large"))
}

async fn not_found(uri: http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("Unknown request URL: {}", uri.path()),
        "invalid_request_error",
        Some("unknown_url"),
    )
}

/// Decrements the in-flight count when the answer (or stream) is done.
struct Inflight(Arc<Mock>);

impl Inflight {
    fn enter(mock: &Arc<Mock>) -> Self {
        let mut n = lock(&mock.inflight);
        *n += 1;
        let mut stats = lock(&mock.stats);
        stats.max_inflight = stats.max_inflight.max(*n);
        Self(Arc::clone(mock))
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        *lock(&self.0.inflight) -= 1;
    }
}

/// A request that passed auth, faults and limits.
struct Admitted {
    prompt: u64,
    /// Completion tokens per choice.
    completion: u64,
    /// Choices.
    n: u64,
    headers: HeaderMap,
    cut_after: Option<usize>,
    /// Answer JSON close-delimited (`Some`), cut mid-body (`Some(true)`).
    unframed: Option<bool>,
    inflight: Inflight,
}

/// Characters of every string and the count of numbers in a value.
fn text(v: &Value) -> (u64, u64) {
    match v {
        Value::String(s) => (s.chars().count() as u64, 0),
        Value::Number(_) => (0, 1),
        Value::Array(items) => items.iter().map(text).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        Value::Object(map) => map.values().map(text).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        Value::Bool(_) | Value::Null => (0, 0),
    }
}

/// The provider's estimate of prompt tokens: characters / 4 (rounded up) over the text of the
/// prompt fields, one token per number of pre-tokenised input.
fn prompt_tokens(body: &Value) -> u64 {
    let fields = ["messages", "prompt", "input", "instructions", "system", "tools", "functions"];
    let (chars, numbers) =
        fields.iter().filter_map(|k| body.get(*k)).map(text).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    chars.div_ceil(4) + numbers
}

fn fnv(v: &Value) -> u64 {
    v.to_string().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn rate_headers(mock: &Mock, now: Instant) -> HeaderMap {
    let mut h = HeaderMap::new();
    let limits = lock(&mock.limits);
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    if let Some(q) = &limits.requests {
        put("x-ratelimit-limit-requests", q.limit.to_string());
        put("x-ratelimit-remaining-requests", q.remaining(now).to_string());
        put("x-ratelimit-reset-requests", go_duration(q.reset(now)));
    }
    if let Some(q) = &limits.tokens {
        put("x-ratelimit-limit-tokens", q.limit.to_string());
        put("x-ratelimit-remaining-tokens", q.remaining(now).to_string());
        put("x-ratelimit-reset-tokens", go_duration(q.reset(now)));
    }
    h
}

/// The key a client sent: OpenAI's bearer token, or Azure OpenAI's `api-key` header.
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
}

fn record(mock: &Mock, path: &str, status: u16, headers: &HeaderMap, at: Instant, model: Option<&str>) {
    let organization = headers.get("openai-organization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let model = model.map(str::to_owned);
    let mut s = lock(&mock.stats);
    match status {
        200..=299 => {
            s.ok += 1;
            *s.ok_by_model.entry(model.clone().unwrap_or_default()).or_default() += 1;
        }
        401 => s.unauthorized += 1,
        _ => {}
    }
    drop(s);
    lock(&mock.seen).push(Seen {
        at,
        path: path.to_owned(),
        status,
        key: bearer(headers),
        organization,
        model,
    });
}

/// Everything before the answer: auth, faults, limits, latency.
async fn gate(
    mock: &Arc<Mock>,
    headers: &HeaderMap,
    kill: &Kill,
    path: &str,
    body: &Value,
) -> Result<Admitted, Response> {
    let at = Instant::now();
    lock(&mock.stats).requests += 1;
    let inflight = Inflight::enter(mock);
    let call = Call { mock, path, headers, at, model: body.get("model").and_then(Value::as_str) };
    let config = lock(&mock.config).clone();
    call.check_key(&config)?;
    let (cut_after, unframed) = call.fault(kill).await?;
    let cost = Cost::of(body, path, &config);
    call.check_limits(cost.charged)?;
    call.settle(&config, &cost);
    call.record(200);
    let headers = rate_headers(mock, at);
    mock.pass_gate().await;
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    Ok(Admitted {
        prompt: cost.prompt,
        completion: cost.completion,
        n: cost.n,
        headers,
        cut_after,
        unframed,
        inflight,
    })
}

/// One request as the gate sees it, for its steps and its record.
struct Call<'a> {
    mock: &'a Arc<Mock>,
    path: &'a str,
    headers: &'a HeaderMap,
    at: Instant,
    model: Option<&'a str>,
}

/// What a request costs: its prompt, what it will generate, and what the token bucket is
/// charged up front (the most it may generate).
struct Cost {
    prompt: u64,
    /// Completion tokens per choice.
    completion: u64,
    /// Choices.
    n: u64,
    charged: u64,
}

impl Cost {
    fn of(body: &Value, path: &str, config: &MockConfig) -> Self {
        let prompt = prompt_tokens(body);
        let max = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64));
        let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 128);
        let generates = path != "/v1/embeddings";
        let completion = if generates {
            max.map_or(config.completion_tokens, |m| m.min(config.completion_tokens))
        } else {
            0
        };
        let charged = prompt.saturating_add(if generates {
            max.unwrap_or(config.completion_tokens).saturating_mul(n)
        } else {
            0
        });
        Self { prompt, completion, n, charged }
    }
}

impl Call<'_> {
    fn record(&self, status: u16) {
        record(self.mock, self.path, status, self.headers, self.at, self.model);
    }

    /// 401 unless the bearer key is the configured one (any key when none is).
    fn check_key(&self, config: &MockConfig) -> Result<(), Response> {
        if config.api_key.is_some() && bearer(self.headers) != config.api_key {
            self.record(401);
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ));
        }
        Ok(())
    }

    /// The next injected fault, if any: an error answer, a dropped connection, a delay, or how
    /// to break the answer (`cut_after` chunks, `unframed`).
    async fn fault(&self, kill: &Kill) -> Result<(Option<usize>, Option<bool>), Response> {
        let Some(f) = lock(&self.mock.faults).pop_front() else { return Ok((None, None)) };
        lock(&self.mock.stats).faults += 1;
        match f {
            Fault::Status { status, retry_after_secs, code: error_code } => {
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                self.record(code.as_u16());
                let mut resp = error(
                    code,
                    "The server had an error while processing your request.",
                    "server_error",
                    error_code.as_deref(),
                );
                if let Some(secs) = retry_after_secs {
                    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                Err(resp)
            }
            Fault::Drop => {
                self.record(0);
                kill.0.cancel();
                std::future::pending::<()>().await;
                Ok((None, None))
            }
            Fault::Delay { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok((None, None))
            }
            Fault::CutStream { after_chunks } => Ok((Some(after_chunks), None)),
            Fault::Unframed { cut } => Ok((None, Some(cut))),
            Fault::Early { .. } => Ok((None, None)),
        }
    }

    /// 429 for a refused model, or when the request or token bucket cannot pay `charged`.
    fn check_limits(&self, charged: u64) -> Result<(), Response> {
        let mock = self.mock;
        let refused_model = self.model.and_then(|m| lock(&mock.limits).refused_models.get(m).copied());
        if let Some(retry_after) = refused_model {
            self.record(429);
            lock(&mock.stats).rate_limited += 1;
            let msg = "Rate limit reached for this model. Please try again later.";
            let mut resp = error(StatusCode::TOO_MANY_REQUESTS, msg, "requests", Some("rate_limit_exceeded"));
            if let Some(secs) = retry_after {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return Err(resp);
        }
        let refused = {
            let mut limits = lock(&mock.limits);
            let requests = limits
                .requests
                .as_mut()
                .map_or(Ok(()), |q| q.try_take(self.at, 1))
                .map_err(|w| (w, "requests"));
            requests.and_then(|()| {
                let tokens = limits.tokens.as_mut().map_or(Ok(()), |q| q.try_take(self.at, charged));
                tokens.map_err(|w| (w, "tokens"))
            })
        };
        let Err((wait, what)) = refused else { return Ok(()) };
        self.record(429);
        lock(&mock.stats).rate_limited += 1;
        let msg = format!("Rate limit reached for {what}. Please try again in {}.", go_duration(wait));
        let mut resp = error(StatusCode::TOO_MANY_REQUESTS, &msg, what, Some("rate_limit_exceeded"));
        let h = resp.headers_mut();
        h.extend(rate_headers(mock, self.at));
        h.insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)));
        h.insert(
            "retry-after-ms",
            HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
        );
        Err(resp)
    }

    /// Count the tokens used; under `Accounting::Used` refund the charge down to them.
    fn settle(&self, config: &MockConfig, cost: &Cost) {
        let used = cost.prompt + cost.completion * cost.n;
        let kept = if config.token_accounting == crate::Accounting::Used {
            // It knows its answer now: settle the charge to what it will really use.
            if let Some(q) = lock(&self.mock.limits).tokens.as_mut() {
                q.refund(self.at, cost.charged.saturating_sub(used));
            }
            used
        } else {
            cost.charged
        };
        let mut stats = lock(&self.mock.stats);
        stats.tokens += used;
        stats.charged_tokens += kept;
    }
}

fn parse(body: &Bytes) -> Result<Value, Response> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {e}"),
            "invalid_request_error",
            None,
        )
    })
}

/// Parse the body and pass the gate: the request and its admission, or the answer to give.
async fn admit(
    mock: &Arc<Mock>,
    kill: &Kill,
    headers: &HeaderMap,
    body: &Bytes,
    path: &str,
) -> Result<(Value, Admitted), Response> {
    let req = parse(body)?;
    let admitted = gate(mock, headers, kill, path, &req).await?;
    Ok((req, admitted))
}

/// A JSON answer carrying the rate-limit headers.
fn answer(body: Value, admitted: &Admitted) -> Response {
    let mut resp = match admitted.unframed {
        None => Json(body).into_response(),
        Some(cut) => unframed(&body, cut),
    };
    resp.headers_mut().extend(admitted.headers.clone());
    resp
}

/// `body` as HTTP/1.0 of unknown length: hyper then sends no `Content-Length` nor chunked
/// encoding and closes the connection after it, which is all that marks its end (`cut`: after
/// half of it, as an upstream that fails mid-answer does).
fn unframed(body: &Value, cut: bool) -> Response {
    let mut bytes = Bytes::from(body.to_string());
    if cut {
        bytes.truncate(bytes.len() / 2);
    }
    let once = futures_util::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
    let mut resp = Response::new(Body::from_stream(once));
    *resp.version_mut() = http::Version::HTTP_10;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn words(body: &Value, n: u64) -> Vec<String> {
    let mut out = vec![format!("m{:08x}", fnv(body) as u32)];
    out.extend((1..n).map(|i| format!(" w{i}")));
    out.truncate(usize::try_from(n).unwrap_or(usize::MAX));
    out
}

fn usage(a: &Admitted) -> Value {
    let completion = a.completion * a.n;
    json!({"prompt_tokens": a.prompt, "completion_tokens": completion, "total_tokens": a.prompt + completion})
}

struct Endpoint {
    path: &'static str,
    /// Chat (`message`/`delta`) or legacy completions (`text`).
    chat: bool,
}

async fn generate(mock: Arc<Mock>, kill: Kill, headers: HeaderMap, body: Bytes, ep: Endpoint) -> Response {
    let (req, admitted) = match admit(&mock, &kill, &headers, &body, ep.path).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_owned();
    let text = words(&req, admitted.completion);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (object, chunk_object) = if ep.chat {
        ("chat.completion", "chat.completion.chunk")
    } else {
        ("text_completion", "text_completion")
    };
    let id = format!("cmpl-mock-{:x}", fnv(&req));
    if !stream {
        let choices: Vec<Value> = (0..admitted.n)
            .map(|i| {
                if ep.chat {
                    json!({"index": i, "message": {"role": "assistant", "content": text.concat()}, "finish_reason": "stop"})
                } else {
                    json!({"index": i, "text": text.concat(), "finish_reason": "stop"})
                }
            })
            .collect();
        let body = json!({"id": id, "object": object, "created": now_unix(), "model": model, "choices": choices, "usage": usage(&admitted)});
        return answer(body, &admitted);
    }

    let include_usage =
        req.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let base = |choices: Value| {
        let mut v = json!({"id": id, "object": chunk_object, "created": now_unix(), "model": model, "choices": choices});
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut events: Vec<String> = Vec::new();
    let delta = |content: &str| if ep.chat { json!({"content": content}) } else { json!(content) };
    let key = if ep.chat { "delta" } else { "text" };
    if ep.chat {
        events.push(
            base(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]))
                .to_string(),
        );
    }
    for w in &text {
        events.push(base(json!([{"index": 0, key: delta(w), "finish_reason": null}])).to_string());
    }
    let end = if ep.chat { json!({}) } else { json!("") };
    events.push(base(json!([{"index": 0, key: end, "finish_reason": "stop"}])).to_string());
    if include_usage {
        let mut last = base(json!([]));
        last["usage"] = usage(&admitted);
        events.push(last.to_string());
    }
    events.push("[DONE]".to_owned());
    sse_response(mock, admitted, events)
}

fn sse_response(mock: Arc<Mock>, admitted: Admitted, events: Vec<String>) -> Response {
    let delay = lock(&mock.config).chunk_delay;
    let cut_after = admitted.cut_after;
    let mut headers = admitted.headers.clone();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let state = (events.into_iter().enumerate(), admitted.inflight, mock);
    let stream = futures_util::stream::unfold(state, move |(mut events, inflight, mock)| async move {
        let (i, event) = events.next()?;
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if cut_after.is_some_and(|n| i >= n) {
            return Some((Err(std::io::Error::other("mock: stream cut")), (events, inflight, mock)));
        }
        *lock(&mock.last_chunk_at) = Some(Instant::now());
        Some((Ok(Bytes::from(format!("data: {event}\n\n"))), (events, inflight, mock)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.headers_mut() = headers;
    resp
}

async fn chat(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(mock, kill, headers, body, Endpoint { path: "/v1/chat/completions", chat: true }).await
}

async fn completions(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(mock, kill, headers, body, Endpoint { path: "/v1/completions", chat: false }).await
}

async fn embeddings(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, admitted) = match admit(&mock, &kill, &headers, &body, "/v1/embeddings").await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let inputs = match req.get("input") {
        Some(Value::Array(items)) => items.clone(),
        Some(v) => vec![v.clone()],
        None => Vec::new(),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let h = fnv(input);
            let vector: Vec<f64> = (0..8).map(|k| f64::from(((h >> (k * 8)) & 0xff) as u8) / 255.0).collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-embedding");
    let body = json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": admitted.prompt, "total_tokens": admitted.prompt}});
    answer(body, &admitted)
}

async fn responses(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, admitted) = match admit(&mock, &kill, &headers, &body, "/v1/responses").await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let text = words(&req, admitted.completion).concat();
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-model");
    let body = json!({"id": format!("resp_mock{:x}", fnv(&req)), "object": "response", "created_at": now_unix(),
        "status": "completed", "model": model,
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
        "usage": {"input_tokens": admitted.prompt, "output_tokens": admitted.completion,
                  "total_tokens": admitted.prompt + admitted.completion}});
    answer(body, &admitted)
}

const MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"];

async fn models(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
) -> Response {
    let admitted = match gate(&mock, &headers, &kill, "/v1/models", &json!({})).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let data: Vec<Value> = MODELS
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    answer(json!({"object": "list", "data": data}), &admitted)
}

async fn model(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(resp) = gate(&mock, &headers, &kill, "/v1/models", &json!({})).await {
        return resp;
    }
    if !MODELS.contains(&id.as_str()) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model '{id}' does not exist"),
            "invalid_request_error",
            Some("model_not_found"),
        );
    }
    Json(json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"})).into_response()
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<crate::Stats> {
    Json(mock.stats())
}

#[derive(serde::Deserialize)]
struct Inject {
    #[serde(flatten)]
    fault: Fault,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

async fn faults(State(mock): State<Arc<Mock>>, Json(req): Json<Inject>) -> StatusCode {
    mock.inject(req.fault, req.count);
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct NewLimits {
    #[serde(default)]
    requests_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
}

/// `POST /mock/limits {"requests_per_minute": N, "tokens_per_minute": M}`: new limits now.
async fn set_limits(State(mock): State<Arc<Mock>>, Json(req): Json<NewLimits>) -> StatusCode {
    mock.set_limits(req.requests_per_minute, req.tokens_per_minute);
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct ModelRule {
    model: String,
    /// Answer it with 429 (true) or serve it again (false).
    refuse: bool,
    #[serde(default)]
    retry_after_secs: Option<u64>,
}

/// `POST /mock/models {"model": "m", "refuse": true, "retry_after_secs": 5}`.
async fn set_model(State(mock): State<Arc<Mock>>, Json(req): Json<ModelRule>) -> StatusCode {
    if req.refuse {
        mock.refuse_model(&req.model, req.retry_after_secs);
    } else {
        mock.allow_model(&req.model);
    }
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_are_characters_over_four() {
        // "user" + "12345678" + "user" + "text" + "abcd" = 24 characters.
        let body = json!({"messages": [{"role": "user", "content": "12345678"}, {"role": "user", "content": [{"type": "text", "text": "abcd"}]}]});
        assert_eq!(prompt_tokens(&body), 6);
        assert_eq!(prompt_tokens(&json!({"input": ["aaaa", "bbbb"]})), 2);
        assert_eq!(prompt_tokens(&json!({"input": [[1, 2, 3]], "model": "not counted"})), 3);
    }

    #[test]
    fn answers_are_deterministic_per_prompt() {
        let a = words(&json!({"messages": "a"}), 3);
        assert_eq!(a.len(), 3);
        assert_eq!(a, words(&json!({"messages": "a"}), 3));
        assert_ne!(a[0], words(&json!({"messages": "b"}), 3)[0]);
    }
}
