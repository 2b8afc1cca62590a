//! Status: what a person needs to act on, as standard conditions (`Ready`, `Progressing`,
//! `Degraded`) with reasons. Pure; the reconciler writes the result.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use llmproxy_api::{LlmProxyStatus, ObservedLimits, Policy, ProxyReport, UpstreamStatus, UsageStatus};

/// Something about the LlmProxy that the operator cannot fix by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    /// The spec passed the schema but cannot run (the message names the field).
    InvalidPolicy(String),
    /// A Secret the spec names does not exist.
    SecretNotFound {
        /// Secret name.
        secret: String,
        /// Why it is read: the upstream key or the client keys.
        use_: SecretUse,
    },
    /// The API server refused an object built from the spec.
    ChildRejected(String),
    /// The Secret has not opted in to being read by proxies (the label of its use, value
    /// `"true"`), or its `llmproxy.io/allowed-proxies` does not list this LlmProxy.
    SecretNotAllowed {
        /// Secret name.
        secret: String,
        /// Why it is read.
        use_: SecretUse,
    },
    /// The upstream key Secret pins where its key may go (`llmproxy.io/allowed-upstream-hosts`)
    /// and an upstream URL of the spec is elsewhere.
    UpstreamHostNotAllowed {
        /// Secret name.
        secret: String,
        /// The host the spec would send the key to.
        host: String,
    },
    /// The upstream key Secret exists but lacks the key.
    SecretKeyMissing {
        /// Secret name.
        secret: String,
        /// The missing key.
        key: String,
    },
    /// `spec.quotaRef` names no LlmQuota.
    QuotaNotFound(String),
    /// The LlmQuota does not let this LlmProxy draw (its namespace, or its guarantee).
    QuotaNotAllowed {
        /// The LlmQuota.
        quota: String,
        /// Why.
        reason: String,
    },
    /// The client keys Secret holds no keys, or keys the proxies would refuse.
    ClientKeysInvalid {
        /// Secret name.
        secret: String,
        /// What is wrong (names a client, never a key).
        error: String,
    },
}

pub(crate) use llmproxy_api::SecretUse;

/// How to create the Secret for `use_`, for the message of a missing one.
fn example(use_: SecretUse, secret: &str) -> String {
    match use_ {
        SecretUse::UpstreamKey => {
            format!("kubectl create secret generic {secret} --from-literal=api-key=...")
        }
        SecretUse::ClientKeys => {
            format!("kubectl create secret generic {secret} --from-literal=TEAM=KEY (one entry per client)")
        }
        SecretUse::RedisPassword => {
            format!("kubectl create secret generic {secret} --from-literal=password=...")
        }
    }
}

impl Problem {
    /// The condition reason.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Problem::InvalidPolicy(_) => "InvalidPolicy",
            Problem::SecretNotFound { .. } => "SecretNotFound",
            Problem::ChildRejected(_) => "ChildRejected",
            Problem::SecretNotAllowed { .. } | Problem::UpstreamHostNotAllowed { .. } => "SecretNotAllowed",
            Problem::SecretKeyMissing { .. } => "SecretKeyMissing",
            Problem::ClientKeysInvalid { .. } => "ClientKeysInvalid",
            Problem::QuotaNotFound(_) => "QuotaNotFound",
            Problem::QuotaNotAllowed { .. } => "QuotaNotAllowed",
        }
    }

    /// What to do about it.
    pub(crate) fn message(&self) -> String {
        match self {
            Problem::InvalidPolicy(e) => format!("the spec cannot run: {e}; fix it and re-apply"),
            Problem::SecretNotFound { secret, use_ } => format!(
                "Secret {secret} ({}) not found; create it, e.g. {}",
                use_.field(),
                example(*use_, secret)
            ),
            Problem::SecretNotAllowed { secret, use_ } => format!(
                "Secret {secret} ({}) has not opted in to being read by llmproxy for that use: whoever owns it \
                 runs kubectl label secret {secret} {}=true (and may narrow it with the annotation {}=NAME,...); \
                 until then no proxy takes up this spec",
                use_.field(),
                use_.label(),
                llmproxy_api::SECRET_ALLOWED_PROXIES
            ),
            Problem::UpstreamHostNotAllowed { secret, host } => format!(
                "Secret {secret} (an upstream's apiKeySecretRef) lets its key go only to the hosts in its \
                 annotation {}, and {host:?} is not one of them: point the upstream at an allowed host, or \
                 ask the Secret's owner to allow it; until then no proxy takes up this spec",
                llmproxy_api::ALLOWED_UPSTREAM_HOSTS
            ),
            Problem::QuotaNotFound(q) => {
                format!("LlmQuota {q} (spec.quotaRef) not found; create it, or remove the reference")
            }
            Problem::QuotaNotAllowed { quota, reason } => format!(
                "LlmQuota {quota} does not let this LlmProxy draw from it: {reason}; the proxies do not \
                 start serving until it does"
            ),
            Problem::ClientKeysInvalid { secret, error } => {
                format!("Secret {secret} (spec.clients.keysSecretRef) cannot be used: {error}")
            }
            Problem::ChildRejected(e) => {
                format!("the API server refused a proxy object built from the spec: {e}; fix the LlmProxy")
            }
            Problem::SecretKeyMissing { secret, key } => {
                format!("Secret {secret} has no key {key:?} (spec.upstream.apiKeySecretRef.key)")
            }
        }
    }
}

