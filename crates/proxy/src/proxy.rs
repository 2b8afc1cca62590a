//! The proxy's shared state: the policy snapshot, the admission gate, the upstream client, the
//! cache and the metrics. The routers that serve it live in `routes.rs`, the request path in
//! `request/`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderName;
use llmproxy_api::Policy;
use llmproxy_api::policy::UpstreamPolicy;

use crate::admission::queue::Admission;
use crate::cache::ResponseCache;
use crate::cache::flight::Flights;
use crate::telemetry::labels::Reload;
use crate::telemetry::metrics::Metrics;
use crate::upstream::ApiKey;
use llmproxy_api::ClientKeys;

/// Settings of the process, as opposed to the policy (which reloads).
#[derive(Clone, Debug)]
pub struct Options {
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// Connect timeout towards the upstream.
    pub connect_timeout: Duration,
    /// Request header naming the client in request records (else the body's `user`).
    pub client_id_header: Option<HeaderName>,
    /// Percentage of requests that get a log line (0: none); metrics always count all.
    pub record_percent: u8,
    /// Longest time to receive a request's whole body (slow uploads are cut with a 408).
    pub body_read_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_request_bytes: 8 << 20,
            connect_timeout: Duration::from_secs(10),
            client_id_header: None,
            record_percent: 100,
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// One running proxy: the policy snapshot, the admission gate, the upstream client.
pub struct Proxy {
    policy: ArcSwap<Policy>,
    /// The key of the one endpoint of `spec.upstream` when it comes from outside the manifest
    /// (`LLMPROXY_UPSTREAM_API_KEY`, `--upstream-api-key-file`).
    api_key: ArcSwapOption<ApiKey>,
    /// Keys by (Secret name, key), from the cluster's Secrets or `--secrets-dir`.
    secret_keys: ArcSwap<HashMap<(String, String), Arc<ApiKey>>>,
    client_keys: ArcSwapOption<ClientKeys>,
    /// Client keys are required (the policy names them, or a keys file was given): until they
    /// are loaded nobody gets in.
    keys_required: AtomicBool,
    admission: Arc<Admission>,
    pool: crate::upstream::pool::Pool,
    cache: Arc<ResponseCache>,
    flights: Arc<Flights>,
    metrics: Arc<Metrics>,
    options: Options,
    ready: AtomicBool,
    /// The policy source runs (or there is none to run).
    source_up: AtomicBool,
    /// Cluster mode with an `apiKeySecretRef`: not ready until the key has been read.
    key_required: AtomicBool,
    next_id: AtomicU64,
    /// `req-` and this process' id: read once, not with a system call per request.
    id_prefix: String,
    /// The shared buckets' mode and members (with `sharedState` or `quotaRef`).
    shared: Arc<crate::admission::shared::SharedState>,
    /// The lessee runs (started once, by `share`).
    sharing: AtomicBool,
    /// Replicas the cluster reports (0: unknown), a floor for the members without Redis.
    replicas: Arc<std::sync::atomic::AtomicU32>,
    /// Why nothing is admitted (the LlmQuota grant was withdrawn), if so.
    withheld: ArcSwapOption<String>,
}

impl Proxy {
    /// A proxy serving `policy`, with its metrics in `metrics`.
    pub fn new(policy: Policy, metrics: Metrics, options: Options) -> Arc<Self> {
        let metrics = Arc::new(metrics);
        let proxy = Arc::new(Self {
            admission: Admission::new(&policy, Arc::clone(&metrics)),
            pool: crate::upstream::pool::Pool::new(options.connect_timeout),
            cache: Arc::new(ResponseCache::new(policy.cache.as_ref())),
            flights: Arc::default(),
            policy: ArcSwap::from_pointee(policy),
            api_key: ArcSwapOption::empty(),
            secret_keys: ArcSwap::default(),
            client_keys: ArcSwapOption::empty(),
            keys_required: AtomicBool::new(false),
            metrics,
            options,
            ready: AtomicBool::new(true),
            source_up: AtomicBool::new(true),
            key_required: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            id_prefix: format!("req-{:08x}", std::process::id()),
            shared: Arc::default(),
            sharing: AtomicBool::new(false),
            replicas: Arc::default(),
            withheld: ArcSwapOption::empty(),
        });
        let policy = proxy.policy.load_full();
        proxy.metrics.init_upstreams(policy.upstreams.iter().map(|u| u.name.as_str()));
        proxy.admission.set_byte_budget(policy.queue.max_bytes);
        proxy.update_gauges();
        proxy.metrics.source_up.set(1);
        proxy
    }

