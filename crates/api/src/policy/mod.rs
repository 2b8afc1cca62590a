//! The runtime policy: an `LlmProxySpec` checked once and turned into plain numbers, so the
//! proxy's hot path never re-validates and a bad spec never reaches it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::paths::{DEFAULT_ALLOWED_PATHS, PathRule};
use crate::spec::{
    CacheScope, ClientPriority, ClientSettings, EndpointSpec, KeyHeader, LlmProxySpec, ModelLimitsSpec,
    Protocol, SecretKeyRef, TokenAccounting, UpstreamSpec,
};

/// Everything the data plane needs to serve one LlmProxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Where requests go: the endpoints of `spec.upstreams`, or the one of `spec.upstream`
    /// (named [`DEFAULT_ENDPOINT`]). Never empty.
    pub upstreams: Vec<UpstreamPolicy>,
    /// The quota to stay inside.
    pub limits: LimitsPolicy,
    /// How requests over the quota wait.
    pub queue: QueuePolicy,
    /// How transient failures are retried.
    pub retry: RetryPolicy,
    /// `None` when caching is off.
    pub cache: Option<CachePolicy>,
    /// Client identity and fairness; `None`: one anonymous client.
    pub clients: Option<ClientsPolicy>,
    /// Where the replicas share their buckets; `None`: each pod enforces its share.
    pub shared: Option<SharedPolicy>,
    /// The organisation-wide quota drawn from too; `None`: none.
    pub quota: Option<QuotaPolicy>,
}

/// A Redis that holds shared buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPolicy {
    /// `redis://` or `rediss://` URL, without a password.
    pub url: String,
    /// The password's Secret and key; `None`: no password.
    pub password: Option<crate::quota::RedisPasswordRef>,
    /// The namespace of the password Secret when it is not the LlmProxy's (an LlmQuota's).
    pub password_namespace: Option<String>,
}

/// The name a proxy keeps Secret `name` under among the Secrets it loaded: one of another
/// namespace (an LlmQuota's) as `NAMESPACE/NAME`, a name no Secret of the LlmProxy's own
/// namespace can have, so no reference in a tenant's spec can resolve to it.
pub fn secret_slot(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

impl SharedPolicy {
    /// Where the password is kept among the Secrets a proxy loaded (see [`secret_slot`]).
    pub fn password_slot(&self) -> Option<(String, String)> {
        let r = self.password.as_ref()?;
        Some((secret_slot(self.password_namespace.as_deref(), &r.name), r.key.clone()))
    }
}

/// An LlmQuota as one consumer draws from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaPolicy {
    /// Its name, which names its buckets in Redis.
    pub name: String,
    /// Requests per minute, all consumers together.
    pub requests_per_minute: u64,
    /// Tokens per minute, all consumers together.
    pub tokens_per_minute: Option<u64>,
    /// Per-model limits within it.
    pub models: BTreeMap<String, ModelLimits>,
    /// Its Redis.
    pub redis: SharedPolicy,
    /// This consumer's weight under contention (>= 1).
    pub weight: u32,
    /// This consumer's guaranteed percent (0..=100).
    pub guaranteed: u32,
}

/// Clients, resolved: every field has its value.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientsPolicy {
    /// The Secret of client keys (cluster mode); `None`: no keys.
    pub keys_secret: Option<String>,
    /// Every client without an override.
    pub default: ClientPolicy,
    /// Named clients.
    pub overrides: std::collections::BTreeMap<String, ClientPolicy>,
    /// Longest interactive traffic may hold a batch request back.
    pub batch_max_delay: Duration,
}

impl ClientsPolicy {
    /// The settings of client `name`.
    pub fn client(&self, name: &str) -> &ClientPolicy {
        self.overrides.get(name).unwrap_or(&self.default)
    }
}

/// One client's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientPolicy {
    /// Weight under contention (>= 1).
    pub weight: u32,
    /// Scheduling class.
    pub priority: ClientPriority,
    /// Cap on its requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Cap on its tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Longest wait of its requests.
    pub max_wait: Duration,
    /// Most of its requests waiting at once.
    pub max_queued: usize,
}

/// The name of the one endpoint of `spec.upstream`, in metrics and status.
pub const DEFAULT_ENDPOINT: &str = "default";

/// One upstream endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamPolicy {
    /// Its name (`default` for `spec.upstream`).
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub url: String,
    /// Where the API key lives (a Secret in the cluster, `--secrets-dir` standalone).
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// How the key is sent.
    pub key_header: KeyHeader,
    /// The wait for response headers, and the longest gap between chunks after that.
    pub timeout: Duration,
    /// What may pass upstream.
    pub allowed_paths: Vec<PathRule>,
    /// Account-choosing client headers that pass (lower case).
    pub allowed_client_headers: Vec<String>,
    /// Share among endpoints that could take a request equally soon (>= 1).
    pub weight: u32,
    /// The models it serves; `None`: all.
    pub models: Option<Vec<String>>,
    /// Its own quota (for `spec.upstream`: the LlmProxy's limits).
    pub limits: EndpointLimits,
    /// The HTTP version spoken to it.
    pub protocol: Protocol,
    /// The most requests in flight on one of its HTTP/2 connections (>= 1).
    pub max_streams_per_connection: u32,
}

impl UpstreamPolicy {
    /// Whether it serves `model` (a request without a model goes anywhere).
    pub fn serves(&self, model: Option<&str>) -> bool {
        match (&self.models, model) {
            (Some(models), Some(m)) => models.iter().any(|x| x == m),
            _ => true,
        }
    }
}

