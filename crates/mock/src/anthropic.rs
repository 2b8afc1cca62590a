//! The mock's Anthropic endpoints: `POST /v1/messages` (JSON and SSE), `POST
//! /v1/messages/count_tokens` and Anthropic's shape of `GET /v1/models`. Input and output tokens
//! per minute are enforced as Anthropic does: input less cache reads at admission, `max_tokens`
//! of output at admission settled to the real output when the answer ends.

// Handlers return a ready `Response` as their error: large, but built once per failed request.
#![allow(clippy::result_large_err)]

mod prompt;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

use self::prompt::{Cached, Prompt};
use crate::dialect::{Dialect, anthropic_error, request_id};
use crate::gate::{Breaks, Call, Charge, Inflight, Kill, Pass, answer, fnv, parse, sse_response, words};
use crate::{Mock, MockConfig, lock};

const MESSAGES: &str = "/v1/messages";
const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// Models listed in Anthropic's shape (any model is served).
const MODELS: &[(&str, &str)] = &[
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1"),
];

/// Whether a request speaks Anthropic's API (for routes both APIs share, as `/v1/models`).
pub(crate) fn speaks(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version") || headers.contains_key("x-api-key")
}

/// Whether `path` is one of Anthropic's own routes.
pub(crate) fn is_messages_path(path: &str) -> bool {
    path == MESSAGES || path.starts_with("/v1/messages/")
}

/// Anthropic's 400 for a body it would refuse: `model`, a positive `max_tokens` (unless
/// `count_tokens`) and a non-empty `messages` array are required.
fn invalid(req: &Value, needs_max_tokens: bool) -> Option<&'static str> {
    if !req.get("model").is_some_and(Value::is_string) {
        return Some("model: Field required");
    }
    if needs_max_tokens {
        match req.get("max_tokens") {
            None | Some(Value::Null) => return Some("max_tokens: Field required"),
            Some(v) if v.as_u64().is_none() && v.as_i64().is_none() => {
                return Some("max_tokens: Input should be a valid integer");
            }
            Some(v) if v.as_u64().is_none_or(|n| n < 1) => {
                return Some("max_tokens: Input should be greater than or equal to 1");
            }
            Some(_) => {}
        }
    }
    match req.get("messages") {
        None | Some(Value::Null) => Some("messages: Field required"),
        Some(Value::Array(m)) if m.is_empty() => Some("messages: at least one message is required"),
        Some(Value::Array(_)) => None,
        Some(_) => Some("messages: Input should be a valid list"),
    }
}

/// A request past its key, its headers and body checks and any injected fault.
struct Entered<'a> {
    call: Call<'a>,
    inflight: Inflight,
    config: MockConfig,
    breaks: Breaks,
}

/// The steps every Anthropic route shares; `check`: require `anthropic-version` and a valid
/// body (`Some(needs max_tokens)`).
async fn enter<'a>(
    mock: &'a Arc<Mock>,
    kill: &Kill,
    headers: &'a HeaderMap,
    req: &'a Value,
    path: &'a str,
    check: Option<bool>,
) -> Result<Entered<'a>, Response> {
    let (call, inflight) = Call::begin(mock, path, headers, req, Dialect::Anthropic);
    let config = lock(&mock.config).clone();
    call.check_key(&config)?;
    if let Some(needs_max_tokens) = check {
        let missing =
            (!headers.contains_key("anthropic-version")).then_some("anthropic-version: header is required");
        if let Some(msg) = missing.or_else(|| invalid(req, needs_max_tokens)) {
            call.record(400);
            return Err(anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", msg));
        }
    }
    let breaks = call.fault(kill).await?;
    Ok(Entered { call, inflight, config, breaks })
}

