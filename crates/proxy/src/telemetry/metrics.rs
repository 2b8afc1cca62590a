//! Prometheus metrics of one proxy process. The registry is passed in (never a global), so tests
//! and the bench can run several proxies in one process. Labels are small closed sets: each
//! label set is an enum whose series are resolved once here, so the request path increments a
//! counter without hashing label strings.

pub use prometheus::Registry;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    TextEncoder,
};

use crate::admission::limiter::{EndpointReport, Limit};
use crate::admission::retry::RetryReason;
use crate::telemetry::labels::{CacheResult, Outcome, Reload, TokenKind};

/// Buckets for waits and latencies, 1 ms to 2 minutes.
const SECONDS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Upstream statuses with a series of their own; any other is counted by its class.
const KNOWN_STATUSES: &[&str] = &[
    "200", "201", "204", "400", "401", "403", "404", "408", "409", "413", "422", "429", "500", "502", "503",
    "504",
];

/// The reasons an upstream attempt gets no HTTP answer; their labels stand in for a status.
const NO_ANSWER: [RetryReason; 2] = [RetryReason::Connect, RetryReason::Timeout];

/// The most distinct `client` label values; clients beyond them are counted as `other`.
pub(crate) const MAX_CLIENT_LABELS: usize = 100;

/// The `client` label of requests from no identified client (no client keys configured).
pub(crate) const ANONYMOUS: &str = "anonymous";

/// One client's series, resolved once and shared by all its requests.
pub struct ClientMetrics {
    by_outcome: Vec<(IntCounter, Histogram)>,
    queue_wait: Histogram,
    throttled: Vec<IntCounter>,
    tokens: Vec<IntCounter>,
}

impl ClientMetrics {
    /// Count a finished client request and its duration.
    pub(crate) fn request_done(&self, outcome: Outcome, seconds: f64) {
        let (count, duration) = &self.by_outcome[outcome as usize];
        count.inc();
        duration.observe(seconds);
    }

    /// Count tokens of one kind.
    pub fn tokens(&self, kind: TokenKind, n: u64) {
        self.tokens[kind as usize].inc_by(n);
    }

    /// Count a request the proxy refused with 429 itself.
    pub fn throttled(&self, limit: Limit) {
        self.throttled[limit as usize].inc();
    }

    /// Record a request's wait from arrival to admission.
    pub(crate) fn queue_wait(&self, seconds: f64) {
        self.queue_wait.observe(seconds);
    }
}

/// Every metric the proxy exports; names start with `llmproxy_` and carry their unit.
pub struct Metrics {
    registry: Registry,
    by_client: ByClient,
    upstreams: Upstreams,
    quota_mode: IntGaugeVec,
    /// Replicas (and LlmQuota consumers' pods) sharing the buckets, as Redis last counted them.
    pub(crate) quota_members: IntGauge,
    /// Malformed entries the shared store's script skipped (a tenant or a bug wrote them).
    pub(crate) quota_malformed_entries: IntCounter,
    /// Retries the retry budget refused.
    pub(crate) retry_budget_exhausted: IntCounter,
    /// Upstream time to response headers.
    pub(crate) upstream_latency: Histogram,
    retries: Vec<IntCounter>,
    /// Requests waiting for admission now.
    pub queue_depth: IntGauge,
    /// Upstream requests in flight.
    pub inflight: IntGauge,
    /// Times an upstream 429 paused admission for what it named.
    pub(crate) upstream_pauses: IntCounter,
    /// The requests-per-minute limit this replica enforces.
    pub(crate) limit_requests_per_minute: IntGauge,
    /// The tokens-per-minute limit this replica enforces (0: unlimited).
    pub(crate) limit_tokens_per_minute: IntGauge,
    /// `queue.maxSize` in force.
    pub(crate) queue_capacity: IntGauge,
    reloads: Vec<IntCounter>,
    /// 1 while the policy source (file poller or cluster watcher) runs.
    pub(crate) source_up: IntGauge,
    /// Times the policy source ended or panicked and was started again.
    pub(crate) source_restarts: IntCounter,
    cache_requests: Vec<IntCounter>,
    /// Requests answered with the response of an identical request in flight.
    pub coalesced: IntCounter,
    /// Entries in the response cache.
    pub(crate) cache_entries: IntGauge,
    /// Bytes the response cache holds (as weighed against `cache.maxBytes`).
    pub(crate) cache_bytes: IntGauge,
    /// Tokens cache hits and coalesced answers did not spend upstream.
    pub(crate) cache_saved_tokens: IntCounter,
    /// How far this pod is its own bottleneck: in-flight requests, plus those waiting for a
    /// slot while every slot is taken, over `maxConcurrent`. It stays low while requests wait
    /// for the upstream quota (more pods cannot help then): the autoscaling signal.
    pub saturation: prometheus::Gauge,
    recent: std::sync::Mutex<Recent>,
}