/// An endpoint's own limits, resolved; absent rates are not limited at the endpoint (until its
/// headers report a limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Requests that may start back to back.
    pub request_burst: u64,
    /// Tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Token bucket capacity.
    pub token_burst: u64,
    /// Per-model limits.
    pub models: BTreeMap<String, ModelLimits>,
}

impl EndpointLimits {
    /// The limits of the one endpoint of `spec.upstream`: the LlmProxy's own.
    pub fn of(limits: &LimitsPolicy) -> Self {
        Self {
            requests_per_minute: Some(limits.requests_per_minute),
            request_burst: limits.request_burst,
            tokens_per_minute: limits.tokens_per_minute,
            token_burst: limits.token_burst,
            models: BTreeMap::new(),
        }
    }
}

/// One model's limits, resolved (bursts of one second's worth).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute.
    pub tokens_per_minute: Option<u64>,
}

impl ModelLimits {
    fn divided(self, n: u64) -> Self {
        Self {
            requests_per_minute: self.requests_per_minute.map(|r| (r / n).max(1)),
            tokens_per_minute: self.tokens_per_minute.map(|t| (t / n).max(1)),
        }
    }
}

/// Rates, already resolved (burst defaults applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsPolicy {
    /// Requests per minute.
    pub requests_per_minute: u64,
    /// Requests that may start back to back.
    pub request_burst: u64,
    /// Tokens per minute, `None` for unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Token bucket capacity.
    pub token_burst: u64,
    /// Upstream requests in flight at once.
    pub max_concurrent: u32,
    /// Completion tokens reserved when a request names no maximum.
    pub default_max_tokens: u32,
    /// How the upstream counts tokens.
    pub token_accounting: TokenAccounting,
    /// The largest charge one request may have: the LlmProxy's whole tokens per minute
    /// (what the provider refuses as too large), not this replica's share of it.
    pub max_request_tokens: Option<u64>,
    /// Per-model limits within the totals.
    pub models: BTreeMap<String, ModelLimits>,
}

impl LimitsPolicy {
    /// Limits with the documented defaults for everything but the two rates (for tests and
    /// tools that build a policy without a spec).
    pub fn per_minute(requests: u64, tokens: Option<u64>) -> Self {
        Self {
            requests_per_minute: requests,
            request_burst: per_second(requests),
            tokens_per_minute: tokens,
            token_burst: tokens.map_or(0, per_second),
            max_concurrent: 64,
            default_max_tokens: 1024,
            token_accounting: TokenAccounting::Requested,
            max_request_tokens: tokens,
            models: BTreeMap::new(),
        }
    }
}

/// The admission queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Waiting requests at once.
    pub max_size: usize,
    /// Longest wait for admission.
    pub max_wait: Duration,
    /// Bytes of request bodies held by waiting and in-flight requests at once.
    pub max_bytes: u64,
}

/// Retry schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, first included (>= 1).
    pub max_attempts: u32,
    /// First back-off.
    pub initial_backoff: Duration,
    /// Cap on any back-off.
    pub max_backoff: Duration,
    /// Growth factor (>= 1).
    pub multiplier: f64,
    /// Randomise back-offs.
    pub jitter: bool,
    /// Retries after errors, as a share of first attempts over the budget's window.
    pub budget_ratio: f64,
    /// Retries allowed per second whatever the traffic.
    pub budget_min_per_second: u32,
}

/// The response cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePolicy {
    /// Time to live of an entry (> 0).
    pub ttl: Duration,
    /// Entries held at most.
    pub max_entries: u64,
    /// Bytes held at most.
    pub max_bytes: u64,
    /// Who shares entries; `None`: each client when client keys are in force, else everyone.
    pub scope: Option<CacheScope>,
}

impl CachePolicy {
    /// Whether entries are kept per client, for a request whose client is `named` (client keys
    /// in force) or not.
    pub fn per_client(&self, named: bool) -> bool {
        self.scope.map_or(named, |s| s == CacheScope::Client)
    }
}

/// One reason a spec cannot run, naming the field the way `kubectl explain` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path such as `spec.limits.requestsPerMinute` or `spec.upstreams[1].url`.
    pub field: String,
    /// What is wrong, e.g. `must be > 0`.
    pub message: String,
}

/// Every reason a spec cannot run, so a user fixes them all in one edit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError(pub Vec<FieldError>);

impl PolicyError {
    /// One problem with one field.
    pub fn one(field: &str, message: impl Into<String>) -> Self {
        Self(vec![FieldError { field: field.to_owned(), message: message.into() }])
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

/// Collects field errors while a spec is checked.
struct Check(Vec<FieldError>);

/// Upper bounds of the durations (the CRD schema says the same in CEL): beyond them a value is a
/// mistake, and deadline arithmetic stays far from overflow.
pub const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest `queue.maxWait`.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The longest retry back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The longest cache TTL.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl Check {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError { field: field.to_owned(), message: message.into() });
    }

    /// A duration no longer than `max` (spelled as in the schema message).
    fn at_most(&mut self, field: &str, d: Duration, max: Duration, spelled: &str) -> Duration {
        if d > max {
            self.fail(field, format!("must be at most {spelled}"));
            return max;
        }
        d
    }

    /// A positive integer as u64, or an error naming the field.
    fn positive(&mut self, field: &str, v: i64) -> u64 {
        if v <= 0 {
            self.fail(field, "must be > 0");
            return 1;
        }
        v.unsigned_abs()
    }

