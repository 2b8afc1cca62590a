//! One record per client request: counted in metrics and written as one structured log line
//! (target `llmproxy::request`). It holds metadata only, never prompt text or any key.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::tokens::{Estimate, Usage};

/// How a request ended; a metric label and a log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered 2xx (after retries, if any).
    Ok,
    /// The upstream refused the request as the client's fault (4xx other than 408/429).
    ClientError,
    /// The upstream failed: 5xx or 429 after the last retry, unreachable, timed out, or a
    /// stream that broke off.
    UpstreamError,
    /// The proxy's queue was full.
    QueueFull,
    /// The request could not be admitted before `queue.maxWait`.
    QueueTimeout,
    /// The proxy refused the request itself (bad JSON, too large, unknown path).
    BadRequest,
    /// The client went away before the response was complete.
    ClientClosed,
    /// Answered from the cache.
    CacheHit,
    /// Answered with the response of an identical request that was in flight.
    Coalesced,
}

impl Outcome {
    /// Every outcome, for initialising metric series.
    pub const ALL: [Outcome; 9] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::UpstreamError,
        Outcome::QueueFull,
        Outcome::QueueTimeout,
        Outcome::BadRequest,
        Outcome::ClientClosed,
        Outcome::CacheHit,
        Outcome::Coalesced,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::QueueFull => "queue_full",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::ClientClosed => "client_closed",
            Outcome::CacheHit => "cache_hit",
            Outcome::Coalesced => "coalesced",
        }
    }

    /// The outcome of a final upstream status.
    pub fn for_status(status: u16) -> Self {
        match status {
            200..=399 => Outcome::Ok,
            408 | 429 | 500.. => Outcome::UpstreamError,
            _ => Outcome::ClientError,
        }
    }
}

/// What is known about one request, filled in as it goes.
#[derive(Debug)]
pub struct RequestRecord {
    /// Arrival time.
    pub started: Instant,
    /// `x-request-id`.
    pub request_id: String,
    /// HTTP method.
    pub method: String,
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
    /// Upstream attempts made.
    pub attempts: u32,
    /// Why each retry happened, in order.
    pub retry_reasons: Vec<&'static str>,
    /// Time spent waiting for admission, all attempts together.
    pub queue_wait: Duration,
    /// Upstream time to headers of the last attempt.
    pub upstream_latency: Option<Duration>,
    /// Tokens reserved before sending.
    pub estimate: Estimate,
    /// Tokens the upstream reported.
    pub usage: Option<Usage>,
    /// Tokens a cache hit or a coalesced answer did not spend.
    pub saved_tokens: Option<u64>,
    /// Who asked: the configured client header, else the body's `user`.
    pub client: Option<String>,
    /// SHA-256 prefix of the prompt (never the prompt).
    pub prompt_hash: Option<String>,
    /// `hit`, `miss`, `bypass` or `coalesced`; `None` when the request is not cacheable.
    pub cache: Option<&'static str>,
    /// Whether this record's log line is written (sampling).
    pub logged: bool,
}

impl RequestRecord {
    /// A record for a request that just arrived.
    pub fn new(method: &str, path: &str, request_id: String) -> Self {
        Self {
            started: Instant::now(),
            request_id,
            method: method.to_owned(),
            path: path.to_owned(),
            model: None,
            stream: false,
            status: 0,
            outcome: Outcome::Ok,
            attempts: 0,
            retry_reasons: Vec::new(),
            queue_wait: Duration::ZERO,
            upstream_latency: None,
            estimate: Estimate::default(),
            usage: None,
            saved_tokens: None,
            client: None,
            prompt_hash: None,
            cache: None,
            logged: true,
        }
    }

    /// Count the request in metrics and write its log line.
    pub fn finish(&self, metrics: &Metrics) {
        let outcome = self.outcome.label();
        let elapsed = self.started.elapsed();
        metrics.requests.with_label_values(&[outcome]).inc();
        metrics.request_duration.with_label_values(&[outcome]).observe(elapsed.as_secs_f64());
        if let Some(u) = self.usage {
            metrics.tokens.with_label_values(&["prompt"]).inc_by(u.prompt);
            metrics.tokens.with_label_values(&["completion"]).inc_by(u.completion);
        }
        if let Some(saved) = self.saved_tokens {
            metrics.cache_saved_tokens.inc_by(saved);
        }
        if !self.logged {
            return;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            target: "llmproxy::request",
            request_id = %self.request_id,
            client = self.client.as_deref(),
            method = %self.method,
            path = %self.path,
            model = self.model.as_deref(),
            stream = self.stream,
            status = self.status,
            outcome,
            cache = self.cache,
            attempts = self.attempts,
            retry_reasons = ?self.retry_reasons,
            queue_wait_ms = ms(self.queue_wait),
            upstream_latency_ms = self.upstream_latency.map(ms),
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
