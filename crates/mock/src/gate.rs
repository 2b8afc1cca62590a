//! The gate every `/v1/...` request passes, whichever API it speaks: the in-flight count, the
//! key, injected faults, the limits, the hold and the latency; and the answers (JSON,
//! close-delimited JSON, SSE) that injected faults can break.

// Steps return a ready `Response` as their error: large, but built once per failed request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::dialect::{
    Dialect, anthropic_error, gemini_quota_error, header_value, insufficient_quota, openai_error,
};
use crate::quota::Quota;
use crate::{Fault, Limits, Mock, MockConfig, Seen, lock};

/// Cancelling it closes the connection the request came on (a fault the mock can play).
#[derive(Clone)]
pub(crate) struct Kill(pub(crate) tokio_util::sync::CancellationToken);

/// Decrements the in-flight count when the answer (or stream) is done.
pub(crate) struct Inflight(Arc<Mock>);

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

/// How an injected fault breaks the answer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Breaks {
    /// Stream this many chunks, then break the connection.
    pub(crate) cut_after: Option<usize>,
    /// Answer JSON close-delimited (`Some`), cut mid-body (`Some(true)`).
    pub(crate) unframed: Option<bool>,
}

/// What an admitted request carries to its answer.
pub(crate) struct Pass {
    /// Rate-limit headers as of admission.
    pub(crate) headers: HeaderMap,
    pub(crate) breaks: Breaks,
    pub(crate) inflight: Inflight,
}

/// Units a request takes from each bucket at admission; `None`: that bucket is not consulted.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Charge {
    pub(crate) requests: Option<u64>,
    pub(crate) tokens: Option<u64>,
    pub(crate) input: Option<u64>,
    pub(crate) output: Option<u64>,
}

/// One request as the gate sees it, for its steps and its record.
pub(crate) struct Call<'a> {
    pub(crate) mock: &'a Arc<Mock>,
    pub(crate) path: &'a str,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) at: Instant,
    pub(crate) model: Option<&'a str>,
    pub(crate) dialect: Dialect,
}

impl<'a> Call<'a> {
    /// Count the request and enter it in flight.
    pub(crate) fn begin(
        mock: &'a Arc<Mock>,
        path: &'a str,
        headers: &'a HeaderMap,
        body: &'a Value,
        dialect: Dialect,
    ) -> (Self, Inflight) {
        let at = Instant::now();
        lock(&mock.stats).requests += 1;
        let inflight = Inflight::enter(mock);
        let model = body.get("model").and_then(Value::as_str);
        (Self { mock, path, headers, at, model, dialect }, inflight)
    }

    /// Log the request with the status answered and count it.
    pub(crate) fn record(&self, status: u16) {
        let model = self.model.map(str::to_owned);
        let mut s = lock(&self.mock.stats);
        match status {
            200..=299 => {
                s.ok += 1;
                *s.ok_by_model.entry(model.clone().unwrap_or_default()).or_default() += 1;
            }
            401 => s.unauthorized += 1,
            529 => s.overloaded += 1,
            _ => {}
        }
        drop(s);
        let h = self.headers;
        lock(&self.mock.seen).push(Seen {
            at: self.at,
            path: self.path.to_owned(),
            status,
            key: self.dialect.key(h),
            model,
            organization: header_value(h, "openai-organization"),
            anthropic_version: header_value(h, "anthropic-version"),
            anthropic_beta: header_value(h, "anthropic-beta"),
        });
    }

    /// 401 unless the key is the configured one (any key when none is).
    pub(crate) fn check_key(&self, config: &MockConfig) -> Result<(), Response> {
        if config.api_key.is_some() && self.dialect.key(self.headers) != config.api_key {
            self.record(401);
            return Err(self.dialect.unauthorized());
        }
        Ok(())
    }

