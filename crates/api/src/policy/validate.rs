//! The validator: an `LlmProxySpec` (and the LlmQuota granted to it) checked field by field
//! into a [`Policy`], every bad field named in one error.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::crd::QuotaModelLimitsSpec;
use crate::crd::{
    CacheSpec, ClientSettings, ClientsSpec, DEFAULT_ENDPOINT, EndpointSpec, GrantedQuota, LimitsSpec,
    LlmProxySpec, ModelLimitsSpec, QueueSpec, RetrySpec, UpstreamSpec,
};
use crate::paths::default_allowed_paths;

/// Collects field errors while a spec is checked.
struct Check(Vec<FieldError>);

impl Check {
    /// The collected errors, if any.
    fn finish(&mut self) -> Result<(), PolicyError> {
        if self.0.is_empty() { Ok(()) } else { Err(PolicyError(std::mem::take(&mut self.0))) }
    }

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

    /// `prefix.name`'s optional rate, positive when set.
    fn rate(&mut self, prefix: &str, name: &str, v: Option<i64>) -> Option<u64> {
        v.map(|v| self.positive(&format!("{prefix}.{name}"), v))
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

impl Policy {
    /// Check a spec and resolve its defaults; the error names every bad field.
    pub fn from_spec(spec: &LlmProxySpec) -> Result<Self, PolicyError> {
        let mut c = Check(Vec::new());
        let limits = limits(&mut c, &spec.limits);
        let upstreams = upstreams(&mut c, spec, EndpointLimits::of(&limits));
        let queue = queue(&mut c, &spec.queue);
        let retry = retry(&mut c, &spec.retry);
        let cache = spec.cache.as_ref().and_then(|cache| self::cache(&mut c, cache));
        let clients = spec.clients.as_ref().map(|cs| self::clients(&mut c, cs, &queue));
        io_not_shared(&mut c, spec, &limits, &upstreams);
        c.finish()?;
        Ok(Self {
            upstreams,
            limits,
            queue,
            retry,
            cache,
            clients,
            shared: spec.shared_state.as_ref().map(|s| SharedPolicy {
                url: s.redis.url.clone(),
                password: s.redis.password_secret_ref.clone(),
                password_namespace: None,
                username: None,
            }),
            quota: None,
        })
    }

    /// Add the LlmQuota of `spec.quotaRef`, as granted. Without `sharedState` of its own, the
    /// LlmProxy's buckets are shared through the quota's Redis too.
    pub fn with_quota(mut self, granted: &GrantedQuota) -> Result<Self, PolicyError> {
        let mut c = Check(Vec::new());
        let rpm = c.positive("status.quota.requestsPerMinute", granted.requests_per_minute);
        let tpm = c.rate("status.quota", "tokensPerMinute", granted.tokens_per_minute);
        let models: BTreeMap<String, ModelLimitsSpec> =
            granted.models.iter().map(|(m, l)| (m.clone(), quota_model(l))).collect();
        let models = model_limits(&mut c, "status.quota.models", &models);
        let weight = c.positive("status.quota.weight", granted.weight.into());
        let guaranteed = c.non_negative("status.quota.guaranteed", granted.guaranteed.unwrap_or(0).into());
        if guaranteed > 100 {
            c.fail("status.quota.guaranteed", "must be at most 100");
        }
        c.finish()?;
        let redis = SharedPolicy {
            url: granted.redis.url.clone(),
            password: granted.redis.password_secret_ref.clone(),
            password_namespace: granted.password_namespace.clone(),
            username: granted.username.clone(),
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

/// `spec.limits`: the LlmProxy's own rates, bursts defaulting to one second's worth.
fn limits(c: &mut Check, l: &LimitsSpec) -> LimitsPolicy {
    let rpm = c.positive("spec.limits.requestsPerMinute", l.requests_per_minute);
    let tpm = c.rate("spec.limits", "tokensPerMinute", l.tokens_per_minute);
    let itpm = c.rate("spec.limits", "inputTokensPerMinute", l.input_tokens_per_minute);
    let otpm = c.rate("spec.limits", "outputTokensPerMinute", l.output_tokens_per_minute);
    let rpd = c.rate("spec.limits", "requestsPerDay", l.requests_per_day);
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
    let models = model_limits(c, "spec.limits.models", &l.models);
    let default_max_tokens = c.positive("spec.limits.defaultMaxTokens", l.default_max_tokens.into());
    LimitsPolicy {
        requests_per_minute: rpm,
        request_burst,
        tokens_per_minute: tpm,
        token_burst: tpm.map_or(0, per_second),
        input_tokens_per_minute: itpm,
        input_token_burst: itpm.map_or(0, per_second),
        output_tokens_per_minute: otpm,
        output_token_burst: otpm.map_or(0, per_second),
        requests_per_day: rpd,
        max_concurrent: u32::try_from(max_concurrent).unwrap_or(u32::MAX),
        default_max_tokens: u32::try_from(default_max_tokens).unwrap_or(u32::MAX),
        token_accounting: l.token_accounting,
        max_request_tokens: tpm,
        max_request_input_tokens: itpm,
        max_request_output_tokens: otpm,
        models,
    }
}

/// `spec.upstream` (one endpoint, with the LlmProxy's limits `total`) or `spec.upstreams`
/// (several, each with its own, names unique); exactly one of them.
fn upstreams(c: &mut Check, spec: &LlmProxySpec, total: EndpointLimits) -> Vec<UpstreamPolicy> {
    match (&spec.upstream, &spec.upstreams) {
        (Some(u), None) => vec![endpoint(c, "spec.upstream", DEFAULT_ENDPOINT, u, 1, None, total)],
        (None, Some(list)) if !list.is_empty() => {
            let mut names = std::collections::BTreeSet::new();
            list.iter()
                .enumerate()
                .map(|(i, e)| {
                    let field = format!("spec.upstreams[{i}]");
                    if !names.insert(e.name.as_str()) {
                        c.fail(&format!("{field}.name"), format!("{:?} is used twice", e.name));
                    }
                    endpoint_of(c, &field, e)
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
    }
}

/// `spec.queue`.
fn queue(c: &mut Check, q: &QueueSpec) -> QueuePolicy {
    let max_size = c.non_negative("spec.queue.maxSize", q.max_size.into());
    QueuePolicy {
        max_size: usize::try_from(max_size).unwrap_or(usize::MAX),
        max_wait: c.at_most("spec.queue.maxWait", q.max_wait.get(), MAX_QUEUE_WAIT, "24h"),
        max_bytes: c.quantity("spec.queue.maxBytes", &q.max_bytes.0),
    }
}

/// `spec.retry`: back-off bounds that fit together and the retry budget.
fn retry(c: &mut Check, r: &RetrySpec) -> RetryPolicy {
    let initial_backoff = c.at_most("spec.retry.initialBackoff", r.initial_backoff.get(), MAX_BACKOFF, "1h");
    let max_backoff = c.at_most("spec.retry.maxBackoff", r.max_backoff.get(), MAX_BACKOFF, "1h");
    let max_attempts = c.positive("spec.retry.maxAttempts", r.max_attempts.into());
    if r.initial_backoff.get() > r.max_backoff.get() {
        c.fail("spec.retry.initialBackoff", "must not exceed maxBackoff");
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
        c.fail("spec.retry.multiplier", "must be >= 1");
    }
    let budget_percent = u32::try_from(c.non_negative("spec.retry.budget.percent", r.budget.percent.into()))
        .unwrap_or(u32::MAX);
    let budget_floor = u32::try_from(
        c.non_negative("spec.retry.budget.minRetriesPerSecond", r.budget.min_retries_per_second.into()),
    )
    .unwrap_or(u32::MAX);
    RetryPolicy {
        max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
        initial_backoff,
        max_backoff,
        multiplier: r.multiplier,
        jitter: r.jitter,
        budget_ratio: f64::from(budget_percent) / 100.0,
        budget_min_per_second: budget_floor,
    }
}

/// `spec.cache`; a zero TTL turns it off.
fn cache(c: &mut Check, cache: &CacheSpec) -> Option<CachePolicy> {
    if cache.ttl.get().is_zero() {
        return None;
    }
    Some(CachePolicy {
        ttl: c.at_most("spec.cache.ttl", cache.ttl.get(), MAX_CACHE_TTL, "720h"),
        max_entries: c.positive("spec.cache.maxEntries", cache.max_entries),
        max_bytes: c.quantity("spec.cache.maxBytes", &cache.max_bytes.0),
        scope: cache.scope,
    })
}

/// `spec.clients`: the default entry and each override resolved over it and the queue's values.
fn clients(c: &mut Check, cs: &ClientsSpec, queue: &QueuePolicy) -> ClientsPolicy {
    let default = client_policy(c, "spec.clients.default", &cs.default, None, queue.max_wait, queue.max_size);
    let mut overrides = BTreeMap::new();
    for o in &cs.overrides {
        let resolved = client_policy(
            c,
            "spec.clients.overrides",
            &o.settings,
            Some(&cs.default),
            queue.max_wait,
            queue.max_size,
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
}

/// One endpoint of `spec.upstreams`.
fn endpoint_of(c: &mut Check, field: &str, e: &EndpointSpec) -> UpstreamPolicy {
    let l = e.limits.clone().unwrap_or_default();
    let prefix = format!("{field}.limits");
    let rpm = c.rate(&prefix, "requestsPerMinute", l.requests_per_minute);
    let tpm = c.rate(&prefix, "tokensPerMinute", l.tokens_per_minute);
    let itpm = c.rate(&prefix, "inputTokensPerMinute", l.input_tokens_per_minute);
    let otpm = c.rate(&prefix, "outputTokensPerMinute", l.output_tokens_per_minute);
    let rpd = c.rate(&prefix, "requestsPerDay", l.requests_per_day);
    let limits = EndpointLimits {
        requests_per_minute: rpm,
        request_burst: rpm.map_or(1, per_second),
        tokens_per_minute: tpm,
        token_burst: tpm.map_or(0, per_second),
        input_tokens_per_minute: itpm,
        input_token_burst: itpm.map_or(0, per_second),
        output_tokens_per_minute: otpm,
        output_token_burst: otpm.map_or(0, per_second),
        requests_per_day: rpd,
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
    mut limits: EndpointLimits,
) -> UpstreamPolicy {
    let url = u.url.trim_end_matches('/').to_owned();
    if let Err(e) = check_url(&url, u.allow_insecure) {
        c.fail(&format!("{field}.url"), e);
    }
    let allowed_paths: Vec<PathRule> = match &u.allowed_paths {
        None => default_allowed_paths(u.provider).iter().filter_map(|r| PathRule::parse(r).ok()).collect(),
        Some(rules) => rules
            .iter()
            .filter_map(|r| PathRule::parse(r).map_err(|e| c.fail(&format!("{field}.allowedPaths"), e)).ok())
            .collect(),
    };
    let root = if u.provider == Provider::Azure { "openai" } else { "v1" };
    if let Some(rule) = allowed_paths.iter().find(|r| r.root() != root) {
        c.fail(
            &format!("{field}.allowedPaths"),
            format!("{rule}: rules for provider {} start with /{root}/", u.provider.name()),
        );
    }
    if u.provider == Provider::Azure {
        // Azure enforces its per-minute limits over 10-second slices: a burst of more than a
        // slice's worth is refused there, whatever the minute's total.
        if let Some(rpm) = limits.requests_per_minute {
            limits.request_burst = limits.request_burst.min((rpm / 6).max(1));
        }
        if let Some(tpm) = limits.tokens_per_minute {
            limits.token_burst = limits.token_burst.min((tpm / 6).max(1));
        }
    }
    if u.provider != Provider::OpenAi && u.key_header != KeyHeader::Bearer {
        c.fail(
            &format!("{field}.keyHeader"),
            format!("applies only to provider openai ({} takes its key its own way)", u.provider.name()),
        );
    }
    let timeout_field = format!("{field}.timeout");
    let timeout = c.at_most(&timeout_field, u.timeout.get(), MAX_UPSTREAM_TIMEOUT, "1h");
    if timeout.is_zero() {
        c.fail(&timeout_field, "must be greater than 0s");
    }
    UpstreamPolicy {
        name: name.to_owned(),
        url,
        api_key_secret_ref: u.api_key_secret_ref.clone(),
        provider: u.provider,
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

/// Input and output token limits are kept by each replica on its own: refuse them where the
/// buckets are shared through Redis, rather than let every replica spend the whole limit.
fn io_not_shared(c: &mut Check, spec: &LlmProxySpec, limits: &LimitsPolicy, upstreams: &[UpstreamPolicy]) {
    let field = match (&spec.shared_state, &spec.quota_ref) {
        (Some(_), _) => "spec.sharedState",
        (None, Some(_)) => "spec.quotaRef",
        (None, None) => return,
    };
    let models = |m: &BTreeMap<String, ModelLimits>| {
        m.values().any(|m| m.input_tokens_per_minute.is_some() || m.output_tokens_per_minute.is_some())
    };
    let set = limits.input_tokens_per_minute.is_some()
        || limits.output_tokens_per_minute.is_some()
        || models(&limits.models)
        || upstreams.iter().any(|u| {
            u.limits.input_tokens_per_minute.is_some()
                || u.limits.output_tokens_per_minute.is_some()
                || models(&u.limits.models)
        });
    if set {
        c.fail(
            field,
            "inputTokensPerMinute and outputTokensPerMinute are kept by each replica on its own and are not \
             shared through Redis yet: use tokensPerMinute here, or one replica without shared state",
        );
    }
    let daily = |m: &BTreeMap<String, ModelLimits>| m.values().any(|m| m.requests_per_day.is_some());
    let per_day = limits.requests_per_day.is_some()
        || daily(&limits.models)
        || upstreams.iter().any(|u| u.limits.requests_per_day.is_some() || daily(&u.limits.models));
    if per_day {
        c.fail(
            field,
            "requestsPerDay is counted by each replica on its own and is not shared through Redis yet: \
             run one replica without shared state, or leave the daily limit to the upstream's own 429s \
             (llmproxy marks the model spent until the next day when Gemini reports a daily quota)",
        );
    }
}

/// An LlmQuota's model limits as an LlmProxy's (which may also limit input and output apart).
fn quota_model(l: &QuotaModelLimitsSpec) -> ModelLimitsSpec {
    ModelLimitsSpec {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        ..ModelLimitsSpec::default()
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
                requests_per_minute: c.rate(&f, "requestsPerMinute", m.requests_per_minute),
                tokens_per_minute: c.rate(&f, "tokensPerMinute", m.tokens_per_minute),
                input_tokens_per_minute: c.rate(&f, "inputTokensPerMinute", m.input_tokens_per_minute),
                output_tokens_per_minute: c.rate(&f, "outputTokensPerMinute", m.output_tokens_per_minute),
                requests_per_day: c.rate(&f, "requestsPerDay", m.requests_per_day),
            };
            if limits == ModelLimits::default() {
                c.fail(
                    &f,
                    "set at least one of requestsPerMinute, tokensPerMinute, inputTokensPerMinute, \
                     outputTokensPerMinute, requestsPerDay",
                );
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