/// Every answer of Anthropic's routes carries a `request-id`; those of `/v1/messages` (errors
/// too) the rate-limit headers, as of admission when it was admitted.
fn finish(mock: &Mock, mut resp: Response, limits: bool) -> Response {
    let h = resp.headers_mut();
    if !h.contains_key("request-id") {
        h.insert("request-id", request_id());
    }
    if limits {
        for (name, value) in &Dialect::Anthropic.rate_headers(mock, Instant::now()) {
            if !h.contains_key(name) {
                h.insert(name, value.clone());
            }
        }
    }
    resp
}

/// What a message answer uses, as its `usage` says.
#[derive(Clone, Copy, Debug)]
struct Usage {
    /// Input tokens neither read from nor written to the cache.
    input: u64,
    cached: Cached,
    output: u64,
    max_tokens: u64,
}

impl Usage {
    fn json(&self, output: u64) -> Value {
        json!({"input_tokens": self.input, "output_tokens": output,
               "cache_creation_input_tokens": self.cached.creation,
               "cache_read_input_tokens": self.cached.read})
    }

    /// `max_tokens` when the answer was cut to it, as Anthropic says it.
    fn stop_reason(&self, length: u64) -> &'static str {
        if length > self.max_tokens { "max_tokens" } else { "end_turn" }
    }
}

/// Gives back the output tokens charged (`max_tokens`) and not used, when the answer ends.
struct Settle {
    mock: Arc<Mock>,
    unused: u64,
}

impl Drop for Settle {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut guard = lock(&self.mock.limits);
        let limits = &mut *guard;
        for q in [limits.output_tokens.as_mut(), limits.tokens.as_mut()].into_iter().flatten() {
            q.refund(now, self.unused);
        }
    }
}

/// A `/v1/messages` request that passed the gate.
struct Admitted {
    usage: Usage,
    /// The answer's length before `max_tokens`.
    length: u64,
    pass: Pass,
    settle: Settle,
}

/// 529 for every `overloaded_every`th `/v1/messages` request.
fn overloaded(call: &Call<'_>, config: &MockConfig) -> Result<(), Response> {
    let Some(every) = config.overloaded_every.filter(|n| *n > 0) else { return Ok(()) };
    let mut seen = lock(&call.mock.messages);
    *seen += 1;
    if !seen.is_multiple_of(every) {
        return Ok(());
    }
    drop(seen);
    call.record(529);
    Err(anthropic_error(
        StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "overloaded_error",
        "Overloaded",
    ))
}

/// Auth, checks, faults, overload, the four buckets, the hold: a message's admission.
async fn admit(
    mock: &Arc<Mock>,
    kill: &Kill,
    headers: &HeaderMap,
    req: &Value,
) -> Result<Admitted, Response> {
    let Entered { call, inflight, config, breaks } =
        enter(mock, kill, headers, req, MESSAGES, Some(true)).await?;
    overloaded(&call, &config)?;
    let prompt = Prompt::of(req);
    let cached = prompt.lookup(mock);
    let max_tokens = req.get("max_tokens").and_then(Value::as_u64).unwrap_or(1);
    let length = config.answer_length(fnv(req));
    let output = length.min(max_tokens);
    let input = prompt.tokens - cached.creation - cached.read;
    let uncached = input + cached.creation;
    let charge = Charge {
        requests: Some(1),
        tokens: Some(uncached + max_tokens),
        input: Some(uncached),
        output: Some(max_tokens),
    };
    call.check_limits(&charge)?;
    prompt.remember(mock);
    call.record(200);
    {
        let mut stats = lock(&mock.stats);
        stats.tokens += prompt.tokens + output;
        stats.charged_tokens += uncached + output;
        stats.anthropic_input_tokens += input;
        stats.anthropic_cache_creation_tokens += cached.creation;
        stats.anthropic_cache_read_tokens += cached.read;
        stats.anthropic_output_tokens += output;
    }
    let headers = Dialect::Anthropic.rate_headers(mock, call.at);
    let settle = Settle { mock: Arc::clone(mock), unused: max_tokens - output };
    call.pass(&config).await;
    let usage = Usage { input, cached, output, max_tokens };
    Ok(Admitted { usage, length, pass: Pass { headers, breaks, inflight }, settle })
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = match parse(&body, Dialect::Anthropic) {
        Ok(req) => match admit(&mock, &kill, &headers, &req).await {
            Ok(admitted) => reply(&mock, &req, admitted),
            Err(resp) => resp,
        },
        Err(resp) => resp,
    };
    finish(&mock, resp, true)
}

