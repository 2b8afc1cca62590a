//! Prometheus metrics of one proxy process. The registry is passed in (never a global), so tests
//! and the bench can run several proxies in one process. Labels are small closed sets.

pub use prometheus::Registry;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, TextEncoder,
};

/// Buckets for waits and latencies, 1 ms to 2 minutes.
const SECONDS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Every metric the proxy exports; names start with `llmproxy_` and carry their unit.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Client requests finished, by outcome (`ok`, `upstream_error`, `queue_full`, ...).
    pub requests: IntCounterVec,
    /// Client request duration, arrival to last byte, by outcome.
    pub request_duration: HistogramVec,
    /// Upstream attempts by HTTP status, or `connect_error` / `timeout`.
    pub upstream_responses: IntCounterVec,
    /// Upstream time to response headers.
    pub upstream_latency: Histogram,
    /// Retries by reason (`status_429`, `status_5xx`, `status_408`, `connect_error`, `timeout`).
    pub retries: IntCounterVec,
    /// Requests waiting for admission now.
    pub queue_depth: IntGauge,
    /// Time from arrival to admission, of admitted requests.
    pub queue_wait: Histogram,
    /// Requests the proxy itself refused with 429, by the limit that held them.
    pub throttled: IntCounterVec,
    /// Upstream requests in flight.
    pub inflight: IntGauge,
    /// Tokens by kind: `prompt` and `completion` as the upstream reported them, `reserved`
    /// as estimated before sending.
    pub tokens: IntCounterVec,
    /// Times an upstream 429 or exhausted quota paused admission for everyone.
    pub upstream_pauses: IntCounter,
    /// The requests-per-minute limit this replica enforces.
    pub limit_requests_per_minute: IntGauge,
    /// The tokens-per-minute limit this replica enforces (0: unlimited).
    pub limit_tokens_per_minute: IntGauge,
    /// `queue.maxSize` in force.
    pub queue_capacity: IntGauge,
    /// Policy reloads by result (`applied`, `unchanged`, `rejected`).
    pub policy_reloads: IntCounterVec,
    /// Cacheable requests by cache result (`hit`, `miss`, `bypass`).
    pub cache_requests: IntCounterVec,
    /// Requests answered with the response of an identical request in flight.
    pub coalesced: IntCounter,
    /// Entries in the response cache.
    pub cache_entries: IntGauge,
    /// Bytes the response cache holds (as weighed against `cache.maxBytes`).
    pub cache_bytes: IntGauge,
    /// Tokens cache hits and coalesced answers did not spend upstream.
    pub cache_saved_tokens: IntCounter,
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> anyhow::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(reg: &Registry, name: &str, help: &str) -> anyhow::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(reg: &Registry, name: &str, help: &str) -> anyhow::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()))?;
    reg.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Register every metric in `registry`.
    pub fn new(registry: Registry) -> anyhow::Result<Self> {
        let r = &registry;
        let request_duration = HistogramVec::new(
            HistogramOpts::new("llmproxy_request_duration_seconds", "Client request duration by outcome.")
                .buckets(SECONDS.to_vec()),
            &["outcome"],
        )?;
        r.register(Box::new(request_duration.clone()))?;
        let upstream_pauses = IntCounter::new(
            "llmproxy_upstream_pauses_total",
            "Times the upstream's Retry-After or exhausted quota paused admission for every request.",
        )?;
        r.register(Box::new(upstream_pauses.clone()))?;
        let coalesced = IntCounter::new(
            "llmproxy_coalesced_requests_total",
            "Requests answered with the response of an identical request that was in flight.",
        )?;
        r.register(Box::new(coalesced.clone()))?;
        let cache_saved_tokens = IntCounter::new(
            "llmproxy_cache_saved_tokens_total",
            "Tokens that cache hits and coalesced answers did not spend upstream.",
        )?;
        r.register(Box::new(cache_saved_tokens.clone()))?;
        let metrics = Self {
            cache_requests: counter(
                r,
                "llmproxy_cache_requests_total",
                "Cacheable requests by cache result (hit, miss, bypass).",
                &["result"],
            )?,
            coalesced,
            cache_entries: gauge(r, "llmproxy_cache_entries", "Entries in the response cache.")?,
            cache_bytes: gauge(
                r,
                "llmproxy_cache_bytes",
                "Bytes held by the response cache, as weighed against its budget.",
            )?,
            cache_saved_tokens,
            requests: counter(r, "llmproxy_requests_total", "Client requests by outcome.", &["outcome"])?,
            request_duration,
            upstream_responses: counter(
                r,
                "llmproxy_upstream_responses_total",
                "Upstream attempts by HTTP status or transport error.",
                &["status"],
            )?,
            upstream_latency: histogram(
                r,
                "llmproxy_upstream_latency_seconds",
                "Upstream time to response headers, per attempt.",
            )?,
            retries: counter(r, "llmproxy_retries_total", "Upstream retries by reason.", &["reason"])?,
            queue_depth: gauge(r, "llmproxy_queue_depth", "Requests waiting for admission.")?,
            queue_wait: histogram(r, "llmproxy_queue_wait_seconds", "Wait from arrival to admission.")?,
            throttled: counter(
                r,
                "llmproxy_throttled_total",
                "Requests the proxy answered with 429 itself, by the limit that held them.",
                &["limit"],
            )?,
            inflight: gauge(r, "llmproxy_inflight_requests", "Upstream requests in flight.")?,
            tokens: counter(
                r,
                "llmproxy_tokens_total",
                "Tokens by kind (prompt, completion, reserved).",
                &["kind"],
            )?,
            upstream_pauses,
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
            policy_reloads: counter(
                r,
                "llmproxy_policy_reloads_total",
                "Policy reloads by result (applied, unchanged, rejected).",
                &["result"],
            )?,
            registry,
        };
        metrics.init_series();
        Ok(metrics)
    }

    /// Create every series of the closed label sets at 0, so that dashboards, alerts and
    /// `rate()` see them before the first event of each kind.
    fn init_series(&self) {
        for o in crate::record::Outcome::ALL {
            self.requests.with_label_values(&[o.label()]);
            self.request_duration.with_label_values(&[o.label()]);
        }
        for r in crate::retry::RetryReason::ALL {
            self.retries.with_label_values(&[r.label()]);
        }
        for l in crate::limiter::Limit::ALL {
            self.throttled.with_label_values(&[l.label()]);
        }
        for kind in ["prompt", "completion", "reserved"] {
            self.tokens.with_label_values(&[kind]);
        }
        for result in ["applied", "unchanged", "rejected"] {
            self.policy_reloads.with_label_values(&[result]);
        }
        for result in ["hit", "miss", "bypass"] {
            self.cache_requests.with_label_values(&[result]);
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