    /// A positive quantity of bytes.
    fn quantity(&mut self, field: &str, q: &str) -> u64 {
        match crate::quantity::bytes(q) {
            Ok(0) => {
                self.fail(field, "must be > 0");
                1
            }
            Ok(n) => n,
            Err(e) => {
                self.fail(field, e);
                1
            }
        }
    }

    fn non_negative(&mut self, field: &str, v: i64) -> u64 {
        if v < 0 {
            self.fail(field, "must be >= 0");
            return 0;
        }
        v.unsigned_abs()
    }
}

/// An upstream base URL the proxy may send its key to: `https://`, or `http://` to loopback (or
/// with `allow_insecure`); no user info, query or fragment (where credentials and surprises hide).
fn check_url(url: &str, allow_insecure: bool) -> Result<(), String> {
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if !is_loopback(authority) && !allow_insecure {
            return Err(format!(
                "{url:?} is plain http to a non-loopback host: use https://, or set allowInsecure: true"
            ));
        }
        rest
    } else {
        return Err(format!("must be an http(s) URL, got {url:?}"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("must be an http(s) URL, got {url:?}"));
    }
    if authority.contains('@') {
        return Err("must not carry user info (put the key in apiKeySecretRef)".to_owned());
    }
    if rest.contains(['?', '#']) {
        return Err("must not carry a query or fragment".to_owned());
    }
    Ok(())
}

/// Whether a URL's `host[:port]` names this machine whatever DNS says: an IPv4 literal in
/// 127.0.0.0/8, the IPv6 literal `[::1]`, or `localhost`. A name that merely starts like one
/// (`127.0.0.1.attacker.example`) resolves wherever its owner wants.
fn is_loopback(authority: &str) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, port)) => {
                let Ok(ip) = ip.parse::<std::net::Ipv6Addr>() else { return false };
                if !ip.is_loopback() {
                    return false;
                }
                ("localhost", port)
            }
            None => return false,
        },
        None => authority.split_at(authority.find(':').unwrap_or(authority.len())),
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok =
        host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.octets()[0] == 127);
    port_ok && host_ok
}

/// One second's worth of a per-minute rate, at least 1.
pub fn per_second(per_minute: u64) -> u64 {
    per_minute.div_ceil(60).max(1)
}

impl Policy {
    /// This replica's share when `replicas` pods split the quota without shared state: rates
    /// and bursts divided (never below 1 per minute and 1 in a burst); concurrency and queue
    /// are per pod already.
    #[must_use]
    pub fn for_replicas(mut self, replicas: u32) -> Self {
        let n = u64::from(replicas.max(1));
        // Shared buckets hold for all pods together; without Redis, the proxies divide by the
        // members they know of themselves.
        if n == 1 || self.shared.is_some() {
            return self;
        }
        if let Some(clients) = &mut self.clients {
            for c in std::iter::once(&mut clients.default).chain(clients.overrides.values_mut()) {
                c.requests_per_minute = c.requests_per_minute.map(|r| (r / n).max(1));
                c.tokens_per_minute = c.tokens_per_minute.map(|t| (t / n).max(1));
            }
        }
        let l = &mut self.limits;
        l.requests_per_minute = (l.requests_per_minute / n).max(1);
        l.request_burst = (l.request_burst / n).max(1);
        l.tokens_per_minute = l.tokens_per_minute.map(|t| (t / n).max(1));
        if let Some(tpm) = l.tokens_per_minute {
            l.token_burst = (l.token_burst / n).max(per_second(tpm));
        }
        for m in l.models.values_mut() {
            *m = m.divided(n);
        }
        for u in &mut self.upstreams {
            let e = &mut u.limits;
            e.requests_per_minute = e.requests_per_minute.map(|r| (r / n).max(1));
            e.request_burst = (e.request_burst / n).max(1);
            e.tokens_per_minute = e.tokens_per_minute.map(|t| (t / n).max(1));
            if let Some(tpm) = e.tokens_per_minute {
                e.token_burst = (e.token_burst / n).max(per_second(tpm));
            }
            for m in e.models.values_mut() {
                *m = m.divided(n);
            }
        }
        self
    }

    /// The longest `timeout` of any endpoint.
    pub fn longest_timeout(&self) -> Duration {
        self.upstreams.iter().map(|u| u.timeout).max().unwrap_or(MAX_UPSTREAM_TIMEOUT)
    }

