//! The operator's own metrics, in a registry passed in (several operators can share a test
//! process). Error labels come from `Error::metric_label`: a closed set, never object names.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Metrics of one operator process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciles by reason.
    pub failures: IntCounterVec,
    /// Time one reconcile takes.
    pub duration: Histogram,
    /// 1 while this instance holds the leader Lease.
    pub leader: IntGauge,
    /// Passes over an LlmProxy's pods that failed (listing its EndpointSlices or writing status).
    pub observe_errors: IntCounter,
    /// Passes over all LlmProxies' pods (one per `--status-interval`).
    pub observe_passes: IntCounter,
    /// Status writes of what the pods report (only when it changed).
    pub observed_writes: IntCounter,
}

impl Metrics {
    /// Register the metrics in `registry`.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let reconciles = IntCounterVec::new(
            Opts::new("llmproxy_operator_reconciles_total", "LlmProxy reconciles by result (ok, error)."),
            &["result"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new("llmproxy_operator_reconcile_errors_total", "Failed LlmProxy reconciles by reason."),
            &["reason"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "llmproxy_operator_reconcile_duration_seconds",
                "Time one LlmProxy reconcile takes.",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let leader =
            IntGauge::new("llmproxy_operator_leader", "1 while this instance holds the leader Lease.")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        let observe_errors = IntCounter::new(
            "llmproxy_operator_observe_errors_total",
            "Passes over an LlmProxy's pods that failed (listing EndpointSlices or writing status).",
        )?;
        registry.register(Box::new(leader.clone()))?;
        let observe_passes = IntCounter::new(
            "llmproxy_operator_observe_passes_total",
            "Passes over all LlmProxies' pods, one per status interval.",
        )?;
        let observed_writes = IntCounter::new(
            "llmproxy_operator_observed_status_writes_total",
            "Status writes of what the proxy pods report (only when it changed).",
        )?;
        registry.register(Box::new(observe_errors.clone()))?;
        registry.register(Box::new(observe_passes.clone()))?;
        registry.register(Box::new(observed_writes.clone()))?;
        for result in ["ok", "error"] {
            reconciles.with_label_values(&[result]);
        }
        for reason in crate::error::Error::LABELS {
            failures.with_label_values(&[reason]);
        }
        Ok(Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            observe_errors,
            observe_passes,
            observed_writes,
        })
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
