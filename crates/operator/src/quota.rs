//! LlmQuota references: which LlmProxies may draw from an LlmQuota (their namespace matches its
//! `allowedNamespaces`) and what each is granted (the share its owner sets in `consumers`, its
//! own Redis user). Pure, for tests; the reconciler and the observer apply the results.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use llmproxy_api::redis_acl::{PASSWORD_KEY, consumer_secret, consumer_user};
use llmproxy_api::{GrantedQuota, LlmProxy, LlmQuota, QuotaConsumer, QuotaRef};

/// Whether labels `labels` match `selector`; an absent selector matches nothing.
pub(crate) fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    llmproxy_api::crd::selects(selector, labels)
}

/// One LlmProxy that names a quota, as the verdict needs it.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// The namespace's labels.
    pub(crate) namespace_labels: BTreeMap<String, String>,
    /// Its `quotaRef`: what it asks for (it may only lower what the owner grants).
    pub(crate) reference: QuotaRef,
    /// Creation time, for a stable order in the LlmQuota's status.
    pub(crate) created: Option<k8s_openapi::jiff::Timestamp>,
}

/// The LlmProxies among `proxies` that name quota `name`, with their namespaces' labels
/// (read once per namespace, into `labels`).
pub(crate) async fn candidates<'a>(
    client: &kube::Client,
    proxies: impl IntoIterator<Item = &'a LlmProxy>,
    name: &str,
    labels: &mut std::collections::HashMap<String, BTreeMap<String, String>>,
) -> Result<Vec<Candidate>, kube::Error> {
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    let mut out = Vec::new();
    for p in proxies {
        let Some(r) = p.spec.quota_ref.as_ref().filter(|r| r.name == name) else { continue };
        let ns = p.namespace().unwrap_or_default();
        if !labels.contains_key(&ns) {
            let mut l = namespaces.get_opt(&ns).await?.map(|n| n.labels().clone()).unwrap_or_default();
            // As the API server sets it on every namespace.
            l.insert("kubernetes.io/metadata.name".into(), ns.clone());
            labels.insert(ns.clone(), l);
        }
        out.push(Candidate {
            namespace: ns.clone(),
            name: p.name_any(),
            namespace_labels: labels.get(&ns).cloned().unwrap_or_default(),
            reference: r.clone(),
            created: p.metadata.creation_timestamp.as_ref().map(|t| t.0),
        });
    }
    Ok(out)
}

/// Every consumer's verdict, oldest first, with the share the quota's owner grants it: a
/// namespace the quota does not allow, or a quota whose shares do not add up, is refused with
/// a reason; usage is left for the observer.
pub(crate) fn verdicts(quota: &LlmQuota, candidates: &[Candidate]) -> Vec<QuotaConsumer> {
    let mut ordered: Vec<&Candidate> = candidates.iter().collect();
    ordered.sort_by(|a, b| (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name)));
    let invalid = quota.spec.problems();
    ordered
        .into_iter()
        .map(|c| {
            let share = quota.spec.share_of(&c.namespace, &c.name, &c.namespace_labels, &c.reference);
            let reason = if !selects(quota.spec.allowed_namespaces.as_ref(), &c.namespace_labels) {
                Some(format!("namespace {} is not in the LlmQuota's allowedNamespaces", c.namespace))
            } else {
                invalid.first().map(|problem| format!("the LlmQuota is invalid: {problem}"))
            };
            QuotaConsumer {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                weight: share.weight,
                guaranteed: (share.guaranteed > 0).then_some(share.guaranteed),
                allowed: reason.is_none(),
                reason,
                requests_last_minute: None,
                tokens_last_minute: None,
            }
        })
        .collect()
}

/// What an allowed consumer is granted (`verdict`: its entry in [`verdicts`]): the quota as
/// the proxies will enforce it, with the owner's share and, where the quota's Redis has a
/// password, the consumer's own Redis user and the Secret of its password (in the operator's
/// namespace; see `crate::identities`), never the quota's own password.
pub(crate) fn grant(
    quota: &LlmQuota,
    verdict: &QuotaConsumer,
    operator_namespace: Option<&str>,
) -> GrantedQuota {
    let name = quota.name_any();
    let mut redis = quota.spec.shared_state.redis.clone();
    let (mut password_namespace, mut username) = (None, None);
    if let (Some(r), Some(ns)) = (redis.password_secret_ref.as_mut(), operator_namespace) {
        r.name = consumer_secret(&name, &verdict.namespace, &verdict.name);
        r.key = PASSWORD_KEY.to_owned();
        password_namespace = Some(ns.to_owned());
        username = Some(consumer_user(&name, &format!("{}/{}", verdict.namespace, verdict.name)));
    }
    GrantedQuota {
        name,
        requests_per_minute: quota.spec.requests_per_minute,
        tokens_per_minute: quota.spec.tokens_per_minute,
        models: quota.spec.models.clone(),
        redis,
        password_namespace,
        username,
        weight: verdict.weight,
        guaranteed: verdict.guaranteed,
    }
}

