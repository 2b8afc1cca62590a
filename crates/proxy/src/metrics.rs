//! Prometheus metrics of one proxy process. The registry is passed in (never a global), so tests
//! and the bench can run several proxies in one process. Labels are small closed sets: each
//! label set is an enum whose series are resolved once here, so the request path increments a
//! counter without hashing label strings.

pub use prometheus::Registry;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, TextEncoder,
};

use crate::labels::{CacheResult, Outcome, Reload, TokenKind};
use crate::limiter::Limit;
use crate::retry::RetryReason;

/// Buckets for waits and latencies, 1 ms to 2 minutes.
const SECONDS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Upstream statuses with a series of their own; any other is counted by its class.
const KNOWN_STATUSES: &[&str] = &[
    "200", "201", "204", "400", "401", "403", "404", "408", "409", "413", "422", "429", "500", "502", "503",
    "504",
];

/// Every metric the proxy exports; names start with `llmproxy_` and carry their unit.
pub struct Metrics {
    registry: Registry,
    by_outcome: Vec<(IntCounter, Histogram)>,
    upstream_responses: IntCounterVec,
    /// Upstream time to response headers.
    pub upstream_latency: Histogram,
    retries: Vec<IntCounter>,
    /// Requests waiting for admission now.
    pub queue_depth: IntGauge,
    /// Time from arrival to admission, of admitted requests.
    pub queue_wait: Histogram,
    throttled: Vec<IntCounter>,
    /// Upstream requests in flight.
    pub inflight: IntGauge,
    tokens: Vec<IntCounter>,
    /// Times an upstream 429 paused admission for what it named.
    pub upstream_pauses: IntCounter,
    /// The requests-per-minute limit this replica enforces.
    pub limit_requests_per_minute: IntGauge,
    /// The tokens-per-minute limit this replica enforces (0: unlimited).
    pub limit_tokens_per_minute: IntGauge,
    /// `queue.maxSize` in force.
    pub queue_capacity: IntGauge,
    reloads: Vec<IntCounter>,
    /// 1 while the policy source (file poller or cluster watcher) runs.
    pub source_up: IntGauge,
    /// Times the policy source ended or panicked and was started again.
    pub source_restarts: IntCounter,
    cache_requests: Vec<IntCounter>,
    /// Requests answered with the response of an identical request in flight.
    pub coalesced: IntCounter,
    /// Entries in the response cache.
    pub cache_entries: IntGauge,
    /// Bytes the response cache holds (as weighed against `cache.maxBytes`).
    pub cache_bytes: IntGauge,
    /// Tokens cache hits and coalesced answers did not spend upstream.
    pub cache_saved_tokens: IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(reg: &Registry, c: C) -> anyhow::Result<C> {
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(reg: &Registry, name: &str, help: &str, label: &str) -> anyhow::Result<IntCounterVec> {
    register(reg, IntCounterVec::new(Opts::new(name, help), &[label])?)
}

fn counter(reg: &Registry, name: &str, help: &str) -> anyhow::Result<IntCounter> {
    register(reg, IntCounter::new(name, help)?)
}

fn gauge(reg: &Registry, name: &str, help: &str) -> anyhow::Result<IntGauge> {
    register(reg, IntGauge::new(name, help)?)
}

fn histogram(reg: &Registry, name: &str, help: &str) -> anyhow::Result<Histogram> {
    register(reg, Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()))?)
}

/// The series of `vec` for each label, in order: created at 0 so dashboards, alerts and
/// `rate()` see them before the first event of each kind.
fn series(vec: &IntCounterVec, labels: impl IntoIterator<Item = &'static str>) -> Vec<IntCounter> {
    labels.into_iter().map(|l| vec.with_label_values(&[l])).collect()
}

