//! One record per client request: counted in metrics and written as one structured log line
//! (target `llmproxy::request`). It holds metadata only, never prompt text or any key. The
//! guard beside it finishes it exactly once, however the request ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::retry::RetryReason;
use crate::protocol::tokens::{Estimate, Usage};
use crate::telemetry::labels::{CacheResult, Outcome, TokenKind};
use crate::telemetry::metrics::{ClientMetrics, Metrics};

/// What the attempts did, kept by them as they go (so that a request abandoned between two
/// attempts still records the ones it made).
#[derive(Debug, Default)]
pub(crate) struct Tried {
    /// Upstream attempts made.
    pub(crate) attempts: u32,
    /// Why each retry happened, in order.
    pub(crate) retry_reasons: Vec<RetryReason>,
    /// Time spent waiting for admission, all attempts together.
    pub(crate) queue_wait: Duration,
    /// Upstream time to headers of the last attempt.
    pub(crate) upstream_latency: Option<Duration>,
    /// The endpoint of the last attempt.
    pub(crate) upstream: Option<String>,
}

/// What is known about one request, filled in as it goes.
#[derive(Debug)]
pub(crate) struct RequestRecord {
    /// Arrival time.
    pub started: Instant,
    /// `x-request-id`.
    pub request_id: String,
    /// HTTP method.
    pub method: http::Method,
    /// Path as the client sent it, without the query.
    pub path: String,
    /// The request's `model`, if any.
    pub model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Status sent to the client.
    pub status: u16,
    /// How it ended.
    pub outcome: Outcome,
    /// What the attempts did.
    pub tried: Tried,
    /// Tokens reserved before sending.
    pub estimate: Estimate,
    /// Tokens the upstream reported.
    pub usage: Option<Usage>,
    /// Tokens a cache hit or a coalesced answer did not spend.
    pub saved_tokens: Option<u64>,
    /// Who asked: the client its key identifies, else the configured client header, else the
    /// body's `user`.
    pub client: Option<String>,
    /// SHA-256 prefix of the prompt (never the prompt).
    pub prompt_hash: Option<String>,
    /// What the cache did; `None` when the request is not cacheable.
    pub cache: Option<CacheResult>,
    /// Whether this record's log line is written (sampling).
    pub logged: bool,
}

impl RequestRecord {
    /// A record for a request that just arrived.
    pub(crate) fn new(method: http::Method, path: &str, request_id: String) -> Self {
        Self {
            started: Instant::now(),
            request_id,
            method,
            path: path.to_owned(),
            model: None,
            stream: false,
            status: 0,
            outcome: Outcome::Ok,
            tried: Tried::default(),
            estimate: Estimate::default(),
            usage: None,
            saved_tokens: None,
            client: None,
            prompt_hash: None,
            cache: None,
            logged: true,
        }
    }

    /// Count the request in metrics (its client's series in `client`) at once, and write its
    /// log line once the serving thread is free: the record is finished while the answer's last
    /// bytes are still on their way to the client, and formatting the line there would delay
    /// them (it runs right after, on the same thread, as its own task).
    pub(crate) fn finish(self, metrics: &Metrics, client: &ClientMetrics) {
        let elapsed = self.started.elapsed();
        client.request_done(self.outcome, elapsed.as_secs_f64());
        if let Some(u) = self.usage {
            client.tokens(TokenKind::Input, u.prompt);
            client.tokens(TokenKind::Output, u.completion);
            client.tokens(TokenKind::CacheWrite, u.cache_write);
            client.tokens(TokenKind::CacheRead, u.cache_read);
        }
        if let Some(saved) = self.saved_tokens {
            metrics.cache_saved_tokens.inc_by(saved);
        }
        if !self.logged {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move { self.log(elapsed) })),
            // Outside a runtime (a request dropped as its runtime shuts down): here and now.
            Err(_) => self.log(elapsed),
        }
    }

    /// The record's log line (target `llmproxy::request`).
    fn log(&self, elapsed: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let tried = &self.tried;
        let reasons: Vec<&str> = tried.retry_reasons.iter().map(|r| r.label()).collect();
        tracing::info!(
            target: "llmproxy::request",
            request_id = self.request_id.as_str(),
            client = self.client.as_deref(),
            method = self.method.as_str(),
            path = self.path.as_str(),
            model = self.model.as_deref(),
            stream = self.stream,
            status = self.status,
            outcome = self.outcome.label(),
            cache = self.cache.map(CacheResult::label),
            attempts = tried.attempts,
            upstream = tried.upstream.as_deref(),
            retry_reasons = ?reasons,
            queue_wait_ms = ms(tried.queue_wait),
            upstream_latency_ms = tried.upstream_latency.map(ms),
            duration_ms = ms(elapsed),
            reserved_tokens = self.estimate.total(),
            prompt_tokens = self.usage.map(|u| u.prompt),
            completion_tokens = self.usage.map(|u| u.completion),
            saved_tokens = self.saved_tokens,
            prompt_hash = self.prompt_hash.as_deref(),
            "request"
        );
    }
}

/// Owns a record until the request ends and finishes it exactly once: with the outcome set by
/// the code that ended the request, or as `client_closed` when the request was dropped early
/// (the client went away while it queued or while the answer streamed).
pub(crate) struct RecordGuard {
    record: Option<RequestRecord>,
    metrics: Arc<Metrics>,
    client: Arc<ClientMetrics>,
}

impl RecordGuard {
    /// Guard `record`, counting it in `metrics` (as no client in particular, until one is set).
    pub(crate) fn new(record: RequestRecord, metrics: Arc<Metrics>) -> Self {
        let client = metrics.client(None);
        Self { record: Some(record), metrics, client }
    }

    /// Count the request in this client's series.
    pub(crate) fn set_client(&mut self, client: Arc<ClientMetrics>) {
        self.client = client;
    }

    /// The record, while the request runs.
    pub(crate) fn get(&mut self) -> &mut RequestRecord {
        // Only `finish` empties it, and it consumes the guard.
        self.record.get_or_insert_with(|| RequestRecord::new(http::Method::GET, "", String::new()))
    }

    /// The attempts' own account, kept in the record as they go.
    pub(crate) fn tried(&mut self) -> &mut Tried {
        &mut self.get().tried
    }

    /// End the request with `status` and `outcome`.
    pub(crate) fn finish(mut self, status: u16, outcome: Outcome) {
        let rec = self.get();
        rec.status = status;
        rec.outcome = outcome;
        self.close();
    }

    /// End the request with the status and outcome already in the record.
    pub(crate) fn complete(mut self) {
        self.close();
    }

    fn close(&mut self) {
        if let Some(rec) = self.record.take() {
            rec.finish(&self.metrics, &self.client);
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        if let Some(rec) = &mut self.record {
            rec.outcome = Outcome::ClientClosed;
            rec.status = 499;
        }
        self.close();
    }
}