    /// Start sharing buckets through Redis as `identity` whenever the policy says so: one lessee
    /// for the LlmProxy's buckets and one for its LlmQuota's, each with its own connection (a
    /// policy without shared state leaves them idle). Once per proxy.
    pub fn share(self: &Arc<Self>, identity: crate::admission::shared::Identity) {
        if self.sharing.swap(true, Ordering::SeqCst) {
            return;
        }
        let state = Arc::clone(&self.shared);
        let weak: std::sync::Weak<dyn crate::admission::shared::Host> =
            Arc::downgrade(self) as std::sync::Weak<Self>;
        // Supervised: a panic is logged and the lessee starts again (stocks carry over); it
        // ends only with the proxy.
        for store in crate::admission::shared::Store::ALL {
            let (weak, identity, state) = (weak.clone(), identity.clone(), Arc::clone(&state));
            tokio::spawn(async move {
                loop {
                    let run = tokio::spawn(crate::admission::shared::run(
                        weak.clone(),
                        identity.clone(),
                        Arc::clone(&state),
                        store,
                    ));
                    match run.await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(error = %e, ?store, "a shared-quota lessee stopped; starting it again in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            if weak.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }

    /// The replicas the cluster runs of this LlmProxy (what the operator reports), so that a pod
    /// cut off from Redis divides by at least that many.
    pub(crate) fn set_replicas(&self, replicas: u32) {
        self.replicas.store(replicas, Ordering::Relaxed);
    }

    /// The replica count to divide by without Redis: the cluster's, else `fallback`.
    pub(crate) fn replicas_hint(&self, fallback: u32) -> Arc<std::sync::atomic::AtomicU32> {
        let _ = self.replicas.compare_exchange(0, fallback.max(1), Ordering::Relaxed, Ordering::Relaxed);
        Arc::clone(&self.replicas)
    }

    /// The value stored under `key` in Secret `secret`, if loaded (the Redis password).
    pub(crate) fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        self.secret_keys.load().get(&(secret.to_owned(), key.to_owned())).map(|k| k.expose().to_owned())
    }

    /// The policy in force (a snapshot; reloads swap it atomically).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Put a new policy in force. Limiter state carries over; limits that did not change keep
    /// their buckets exactly as they were.
    pub fn apply_policy(&self, policy: Policy) -> Reload {
        if **self.policy.load() == policy {
            self.metrics.reload(Reload::Unchanged);
            return Reload::Unchanged;
        }
        self.admission.reconfigure(&policy);
        self.metrics.init_upstreams(policy.upstreams.iter().map(|u| u.name.as_str()));
        self.admission.set_byte_budget(policy.queue.max_bytes);
        self.cache.reconfigure(policy.cache.as_ref());
        self.policy.store(Arc::new(policy));
        self.update_gauges();
        self.metrics.reload(Reload::Applied);
        Reload::Applied
    }

    /// Admit nothing, answering 503 with `reason` (the LlmQuota grant was withdrawn), or admit
    /// again (`None`): the last good policy must not go on drawing on a quota no longer granted.
    /// Whether that changed anything.
    pub(crate) fn withhold(&self, reason: Option<String>) -> bool {
        let before = self.withheld.swap(reason.map(Arc::new));
        before.as_deref() != self.withheld.load().as_deref()
    }

    /// Why nothing is admitted, if so.
    pub(crate) fn withheld(&self) -> Option<Arc<String>> {
        self.withheld.load_full()
    }

    /// Count a policy that was refused (the last good one keeps serving).
    pub(crate) fn reject_policy(&self) {
        self.metrics.reload(Reload::Rejected);
    }

    fn update_gauges(&self) {
        let p = self.policy.load();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.limit_requests_per_minute.set(as_i64(p.limits.requests_per_minute));
        self.metrics.limit_tokens_per_minute.set(as_i64(p.limits.tokens_per_minute.unwrap_or(0)));
        self.metrics.queue_capacity.set(as_i64(p.queue.max_size as u64));
    }

    /// Set or rotate the key of the one endpoint of `spec.upstream` (from the environment or
    /// a key file); the next upstream request uses it. Never sent to any endpoint of
    /// `spec.upstreams`: those take theirs from their own Secret references.
    pub fn set_api_key(&self, key: Option<ApiKey>) {
        self.api_key.store(key.map(Arc::new));
    }

    /// Set or rotate the key stored under `key` in Secret `secret` (`None`: it is gone).
    pub(crate) fn set_secret_key(&self, secret: &str, key: &str, value: Option<ApiKey>) {
        let id = (secret.to_owned(), key.to_owned());
        self.secret_keys.rcu(|keys| {
            let mut keys = HashMap::clone(keys);
            match &value {
                Some(v) => keys.insert(id.clone(), Arc::new(v.clone())),
                None => keys.remove(&id),
            };
            keys
        });
    }

    /// The key for `endpoint` of `policy`: from its Secret reference, else (for the one
    /// endpoint of `spec.upstream`) the key given from outside.
    pub(crate) fn key_for(&self, policy: &Policy, endpoint: &UpstreamPolicy) -> Option<Arc<ApiKey>> {
        if let Some(r) = &endpoint.api_key_secret_ref
            && let Some(key) = self.secret_keys.load().get(&(r.name.clone(), r.key.clone()))
        {
            return Some(Arc::clone(key));
        }
        (policy.upstreams.len() == 1).then(|| self.api_key.load_full()).flatten()
    }

    /// The endpoints of the policy in force whose key has not been loaded.
    fn keys_missing(&self) -> Vec<String> {
        let policy = self.policy.load();
        policy
            .upstreams
            .iter()
            .filter(|u| u.api_key_secret_ref.is_some() && self.key_for(&policy, u).is_none())
            .map(|u| u.name.clone())
            .collect()
    }

    /// Set or rotate the client keys; the next request is checked against them.
    pub fn set_client_keys(&self, keys: Option<ClientKeys>) {
        self.client_keys.store(keys.map(Arc::new));
    }

    /// Require a client key on every request (or stop requiring one).
    pub fn require_client_keys(&self, required: bool) {
        self.keys_required.store(required, Ordering::SeqCst);
    }

    /// The client keys in force, when keys are required (`Some(None)`: required, not loaded).
    pub(crate) fn client_keys(&self) -> Option<Option<Arc<ClientKeys>>> {
        self.keys_required.load(Ordering::SeqCst).then(|| self.client_keys.load_full())
    }

    /// The metrics this proxy reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The admission gate (queue depth and limiter state, for tests and status).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    pub(crate) fn pool(&self) -> &crate::upstream::pool::Pool {
        &self.pool
    }

    pub(crate) fn cache(&self) -> &Arc<ResponseCache> {
        &self.cache
    }

    /// Requests in flight that identical ones wait on (coalescing).
    pub fn flights(&self) -> &Arc<Flights> {
        &self.flights
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    /// Report not-ready (during shutdown, so load balancers stop sending).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the policy source runs; while it does not, the proxy reports not ready (it keeps
    /// serving its last good policy, but its policy no longer follows the source).
    pub(crate) fn set_source_up(&self, up: bool) {
        self.source_up.store(up, Ordering::SeqCst);
        self.metrics.source_up.set(i64::from(up));
    }

    /// Whether `/readyz` waits for every endpoint's key (so no request goes out without one).
    pub fn set_key_required(&self, required: bool) {
        self.key_required.store(required, Ordering::SeqCst);
    }

    /// Why the proxy is not ready, if it is not.
    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::SeqCst) {
            return Some("shutting down");
        }
        if !self.source_up.load(Ordering::SeqCst) {
            return Some("the policy source stopped and is being restarted");
        }
        if self.key_required.load(Ordering::SeqCst) && !self.keys_missing().is_empty() {
            return Some("waiting for the upstream API key Secret");
        }
        if self.keys_required.load(Ordering::SeqCst) && self.client_keys.load().is_none() {
            return Some("waiting for the client keys");
        }
        None
    }

    /// What this pod reports on `/status`.
    pub fn report(&self) -> llmproxy_api::ProxyReport {
        self.update_saturation();
        let as_i64 = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let upstreams = self
            .admission
            .endpoints()
            .into_iter()
            .map(|e| llmproxy_api::UpstreamStatus {
                name: e.name,
                observed_limits: (e.observed != (None, None)).then(|| llmproxy_api::ObservedLimits {
                    requests_per_minute: as_i64(e.observed.0),
                    tokens_per_minute: as_i64(e.observed.1),
                }),
                healthy: e.healthy,
                last_error: e.last_error,
                exhausted: e.exhausted,
            })
            .collect();
        let (requests_last_minute, tokens_last_minute) = self.admission.last_minute();
        let recent = self.metrics.last_minute();
        llmproxy_api::ProxyReport {
            upstreams,
            requests_last_minute,
            tokens_last_minute,
            queue_depth: self.admission.waiting() as u64,
            inflight: u64::from(self.admission.inflight()),
            max_concurrent: u64::from(self.policy().limits.max_concurrent),
            queue_wait_p99_seconds: recent.queue_wait_p99,
            upstream429s_last_minute: recent.upstream_429s,
            upstream_errors_last_minute: recent.upstream_errors,
            quota_mode: self.shared.mode().map(|m| m.label().to_owned()),
        }
    }

    /// `llmproxy_saturation`: in flight, plus those waiting for a slot while all are taken,
    /// over `maxConcurrent`.
    pub(crate) fn update_saturation(&self) {
        let max = f64::from(self.policy().limits.max_concurrent.max(1));
        let inflight = f64::from(self.admission.inflight());
        #[allow(clippy::cast_precision_loss)]
        let waiting = self.admission.waiting() as f64;
        let busy = if inflight >= max { inflight + waiting } else { inflight };
        self.metrics.saturation.set(busy / max);
    }

    pub(crate) fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:08x}", self.id_prefix)
    }
}

impl crate::admission::shared::Host for Proxy {
    fn policy(&self) -> Arc<Policy> {
        Proxy::policy(self)
    }

    fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        Proxy::secret_value(self, secret, key)
    }

    fn replicas(&self, fallback: u32) -> u32 {
        self.replicas_hint(fallback).load(Ordering::Relaxed)
    }

    fn admission(&self) -> &Arc<Admission> {
        Proxy::admission(self)
    }

    fn metrics(&self) -> &Arc<Metrics> {
        Proxy::metrics(self)
    }
}