impl Metrics {
    /// Register every metric in `registry`.
    pub fn new(registry: Registry) -> anyhow::Result<Self> {
        let r = &registry;
        let requests = counter_vec(r, "llmproxy_requests_total", "Client requests by outcome.", "outcome")?;
        let durations = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "llmproxy_request_duration_seconds",
                    "Client request duration by outcome.",
                )
                .buckets(SECONDS.to_vec()),
                &["outcome"],
            )?,
        )?;
        let by_outcome = Outcome::ALL
            .iter()
            .map(|o| (requests.with_label_values(&[o.label()]), durations.with_label_values(&[o.label()])))
            .collect();
        let retries = counter_vec(r, "llmproxy_retries_total", "Upstream retries by reason.", "reason")?;
        let throttled = counter_vec(
            r,
            "llmproxy_throttled_total",
            "Requests the proxy answered with 429 itself, by the limit that held them.",
            "limit",
        )?;
        let tokens = counter_vec(
            r,
            "llmproxy_tokens_total",
            "Tokens by kind (prompt, completion, reserved).",
            "kind",
        )?;
        let reloads = counter_vec(
            r,
            "llmproxy_policy_reloads_total",
            "Policy reloads by result (applied, unchanged, rejected).",
            "result",
        )?;
        let cache_requests = counter_vec(
            r,
            "llmproxy_cache_requests_total",
            "Cacheable requests by cache result (hit, miss, bypass).",
            "result",
        )?;
        Ok(Self {
            by_outcome,
            upstream_responses: counter_vec(
                r,
                "llmproxy_upstream_responses_total",
                "Upstream attempts by HTTP status or transport error.",
                "status",
            )?,
            upstream_latency: histogram(
                r,
                "llmproxy_upstream_latency_seconds",
                "Upstream time to response headers, per attempt.",
            )?,
            retries: series(&retries, RetryReason::ALL.map(RetryReason::label)),
            queue_depth: gauge(r, "llmproxy_queue_depth", "Requests waiting for admission.")?,
            queue_wait: histogram(r, "llmproxy_queue_wait_seconds", "Wait from arrival to admission.")?,
            throttled: series(&throttled, Limit::ALL.map(Limit::label)),
            inflight: gauge(r, "llmproxy_inflight_requests", "Upstream requests in flight.")?,
            tokens: series(&tokens, TokenKind::ALL.map(TokenKind::label)),
            upstream_pauses: counter(
                r,
                "llmproxy_upstream_pauses_total",
                "Times an upstream 429 paused admission for what it named.",
            )?,
            limit_requests_per_minute: gauge(
                r,
                "llmproxy_limit_requests_per_minute",
                "Requests-per-minute limit this replica enforces.",
            )?,
            limit_tokens_per_minute: gauge(
                r,
                "llmproxy_limit_tokens_per_minute",
                "Tokens-per-minute limit this replica enforces (0: unlimited).",
            )?,
            queue_capacity: gauge(r, "llmproxy_queue_capacity_requests", "Requests that may wait at once.")?,
            reloads: series(&reloads, Reload::ALL.map(Reload::label)),
            source_up: gauge(
                r,
                "llmproxy_policy_source_up",
                "1 while the policy source (file poller or cluster watcher) runs.",
            )?,
            source_restarts: counter(
                r,
                "llmproxy_policy_source_restarts_total",
                "Times the policy source ended or panicked and was started again.",
            )?,
            cache_requests: series(&cache_requests, CacheResult::COUNTED.map(CacheResult::label)),
            coalesced: counter(
                r,
                "llmproxy_coalesced_requests_total",
                "Requests answered with the response of an identical request that was in flight.",
            )?,
            cache_entries: gauge(r, "llmproxy_cache_entries", "Entries in the response cache.")?,
            cache_bytes: gauge(
                r,
                "llmproxy_cache_bytes",
                "Bytes held by the response cache, as weighed against its budget.",
            )?,
            cache_saved_tokens: counter(
                r,
                "llmproxy_cache_saved_tokens_total",
                "Tokens that cache hits and coalesced answers did not spend upstream.",
            )?,
            registry,
        })
    }

    /// Count a finished client request and its duration.
    pub fn request_done(&self, outcome: Outcome, seconds: f64) {
        let (count, duration) = &self.by_outcome[outcome as usize];
        count.inc();
        duration.observe(seconds);
    }

    /// Count tokens of one kind.
    pub fn tokens(&self, kind: TokenKind, n: u64) {
        self.tokens[kind as usize].inc_by(n);
    }

    /// Count a retry.
    pub fn retry(&self, reason: RetryReason) {
        self.retries[reason as usize].inc();
    }

    /// Count a request the proxy refused with 429 itself.
    pub fn throttled(&self, limit: Limit) {
        self.throttled[limit as usize].inc();
    }

    /// Count a policy reload.
    pub fn reload(&self, result: Reload) {
        self.reloads[result as usize].inc();
    }

    /// Count a cache lookup (coalesced answers are counted by `coalesced`).
    pub fn cache(&self, result: CacheResult) {
        match result {
            CacheResult::Coalesced => self.coalesced.inc(),
            other => self.cache_requests[other as usize].inc(),
        }
    }

    /// Count an upstream attempt by its HTTP status.
    pub fn upstream_status(&self, status: u16) {
        let text = status.to_string();
        let label = match KNOWN_STATUSES.iter().find(|s| **s == text) {
            Some(known) => *known,
            None => match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
        };
        self.upstream_responses.with_label_values(&[label]).inc();
    }

    /// Count an upstream attempt that got no HTTP answer (`connect_error`, `timeout`).
    pub fn upstream_failure(&self, what: &'static str) {
        self.upstream_responses.with_label_values(&[what]).inc();
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_closed_label_set_is_exported_at_zero_and_counts_where_it_should() {
        let m = Metrics::new(Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        let text = m.render();
        for o in Outcome::ALL {
            assert!(
                text.contains(&format!("llmproxy_requests_total{{outcome=\"{}\"}} 0", o.label())),
                "{o:?}"
            );
        }
        for l in Limit::ALL {
            assert!(
                text.contains(&format!("llmproxy_throttled_total{{limit=\"{}\"}} 0", l.label())),
                "{l:?}"
            );
        }
        m.request_done(Outcome::QueueFull, 0.5);
        m.tokens(TokenKind::Completion, 7);
        m.cache(CacheResult::Bypass);
        m.upstream_status(418);
        let text = m.render();
        assert!(text.contains("llmproxy_requests_total{outcome=\"queue_full\"} 1"));
        assert!(text.contains("llmproxy_tokens_total{kind=\"completion\"} 7"));
        assert!(text.contains("llmproxy_cache_requests_total{result=\"bypass\"} 1"));
        assert!(text.contains("llmproxy_upstream_responses_total{status=\"4xx\"} 1"));
    }
}
