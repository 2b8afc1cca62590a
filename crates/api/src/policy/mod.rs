//! The runtime policy: an `LlmProxySpec` checked once and turned into plain numbers, so the
//! proxy's hot path never re-validates and a bad spec never reaches it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub mod replicas;
mod validate;

use crate::crd::{
    CacheScope, ClientPriority, KeyHeader, Protocol, Provider, RedisPasswordRef, SecretKeyRef,
    TokenAccounting,
};
use crate::paths::PathRule;

/// Everything the data plane needs to serve one LlmProxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Where requests go: the endpoints of `spec.upstreams`, or the one of `spec.upstream`
    /// (named `default`). Never empty.
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
    pub password: Option<RedisPasswordRef>,
    /// The namespace of the password Secret when it is not the LlmProxy's (an LlmQuota's).
    pub password_namespace: Option<String>,
    /// The Redis user to log in as (an LlmQuota consumer's own); `None`: the default user.
    pub username: Option<String>,
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

/// One upstream endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamPolicy {
    /// Its name (`default` for `spec.upstream`).
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub url: String,
    /// Where the API key lives (a Secret in the cluster, `--secrets-dir` standalone).
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// The API it speaks: paths, how the key is sent, how a request is charged and which
    /// headers and errors mean what.
    pub provider: Provider,
    /// How the key is sent (an OpenAI-compatible upstream's choice; other providers have one).
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
    /// Input tokens per minute.
    pub input_tokens_per_minute: Option<u64>,
    /// Input token bucket capacity.
    pub input_token_burst: u64,
    /// Output tokens per minute.
    pub output_tokens_per_minute: Option<u64>,
    /// Output token bucket capacity.
    pub output_token_burst: u64,
    /// Requests per day (from midnight US Pacific).
    pub requests_per_day: Option<u64>,
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
            input_tokens_per_minute: limits.input_tokens_per_minute,
            input_token_burst: limits.input_token_burst,
            output_tokens_per_minute: limits.output_tokens_per_minute,
            output_token_burst: limits.output_token_burst,
            requests_per_day: limits.requests_per_day,
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
    /// Input (prompt) tokens per minute.
    pub input_tokens_per_minute: Option<u64>,
    /// Output (completion) tokens per minute.
    pub output_tokens_per_minute: Option<u64>,
    /// Requests per day (from midnight US Pacific).
    pub requests_per_day: Option<u64>,
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
    /// Input (prompt) tokens per minute, `None` for unlimited: Anthropic's ITPM.
    pub input_tokens_per_minute: Option<u64>,
    /// Input token bucket capacity.
    pub input_token_burst: u64,
    /// Output (completion) tokens per minute, `None` for unlimited: Anthropic's OTPM.
    pub output_tokens_per_minute: Option<u64>,
    /// Output token bucket capacity.
    pub output_token_burst: u64,
    /// Requests per day (from midnight US Pacific), `None` for unlimited: Gemini's RPD.
    pub requests_per_day: Option<u64>,
    /// Upstream requests in flight at once.
    pub max_concurrent: u32,
    /// Completion tokens reserved when a request names no maximum.
    pub default_max_tokens: u32,
    /// How the upstream counts tokens.
    pub token_accounting: TokenAccounting,
    /// The largest charge one request may have: the LlmProxy's whole tokens per minute
    /// (what the provider refuses as too large), not this replica's share of it.
    pub max_request_tokens: Option<u64>,
    /// The largest input charge one request may have (the whole input tokens per minute).
    pub max_request_input_tokens: Option<u64>,
    /// The largest output charge (`max_tokens`) one request may have (the whole output tokens
    /// per minute).
    pub max_request_output_tokens: Option<u64>,
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
            input_tokens_per_minute: None,
            input_token_burst: 0,
            output_tokens_per_minute: None,
            output_token_burst: 0,
            requests_per_day: None,
            max_concurrent: 64,
            default_max_tokens: 1024,
            token_accounting: TokenAccounting::Requested,
            max_request_tokens: tokens,
            max_request_input_tokens: None,
            max_request_output_tokens: None,
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

/// Upper bounds of the durations (the CRD schema says the same in CEL): beyond them a value is a
/// mistake, and deadline arithmetic stays far from overflow.
pub(crate) const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest `queue.maxWait`.
pub(crate) const MAX_QUEUE_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The longest retry back-off.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The longest cache TTL.
pub(crate) const MAX_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// One second's worth of a per-minute rate, at least 1.
pub fn per_second(per_minute: u64) -> u64 {
    per_minute.div_ceil(60).max(1)
}

impl Policy {
    /// The longest `timeout` of any endpoint.
    pub fn longest_timeout(&self) -> Duration {
        self.upstreams.iter().map(|u| u.timeout).max().unwrap_or(MAX_UPSTREAM_TIMEOUT)
    }