/// What the operator saw of the proxy Deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rollout {
    /// Pods wanted.
    pub desired: i32,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods ready.
    pub ready: i32,
    /// Pods running the current template.
    pub updated: i32,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The status for this generation. Conditions whose status did not change keep their
/// `lastTransitionTime` from `previous`.
pub(crate) fn compute(
    generation: Option<i64>,
    problem: Option<&Problem>,
    rollout: Rollout,
    endpoint: String,
    previous: Option<&LlmProxyStatus>,
    now: &Time,
) -> LlmProxyStatus {
    let Rollout { desired, replicas, ready, updated } = rollout;
    let pods = format!("{ready} of {desired} proxy pods ready");
    let mut conditions = match problem {
        Some(p) => vec![
            condition("Ready", false, p.reason(), p.message(), generation, now),
            condition(
                "Progressing",
                false,
                p.reason(),
                "waiting for the problem to be fixed".into(),
                generation,
                now,
            ),
            condition("Degraded", true, p.reason(), p.message(), generation, now),
        ],
        None => {
            let ready_ok = desired > 0 && ready >= desired;
            let ready_reason = match (desired, ready_ok) {
                (0, _) => "ScaledToZero",
                (_, true) => "ProxiesReady",
                _ => "ProxiesNotReady",
            };
            let rolling = updated < desired || ready < desired || replicas > desired;
            vec![
                condition("Ready", ready_ok, ready_reason, pods.clone(), generation, now),
                condition(
                    "Progressing",
                    rolling,
                    if rolling { "RollingOut" } else { "RolloutComplete" },
                    format!("{updated} of {desired} proxy pods up to date; {pods}"),
                    generation,
                    now,
                ),
                condition("Degraded", false, "AsExpected", "no problem found".into(), generation, now),
            ]
        }
    };
    for c in &mut conditions {
        keep_transition(c, previous);
    }
    let mut status = LlmProxyStatus {
        conditions,
        observed_generation: generation,
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        endpoint: Some(endpoint),
        upstreams: previous.map(|p| p.upstreams.clone()).unwrap_or_default(),
        quota: None,
        usage: previous.and_then(|p| p.usage.clone()),
    };
    // What the pods report is the observer's (its own field manager): carried here so that a
    // comparison with the stored status sees no change, and left out of what the reconciler
    // applies (`reconciler_part`).
    if let Some(prev) = previous {
        status.conditions.extend(prev.conditions.iter().filter(|c| observed_condition(&c.type_)).cloned());
    }
    status
}

/// Whether `stored` already says what `new` does, whatever the order of its conditions (two
/// field managers write them, and the server keeps its own order).
pub(crate) fn unchanged(stored: Option<&LlmProxyStatus>, new: &LlmProxyStatus) -> bool {
    let sorted = |s: &LlmProxyStatus| {
        let mut s = s.clone();
        s.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        s
    };
    stored.is_some_and(|s| sorted(s) == sorted(new))
}