/// The name of the Role and RoleBinding that once let all of a quota's consumers read its
/// password; the operator deletes them where an older version left them.
pub(crate) fn password_rbac_name(quota: &str) -> String {
    format!("llmproxy-quota-{quota}-password")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn quota(selector: Option<LabelSelector>) -> LlmQuota {
        let yaml = "apiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {name: org, uid: u1}\nspec:\n  requestsPerMinute: 6000\n  sharedState: {redis: {url: 'redis://r:6379', passwordSecretRef: {name: redis-auth}}}\n";
        let mut q: LlmQuota = serde_yaml::from_str(yaml).unwrap();
        q.spec.allowed_namespaces = selector;
        q
    }

    fn candidate(ns: &str, team: &str, guaranteed: Option<i32>, created: i64) -> Candidate {
        Candidate {
            namespace: ns.into(),
            name: "p".into(),
            namespace_labels: BTreeMap::from([("team".to_owned(), team.to_owned())]),
            reference: QuotaRef { name: "org".into(), weight: None, guaranteed },
            created: k8s_openapi::jiff::Timestamp::from_second(created).ok(),
        }
    }

    fn team_selector() -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "team".into(),
                operator: "In".into(),
                values: Some(vec!["a".into(), "b".into()]),
            }]),
            ..LabelSelector::default()
        }
    }

    #[test]
    fn namespaces_decide_who_may_draw() {
        let q = quota(Some(team_selector()));
        let v = verdicts(
            &q,
            &[
                candidate("ns-late", "b", None, 30),
                candidate("ns-a", "a", None, 10),
                candidate("ns-x", "x", None, 20),
            ],
        );
        let summary: Vec<(&str, bool)> = v.iter().map(|c| (c.namespace.as_str(), c.allowed)).collect();
        assert_eq!(summary, [("ns-a", true), ("ns-x", false), ("ns-late", true)]);
        assert!(v[1].reason.as_deref().is_some_and(|r| r.contains("allowedNamespaces")));
        assert!(
            verdicts(&quota(None), &[candidate("ns-a", "a", None, 1)]).iter().all(|c| !c.allowed),
            "closed without a selector"
        );
    }

    #[test]
    fn shares_are_the_owners_and_a_consumer_can_only_ask_for_less() {
        let mut q = quota(Some(team_selector()));
        let yaml = "- {namespace: ns-a, name: p, weight: 4, guaranteed: 30}\n- {namespaceSelector: {matchLabels: {team: b}}, weight: 2}\n";
        q.spec.consumers = serde_yaml::from_str(yaml).unwrap();
        q.spec.default_weight = Some(3);
        // The oldest consumer asks for everything: it gets what the owner set, no more. A later
        // one asking nothing is not starved: it has its entry's weight.
        let mut greedy = candidate("ns-a", "a", Some(100), 1);
        greedy.reference.weight = Some(1000);
        let mut modest = candidate("ns-b", "b", None, 2);
        modest.reference.weight = Some(1);
        let mut unlisted = candidate("ns-a", "a", None, 3);
        unlisted.name = "other".into();
        let v = verdicts(&q, &[greedy, candidate("ns-b2", "b", Some(10), 4), modest, unlisted]);
        let shares: Vec<(&str, &str, bool, i32, Option<i32>)> = v
            .iter()
            .map(|c| (c.namespace.as_str(), c.name.as_str(), c.allowed, c.weight, c.guaranteed))
            .collect();
        assert_eq!(
            shares,
            [
                ("ns-a", "p", true, 4, Some(30)),
                ("ns-b", "p", true, 1, None),
                ("ns-a", "other", true, 3, None),
                ("ns-b2", "p", true, 2, None),
            ]
        );
        let g = grant(&q, &v[0], Some("ops"));
        assert_eq!((g.weight, g.guaranteed, g.password_namespace.as_deref()), (4, Some(30), Some("ops")));
        // Its own Redis user and password Secret, never the quota's own password.
        let secret = g.redis.password_secret_ref.as_ref().map(|r| r.name.clone());
        assert_eq!(secret, Some(consumer_secret("org", &v[0].namespace, &v[0].name)));
        assert_ne!(secret.as_deref(), Some("redis-auth"));
        assert_eq!(g.username, Some(consumer_user("org", &format!("{}/{}", v[0].namespace, v[0].name))));
    }

    #[test]
    fn guarantees_over_100_refuse_every_consumer_with_the_reason() {
        let mut q = quota(Some(team_selector()));
        let yaml =
            "- {namespace: ns-a, name: p, guaranteed: 70}\n- {namespace: ns-b, name: p, guaranteed: 40}\n";
        q.spec.consumers = serde_yaml::from_str(yaml).unwrap();
        let v = verdicts(&q, &[candidate("ns-a", "a", None, 1), candidate("ns-b", "b", None, 2)]);
        assert!(v.iter().all(|c| !c.allowed), "{v:?}");
        assert!(v[0].reason.as_deref().is_some_and(|r| r.contains("sum to 110 %")), "{v:?}");
    }
}
