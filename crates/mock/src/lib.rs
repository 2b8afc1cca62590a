//! A mock upstream for tests, benchmarks and `llmproxy demo` that speaks OpenAI's API and
//! Anthropic's Messages API (`/v1/messages`, JSON and SSE, `count_tokens`, prompt caching). It
//! enforces requests and tokens per minute with real 429s (OpenAI's `Retry-After`,
//! `retry-after-ms`, `x-ratelimit-*`; Anthropic's input and output tokens per minute with
//! `anthropic-ratelimit-*`), checks the key, can inject 5xx (529 overloaded), dropped
//! connections, slow answers and broken streams, and counts everything it served. Its OpenAI
//! routes can also answer as Azure OpenAI does (deployment paths, `api-key`, `api-version`,
//! remaining-only headers) or as Gemini's OpenAI-compatible API does (no rate-limit headers,
//! the quota in the 429 body, a daily quota per model), and as an account out of credit.

#![warn(unreachable_pub)]

mod anthropic;
mod control;
mod dialect;
mod gate;
mod handlers;
pub mod load;
mod quota;
mod server;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::quota::Quota;

/// How the mock behaves.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Requests per minute; `None`: unlimited.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute (prompt estimate + max tokens, settled to real usage; for
    /// `/v1/messages` input less cache reads + `max_tokens`, always settled); `None`: unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Anthropic's input tokens per minute (`/v1/messages`: the input estimate less cache reads,
    /// charged at admission); `None`: unlimited.
    pub input_tokens_per_minute: Option<u64>,
    /// Anthropic's output tokens per minute (`/v1/messages`: `max_tokens` charged at admission,
    /// the unused part given back when the answer ends); `None`: unlimited.
    pub output_tokens_per_minute: Option<u64>,
    /// Granularity of enforcement: at most this window's share of the per-minute limit may
    /// arrive back to back (OpenAI enforces per-minute limits over shorter periods).
    pub window: Duration,
    /// The bearer key clients must send; `None`: any or none.
    pub api_key: Option<String>,
    /// Wait before sending response headers.
    pub latency: Duration,
    /// Wait between streamed chunks.
    pub chunk_delay: Duration,
    /// Completion tokens per answer (fewer if the request's max is lower).
    pub completion_tokens: u64,
    /// Answer lengths spread over this range, picked per prompt (deterministically), instead of
    /// `completion_tokens`, on both APIs.
    pub answer_tokens: Option<std::ops::RangeInclusive<u64>>,
    /// Answer every Nth `/v1/messages` request 529 `overloaded_error` (Anthropic's sign of a
    /// busy fleet), before its limits are charged; `None`: never.
    pub overloaded_every: Option<u64>,
    /// How tokens count against `tokens_per_minute`.
    pub token_accounting: Accounting,
    /// Streams one HTTP/2 connection may carry at once (hyper's default, 200, when `None`).
    pub http2_max_streams: Option<u32>,
    /// Which provider the OpenAI-shaped routes answer as.
    pub flavor: Flavor,
    /// Gemini: requests per day per model; once spent, a 429 naming the daily quota (with a
    /// `retryDelay`, as Gemini sends even then). `None`: unlimited.
    pub requests_per_day: Option<u64>,
}

/// Which provider the OpenAI-shaped routes answer as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// OpenAI: `x-ratelimit-*` headers, `Retry-After` and `retry-after-ms` on 429.
    #[default]
    OpenAi,
    /// Azure OpenAI: the key only in `api-key`, `api-version` required on deployment paths,
    /// only `x-ratelimit-remaining-*` headers, `retry-after-ms` and `x-ms-retry-after-ms`.
    Azure,
    /// Gemini: no rate-limit headers; 429 bodies in a JSON array with `google.rpc.RetryInfo`
    /// and `google.rpc.QuotaFailure` details (a `Help` entry first).
    Gemini,
}

/// How the mock counts a request's tokens, like one provider or another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accounting {
    /// OpenAI's way: prompt estimate + `max_tokens` (or the answer length) x `n`, charged at
    /// admission and never refunded.
    #[default]
    Requested,
    /// Charged like `Requested` at admission, then settled to the real usage.
    Used,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: None,
            window: Duration::from_secs(1),
            api_key: None,
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            completion_tokens: 16,
            answer_tokens: None,
            overloaded_every: None,
            token_accounting: Accounting::Requested,
            http2_max_streams: None,
            flavor: Flavor::OpenAi,
            requests_per_day: None,
        }
    }
}

impl MockConfig {
    /// Tokens an answer to a prompt with digest `digest` has, before any `max_tokens`.
    pub(crate) fn answer_length(&self, digest: u64) -> u64 {
        match &self.answer_tokens {
            Some(r) if r.start() <= r.end() => r.start() + digest % (r.end() - r.start() + 1),
            _ => self.completion_tokens,
        }
    }
}