    /// The endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Option<&UpstreamPolicy> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Check a spec and resolve its defaults; the error names every bad field.
    pub fn from_spec(spec: &LlmProxySpec) -> Result<Self, PolicyError> {
        let mut c = Check(Vec::new());

        let l = &spec.limits;
        let rpm = c.positive("spec.limits.requestsPerMinute", l.requests_per_minute);
        let tpm = l.tokens_per_minute.map(|t| c.positive("spec.limits.tokensPerMinute", t));
        let request_burst = match l.burst {
            Some(b) => {
                let b = c.positive("spec.limits.burst", b);
                if b > rpm {
                    c.fail("spec.limits.burst", "must not exceed requestsPerMinute");
                }
                b
            }
            None => per_second(rpm),
        };
        let max_concurrent = c.positive("spec.limits.maxConcurrent", l.max_concurrent.into());
        let models = model_limits(&mut c, "spec.limits.models", &l.models);
        let total = EndpointLimits {
            requests_per_minute: Some(rpm),
            request_burst,
            tokens_per_minute: tpm,
            token_burst: tpm.map_or(0, per_second),
            models: BTreeMap::new(),
        };
        let upstreams = match (&spec.upstream, &spec.upstreams) {
            (Some(u), None) => vec![endpoint(&mut c, "spec.upstream", DEFAULT_ENDPOINT, u, 1, None, total)],
            (None, Some(list)) if !list.is_empty() => {
                let mut names = std::collections::BTreeSet::new();
                list.iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let field = format!("spec.upstreams[{i}]");
                        if !names.insert(e.name.as_str()) {
                            c.fail(&format!("{field}.name"), format!("{:?} is used twice", e.name));
                        }
                        endpoint_of(&mut c, &field, e)
                    })
                    .collect()
            }
            (Some(_), Some(_)) => {
                c.fail("spec", "set exactly one of upstream (one endpoint) or upstreams (several)");
                Vec::new()
            }
            (None, _) => {
                c.fail("spec.upstream", "required (or spec.upstreams)");
                Vec::new()
            }
        };
        let default_max_tokens = c.positive("spec.limits.defaultMaxTokens", l.default_max_tokens.into());

        let max_size = c.non_negative("spec.queue.maxSize", spec.queue.max_size.into());
        let max_wait = c.at_most("spec.queue.maxWait", spec.queue.max_wait.get(), MAX_QUEUE_WAIT, "24h");
        let queue_bytes = c.quantity("spec.queue.maxBytes", &spec.queue.max_bytes.0);

        let r = &spec.retry;
        let initial_backoff =
            c.at_most("spec.retry.initialBackoff", r.initial_backoff.get(), MAX_BACKOFF, "1h");
        let max_backoff = c.at_most("spec.retry.maxBackoff", r.max_backoff.get(), MAX_BACKOFF, "1h");
        let max_attempts = c.positive("spec.retry.maxAttempts", r.max_attempts.into());
        if r.initial_backoff.get() > r.max_backoff.get() {
            c.fail("spec.retry.initialBackoff", "must not exceed maxBackoff");
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            c.fail("spec.retry.multiplier", "must be >= 1");
        }
        let budget_percent =
            u32::try_from(c.non_negative("spec.retry.budget.percent", r.budget.percent.into()))
                .unwrap_or(u32::MAX);
        let budget_floor = u32::try_from(
            c.non_negative("spec.retry.budget.minRetriesPerSecond", r.budget.min_retries_per_second.into()),
        )
        .unwrap_or(u32::MAX);

        let cache = match &spec.cache {
            Some(cache) if !cache.ttl.get().is_zero() => Some(CachePolicy {
                ttl: c.at_most("spec.cache.ttl", cache.ttl.get(), MAX_CACHE_TTL, "720h"),
                max_entries: c.positive("spec.cache.maxEntries", cache.max_entries),
                max_bytes: c.quantity("spec.cache.maxBytes", &cache.max_bytes.0),
                scope: cache.scope,
            }),
            _ => None,
        };

        let queue_size = usize::try_from(max_size).unwrap_or(usize::MAX);
        let clients = spec.clients.as_ref().map(|cs| {
            let default =
                client_policy(&mut c, "spec.clients.default", &cs.default, None, max_wait, queue_size);
            let mut overrides = std::collections::BTreeMap::new();
            for o in &cs.overrides {
                let resolved = client_policy(
                    &mut c,
                    "spec.clients.overrides",
                    &o.settings,
                    Some(&cs.default),
                    max_wait,
                    queue_size,
                );
                if overrides.insert(o.name.clone(), resolved).is_some() {
                    c.fail("spec.clients.overrides", format!("client {:?} is named twice", o.name));
                }
            }
            ClientsPolicy {
                keys_secret: cs.keys_secret_ref.as_ref().map(|r| r.name.clone()),
                default,
                overrides,
                batch_max_delay: c.at_most(
                    "spec.clients.batchMaxDelay",
                    cs.batch_max_delay.get(),
                    MAX_QUEUE_WAIT,
                    "24h",
                ),
            }
        });

        if !c.0.is_empty() {
            return Err(PolicyError(c.0));
        }
        Ok(Self {
            upstreams,
            limits: LimitsPolicy {
                requests_per_minute: rpm,
                request_burst,
                tokens_per_minute: tpm,
                token_burst: tpm.map_or(0, per_second),
                max_concurrent: u32::try_from(max_concurrent).unwrap_or(u32::MAX),
                default_max_tokens: u32::try_from(default_max_tokens).unwrap_or(u32::MAX),
                token_accounting: l.token_accounting,
                max_request_tokens: tpm,
                models,
            },
            queue: QueuePolicy {
                max_size: usize::try_from(max_size).unwrap_or(usize::MAX),
                max_wait,
                max_bytes: queue_bytes,
            },
            retry: RetryPolicy {
                max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
                initial_backoff,
                max_backoff,
                multiplier: r.multiplier,
                jitter: r.jitter,
                budget_ratio: f64::from(budget_percent) / 100.0,
                budget_min_per_second: budget_floor,
            },
            cache,
            clients,
            shared: spec.shared_state.as_ref().map(|s| SharedPolicy {
                url: s.redis.url.clone(),
                password: s.redis.password_secret_ref.clone(),
                password_namespace: None,
            }),
            quota: None,
        })
    }

    /// Add the LlmQuota of `spec.quotaRef`, as granted. Without `sharedState` of its own, the
    /// LlmProxy's buckets are shared through the quota's Redis too.
    pub fn with_quota(mut self, granted: &crate::quota::GrantedQuota) -> Result<Self, PolicyError> {
        let mut c = Check(Vec::new());
        let rpm = c.positive("status.quota.requestsPerMinute", granted.requests_per_minute);
        let tpm = granted.tokens_per_minute.map(|t| c.positive("status.quota.tokensPerMinute", t));
        let models = model_limits(&mut c, "status.quota.models", &granted.models);
        let weight = c.positive("status.quota.weight", granted.weight.into());
        let guaranteed = c.non_negative("status.quota.guaranteed", granted.guaranteed.unwrap_or(0).into());
        if guaranteed > 100 {
            c.fail("status.quota.guaranteed", "must be at most 100");
        }
        if !c.0.is_empty() {
            return Err(PolicyError(c.0));
        }
        let redis = SharedPolicy {
            url: granted.redis.url.clone(),
            password: granted.redis.password_secret_ref.clone(),
            password_namespace: granted.password_namespace.clone(),
        };
        if self.shared.is_none() {
            self.shared = Some(redis.clone());
        }
        self.quota = Some(QuotaPolicy {
            name: granted.name.clone(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            models,
            redis,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
            guaranteed: u32::try_from(guaranteed).unwrap_or(100),
        });
        Ok(self)
    }
}

