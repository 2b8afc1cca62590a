//! The runtime policy: an `LlmProxySpec` checked once and turned into plain numbers, so the
//! proxy's hot path never re-validates and a bad spec never reaches it.

use std::fmt;
use std::time::Duration;

use crate::paths::{DEFAULT_ALLOWED_PATHS, PathRule};
use crate::spec::{ClientPriority, ClientSettings, LlmProxySpec, SecretKeyRef, TokenAccounting};

/// Everything the data plane needs to serve one LlmProxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Where requests go.
    pub upstream: UpstreamPolicy,
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

/// The upstream endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamPolicy {
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub url: String,
    /// Where the API key lives in cluster mode.
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// The wait for response headers, and the longest gap between chunks after that.
    pub timeout: Duration,
    /// What may pass upstream.
    pub allowed_paths: Vec<PathRule>,
    /// Account-choosing client headers that pass (lower case).
    pub allowed_client_headers: Vec<String>,
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
}

/// One reason a spec cannot run, naming the field the way `kubectl explain` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path such as `spec.limits.requestsPerMinute`.
    pub field: &'static str,
    /// What is wrong, e.g. `must be > 0`.
    pub message: String,
}

/// Every reason a spec cannot run, so a user fixes them all in one edit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError(pub Vec<FieldError>);

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
    fn fail(&mut self, field: &'static str, message: impl Into<String>) {
        self.0.push(FieldError { field, message: message.into() });
    }

    /// A duration no longer than `max` (spelled as in the schema message).
    fn at_most(&mut self, field: &'static str, d: Duration, max: Duration, spelled: &str) -> Duration {
        if d > max {
            self.fail(field, format!("must be at most {spelled}"));
            return max;
        }
        d
    }

    /// A positive integer as u64, or an error naming the field.
    fn positive(&mut self, field: &'static str, v: i64) -> u64 {
        if v <= 0 {
            self.fail(field, "must be > 0");
            return 1;
        }
        v.unsigned_abs()
    }

    /// A positive quantity of bytes.
    fn quantity(&mut self, field: &'static str, q: &str) -> u64 {
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

    fn non_negative(&mut self, field: &'static str, v: i64) -> u64 {
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
        let host = rest.split('/').next().unwrap_or_default();
        let host = host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        let loopback = host == "localhost" || host == "[::1]" || host.starts_with("127.");
        if !loopback && !allow_insecure {
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
        if n == 1 {
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
        self
    }

    /// Check a spec and resolve its defaults; the error names every bad field.
    pub fn from_spec(spec: &LlmProxySpec) -> Result<Self, PolicyError> {
        let mut c = Check(Vec::new());

        let url = spec.upstream.url.trim_end_matches('/').to_owned();
        if let Err(e) = check_url(&url, spec.upstream.allow_insecure) {
            c.fail("spec.upstream.url", e);
        }
        let allowed_paths = match &spec.upstream.allowed_paths {
            None => DEFAULT_ALLOWED_PATHS.iter().filter_map(|r| PathRule::parse(r).ok()).collect(),
            Some(rules) => rules
                .iter()
                .filter_map(|r| PathRule::parse(r).map_err(|e| c.fail("spec.upstream.allowedPaths", e)).ok())
                .collect(),
        };
        let timeout =
            c.at_most("spec.upstream.timeout", spec.upstream.timeout.get(), MAX_UPSTREAM_TIMEOUT, "1h");
        if timeout.is_zero() {
            c.fail("spec.upstream.timeout", "must be greater than 0s");
        }

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

        let cache = match &spec.cache {
            Some(cache) if !cache.ttl.get().is_zero() => Some(CachePolicy {
                ttl: c.at_most("spec.cache.ttl", cache.ttl.get(), MAX_CACHE_TTL, "720h"),
                max_entries: c.positive("spec.cache.maxEntries", cache.max_entries),
                max_bytes: c.quantity("spec.cache.maxBytes", &cache.max_bytes.0),
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
            upstream: UpstreamPolicy {
                url,
                api_key_secret_ref: spec.upstream.api_key_secret_ref.clone(),
                timeout,
                allowed_paths,
                allowed_client_headers: spec
                    .upstream
                    .allowed_client_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            },
            limits: LimitsPolicy {
                requests_per_minute: rpm,
                request_burst,
                tokens_per_minute: tpm,
                token_burst: tpm.map_or(0, per_second),
                max_concurrent: u32::try_from(max_concurrent).unwrap_or(u32::MAX),
                default_max_tokens: u32::try_from(default_max_tokens).unwrap_or(u32::MAX),
                token_accounting: l.token_accounting,
                max_request_tokens: tpm,
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
            },
            cache,
            clients,
        })
    }
}

/// One client's settings, resolved over `fallback` (the default entry) and the queue's values.
fn client_policy(
    c: &mut Check,
    field: &'static str,
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
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
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
        let p = Policy::from_spec(&spec(MINIMAL)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.upstream.url, "https://api.openai.com/v1", "trailing slash trimmed");
        assert_eq!(p.upstream.timeout, Duration::from_secs(600));
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
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.limits.request_burst, 30);
        assert_eq!(
            p.cache,
            Some(CachePolicy { ttl: Duration::from_secs(300), max_entries: 10_000, max_bytes: 64 << 20 })
        );
    }

    #[test]
    fn replicas_split_the_quota() {
        let p = Policy::from_spec(&spec(MINIMAL)).unwrap_or_else(|e| panic!("{e}"));
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
        for ok in ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]:9/v1", "https://x.io/v1"]
        {
            assert!(url(ok, "").is_empty(), "{ok}");
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
        let p = Policy::from_spec(&spec(&yaml)).unwrap_or_else(|e| panic!("{e}"));
        let c = p.clients.clone().unwrap_or_else(|| panic!("clients"));
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
    fn every_error_is_reported_at_once() {
        let got = errors("upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 0, maxConcurrent: 0}");
        assert_eq!(got, "spec.limits.requestsPerMinute: must be > 0; spec.limits.maxConcurrent: must be > 0");
    }
}