    /// The endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Option<&UpstreamPolicy> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// Requests in flight on one HTTP/2 connection when `maxStreamsPerConnection` is absent.
pub(crate) const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DEFAULT_ENDPOINT, LlmProxySpec};

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
    fn input_output_limits_are_kept_apart_but_not_shared_and_anthropic_has_its_paths() {
        let yaml = "upstream: {url: 'https://api.anthropic.com/v1', provider: anthropic}\nlimits: {requestsPerMinute: 50, inputTokensPerMinute: 30000, models: {claude-x: {outputTokensPerMinute: 4000}}}";
        let spec: LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
        let p = Policy::from_spec(&spec).unwrap();
        assert_eq!((p.limits.input_tokens_per_minute, p.limits.input_token_burst), (Some(30000), 500));
        assert_eq!(p.limits.max_request_input_tokens, Some(30000));
        assert_eq!(p.limits.models["claude-x"].output_tokens_per_minute, Some(4000));
        assert_eq!(p.upstreams[0].provider, Provider::Anthropic);
        let e = errors(&format!("{yaml}\nsharedState: {{redis: {{url: 'redis://r:6379'}}}}"));
        assert!(
            e.contains(
                "spec.sharedState: inputTokensPerMinute and outputTokensPerMinute are kept by each replica"
            ),
            "{e}"
        );
        let paths: Vec<&str> = crate::paths::default_allowed_paths(Provider::Anthropic).to_vec();
        assert_eq!(paths, crate::paths::DEFAULT_ANTHROPIC_PATHS);
    }

    #[test]
    fn azure_bursts_stay_in_a_10_second_slice_and_its_rules_start_with_openai() {
        let yaml = "upstream: {url: 'https://r.openai.azure.com', provider: azure}\nlimits: {requestsPerMinute: 600, burst: 500, tokensPerMinute: 60000}";
        let p = Policy::from_spec(&serde_yaml::from_str::<LlmProxySpec>(yaml).unwrap()).unwrap();
        assert_eq!(p.limits.request_burst, 500, "the LlmProxy's own burst is as configured");
        assert_eq!((p.upstreams[0].limits.request_burst, p.upstreams[0].limits.token_burst), (100, 1000));
        assert!(p.upstreams[0].allowed_paths.iter().all(|r| r.root() == "openai"));
        let e = errors(
            "upstream: {url: 'https://r.openai.azure.com', provider: azure, allowedPaths: ['POST /v1/chat/completions']}\nlimits: {requestsPerMinute: 60}",
        );
        assert!(e.contains("spec.upstream.allowedPaths: POST /v1/chat/completions: rules for provider azure start with /openai/"), "{e}");
        let e = errors(
            "upstream: {url: 'https://api.openai.com/v1', allowedPaths: ['POST /openai/deployments/*/chat/completions']}\nlimits: {requestsPerMinute: 60}",
        );
        assert!(e.contains("rules for provider openai start with /v1/"), "{e}");
    }

    #[test]
    fn requests_per_day_are_limits_of_their_own_not_shared_yet() {
        let yaml = "upstream: {url: 'https://g.example/v1beta/openai', provider: gemini}\nlimits: {requestsPerMinute: 60, requestsPerDay: 1000, models: {g: {requestsPerDay: 50}}}";
        let p = Policy::from_spec(&serde_yaml::from_str::<LlmProxySpec>(yaml).unwrap()).unwrap();
        assert_eq!(p.limits.requests_per_day, Some(1000));
        assert_eq!(p.upstreams[0].limits.requests_per_day, Some(1000));
        assert_eq!(p.limits.models["g"].requests_per_day, Some(50));
        assert_eq!(p.clone().for_replicas(4).limits.requests_per_day, Some(250));
        let e = errors(&format!("{yaml}\nsharedState: {{redis: {{url: 'redis://r:6379'}}}}"));
        assert!(e.contains("spec.sharedState: requestsPerDay is counted by each replica"), "{e}");
    }

    #[test]
    fn a_key_header_is_refused_for_a_provider_that_takes_its_key_its_own_way() {
        let e = errors(
            "upstream: {url: 'https://api.anthropic.com/v1', provider: anthropic, keyHeader: api-key}\nlimits: {requestsPerMinute: 50}",
        );
        assert!(e.contains("spec.upstream.keyHeader: applies only to provider openai"), "{e}");
        let e = errors(
            "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 50, outputTokensPerMinute: 0, models: {m: {}}}",
        );
        assert!(e.contains("spec.limits.outputTokensPerMinute: must be > 0"), "{e}");
        assert!(e.contains("spec.limits.models.m: set at least one of"), "{e}");
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
        let r = RedisPasswordRef { name: "org-redis".into(), key: "password".into() };
        let local = SharedPolicy {
            url: "redis://r".into(),
            password: Some(r.clone()),
            password_namespace: None,
            username: None,
        };
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
            "spec.upstreams[1].limits.models.m: set at least one of requestsPerMinute",
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