/// One endpoint of `spec.upstreams`.
fn endpoint_of(c: &mut Check, field: &str, e: &EndpointSpec) -> UpstreamPolicy {
    let l = e.limits.clone().unwrap_or_default();
    let rpm = l.requests_per_minute.map(|r| c.positive(&format!("{field}.limits.requestsPerMinute"), r));
    let tpm = l.tokens_per_minute.map(|t| c.positive(&format!("{field}.limits.tokensPerMinute"), t));
    let limits = EndpointLimits {
        requests_per_minute: rpm,
        request_burst: rpm.map_or(1, per_second),
        tokens_per_minute: tpm,
        token_burst: tpm.map_or(0, per_second),
        models: model_limits(c, &format!("{field}.limits.models"), &l.models),
    };
    let weight = c.positive(&format!("{field}.weight"), e.weight.into());
    if e.models.as_ref().is_some_and(Vec::is_empty) {
        c.fail(&format!("{field}.models"), "must name at least one model (or be left out for all)");
    }
    endpoint(c, field, &e.name, &e.upstream, weight, e.models.clone(), limits)
}

/// An endpoint from its `UpstreamSpec` fields, checked.
fn endpoint(
    c: &mut Check,
    field: &str,
    name: &str,
    u: &UpstreamSpec,
    weight: u64,
    models: Option<Vec<String>>,
    limits: EndpointLimits,
) -> UpstreamPolicy {
    let url = u.url.trim_end_matches('/').to_owned();
    if let Err(e) = check_url(&url, u.allow_insecure) {
        c.fail(&format!("{field}.url"), e);
    }
    let allowed_paths = match &u.allowed_paths {
        None => DEFAULT_ALLOWED_PATHS.iter().filter_map(|r| PathRule::parse(r).ok()).collect(),
        Some(rules) => rules
            .iter()
            .filter_map(|r| PathRule::parse(r).map_err(|e| c.fail(&format!("{field}.allowedPaths"), e)).ok())
            .collect(),
    };
    let timeout_field = format!("{field}.timeout");
    let timeout = c.at_most(&timeout_field, u.timeout.get(), MAX_UPSTREAM_TIMEOUT, "1h");
    if timeout.is_zero() {
        c.fail(&timeout_field, "must be greater than 0s");
    }
    UpstreamPolicy {
        name: name.to_owned(),
        url,
        api_key_secret_ref: u.api_key_secret_ref.clone(),
        key_header: u.key_header,
        timeout,
        allowed_paths,
        allowed_client_headers: u.allowed_client_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        weight: u32::try_from(weight).unwrap_or(u32::MAX),
        models,
        limits,
        protocol: u.protocol,
        max_streams_per_connection: streams_per_connection(c, field, u.max_streams_per_connection),
    }
}

/// Requests in flight on one HTTP/2 connection when `maxStreamsPerConnection` is absent.
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;

/// `maxStreamsPerConnection`, checked as the schema does (1 to 10,000).
fn streams_per_connection(c: &mut Check, field: &str, n: Option<i32>) -> u32 {
    let Some(n) = n else { return DEFAULT_STREAMS_PER_CONNECTION };
    let field = format!("{field}.maxStreamsPerConnection");
    match u32::try_from(n) {
        Ok(n @ 1..=10_000) => n,
        _ => {
            c.fail(&field, "must be between 1 and 10000");
            DEFAULT_STREAMS_PER_CONNECTION
        }
    }
}

/// Per-model limits, checked.
fn model_limits(
    c: &mut Check,
    field: &str,
    models: &BTreeMap<String, ModelLimitsSpec>,
) -> BTreeMap<String, ModelLimits> {
    models
        .iter()
        .map(|(name, m)| {
            let f = format!("{field}.{name}");
            let limits = ModelLimits {
                requests_per_minute: m
                    .requests_per_minute
                    .map(|r| c.positive(&format!("{f}.requestsPerMinute"), r)),
                tokens_per_minute: m
                    .tokens_per_minute
                    .map(|t| c.positive(&format!("{f}.tokensPerMinute"), t)),
            };
            if limits == ModelLimits::default() {
                c.fail(&f, "set requestsPerMinute, tokensPerMinute or both");
            }
            (name.clone(), limits)
        })
        .collect()
}