/// The last minute of what a pod reports for its LlmProxy's status.
#[derive(Debug)]
struct Recent {
    upstream_429s: crate::admission::limiter::window::MinuteWindow,
    upstream_errors: crate::admission::limiter::window::MinuteWindow,
    /// Queue waits (seconds) with when they ended; at most `MAX_WAITS`, the last minute's.
    waits: std::collections::VecDeque<(tokio::time::Instant, f32)>,
}

impl Recent {
    /// Nothing seen yet, as of `now`.
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            upstream_429s: crate::admission::limiter::window::MinuteWindow::new(now),
            upstream_errors: crate::admission::limiter::window::MinuteWindow::new(now),
            waits: std::collections::VecDeque::new(),
        }
    }
}

/// The policy source's series, registered together.
struct Source {
    reloads: Vec<IntCounter>,
    source_up: IntGauge,
    source_restarts: IntCounter,
}

impl Source {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let reloads = counter_vec(
            r,
            "llmproxy_policy_reloads_total",
            "Policy reloads by result (applied, unchanged, rejected).",
            "result",
        )?;
        Ok(Self {
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
        })
    }
}

/// The response cache's series, registered together.
struct Cache {
    cache_requests: Vec<IntCounter>,
    coalesced: IntCounter,
    cache_entries: IntGauge,
    cache_bytes: IntGauge,
    cache_saved_tokens: IntCounter,
}

impl Cache {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let cache_requests = counter_vec(
            r,
            "llmproxy_cache_requests_total",
            "Cacheable requests by cache result (hit, miss, bypass).",
            "result",
        )?;
        Ok(Self {
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
        })
    }
}

/// The autoscaling signal (see `Metrics::saturation`).
fn saturation(r: &Registry) -> Result<prometheus::Gauge, prometheus::Error> {
    register(
        r,
        prometheus::Gauge::new(
            "llmproxy_saturation",
            "In-flight requests, plus those waiting for a slot while all are taken, over maxConcurrent: above 1 the pod itself is the bottleneck (scale out); it stays low while requests wait for the upstream quota.",
        )?,
    )
}

/// Which mode the shared limits run in, one series per mode.
fn quota_mode(r: &Registry) -> Result<IntGaugeVec, prometheus::Error> {
    register(
        r,
        IntGaugeVec::new(
            Opts::new(
                "llmproxy_quota_mode",
                "1 for the mode the shared limits run in: shared (through Redis) or local (a share each, Redis unreachable); 0 for the other.",
            ),
            &["mode"],
        )?,
    )
}

/// The most queue waits remembered for the p99 (the newest).
const MAX_WAITS: usize = 4096;

/// What a pod saw in the last minute.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LastMinute {
    /// Upstream 429s.
    pub upstream_429s: u64,
    /// Upstream 5xx, connection errors and timeouts.
    pub(crate) upstream_errors: u64,
    /// 99th percentile of queue waits, seconds.
    pub(crate) queue_wait_p99: f64,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    reg: &Registry,
    c: C,
) -> Result<C, prometheus::Error> {
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntCounterVec, prometheus::Error> {
    register(reg, IntCounterVec::new(Opts::new(name, help), &[label])?)
}

fn counter(reg: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    register(reg, IntCounter::new(name, help)?)
}

fn gauge(reg: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    register(reg, IntGauge::new(name, help)?)
}

fn histogram(reg: &Registry, name: &str, help: &str) -> Result<Histogram, prometheus::Error> {
    register(reg, Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()))?)
}

/// The series of `vec` for each label, in order: created at 0 so dashboards, alerts and
/// `rate()` see them before the first event of each kind.
fn series(vec: &IntCounterVec, labels: impl IntoIterator<Item = &'static str>) -> Vec<IntCounter> {
    labels.into_iter().map(|l| vec.with_label_values(&[l])).collect()
}