/// A misbehaviour for the next request(s). On `/v1/messages` every error is answered in
/// Anthropic's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this status (an OpenAI-style error body, Anthropic's on Anthropic's
    /// routes), optionally with `Retry-After`.
    Status {
        /// HTTP status.
        status: u16,
        /// Seconds for `Retry-After`.
        #[serde(default)]
        retry_after_secs: Option<u64>,
        /// OpenAI: the error body's `code` (e.g. `insufficient_quota`). Anthropic: when it names
        /// one of Anthropic's error types, optionally with a message as `"type: message"` (e.g.
        /// `"rate_limit_error: monthly spend limit reached"`), the error's type and message; else
        /// the type follows the status (529 `overloaded_error`, 429 `rate_limit_error`, ...).
        #[serde(default)]
        code: Option<String>,
    },
    /// Close the connection without answering.
    Drop,
    /// Wait this long before answering.
    Delay {
        /// Milliseconds.
        ms: u64,
    },
    /// Stream this many chunks, then break the connection.
    CutStream {
        /// Chunks sent before the break.
        after_chunks: usize,
    },
    /// Answer with this status before reading the request body (as a server refusing an
    /// upload too large for it does).
    Early {
        /// HTTP status.
        status: u16,
    },
    /// Answer a JSON body as HTTP/1.0 with neither `Content-Length` nor chunked encoding, so
    /// that only the connection's close ends it; `cut`: close after half of it.
    Unframed {
        /// Close mid-body.
        cut: bool,
    },
}

/// What the mock has seen and done.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Requests received on `/v1/...`.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 429 because a limit was exceeded.
    pub rate_limited: u64,
    /// Answered 429 because no wait would help: out of credit, or a daily quota spent.
    pub exhausted: u64,
    /// Answered 401.
    pub unauthorized: u64,
    /// Requests that met an injected fault.
    pub faults: u64,
    /// Most requests in flight at once.
    pub max_inflight: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Requests that came over HTTP/2.
    pub http2_requests: u64,
    /// Tokens used (prompt + completion) by successful requests.
    pub tokens: u64,
    /// Tokens counted against `tokens_per_minute`, by its accounting (what it charged and kept).
    pub charged_tokens: u64,
    /// Answered 2xx, by the request's model.
    pub ok_by_model: std::collections::BTreeMap<String, u64>,
    /// Answered 529 (overloaded), injected or by `overloaded_every`.
    pub overloaded: u64,
    /// `/v1/messages` input tokens not read from nor written to the prompt cache.
    pub anthropic_input_tokens: u64,
    /// `/v1/messages` input tokens written to the prompt cache.
    pub anthropic_cache_creation_tokens: u64,
    /// `/v1/messages` input tokens read from the prompt cache.
    pub anthropic_cache_read_tokens: u64,
    /// `/v1/messages` output tokens answered.
    pub anthropic_output_tokens: u64,
}

/// One request as the mock saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Arrival.
    pub at: Instant,
    /// Path.
    pub path: String,
    /// Status answered (0 for a dropped connection).
    pub status: u16,
    /// The key sent: as a bearer token or Azure's `api-key` header on OpenAI's routes, as
    /// `x-api-key` or a bearer token on Anthropic's.
    pub key: Option<String>,
    /// The request body's `model`, if any.
    pub model: Option<String>,
    /// The `openai-organization` header sent, if any.
    pub organization: Option<String>,
    /// The `anthropic-version` header sent, if any.
    pub anthropic_version: Option<String>,
    /// The `anthropic-beta` header sent, if any.
    pub anthropic_beta: Option<String>,
}

/// New per-minute limits (`POST /mock/limits`); each left out is lifted.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub(crate) struct NewLimits {
    #[serde(default)]
    pub(crate) requests_per_minute: Option<u64>,
    #[serde(default)]
    pub(crate) tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub(crate) input_tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub(crate) output_tokens_per_minute: Option<u64>,
}

pub(crate) struct Limits {
    requests: Option<Quota>,
    tokens: Option<Quota>,
    input_tokens: Option<Quota>,
    output_tokens: Option<Quota>,
    /// Models answered with 429 (and this `Retry-After`, in seconds) whatever the quota.
    refused_models: std::collections::BTreeMap<String, Option<u64>>,
    /// Requests admitted today, per model (for `requests_per_day`).
    per_day: std::collections::BTreeMap<String, u64>,
    /// Every request answered 429 `insufficient_quota`.
    out_of_credit: bool,
}

/// Shared state of a running mock.
pub struct Mock {
    config: Mutex<MockConfig>,
    limits: Mutex<Limits>,
    faults: Mutex<VecDeque<Fault>>,
    stats: Mutex<Stats>,
    seen: Mutex<Vec<Seen>>,
    inflight: Mutex<u64>,
    /// When the last streamed chunk of any stream was written.
    last_chunk_at: Mutex<Option<Instant>>,
    /// Closed: admitted requests wait before answering (tests hold an answer this way instead
    /// of racing a timer).
    gate: tokio::sync::watch::Sender<bool>,
    /// Digests of the prompt prefixes written to Anthropic's prompt cache.
    prompt_cache: Mutex<HashSet<u64>>,
    /// `/v1/messages` requests so far, for `overloaded_every`.
    messages: Mutex<u64>,
}