/// One client's settings, resolved over `fallback` (the default entry) and the queue's values.
fn client_policy(
    c: &mut Check,
    field: &str,
    s: &ClientSettings,
    fallback: Option<&ClientSettings>,
    queue_wait: Duration,
    queue_size: usize,
) -> ClientPolicy {
    let pick = |f: fn(&ClientSettings) -> Option<i64>| f(s).or_else(|| fallback.and_then(f));
    let weight = pick(|x| x.weight.map(i64::from)).map_or(1, |w| c.positive(field, w));
    let wait = s.max_wait.as_ref().or_else(|| fallback.and_then(|f| f.max_wait.as_ref())).map(|d| d.get());
    ClientPolicy {
        weight: u32::try_from(weight).unwrap_or(u32::MAX),
        priority: s.priority.or_else(|| fallback.and_then(|f| f.priority)).unwrap_or_default(),
        requests_per_minute: pick(|x| x.requests_per_minute).map(|r| c.positive(field, r)),
        tokens_per_minute: pick(|x| x.tokens_per_minute).map(|t| c.positive(field, t)),
        max_wait: wait.map_or(queue_wait, |w| c.at_most(field, w, MAX_QUEUE_WAIT, "24h")),
        max_queued: pick(|x| x.max_queued.map(i64::from))
            .map_or(queue_size, |q| usize::try_from(c.non_negative(field, q)).unwrap_or(usize::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> LlmProxySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn errors(yaml: &str) -> String {
        Policy::from_spec(&spec(yaml)).err().map(|e| e.to_string()).unwrap_or_default()
    }

    const MINIMAL: &str = "
upstream: {url: 'https://api.openai.com/v1/'}
limits: {requestsPerMinute: 3500, tokensPerMinute: 90000}
";

    #[test]
    fn minimal_spec_resolves_documented_defaults() {
        let p = Policy::from_spec(&spec(MINIMAL)).unwrap();
        let u = &p.upstreams[0];
        assert_eq!((p.upstreams.len(), u.name.as_str()), (1, DEFAULT_ENDPOINT));
        assert_eq!(u.url, "https://api.openai.com/v1", "trailing slash trimmed");
        assert_eq!(u.timeout, Duration::from_secs(600));
        assert_eq!(
            u.limits.requests_per_minute,
            Some(p.limits.requests_per_minute),
            "the one endpoint's quota is the total"
        );
        assert_eq!((p.retry.budget_ratio, p.retry.budget_min_per_second), (0.2, 1));
        assert_eq!(p.limits.request_burst, 59, "one second's worth of 3500 RPM, rounded up");
        assert_eq!(p.limits.token_burst, 1500, "one second's worth of 90000 TPM");
        assert_eq!(p.limits.max_concurrent, 64);
        assert_eq!(p.limits.default_max_tokens, 1024);
        assert_eq!(p.queue.max_size, 1000);
        assert_eq!(p.queue.max_wait, Duration::from_secs(30));
        assert_eq!(p.queue.max_bytes, 64 << 20);
        assert_eq!(p.retry.max_attempts, 4);
        assert_eq!(p.retry.initial_backoff, Duration::from_secs(1));
        assert_eq!(p.retry.max_backoff, Duration::from_secs(30));
        assert!(p.retry.jitter);
        assert_eq!(p.cache, None);
    }

    #[test]
    fn small_rates_still_get_a_burst_of_one() {
        let p = Policy::from_spec(&spec("upstream: {url: 'https://x:1'}\nlimits: {requestsPerMinute: 10}"));
        assert_eq!(p.map(|p| (p.limits.request_burst, p.limits.tokens_per_minute)), Ok((1, None)));
    }

    #[test]
    fn explicit_burst_and_cache() {
        let p = Policy::from_spec(&spec(
            "upstream: {url: 'https://x:1'}\nlimits: {requestsPerMinute: 600, burst: 30}\ncache: {ttl: 5m}",
        ))
        .unwrap();
        assert_eq!(p.limits.request_burst, 30);
        assert_eq!(
            p.cache,
            Some(CachePolicy {
                ttl: Duration::from_secs(300),
                max_entries: 10_000,
                max_bytes: 64 << 20,
                scope: None
            })
        );
    }

    #[test]
    fn a_quota_password_of_another_namespace_has_a_slot_no_local_reference_can_name() {
        let r = crate::quota::RedisPasswordRef { name: "org-redis".into(), key: "password".into() };
        let local =
            SharedPolicy { url: "redis://r".into(), password: Some(r.clone()), password_namespace: None };
        assert_eq!(local.password_slot(), Some(("org-redis".into(), "password".into())));
        let quota = SharedPolicy { password_namespace: Some("llmproxy-system".into()), ..local };
        assert_eq!(quota.password_slot(), Some(("llmproxy-system/org-redis".into(), "password".into())));
    }

    #[test]
    fn replicas_split_the_quota() {
        let p = Policy::from_spec(&spec(MINIMAL)).unwrap();
        let share = p.clone().for_replicas(3);
        assert_eq!(share.limits.requests_per_minute, 1166);
        assert_eq!(share.limits.request_burst, 19);
        assert_eq!(share.limits.tokens_per_minute, Some(30_000));
        assert_eq!(share.limits.token_burst, 500);
        assert_eq!(share.limits.max_concurrent, p.limits.max_concurrent, "per pod already");
        assert_eq!(p.clone().for_replicas(1), p);
        assert_eq!(p.clone().for_replicas(0), p, "0 pods is treated as 1");
    }

    #[test]
    fn the_cache_scope_defaults_to_the_client_when_clients_are_named() {
        let scoped = |scope: &str| {
            let yaml = format!("{MINIMAL}cache: {{ttl: 1m{scope}}}");
            Policy::from_spec(&spec(&yaml)).ok().and_then(|p| p.cache).unwrap_or_else(|| panic!("{yaml}"))
        };
        let auto = scoped("");
        assert_eq!(auto.scope, None);
        assert!(auto.per_client(true) && !auto.per_client(false), "client keys decide");
        assert!(!scoped(", scope: shared").per_client(true));
        assert!(scoped(", scope: client").per_client(true));
        assert!(
            serde_yaml::from_str::<LlmProxySpec>(&format!("{MINIMAL}cache: {{ttl: 1m, scope: tenant}}"))
                .is_err()
        );
    }

    #[test]
    fn zero_ttl_turns_the_cache_off() {
        let yaml = format!("{MINIMAL}cache: {{ttl: 0s}}");
        assert_eq!(Policy::from_spec(&spec(&yaml)).map(|p| p.cache), Ok(None));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("limits: {requestsPerMinute: 0}", "spec.limits.requestsPerMinute: must be > 0"),
            ("limits: {requestsPerMinute: -3}", "spec.limits.requestsPerMinute: must be > 0"),
            (
                "limits: {requestsPerMinute: 60, tokensPerMinute: 0}",
                "spec.limits.tokensPerMinute: must be > 0",
            ),
            (
                "limits: {requestsPerMinute: 60, burst: 61}",
                "spec.limits.burst: must not exceed requestsPerMinute",
            ),
            ("limits: {requestsPerMinute: 60, maxConcurrent: 0}", "spec.limits.maxConcurrent: must be > 0"),
            ("limits: {requestsPerMinute: 60}\nqueue: {maxSize: -1}", "spec.queue.maxSize: must be >= 0"),
            (
                "limits: {requestsPerMinute: 60}\nretry: {initialBackoff: 10s, maxBackoff: 5s}",
                "spec.retry.initialBackoff: must not exceed maxBackoff",
            ),
            (
                "limits: {requestsPerMinute: 60}\nretry: {multiplier: 0.5}",
                "spec.retry.multiplier: must be >= 1",
            ),
            (
                "limits: {requestsPerMinute: 60}\nretry: {maxAttempts: 0}",
                "spec.retry.maxAttempts: must be > 0",
            ),
        ];
        for (limits, want) in cases {
            let got = errors(&format!("upstream: {{url: 'https://api.openai.com/v1'}}\n{limits}"));
            assert!(got.contains(want), "{limits}: got {got:?}, want {want:?}");
        }
        let got = errors(
            "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 60}\ncache: {ttl: 1m, maxBytes: 12Q}",
        );
        assert!(got.contains("spec.cache.maxBytes: invalid quantity \"12Q\""), "{got}");
        let got = errors("upstream: {url: 'ftp://x', timeout: 0s}\nlimits: {requestsPerMinute: 60}");
        assert!(got.contains("spec.upstream.url: must be an http(s) URL"), "{got}");
        assert!(got.contains("spec.upstream.timeout: must be greater than 0s"), "{got}");
    }

    #[test]
    fn upstream_urls_that_could_leak_the_key_are_refused() {
        let url = |u: &str, extra: &str| {
            errors(&format!("upstream: {{url: '{u}'{extra}}}\nlimits: {{requestsPerMinute: 60}}"))
        };
        assert!(url("http://evil.example/v1", "").contains("plain http to a non-loopback host"));
        assert!(url("http://evil.example/v1", ", allowInsecure: true").is_empty());
        for ok in [
            "http://127.0.0.1:8000/v1",
            "http://127.255.0.9/v1",
            "http://localhost/v1",
            "http://[::1]:9/v1",
            "http://[0:0::1]/v1",
            "https://x.io/v1",
        ] {
            assert!(url(ok, "").is_empty(), "{ok}");
        }
        // Names that only look like loopback resolve wherever their owner says.
        for leaky in [
            "http://127.0.0.1.attacker.example/v1",
            "http://127.attacker.example/v1",
            "http://127.0.0.1.nip.io:8000/v1",
            "http://localhost.attacker.example/v1",
            "http://127.1/v1",
            "http://0177.0.0.1/v1",
            "http://[::ffff:127.0.0.1]/v1",
            "http://[::1]x/v1",
            "http://128.0.0.1/v1",
            "http://127.0.0.1:80:80/v1",
            "http://LocalHost/v1",
        ] {
            assert!(url(leaky, "").contains("plain http to a non-loopback host"), "{leaky}");
        }
        assert!(url("https://user:pw@x.io/v1", "").contains("must not carry user info"));
        assert!(url("https://x.io/v1?key=1", "").contains("must not carry a query or fragment"));
        assert!(url("https://x.io/v1#f", "").contains("must not carry a query or fragment"));
        let got = errors(
            "upstream: {url: 'https://x.io', allowedPaths: ['POST /v1/chat/completions', 'GET /files']}\nlimits: {requestsPerMinute: 60}",
        );
        assert!(
            got.contains("spec.upstream.allowedPaths: \"GET /files\": the path must start with /v1/"),
            "{got}"
        );
    }

    #[test]
    fn durations_have_upper_bounds() {
        let base = "upstream: {url: 'https://x.io', timeout: 2h}\nlimits: {requestsPerMinute: 60}\n";
        let got = errors(&format!(
            "{base}queue: {{maxWait: 3000000000000000h}}\nretry: {{initialBackoff: 2h, maxBackoff: 2h}}\ncache: {{ttl: 721h}}"
        ));
        for want in [
            "spec.upstream.timeout: must be at most 1h",
            "spec.queue.maxWait: must be at most 24h",
            "spec.retry.initialBackoff: must be at most 1h",
            "spec.retry.maxBackoff: must be at most 1h",
            "spec.cache.ttl: must be at most 720h",
        ] {
            assert!(got.contains(want), "{want} in {got}");
        }
        let ok = format!("{MINIMAL}queue: {{maxWait: 24h}}\ncache: {{ttl: 720h}}");
        assert!(Policy::from_spec(&spec(&ok)).is_ok());
    }

    #[test]
    fn clients_resolve_over_the_default_and_the_queue() {
        let yaml = format!(
            "{MINIMAL}queue: {{maxWait: 40s}}\nclients:\n  keysSecretRef: {{name: keys}}\n  default: {{weight: 2, tokensPerMinute: 9000}}\n  overrides: [{{name: nightly, priority: batch, maxWait: 10m}}]\n"
        );
        let p = Policy::from_spec(&spec(&yaml)).unwrap();
        let c = p.clients.clone().expect("clients");
        assert_eq!(c.keys_secret.as_deref(), Some("keys"));
        let chat = c.client("chatbot");
        assert_eq!(
            (chat.weight, chat.priority, chat.max_wait),
            (2, ClientPriority::Interactive, Duration::from_secs(40))
        );
        let nightly = c.client("nightly");
        assert_eq!(nightly.priority, ClientPriority::Batch);
        assert_eq!((nightly.weight, nightly.tokens_per_minute), (2, Some(9000)), "from the default");
        assert_eq!(nightly.max_wait, Duration::from_secs(600));
        assert_eq!(nightly.max_queued, 1000);
        assert_eq!(p.for_replicas(3).clients.map(|c| c.client("x").tokens_per_minute), Some(Some(3000)));
        let twice = format!("{MINIMAL}clients:\n  overrides: [{{name: a}}, {{name: a}}]\n");
        assert!(errors(&twice).contains("client \"a\" is named twice"));
    }

    #[test]
    fn several_upstreams_resolve_each_with_its_own_limits() {
        let p = Policy::from_spec(&spec(
            "upstreams:
  - {name: east, url: 'https://east.example/v1', weight: 2, limits: {requestsPerMinute: 600, models: {gpt-4o: {tokensPerMinute: 6000}}}}
  - {name: west, url: 'https://west.example/v1', keyHeader: api-key, models: [gpt-4o-mini]}
limits: {requestsPerMinute: 1200, models: {gpt-4o: {requestsPerMinute: 300}}}",
        ))
        .unwrap();
        let (east, west) = (&p.upstreams[0], &p.upstreams[1]);
        assert_eq!(
            (east.weight, east.limits.requests_per_minute, east.limits.request_burst),
            (2, Some(600), 10)
        );
        assert_eq!(east.limits.models["gpt-4o"].tokens_per_minute, Some(6000));
        assert_eq!((west.key_header, west.limits.requests_per_minute), (KeyHeader::ApiKey, None));
        assert!(west.serves(Some("gpt-4o-mini")) && !west.serves(Some("gpt-4o")) && west.serves(None));
        assert!(east.serves(Some("anything")));
        assert_eq!((east.protocol, east.max_streams_per_connection), (Protocol::Auto, 100), "the defaults");
        assert_eq!(p.limits.models["gpt-4o"].requests_per_minute, Some(300));
        let half = p.for_replicas(2);
        assert_eq!(half.upstreams[0].limits.requests_per_minute, Some(300));
        assert_eq!(half.upstreams[0].limits.models["gpt-4o"].tokens_per_minute, Some(3000));
        assert_eq!(half.limits.models["gpt-4o"].requests_per_minute, Some(150));
    }

    #[test]
    fn upstream_protocol_and_streams_per_connection_resolve_and_are_checked() {
        let p = Policy::from_spec(&spec(
            "upstream: {url: 'https://x.io/v1', protocol: http2, maxStreamsPerConnection: 64}\nlimits: {requestsPerMinute: 60}",
        ))
        .unwrap();
        assert_eq!(
            (p.upstreams[0].protocol, p.upstreams[0].max_streams_per_connection),
            (Protocol::Http2, 64)
        );
        for bad in [0, -1, 10_001] {
            let yaml = format!(
                "upstream: {{url: 'https://x.io/v1', maxStreamsPerConnection: {bad}}}\nlimits: {{requestsPerMinute: 60}}"
            );
            assert!(
                errors(&yaml).contains("spec.upstream.maxStreamsPerConnection"),
                "{bad}: {}",
                errors(&yaml)
            );
        }
    }

    #[test]
    fn upstream_errors_name_the_endpoint() {
        let got = errors(
            "upstreams:
  - {name: a, url: 'http://10.0.0.1/v1', timeout: 0s}
  - {name: a, url: 'https://b.example/v1', models: [], limits: {models: {m: {}}}}
limits: {requestsPerMinute: 60}",
        );
        for want in [
            "spec.upstreams[0].url: \"http://10.0.0.1/v1\" is plain http",
            "spec.upstreams[0].timeout: must be greater than 0s",
            "spec.upstreams[1].name: \"a\" is used twice",
            "spec.upstreams[1].models: must name at least one model",
            "spec.upstreams[1].limits.models.m: set requestsPerMinute, tokensPerMinute or both",
        ] {
            assert!(got.contains(want), "{want} in {got}");
        }
        let got = errors("limits: {requestsPerMinute: 60}");
        assert!(got.contains("spec.upstream: required (or spec.upstreams)"), "{got}");
        let got = errors(
            "upstream: {url: 'https://a.example'}\nupstreams: [{name: b, url: 'https://b.example'}]\nlimits: {requestsPerMinute: 60}",
        );
        assert!(got.contains("set exactly one of upstream"), "{got}");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let got = errors("upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 0, maxConcurrent: 0}");
        assert_eq!(got, "spec.limits.requestsPerMinute: must be > 0; spec.limits.maxConcurrent: must be > 0");
    }
}