/// The per-client families, and each client's series resolved from them once.
struct ByClient {
    requests: IntCounterVec,
    durations: HistogramVec,
    queue_waits: HistogramVec,
    throttled: IntCounterVec,
    tokens: IntCounterVec,
    clients: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<ClientMetrics>>>,
}

impl ByClient {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let by_client = |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
            register(r, IntCounterVec::new(Opts::new(name, help), &[label, "client"])?)
        };
        let histograms = |name: &str,
                          help: &str,
                          labels: &[&str]|
         -> Result<HistogramVec, prometheus::Error> {
            register(r, HistogramVec::new(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()), labels)?)
        };
        Ok(Self {
            requests: by_client(
                "llmproxy_requests_total",
                "Client requests by outcome and client.",
                "outcome",
            )?,
            durations: histograms(
                "llmproxy_request_duration_seconds",
                "Client request duration by outcome and client.",
                &["outcome", "client"],
            )?,
            queue_waits: histograms(
                "llmproxy_queue_wait_seconds",
                "Wait from arrival to admission, by client.",
                &["client"],
            )?,
            throttled: by_client(
                "llmproxy_throttled_total",
                "Requests the proxy answered with 429 itself, by the limit that held them and client.",
                "limit",
            )?,
            tokens: by_client(
                "llmproxy_tokens_total",
                "Tokens by kind (prompt, completion, reserved) and client.",
                "kind",
            )?,
            clients: std::sync::Mutex::default(),
        })
    }

    /// The series of client `name` (`None`: no identified client): at most
    /// `MAX_CLIENT_LABELS` distinct names; later ones are counted as `other`.
    fn client(&self, name: Option<&str>) -> std::sync::Arc<ClientMetrics> {
        let name = name.unwrap_or(ANONYMOUS);
        let mut clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = clients.get(name) {
            return std::sync::Arc::clone(m);
        }
        let label = if clients.len() >= MAX_CLIENT_LABELS { "other" } else { name };
        if let Some(m) = clients.get(label) {
            return std::sync::Arc::clone(m);
        }
        let with = |vec: &IntCounterVec, labels: &[&'static str]| -> Vec<IntCounter> {
            labels.iter().map(|l| vec.with_label_values(&[l, label])).collect()
        };
        let m = std::sync::Arc::new(ClientMetrics {
            by_outcome: Outcome::ALL
                .iter()
                .map(|o| {
                    (
                        self.requests.with_label_values(&[o.label(), label]),
                        self.durations.with_label_values(&[o.label(), label]),
                    )
                })
                .collect(),
            queue_wait: self.queue_waits.with_label_values(&[label]),
            throttled: with(&self.throttled, &Limit::ALL.map(Limit::label)),
            tokens: with(&self.tokens, &TokenKind::ALL.map(TokenKind::label)),
        });
        clients.insert(label.to_owned(), std::sync::Arc::clone(&m));
        m
    }
}

/// The per-endpoint families.
struct Upstreams {
    responses: IntCounterVec,
    ejections: IntCounterVec,
    exhausted: IntCounterVec,
    healthy: IntGaugeVec,
    limit: IntGaugeVec,
    remaining: IntGaugeVec,
}

impl Upstreams {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            responses: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "llmproxy_upstream_responses_total",
                        "Upstream attempts by endpoint and HTTP status or transport error.",
                    ),
                    &["status", "upstream"],
                )?,
            )?,
            ejections: counter_vec(
                r,
                "llmproxy_upstream_ejections_total",
                "Times an upstream endpoint was taken out after failures.",
                "upstream",
            )?,
            exhausted: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "llmproxy_upstream_quota_exhausted_total",
                        "429s an upstream answered because a quota no wait fixes is spent (reason: insufficient_quota, billing, spend_limit, requests_per_day); its requests are refused at once or sent elsewhere until its reset or a successful probe.",
                    ),
                    &["upstream", "reason"],
                )?,
            )?,
            healthy: register(
                r,
                IntGaugeVec::new(
                    Opts::new("llmproxy_upstream_healthy", "1 while an upstream endpoint takes requests."),
                    &["upstream"],
                )?,
            )?,
            limit: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "llmproxy_upstream_limit_per_minute",
                        "The tightest limit an upstream endpoint enforces (requests, tokens per minute): configured, or lower as its x-ratelimit-limit-* headers report.",
                    ),
                    &["upstream", "kind"],
                )?,
            )?,
            remaining: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "llmproxy_upstream_remaining",
                        "What an upstream endpoint's x-ratelimit-remaining-* headers last said remains.",
                    ),
                    &["upstream", "kind"],
                )?,
            )?,
        })
    }
}