/// The answer to an admitted message, JSON or SSE.
fn reply(mock: &Arc<Mock>, req: &Value, a: Admitted) -> Response {
    let model = req.get("model").and_then(Value::as_str).unwrap_or("claude-mock");
    let id = format!("msg_mock{:016x}", fnv(req));
    let text = words(req, a.usage.output);
    let stop = a.usage.stop_reason(a.length);
    if req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let frames = events(&id, model, &text, &a.usage, stop);
        return sse_response(Arc::clone(mock), a.pass, frames, a.settle);
    }
    let body = json!({"id": id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text.concat()}],
        "stop_reason": stop, "stop_sequence": null, "usage": a.usage.json(a.usage.output)});
    let resp = answer(body, &a.pass);
    drop(a.settle);
    resp
}

/// The SSE frames of a streamed message, as Anthropic sends them.
fn events(id: &str, model: &str, text: &[String], usage: &Usage, stop: &str) -> Vec<String> {
    let frame = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let message = json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": usage.json(1)});
    let mut frames = vec![
        frame("message_start", json!({"type": "message_start", "message": message})),
        frame(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        frame("ping", json!({"type": "ping"})),
    ];
    frames.extend(text.iter().map(|w| {
        let delta =
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}});
        frame("content_block_delta", delta)
    }));
    frames.push(frame("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    frames.push(frame(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
               "usage": {"output_tokens": usage.output}}),
    ));
    frames.push(frame("message_stop", json!({"type": "message_stop"})));
    frames
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, charged to no bucket.
pub(crate) async fn count_tokens(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = match parse(&body, Dialect::Anthropic) {
        Ok(req) => match enter(&mock, &kill, &headers, &req, COUNT_TOKENS, Some(false)).await {
            Ok(e) => {
                e.call.record(200);
                e.call.pass(&e.config).await;
                let pass = Pass { headers: HeaderMap::new(), breaks: e.breaks, inflight: e.inflight };
                answer(json!({"input_tokens": Prompt::of(&req).tokens}), &pass)
            }
            Err(resp) => resp,
        },
        Err(resp) => resp,
    };
    finish(&mock, resp, false)
}

fn model_json(id: &str, display_name: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": display_name, "created_at": "2025-01-01T00:00:00Z"})
}

/// `GET /v1/models` in Anthropic's shape.
pub(crate) async fn models(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
) -> Response {
    let none = json!({});
    let resp = match enter(&mock, &kill, &headers, &none, "/v1/models", None).await {
        Ok(e) => {
            e.call.record(200);
            e.call.pass(&e.config).await;
            let data: Vec<Value> = MODELS.iter().map(|(id, name)| model_json(id, name)).collect();
            let (first, last) = (MODELS.first().map(|m| m.0), MODELS.last().map(|m| m.0));
            Json(json!({"data": data, "has_more": false, "first_id": first, "last_id": last})).into_response()
        }
        Err(resp) => resp,
    };
    finish(&mock, resp, false)
}

/// `GET /v1/models/{id}` in Anthropic's shape.
pub(crate) async fn model(
    State(mock): State<Arc<Mock>>,
    Extension(kill): Extension<Kill>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let none = json!({});
    let resp = match enter(&mock, &kill, &headers, &none, "/v1/models", None).await {
        Ok(e) => match MODELS.iter().find(|(m, _)| *m == id) {
            Some((m, name)) => {
                e.call.record(200);
                Json(model_json(m, name)).into_response()
            }
            None => {
                e.call.record(404);
                anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("model: {id}"))
            }
        },
        Err(resp) => resp,
    };
    finish(&mock, resp, false)
}