    /// The next injected fault, if any: an error answer, a dropped connection, a delay, or how
    /// to break the answer.
    pub(crate) async fn fault(&self, kill: &Kill) -> Result<Breaks, Response> {
        let Some(f) = lock(&self.mock.faults).pop_front() else { return Ok(Breaks::default()) };
        lock(&self.mock.stats).faults += 1;
        match f {
            Fault::Status { status, retry_after_secs, code } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                self.record(status.as_u16());
                let mut resp = self.dialect.fault(status, code.as_deref());
                if let Some(secs) = retry_after_secs {
                    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                Err(resp)
            }
            Fault::Drop => {
                self.record(0);
                kill.0.cancel();
                std::future::pending::<()>().await;
                Ok(Breaks::default())
            }
            Fault::Delay { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(Breaks::default())
            }
            Fault::CutStream { after_chunks } => Ok(Breaks { cut_after: Some(after_chunks), unframed: None }),
            Fault::Unframed { cut } => Ok(Breaks { cut_after: None, unframed: Some(cut) }),
            Fault::Early { .. } => Ok(Breaks::default()),
        }
    }

    /// 429 for a refused model, or when a bucket cannot pay its part of `charge`. OpenAI's
    /// buckets keep what they took before the one that refused; Anthropic's give it back.
    pub(crate) fn check_limits(&self, charge: &Charge) -> Result<(), Response> {
        let mock = self.mock;
        self.check_long_window()?;
        let refused_model = self.model.and_then(|m| lock(&mock.limits).refused_models.get(m).copied());
        if let Some(retry_after) = refused_model {
            self.record(429);
            lock(&mock.stats).rate_limited += 1;
            let mut resp = self.dialect.model_refused();
            if let Some(secs) = retry_after {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return Err(resp);
        }
        let Err((wait, what, limit)) = self.take(charge) else {
            if let Some(model) = self.model.filter(|_| self.dialect == Dialect::Gemini) {
                *lock(&mock.limits).per_day.entry(model.to_owned()).or_default() += 1;
            }
            return Ok(());
        };
        self.record(429);
        lock(&mock.stats).rate_limited += 1;
        let mut resp = self.dialect.limited(what, limit, wait, self.model.unwrap_or_default());
        let h = resp.headers_mut();
        h.extend(self.dialect.rate_headers(mock, self.at));
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        // Gemini says how long to wait in the body only.
        if self.dialect != Dialect::Gemini {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self.dialect, Dialect::OpenAi | Dialect::Azure) {
            h.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if self.dialect == Dialect::Azure {
            h.insert("x-ms-retry-after-ms", HeaderValue::from(ms));
        }
        Err(resp)
    }

    /// 429 for what no wait fixes: an account out of credit, or (Gemini) a model's daily quota
    /// spent, answered as Gemini does with a `retryDelay` all the same.
    fn check_long_window(&self) -> Result<(), Response> {
        let mock = self.mock;
        let per_day = lock(&mock.config).requests_per_day;
        let limits = lock(&mock.limits);
        let out_of_credit = limits.out_of_credit && self.dialect != Dialect::Anthropic;
        let model = self.model.unwrap_or_default();
        let day_spent = self.dialect == Dialect::Gemini
            && per_day.is_some_and(|limit| limits.per_day.get(model).copied().unwrap_or(0) >= limit);
        drop(limits);
        if !(out_of_credit || day_spent) {
            return Ok(());
        }
        self.record(429);
        lock(&mock.stats).exhausted += 1;
        Err(if out_of_credit {
            insufficient_quota()
        } else {
            gemini_quota_error(
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                model,
                Duration::from_secs(43),
            )
        })
    }

    /// Take `charge` from the buckets in order, or say which refused, its limit and the wait.
    fn take(&self, charge: &Charge) -> Result<(), (Duration, &'static str, u64)> {
        let mut limits = lock(&self.mock.limits);
        let names = ["requests", "tokens", "input tokens", "output tokens"];
        let parts = [charge.requests, charge.tokens, charge.input, charge.output];
        let mut taken = Vec::new();
        for (i, part) in parts.into_iter().enumerate() {
            let (Some(n), Some(q)) = (part, bucket(&mut limits, i)) else { continue };
            match q.try_take(self.at, n) {
                Ok(()) => taken.push((i, n)),
                Err(wait) => {
                    let limit = q.limit;
                    if self.dialect == Dialect::Anthropic {
                        for (j, n) in taken {
                            if let Some(q) = bucket(&mut limits, j) {
                                q.refund(self.at, n);
                            }
                        }
                    }
                    return Err((wait, names[i], limit));
                }
            }
        }
        Ok(())
    }

    /// Hold while the mock holds answers, then wait the configured latency.
    pub(crate) async fn pass(&self, config: &MockConfig) {
        self.mock.pass_gate().await;
        if !config.latency.is_zero() {
            tokio::time::sleep(config.latency).await;
        }
    }
}

/// The `i`th bucket of a `Charge`: requests, tokens, input tokens, output tokens.
fn bucket(limits: &mut Limits, i: usize) -> Option<&mut Quota> {
    match i {
        0 => limits.requests.as_mut(),
        1 => limits.tokens.as_mut(),
        2 => limits.input_tokens.as_mut(),
        _ => limits.output_tokens.as_mut(),
    }
}

/// The request body as JSON (an empty body is `{}`), or the dialect's 400.
pub(crate) fn parse(body: &Bytes, dialect: Dialect) -> Result<Value, Response> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = format!("We could not parse the JSON body of your request: {e}");
        match dialect {
            Dialect::OpenAi | Dialect::Azure | Dialect::Gemini => {
                openai_error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None)
            }
            Dialect::Anthropic => anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
        }
    })
}