impl Metrics {
    /// Register every metric in `registry`.
    pub fn new(registry: Registry) -> Result<Self, crate::Error> {
        let r = &registry;
        let retries = counter_vec(r, "llmproxy_retries_total", "Upstream retries by reason.", "reason")?;
        let Source { reloads, source_up, source_restarts } = Source::register(r)?;
        let Cache { cache_requests, coalesced, cache_entries, cache_bytes, cache_saved_tokens } =
            Cache::register(r)?;
        let metrics = Self {
            saturation: saturation(r)?,
            recent: std::sync::Mutex::new(Recent::new(tokio::time::Instant::now())),
            by_client: ByClient::register(r)?,
            upstreams: Upstreams::register(r)?,
            quota_mode: quota_mode(r)?,
            quota_members: gauge(
                r,
                "llmproxy_quota_members",
                "Pods sharing the buckets, by their heartbeats in Redis (a pod alone divides each rate by it).",
            )?,
            quota_malformed_entries: counter(
                r,
                "llmproxy_quota_malformed_entries_total",
                "Malformed entries in Redis the shared limits' script skipped or removed instead of failing.",
            )?,
            retry_budget_exhausted: counter(
                r,
                "llmproxy_retry_budget_exhausted_total",
                "Retries the retry budget refused (the request got the upstream's last answer).",
            )?,
            upstream_latency: histogram(
                r,
                "llmproxy_upstream_latency_seconds",
                "Upstream time to response headers, per attempt.",
            )?,
            retries: series(&retries, RetryReason::ALL.map(RetryReason::label)),
            queue_depth: gauge(r, "llmproxy_queue_depth", "Requests waiting for admission.")?,
            inflight: gauge(r, "llmproxy_inflight_requests", "Upstream requests in flight.")?,
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
            reloads,
            source_up,
            source_restarts,
            cache_requests,
            coalesced,
            cache_entries,
            cache_bytes,
            cache_saved_tokens,
            registry,
        };
        // The anonymous client's series exist from the start, for dashboards and alerts.
        metrics.client(None);
        Ok(metrics)
    }

    /// The series of a client (`None`: no client identified). The label takes at most
    /// `MAX_CLIENT_LABELS` distinct names; later ones are counted as `other`.
    pub fn client(&self, name: Option<&str>) -> std::sync::Arc<ClientMetrics> {
        self.by_client.client(name)
    }

    /// Count a retry.
    pub fn retry(&self, reason: RetryReason) {
        self.retries[reason as usize].inc();
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

    /// Count an upstream attempt at endpoint `upstream` by its HTTP status.
    pub(crate) fn upstream_status(&self, upstream: &str, status: u16) {
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
        self.upstreams.responses.with_label_values(&[label, upstream]).inc();
        if status == 429 || status >= 500 {
            let now = tokio::time::Instant::now();
            let mut r = self.recent();
            let w = if status == 429 { &mut r.upstream_429s } else { &mut r.upstream_errors };
            w.add(now, 1, 0);
        }
    }

    /// Export every endpoint's response series from zero (what rates and alerts divide by,
    /// and a first failure then counts in a rate: a series born at 1 shows no increase).
    pub(crate) fn init_upstreams<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for upstream in names {
            for status in KNOWN_STATUSES.iter().copied().chain(NO_ANSWER.map(RetryReason::label)) {
                self.upstreams.responses.with_label_values(&[status, upstream]);
            }
            self.upstreams.ejections.with_label_values(&[upstream]);
            for reason in crate::protocol::provider::Reason::ALL {
                self.upstreams.exhausted.with_label_values(&[upstream, reason.label()]);
            }
        }
    }

    /// Count an upstream 429 that said a quota no wait fixes is spent.
    pub(crate) fn upstream_exhausted(&self, upstream: &str, reason: &str) {
        self.upstreams.exhausted.with_label_values(&[upstream, reason]).inc();
    }

