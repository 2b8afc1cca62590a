//! Status: what a person needs to act on, as standard conditions (`Ready`, `Progressing`,
//! `Degraded`) with reasons. Pure; the reconciler writes the result.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use llmproxy_api::LlmProxyStatus;

/// Something about the LlmProxy that the operator cannot fix by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The spec passed the schema but cannot run (the message names the field).
    InvalidPolicy(String),
    /// `spec.upstream.apiKeySecretRef` names a Secret that does not exist.
    SecretNotFound(String),
    /// The API server refused an object built from the spec.
    ChildRejected(String),
    /// The Secret has not opted in to being read by proxies (label
    /// `llmproxy.io/upstream-key: "true"`), or its `llmproxy.io/allowed-proxies` does not list
    /// this LlmProxy.
    SecretNotAllowed(String),
    /// The Secret exists but lacks the key.
    SecretKeyMissing {
        /// Secret name.
        secret: String,
        /// The missing key.
        key: String,
    },
}

impl Problem {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::InvalidPolicy(_) => "InvalidPolicy",
            Problem::SecretNotFound(_) => "SecretNotFound",
            Problem::ChildRejected(_) => "ChildRejected",
            Problem::SecretNotAllowed(_) => "SecretNotAllowed",
            Problem::SecretKeyMissing { .. } => "SecretKeyMissing",
        }
    }

    /// What to do about it.
    pub fn message(&self) -> String {
        match self {
            Problem::InvalidPolicy(e) => format!("the spec cannot run: {e}; fix it and re-apply"),
            Problem::SecretNotFound(s) => format!(
                "Secret {s} (spec.upstream.apiKeySecretRef) not found; create it, e.g. \
                 kubectl create secret generic {s} --from-literal=api-key=..."
            ),
            Problem::SecretNotAllowed(s) => format!(
                "Secret {s} has not opted in to being read by llmproxy: whoever owns it runs \
                 kubectl label secret {s} {}=true (and may narrow it with the annotation {}=NAME,...)",
                llmproxy_api::SECRET_OPT_IN_LABEL,
                llmproxy_api::SECRET_ALLOWED_PROXIES
            ),
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
pub struct Rollout {
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
pub fn compute(
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
    if let Some(prev) = previous {
        for c in &mut conditions {
            if let Some(old) = prev.conditions.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
    }
    LlmProxyStatus {
        conditions,
        observed_generation: generation,
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        endpoint: Some(endpoint),
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
        let p = Problem::SecretNotFound("openai-key".into());
        let s = compute(Some(1), Some(&p), Rollout::default(), "http://x".into(), None, &at(10));
        let d = get(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "SecretNotFound"));
        assert!(d.message.contains("kubectl create secret generic openai-key"), "{}", d.message);
        assert_eq!(get(&s, "Ready").status, "False");
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
}
