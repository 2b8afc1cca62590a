//! The mock's OpenAI endpoints: chat completions (JSON and SSE), completions, embeddings,
//! responses, models; and Azure OpenAI's deployment paths onto the same.

// Handlers return a ready `Response` as their error: large, but built once per failed request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::dialect::{Dialect, anthropic_error, openai_error};
use crate::gate::{Call, Charge, Kill, Pass, answer, fnv, now_unix, parse, sse_response, words};
use crate::{Mock, MockConfig, lock};

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    openai_error(status, message, kind, code)
}

/// An answer given before the request body was read, in the shape of the API `path` belongs to.
pub(crate) fn early(status: u16, anthropic: bool) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::PAYLOAD_TOO_LARGE);
    if anthropic {
        return anthropic_error(
            code,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        );
    }
    error(code, "Request too large for this server.", "invalid_request_error", Some("request_too_large"))
}

pub(crate) async fn not_found(uri: http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("Unknown request URL: {}", uri.path()),
        "invalid_request_error",
        Some("unknown_url"),
    )
}

/// A request that passed auth, faults and limits.
struct Admitted {
    prompt: u64,
    /// Completion tokens per choice.
    completion: u64,
    /// Choices.
    n: u64,
    pass: Pass,
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

/// Everything before the answer: auth, faults, limits, latency. `path` is the operation
/// (OpenAI's path), `seen` the path and query the request came on.
async fn gate(
    mock: &Arc<Mock>,
    headers: &HeaderMap,
    kill: &Kill,
    (path, seen): (&str, &str),
    body: &Value,
) -> Result<Admitted, Response> {
    let config = lock(&mock.config).clone();
    let dialect = Dialect::openai(config.flavor);
    let (call, inflight) = Call::begin(mock, seen, headers, body, dialect);
    call.check_key(&config)?;
    let breaks = call.fault(kill).await?;
    let cost = Cost::of(body, path, &config);
    let charge = Charge { requests: Some(1), tokens: Some(cost.charged), ..Charge::default() };
    call.check_limits(&charge)?;
    settle(&call, &config, &cost);
    call.record(200);
    let headers = dialect.rate_headers(mock, call.at);
    call.pass(&config).await;
    let pass = Pass { headers, breaks, inflight };
    Ok(Admitted { prompt: cost.prompt, completion: cost.completion, n: cost.n, pass })
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
        let length = config.answer_length(fnv(body));
        let completion = if generates { max.map_or(length, |m| m.min(length)) } else { 0 };
        let charged =
            prompt.saturating_add(if generates { max.unwrap_or(length).saturating_mul(n) } else { 0 });
        Self { prompt, completion, n, charged }
    }
}

/// Count the tokens used; under `Accounting::Used` refund the charge down to them.
fn settle(call: &Call<'_>, config: &MockConfig, cost: &Cost) {
    let used = cost.prompt + cost.completion * cost.n;
    let kept = if config.token_accounting == crate::Accounting::Used {
        // It knows its answer now: settle the charge to what it will really use.
        if let Some(q) = lock(&call.mock.limits).tokens.as_mut() {
            q.refund(call.at, cost.charged.saturating_sub(used));
        }
        used
    } else {
        cost.charged
    };
    let mut stats = lock(&call.mock.stats);
    stats.tokens += used;
    stats.charged_tokens += kept;
}

/// Parse the body and pass the gate: the request and its admission, or the answer to give.
async fn admit(
    mock: &Arc<Mock>,
    kill: &Kill,
    headers: &HeaderMap,
    body: &Bytes,
    path: (&str, &str),
) -> Result<(Value, Admitted), Response> {
    let mut req = parse(body, Dialect::OpenAi)?;
    if let Some(deployment) = azure_deployment(path.1) {
        req["model"] = Value::String(deployment.to_owned());
    }
    let admitted = gate(mock, headers, kill, path, &req).await?;
    Ok((req, admitted))
}

/// The deployment an Azure path names (`/openai/deployments/{deployment}/...`).
fn azure_deployment(path: &str) -> Option<&str> {
    path.strip_prefix("/openai/deployments/")?.split('/').next()
}

fn usage(a: &Admitted) -> Value {
    let completion = a.completion * a.n;
    json!({"prompt_tokens": a.prompt, "completion_tokens": completion, "total_tokens": a.prompt + completion})
}

struct Endpoint {
    path: &'static str,
    /// The path (and, on Azure's deployment paths, the query) it came on.
    seen: String,
    /// Chat (`message`/`delta`) or legacy completions (`text`).
    chat: bool,
}

async fn generate(mock: Arc<Mock>, kill: Kill, headers: HeaderMap, body: Bytes, ep: Endpoint) -> Response {
    let (req, admitted) = match admit(&mock, &kill, &headers, &body, (ep.path, &ep.seen)).await {
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
        return answer(body, &admitted.pass);
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
    let frames = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    sse_response(mock, admitted.pass, frames, ())
}

pub(crate) async fn chat(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = uri.path().to_owned();
    generate(mock, kill, headers, body, Endpoint { path: "/v1/chat/completions", seen, chat: true }).await
}

pub(crate) async fn completions(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = uri.path().to_owned();
    generate(mock, kill, headers, body, Endpoint { path: "/v1/completions", seen, chat: false }).await
}

/// Azure OpenAI's deployment paths: `api-version` required (as Azure requires it), the
/// deployment the model, then the OpenAI operation.
pub(crate) async fn azure(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let has_version = uri.query().unwrap_or_default().split('&').any(|p| p.starts_with("api-version="));
    if !has_version {
        let body = json!({"error": {"code": "404", "message": "Resource not found"}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let seen = uri.path_and_query().map_or_else(|| uri.path().to_owned(), ToString::to_string);
    let op =
        uri.path().strip_prefix("/openai/deployments/").and_then(|p| p.split_once('/')).map(|(_, op)| op);
    let ep = match op {
        Some("chat/completions") => Endpoint { path: "/v1/chat/completions", seen, chat: true },
        Some("completions") => Endpoint { path: "/v1/completions", seen, chat: false },
        Some("embeddings") => return embed(mock, kill, headers, body, &seen).await,
        _ => return not_found(uri).await,
    };
    generate(mock, kill, headers, body, ep).await
}

pub(crate) async fn embeddings(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    embed(mock, kill, headers, body, uri.path()).await
}

async fn embed(mock: Arc<Mock>, kill: Kill, headers: HeaderMap, body: Bytes, seen: &str) -> Response {
    let (req, admitted) = match admit(&mock, &kill, &headers, &body, ("/v1/embeddings", seen)).await {
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
    answer(body, &admitted.pass)
}

pub(crate) async fn responses(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, admitted) = match admit(&mock, &kill, &headers, &body, ("/v1/responses", "/v1/responses")).await
    {
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
    answer(body, &admitted.pass)
}

const MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"];

pub(crate) async fn models(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
) -> Response {
    let admitted = match gate(&mock, &headers, &kill, ("/v1/models", "/v1/models"), &json!({})).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let data: Vec<Value> = MODELS
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    answer(json!({"object": "list", "data": data}), &admitted.pass)
}

pub(crate) async fn model(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(resp) = gate(&mock, &headers, &kill, ("/v1/models", "/v1/models"), &json!({})).await {
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