/// A JSON answer carrying the rate-limit headers.
pub(crate) fn answer(body: Value, pass: &Pass) -> Response {
    let mut resp = match pass.breaks.unframed {
        None => Json(body).into_response(),
        Some(cut) => unframed(&body, cut),
    };
    resp.headers_mut().extend(pass.headers.clone());
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

/// An SSE answer of ready `frames`, `chunk_delay` apart, broken after `cut_after` frames if a
/// fault says so. `done` is dropped with the stream: when it ends or the client goes away.
pub(crate) fn sse_response<D: Send + 'static>(
    mock: Arc<Mock>,
    pass: Pass,
    frames: Vec<String>,
    done: D,
) -> Response {
    let delay = lock(&mock.config).chunk_delay;
    let cut_after = pass.breaks.cut_after;
    let mut headers = pass.headers;
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let state = (frames.into_iter().enumerate(), (pass.inflight, done), mock);
    let stream = futures_util::stream::unfold(state, move |(mut frames, held, mock)| async move {
        let (i, frame) = frames.next()?;
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if cut_after.is_some_and(|n| i >= n) {
            return Some((Err(std::io::Error::other("mock: stream cut")), (frames, held, mock)));
        }
        *lock(&mock.last_chunk_at) = Some(Instant::now());
        Some((Ok(Bytes::from(frame)), (frames, held, mock)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.headers_mut() = headers;
    resp
}

/// A digest of a JSON value, to make answers deterministic per request.
pub(crate) fn fnv(v: &Value) -> u64 {
    fnv_bytes(0xcbf2_9ce4_8422_2325, v.to_string().as_bytes())
}

/// FNV-1a of `bytes` from state `h` (chained for prefixes).
pub(crate) fn fnv_bytes(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Seconds since the epoch, for `created` fields.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An answer of `n` tokens, a word each, the first one a digest of the request.
pub(crate) fn words(body: &Value, n: u64) -> Vec<String> {
    let mut out = vec![format!("m{:08x}", fnv(body) as u32)];
    out.extend((1..n).map(|i| format!(" w{i}")));
    out.truncate(usize::try_from(n).unwrap_or(usize::MAX));
    out
}