/// Conditions written from what the proxy pods report, not by the reconciler.
pub(crate) const OBSERVED_CONDITIONS: &[&str] =
    &["LimitsAboveUpstream", "QuotaShared", "QuotaBound", "Saturated", "UpstreamQuotaExhausted"];

fn observed_condition(type_: &str) -> bool {
    OBSERVED_CONDITIONS.contains(&type_)
}

/// The fields the reconciler owns: without the pods' reports, which another field manager
/// applies. Server-side apply leaves what one manager omits to the other.
pub(crate) fn reconciler_part(status: &LlmProxyStatus) -> LlmProxyStatus {
    let mut s = status.clone();
    s.upstreams.clear();
    s.usage = None;
    s.conditions.retain(|c| !observed_condition(&c.type_));
    s
}

/// One view of each upstream out of every pod's report: the lowest limit any pod was told
/// (they share the key, so they normally agree), healthy only if no pod has it taken out (one
/// pod's ejection is worth a look), the error of a pod that took it out, else any error, and
/// every quota any pod was told is spent.
pub(crate) fn aggregate_upstreams(reports: &[ProxyReport]) -> Vec<UpstreamStatus> {
    let mut out: Vec<UpstreamStatus> = Vec::new();
    for u in reports.iter().flat_map(|r| &r.upstreams) {
        let Some(seen) = out.iter_mut().find(|s| s.name == u.name) else {
            out.push(u.clone());
            continue;
        };
        if let Some(l) = &u.observed_limits {
            let mine = seen.observed_limits.get_or_insert_with(ObservedLimits::default);
            mine.requests_per_minute = lower(mine.requests_per_minute, l.requests_per_minute);
            mine.tokens_per_minute = lower(mine.tokens_per_minute, l.tokens_per_minute);
        }
        if !u.healthy && seen.healthy {
            seen.healthy = false;
            seen.last_error = u.last_error.clone().or(seen.last_error.take());
        } else if seen.last_error.is_none() {
            seen.last_error = u.last_error.clone();
        }
        for x in &u.exhausted {
            if !seen.exhausted.iter().any(|s| s.model == x.model) {
                seen.exhausted.push(x.clone());
            }
        }
    }
    for u in &mut out {
        u.exhausted.sort_by(|a, b| a.model.cmp(&b.model));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `UpstreamQuotaExhausted`: true while an upstream reports a quota spent that no wait fixes
/// (an account out of credit, a spend limit, a daily quota): its requests are refused at once
/// or sent to another endpoint until its reset, which someone may need to act on.
pub(crate) fn upstream_quota_exhausted(
    upstreams: &[UpstreamStatus],
    generation: Option<i64>,
    previous: Option<&LlmProxyStatus>,
    now: &Time,
) -> Condition {
    let spent: Vec<String> = upstreams
        .iter()
        .flat_map(|u| {
            u.exhausted.iter().map(move |x| {
                let of = x.model.as_deref().map(|m| format!(" for {m}")).unwrap_or_default();
                let until = x.until.as_deref().map(|t| format!(" until {t}")).unwrap_or_default();
                format!("{}: {}{of}{until}", u.name, x.reason)
            })
        })
        .collect();
    let mut c = if spent.is_empty() {
        condition(
            "UpstreamQuotaExhausted",
            false,
            "UpstreamQuotasAvailable",
            "no upstream reports a spent quota".into(),
            generation,
            now,
        )
    } else {
        condition(
            "UpstreamQuotaExhausted",
            true,
            "UpstreamReportsQuotaSpent",
            format!(
                "{}; those requests are answered 429 at once or sent to another endpoint, and probed once a minute",
                spent.join("; ")
            ),
            generation,
            now,
        )
    };
    keep_transition(&mut c, previous);
    c
}

fn lower(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// All pods' usage together, against the LlmProxy's limits.
pub(crate) fn usage(reports: &[ProxyReport], policy: Option<&Policy>) -> UsageStatus {
    let sum = |f: fn(&ProxyReport) -> u64| reports.iter().map(f).fold(0u64, u64::saturating_add);
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let (requests, tokens) = (sum(|r| r.requests_last_minute), sum(|r| r.tokens_last_minute));
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let utilization = policy.map_or(0, |p| {
        let by_requests = requests as f64 / p.limits.requests_per_minute.max(1) as f64;
        let by_tokens = p.limits.tokens_per_minute.map_or(0.0, |t| tokens as f64 / t.max(1) as f64);
        (by_requests.max(by_tokens) * 100.0).round().min(1e9) as i64
    });
    let p99 = reports.iter().map(|r| r.queue_wait_p99_seconds).fold(0.0, f64::max);
    UsageStatus {
        requests_last_minute: as_i64(requests),
        tokens_last_minute: as_i64(tokens),
        utilization_percent: utilization,
        queue_depth: as_i64(sum(|r| r.queue_depth)),
        // Milliseconds are enough, and a stable value writes no status for noise.
        queue_wait_p99_seconds: (p99 * 1000.0).round() / 1000.0,
        upstream429s_last_minute: as_i64(sum(|r| r.upstream429s_last_minute)),
        upstream_errors_last_minute: as_i64(sum(|r| r.upstream_errors_last_minute)),
    }
}

/// `QuotaBound` (requests wait while slots are free: the upstream quota holds them, and more
/// pods would only divide it) and `Saturated` (a pod's slots are all taken with requests
/// waiting: more pods would help).
pub(crate) fn bottlenecks(
    reports: &[ProxyReport],
    generation: Option<i64>,
    previous: Option<&LlmProxyStatus>,
    now: &Time,
) -> Vec<Condition> {
    let waiting = |r: &&ProxyReport| r.queue_depth > 0;
    let quota_bound = reports.iter().filter(waiting).filter(|r| r.inflight < r.max_concurrent).count();
    let saturated = reports
        .iter()
        .filter(|r| r.max_concurrent > 0 && r.inflight >= r.max_concurrent && r.queue_depth > 0)
        .count();
    let pods = reports.len();
    let mut out = vec![
        if quota_bound > 0 {
            condition(
                "QuotaBound",
                true,
                "WaitingForUpstreamQuota",
                format!(
                    "{quota_bound} of {pods} pods queue requests while slots are free: the upstream quota holds \
                     them; more replicas would not help (raise the quota, spread load over time, or add an upstream)"
                ),
                generation,
                now,
            )
        } else {
            condition(
                "QuotaBound",
                false,
                "QuotaHasRoom",
                "no pod waits on the quota".into(),
                generation,
                now,
            )
        },
        if saturated > 0 {
            condition(
                "Saturated",
                true,
                "ConcurrencyExhausted",
                format!(
                    "{saturated} of {pods} pods have every maxConcurrent slot taken with requests waiting: \
                     scale out (or raise limits.maxConcurrent)"
                ),
                generation,
                now,
            )
        } else {
            condition("Saturated", false, "SlotsFree", "no pod is out of slots".into(), generation, now)
        },
    ];
    for c in &mut out {
        keep_transition(c, previous);
    }
    out
}

/// `QuotaShared`: whether every pod shares its buckets through Redis (`None` when no pod has
/// shared state). False with `RedisUnavailable` while any pod runs on its local share.
pub(crate) fn quota_shared(
    reports: &[ProxyReport],
    generation: Option<i64>,
    previous: Option<&LlmProxyStatus>,
    now: &Time,
) -> Option<Condition> {
    let modes: Vec<&str> = reports.iter().filter_map(|r| r.quota_mode.as_deref()).collect();
    if modes.is_empty() {
        return None;
    }
    let local = modes.iter().filter(|m| **m != "shared").count();
    let mut c = if local == 0 {
        condition(
            "QuotaShared",
            true,
            "Shared",
            format!("{} pods share the limits through Redis", modes.len()),
            generation,
            now,
        )
    } else {
        condition(
            "QuotaShared",
            false,
            "RedisUnavailable",
            format!(
                "{local} of {} pods cannot reach Redis and enforce a local share of the limits (rate / pods); \
                 the total stays within them, a busy pod cannot use what idle ones leave",
                modes.len()
            ),
            generation,
            now,
        )
    };
    keep_transition(&mut c, previous);
    Some(c)
}

/// `LimitsAboveUpstream`: true when an endpoint's configured limit is above what its upstream
/// reports granting; the proxies enforce the lower one, so the spec overstates what teams get.
pub(crate) fn limits_above_upstream(
    policy: &Policy,
    upstreams: &[UpstreamStatus],
    generation: Option<i64>,
    previous: Option<&LlmProxyStatus>,
    now: &Time,
) -> Condition {
    let mut above = Vec::new();
    for e in &policy.upstreams {
        let Some(seen) = upstreams.iter().find(|u| u.name == e.name).and_then(|u| u.observed_limits.as_ref())
        else {
            continue;
        };
        let mut check = |what: &str, configured: Option<u64>, observed: Option<i64>| {
            if let (Some(c), Some(o)) = (configured, observed)
                && i64::try_from(c).unwrap_or(i64::MAX) > o
            {
                above.push(format!("{}: {what} {c} configured, the upstream grants {o}", e.name));
            }
        };
        check("requestsPerMinute", e.limits.requests_per_minute, seen.requests_per_minute);
        check("tokensPerMinute", e.limits.tokens_per_minute, seen.tokens_per_minute);
    }
    let mut c = if above.is_empty() {
        condition(
            "LimitsAboveUpstream",
            false,
            "WithinUpstreamLimits",
            "no configured limit is above what its upstream reports".into(),
            generation,
            now,
        )
    } else {
        condition(
            "LimitsAboveUpstream",
            true,
            "UpstreamGrantsLess",
            format!("{}; the proxies enforce the upstream's figure", above.join("; ")),
            generation,
            now,
        )
    };
    keep_transition(&mut c, previous);
    c
}

/// Add the `ClientAuth` condition: whether clients must present a key, said plainly when they
/// need not (anything that can reach the Service then spends the upstream key).
pub(crate) fn add_client_auth(
    status: &mut LlmProxyStatus,
    required: bool,
    previous: Option<&LlmProxyStatus>,
    now: &Time,
) {
    let mut c = if required {
        condition(
            "ClientAuth",
            true,
            "ClientKeysRequired",
            "every request must carry a client key from spec.clients.keysSecretRef".into(),
            status.observed_generation,
            now,
        )
    } else {
        condition(
            "ClientAuth",
            false,
            "ClientAuthDisabled",
            "no spec.clients.keysSecretRef: anything that can reach the Service spends the upstream key"
                .into(),
            status.observed_generation,
            now,
        )
    };
    keep_transition(&mut c, previous);
    status.conditions.retain(|x| x.type_ != "ClientAuth");
    status.conditions.push(c);
}

/// A condition whose status did not change keeps its `lastTransitionTime` from `previous`.
fn keep_transition(c: &mut Condition, previous: Option<&LlmProxyStatus>) {
    if let Some(old) = condition_status(previous, &c.type_).filter(|o| o.status == c.status) {
        c.last_transition_time = old.last_transition_time.clone();
    }
}

/// The status of the condition `type_`, if set.
pub fn condition_status<'a>(status: Option<&'a LlmProxyStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap_or_default())
    }

    fn get<'a>(s: &'a LlmProxyStatus, t: &str) -> &'a Condition {
        condition_status(Some(s), t).unwrap_or_else(|| panic!("no {t}"))
    }

    #[test]
    fn ready_when_every_wanted_pod_is_ready() {
        let rollout = Rollout { desired: 2, replicas: 2, ready: 2, updated: 2 };
        let s = compute(Some(3), None, rollout, "http://x".into(), None, &at(10));
        assert_eq!(
            (get(&s, "Ready").status.as_str(), get(&s, "Ready").reason.as_str()),
            ("True", "ProxiesReady")
        );
        assert_eq!(get(&s, "Progressing").status, "False");
        assert_eq!(get(&s, "Degraded").status, "False");
        assert_eq!((s.observed_generation, s.ready_replicas), (Some(3), Some(2)));
    }

    #[test]
    fn not_ready_while_rolling_out() {
        let rollout = Rollout { desired: 2, replicas: 2, ready: 1, updated: 1 };
        let s = compute(Some(1), None, rollout, "http://x".into(), None, &at(10));
        assert_eq!(get(&s, "Ready").reason, "ProxiesNotReady");
        assert_eq!(get(&s, "Ready").message, "1 of 2 proxy pods ready");
        assert_eq!(get(&s, "Progressing").status, "True");
    }

    #[test]
    fn problems_degrade_with_an_actionable_message() {
        let p = Problem::SecretNotFound { secret: "openai-key".into(), use_: SecretUse::UpstreamKey };
        let s = compute(Some(1), Some(&p), Rollout::default(), "http://x".into(), None, &at(10));
        let d = get(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "SecretNotFound"));
        assert!(d.message.contains("kubectl create secret generic openai-key"), "{}", d.message);
        assert_eq!(get(&s, "Ready").status, "False");
    }

    #[test]
    fn client_auth_says_plainly_when_anyone_may_use_the_proxy() {
        let rollout = Rollout { desired: 1, replicas: 1, ready: 1, updated: 1 };
        let mut open = compute(Some(1), None, rollout, "e".into(), None, &at(10));
        add_client_auth(&mut open, false, None, &at(10));
        let c = get(&open, "ClientAuth");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "ClientAuthDisabled"));
        let mut again = compute(Some(2), None, rollout, "e".into(), Some(&open), &at(20));
        add_client_auth(&mut again, false, Some(&open), &at(20));
        assert_eq!(get(&again, "ClientAuth").last_transition_time, at(10));
        let mut closed = again.clone();
        add_client_auth(&mut closed, true, Some(&again), &at(30));
        assert_eq!(get(&closed, "ClientAuth").reason, "ClientKeysRequired");
        assert_eq!(get(&closed, "ClientAuth").last_transition_time, at(30));
        assert_eq!(closed.conditions.iter().filter(|c| c.type_ == "ClientAuth").count(), 1);
    }

    #[test]
    fn transition_times_move_only_on_transitions() {
        let rollout = Rollout { desired: 1, replicas: 1, ready: 1, updated: 1 };
        let first = compute(Some(1), None, rollout, "e".into(), None, &at(10));
        let same = compute(Some(2), None, rollout, "e".into(), Some(&first), &at(20));
        assert_eq!(get(&same, "Ready").last_transition_time, at(10));
        let down = Rollout { ready: 0, ..rollout };
        let changed = compute(Some(2), None, down, "e".into(), Some(&same), &at(30));
        assert_eq!(get(&changed, "Ready").last_transition_time, at(30));
        assert_eq!(get(&changed, "Degraded").last_transition_time, at(10));
    }

    fn seen(name: &str, rpm: Option<i64>, healthy: bool, error: Option<&str>) -> UpstreamStatus {
        UpstreamStatus {
            name: name.into(),
            observed_limits: rpm
                .map(|r| ObservedLimits { requests_per_minute: Some(r), ..ObservedLimits::default() }),
            healthy,
            last_error: error.map(str::to_owned),
            exhausted: Vec::new(),
        }
    }

    #[test]
    fn pods_reports_combine_into_the_lowest_limit_and_any_ejection() {
        let one = ProxyReport {
            upstreams: vec![seen("b", Some(600), true, None), seen("a", Some(100), true, None)],
            ..ProxyReport::default()
        };
        let two = ProxyReport {
            upstreams: vec![
                seen("a", Some(90), false, Some("connect: refused")),
                seen("b", None, true, None),
            ],
            ..ProxyReport::default()
        };
        let all = aggregate_upstreams(&[one, two]);
        assert_eq!(
            all,
            [seen("a", Some(90), false, Some("connect: refused")), seen("b", Some(600), true, None)]
        );
        assert!(aggregate_upstreams(&[]).is_empty());
    }

    #[test]
    fn a_quota_any_pod_was_told_is_spent_is_shown_once_with_a_condition() {
        let spent = |model: Option<&str>| llmproxy_api::ExhaustedStatus {
            model: model.map(str::to_owned),
            reason: "requests_per_day".into(),
            until: Some("2026-12-03T08:00:00Z".into()),
        };
        let pod = |models: &[Option<&str>]| ProxyReport {
            upstreams: vec![UpstreamStatus {
                exhausted: models.iter().map(|m| spent(*m)).collect(),
                ..seen("g", None, true, None)
            }],
            ..ProxyReport::default()
        };
        let all = aggregate_upstreams(&[pod(&[Some("m2")]), pod(&[Some("m1"), Some("m2")]), pod(&[])]);
        assert_eq!(all[0].exhausted, [spent(Some("m1")), spent(Some("m2"))]);
        let c = upstream_quota_exhausted(&all, Some(1), None, &at(5));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpstreamReportsQuotaSpent"));
        assert!(c.message.contains("g: requests_per_day for m1 until 2026-12-03T08:00:00Z"), "{}", c.message);
        let clear = upstream_quota_exhausted(&aggregate_upstreams(&[pod(&[])]), Some(1), None, &at(6));
        assert_eq!(clear.status, "False");
    }

    #[test]
    fn limits_above_upstream_names_the_endpoint_and_the_figures() {
        let yaml = "upstreams: [{name: a, url: 'https://a.example', limits: {requestsPerMinute: 1200}}, {name: b, url: 'https://b.example'}]\nlimits: {requestsPerMinute: 5000}";
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
        let policy = Policy::from_spec(&spec).unwrap();
        let c = limits_above_upstream(
            &policy,
            &[seen("a", Some(600), true, None), seen("b", Some(10), true, None)],
            Some(1),
            None,
            &at(10),
        );
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpstreamGrantsLess"));
        assert!(
            c.message.starts_with("a: requestsPerMinute 1200 configured, the upstream grants 600"),
            "{}",
            c.message
        );
        assert!(!c.message.contains("b:"), "b has no limit of its own: {}", c.message);
        let fine =
            limits_above_upstream(&policy, &[seen("a", Some(1200), true, None)], Some(1), None, &at(10));
        assert_eq!(fine.reason, "WithinUpstreamLimits");
    }

    #[test]
    fn the_reconciler_applies_its_fields_only_and_keeps_the_observers_for_comparison() {
        let rollout = Rollout { desired: 1, replicas: 1, ready: 1, updated: 1 };
        let mut stored = compute(Some(1), None, rollout, "e".into(), None, &at(10));
        stored.upstreams = vec![seen("a", Some(1), true, None)];
        stored.conditions.insert(
            0,
            condition("LimitsAboveUpstream", true, "UpstreamGrantsLess", "m".into(), Some(1), &at(5)),
        );
        let again = compute(Some(1), None, rollout, "e".into(), Some(&stored), &at(20));
        assert!(unchanged(Some(&stored), &again), "same content, other order: no write");
        let applied = reconciler_part(&again);
        assert!(applied.upstreams.is_empty());
        assert!(condition_status(Some(&applied), "LimitsAboveUpstream").is_none());
        assert!(condition_status(Some(&applied), "Ready").is_some());
    }

    #[test]
    fn quota_shared_says_when_a_pod_is_on_its_own() {
        let pod = |mode: Option<&str>| ProxyReport {
            quota_mode: mode.map(str::to_owned),
            ..ProxyReport::default()
        };
        assert!(quota_shared(&[pod(None)], Some(1), None, &at(1)).is_none(), "no shared state, no condition");
        let ok = quota_shared(&[pod(Some("shared")), pod(Some("shared"))], Some(1), None, &at(1));
        assert_eq!(ok.map(|c| (c.status, c.reason)), Some(("True".into(), "Shared".into())));
        let down = quota_shared(&[pod(Some("shared")), pod(Some("local"))], Some(1), None, &at(1));
        let down = down.expect("a condition");
        assert_eq!((down.status.as_str(), down.reason.as_str()), ("False", "RedisUnavailable"));
        assert!(down.message.starts_with("1 of 2 pods"), "{}", down.message);
    }
}