/// Every lock of the mock goes through here: std's Mutex, poisoning recovered (the workspace's
/// choice, stated beside `await_holding_lock` in Cargo.toml).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mock {
    /// State for a mock with `config`.
    pub(crate) fn new(config: MockConfig) -> Arc<Self> {
        let now = Instant::now();
        let quota = |limit: Option<u64>| limit.map(|l| Quota::new(l, config.window, now));
        let limits = Limits {
            requests: quota(config.requests_per_minute),
            tokens: quota(config.tokens_per_minute),
            input_tokens: quota(config.input_tokens_per_minute),
            output_tokens: quota(config.output_tokens_per_minute),
            refused_models: std::collections::BTreeMap::new(),
            per_day: std::collections::BTreeMap::new(),
            out_of_credit: false,
        };
        Arc::new(Self {
            config: Mutex::new(config),
            limits: Mutex::new(limits),
            faults: Mutex::new(VecDeque::new()),
            stats: Mutex::new(Stats::default()),
            seen: Mutex::new(Vec::new()),
            inflight: Mutex::new(0),
            last_chunk_at: Mutex::new(None),
            gate: tokio::sync::watch::Sender::new(true),
            prompt_cache: Mutex::new(HashSet::new()),
            messages: Mutex::new(0),
        })
    }

    /// Queue `fault` for the next `count` requests.
    pub fn inject(&self, fault: Fault, count: usize) {
        lock(&self.faults).extend(std::iter::repeat_n(fault, count));
    }

    /// The next fault, if it is one answered before the body is read.
    pub(crate) fn take_early(&self) -> Option<u16> {
        let mut faults = lock(&self.faults);
        match faults.front() {
            Some(Fault::Early { status }) => {
                let status = *status;
                faults.pop_front();
                lock(&self.stats).requests += 1;
                lock(&self.stats).faults += 1;
                Some(status)
            }
            _ => None,
        }
    }

    /// Enforce new limits from now on (a provider lowering or raising a key's quota); `None`
    /// lifts that limit. The headers report the new limits at once.
    pub(crate) fn set_limits(&self, new: NewLimits) {
        let now = Instant::now();
        let mut config = lock(&self.config);
        config.requests_per_minute = new.requests_per_minute;
        config.tokens_per_minute = new.tokens_per_minute;
        config.input_tokens_per_minute = new.input_tokens_per_minute;
        config.output_tokens_per_minute = new.output_tokens_per_minute;
        let window = config.window;
        let quota = |limit: Option<u64>| limit.map(|l| Quota::new(l, window, now));
        let mut limits = lock(&self.limits);
        limits.requests = quota(new.requests_per_minute);
        limits.tokens = quota(new.tokens_per_minute);
        limits.input_tokens = quota(new.input_tokens_per_minute);
        limits.output_tokens = quota(new.output_tokens_per_minute);
    }

    /// Answer every request for `model` with 429 (with this `Retry-After`) until allowed again.
    pub fn refuse_model(&self, model: &str, retry_after_secs: Option<u64>) {
        lock(&self.limits).refused_models.insert(model.to_owned(), retry_after_secs);
    }

    /// Answer every request 429 `insufficient_quota` (an account out of credit) until `false`.
    pub fn set_out_of_credit(&self, out: bool) {
        lock(&self.limits).out_of_credit = out;
    }

    /// Serve `model` again.
    pub(crate) fn allow_model(&self, model: &str) {
        lock(&self.limits).refused_models.remove(model);
    }

    /// Change the accepted key (rotation tests).
    pub fn set_api_key(&self, key: Option<String>) {
        lock(&self.config).api_key = key;
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// When the most recent stream chunk was written.
    pub fn last_chunk_at(&self) -> Option<Instant> {
        *lock(&self.last_chunk_at)
    }

    /// Hold every answer (after admission) until `release`.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    /// Let held answers go.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Wait while the gate is closed.
    pub(crate) async fn pass_gate(&self) {
        let mut rx = self.gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// Forget counters and the request log (limits keep their state).
    pub fn reset_stats(&self) {
        *lock(&self.stats) = Stats::default();
        lock(&self.seen).clear();
    }
}

/// A mock serving on loopback; stops when dropped.
pub struct MockServer {
    /// Shared state, for injecting faults and reading stats.
    pub mock: Arc<Mock>,
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl MockServer {
    /// Start on `addr` (port 0 for any free port).
    pub async fn start(config: MockConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mock = Mock::new(config);
        let stop = CancellationToken::new();
        tokio::spawn(server::serve(listener, Arc::clone(&mock), stop.clone()));
        Ok(Self { mock, addr, stop })
    }

    /// Start on a free loopback port.
    pub async fn start_local(config: MockConfig) -> std::io::Result<Self> {
        Self::start(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// The base URL to configure as `upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stop accepting and close every connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