    /// Count an upstream attempt that got no HTTP answer (`reason` is one of `NO_ANSWER`).
    pub(crate) fn upstream_failure(&self, upstream: &str, reason: RetryReason) {
        self.upstreams.responses.with_label_values(&[reason.label(), upstream]).inc();
        self.recent().upstream_errors.add(tokio::time::Instant::now(), 1, 0);
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remember a queue wait for the last minute's p99.
    pub(crate) fn recent_wait(&self, waited: std::time::Duration) {
        let now = tokio::time::Instant::now();
        let mut r = self.recent();
        if r.waits.len() >= MAX_WAITS {
            r.waits.pop_front();
        }
        #[allow(clippy::cast_possible_truncation)]
        r.waits.push_back((now, waited.as_secs_f64() as f32));
    }

    /// The last minute's upstream 429s, errors and p99 queue wait.
    pub(crate) fn last_minute(&self) -> LastMinute {
        let now = tokio::time::Instant::now();
        let mut r = self.recent();
        while r.waits.front().is_some_and(|(at, _)| now.duration_since(*at).as_secs() >= 60) {
            r.waits.pop_front();
        }
        let mut waits: Vec<f32> = r.waits.iter().map(|(_, w)| *w).collect();
        waits.sort_by(f32::total_cmp);
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let p99 = waits
            .get(((waits.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        LastMinute {
            upstream_429s: r.upstream_429s.total(now).0,
            upstream_errors: r.upstream_errors.total(now).0,
            queue_wait_p99: f64::from(p99),
        }
    }

    /// Count an endpoint taken out after failures.
    pub(crate) fn upstream_ejected(&self, upstream: &str) {
        self.upstreams.ejections.with_label_values(&[upstream]).inc();
    }

    /// Set the endpoint gauges to `reports` (endpoints no longer configured disappear).
    pub(crate) fn set_endpoints(&self, reports: &[EndpointReport]) {
        self.upstreams.healthy.reset();
        self.upstreams.limit.reset();
        self.upstreams.remaining.reset();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for r in reports {
            self.upstreams.healthy.with_label_values(&[&r.name]).set(i64::from(r.healthy));
            // Counted from zero, so a rate over it exists before the first ejection.
            self.upstreams.ejections.with_label_values(&[&r.name]);
            for (kind, limit, remaining) in
                [("requests", r.in_force.0, r.remaining.0), ("tokens", r.in_force.1, r.remaining.1)]
            {
                if let Some(l) = limit {
                    self.upstreams.limit.with_label_values(&[&r.name, kind]).set(as_i64(l));
                }
                if let Some(left) = remaining {
                    self.upstreams.remaining.with_label_values(&[&r.name, kind]).set(as_i64(left));
                }
            }
        }
    }

    /// The shared limits now run in `mode` (`shared` or `local`).
    pub(crate) fn set_quota_mode(&self, mode: &str) {
        for m in ["shared", "local"] {
            self.quota_mode.with_label_values(&[m]).set(i64::from(m == mode));
        }
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
        let m = Metrics::new(Registry::new()).unwrap();
        let text = m.render();
        for o in Outcome::ALL {
            let series =
                format!("llmproxy_requests_total{{client=\"anonymous\",outcome=\"{}\"}} 0", o.label());
            assert!(text.contains(&series), "{o:?}");
        }
        for l in Limit::ALL {
            let series =
                format!("llmproxy_throttled_total{{client=\"anonymous\",limit=\"{}\"}} 0", l.label());
            assert!(text.contains(&series), "{l:?}");
        }
        let team = m.client(Some("team-a"));
        team.request_done(Outcome::QueueFull, 0.5);
        team.tokens(TokenKind::Output, 7);
        m.cache(CacheResult::Bypass);
        m.upstream_status("default", 418);
        let text = m.render();
        assert!(text.contains("llmproxy_requests_total{client=\"team-a\",outcome=\"queue_full\"} 1"));
        assert!(text.contains("llmproxy_tokens_total{client=\"team-a\",kind=\"output\"} 7"));
        assert!(text.contains("llmproxy_cache_requests_total{result=\"bypass\"} 1"));
        assert!(text.contains("llmproxy_upstream_responses_total{status=\"4xx\",upstream=\"default\"} 1"));
    }

    #[test]
    fn the_client_label_is_bounded() {
        let m = Metrics::new(Registry::new()).unwrap();
        for i in 0..(MAX_CLIENT_LABELS + 50) {
            m.client(Some(&format!("c{i}"))).request_done(Outcome::Ok, 0.1);
        }
        let text = m.render();
        let names: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("llmproxy_requests_total{"))
            .filter_map(|l| l.split("client=\"").nth(1)?.split('"').next())
            .collect();
        assert!(names.len() <= MAX_CLIENT_LABELS + 1, "{} label values", names.len());
        assert!(names.contains("other"));
    }
}
