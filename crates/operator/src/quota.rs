//! LlmQuota references: which LlmProxies may draw from an LlmQuota (their namespace matches its
//! `allowedNamespaces`, and the guarantees fit in 100 %), what each is granted, and the RBAC
//! that lets exactly those proxies read the quota's Redis password. Pure, for tests; the
//! reconciler and the observer apply the results.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use llmproxy_api::{GrantedQuota, LlmProxy, LlmQuota, QuotaConsumer};

/// Whether labels `labels` match `selector` (`matchLabels` and `matchExpressions`, as the API
/// server evaluates them). An absent selector matches nothing: a quota is closed until its
/// owner says who may draw from it.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(s) = selector else { return false };
    let by_labels = s.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// One LlmProxy that names a quota, as the verdict needs it.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The namespace's labels.
    pub namespace_labels: BTreeMap<String, String>,
    /// `quotaRef.weight`.
    pub weight: i32,
    /// `quotaRef.guaranteed`.
    pub guaranteed: Option<i32>,
    /// Creation time, oldest first: earlier consumers keep their guarantees.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
}

/// The LlmProxies among `proxies` that name quota `name`, with their namespaces' labels
/// (read once per namespace, into `labels`).
pub async fn candidates<'a>(
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
            weight: r.weight,
            guaranteed: r.guaranteed,
            created: p.metadata.creation_timestamp.as_ref().map(|t| t.0),
        });
    }
    Ok(out)
}

/// Every consumer's verdict, oldest first: a namespace the quota does not allow, or a
/// guarantee that would push the sum over 100 %, is refused with a reason; usage is left
/// for the observer.
pub fn verdicts(quota: &LlmQuota, candidates: &[Candidate]) -> Vec<QuotaConsumer> {
    let mut ordered: Vec<&Candidate> = candidates.iter().collect();
    ordered.sort_by(|a, b| (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name)));
    let mut guaranteed = 0i64;
    ordered
        .into_iter()
        .map(|c| {
            let g = i64::from(c.guaranteed.unwrap_or(0).max(0));
            let reason = if !selects(quota.spec.allowed_namespaces.as_ref(), &c.namespace_labels) {
                Some(format!("namespace {} is not in the LlmQuota's allowedNamespaces", c.namespace))
            } else if guaranteed + g > 100 {
                Some(format!("guaranteed {g} % does not fit: earlier consumers hold {guaranteed} % of 100 %"))
            } else {
                guaranteed += g;
                None
            };
            QuotaConsumer {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                weight: c.weight,
                guaranteed: c.guaranteed,
                allowed: reason.is_none(),
                reason,
                requests_last_minute: None,
                tokens_last_minute: None,
            }
        })
        .collect()
}

/// What an allowed consumer is granted: the quota as the proxies will enforce it, the password
/// Secret found in the operator's namespace.
pub fn grant(quota: &LlmQuota, p: &LlmProxy, operator_namespace: Option<&str>) -> Option<GrantedQuota> {
    let r = p.spec.quota_ref.as_ref()?;
    Some(GrantedQuota {
        name: quota.name_any(),
        requests_per_minute: quota.spec.requests_per_minute,
        tokens_per_minute: quota.spec.tokens_per_minute,
        models: quota.spec.models.clone(),
        redis: quota.spec.shared_state.redis.clone(),
        password_namespace: quota
            .spec
            .shared_state
            .redis
            .password_secret_ref
            .as_ref()
            .and(operator_namespace.map(str::to_owned)),
        weight: r.weight,
        guaranteed: r.guaranteed,
    })
}

/// The name of the Role and RoleBinding that let a quota's consumers read its password.
pub fn password_rbac_name(quota: &str) -> String {
    format!("llmproxy-quota-{quota}-password")
}

/// A Role in the operator's namespace reading only the quota's password Secret, and a
/// RoleBinding naming only the allowed consumers' ServiceAccounts; both owned by the LlmQuota
/// (so they go with it). `None` when the quota has no password.
pub fn password_rbac(
    quota: &LlmQuota,
    namespace: &str,
    allowed: &[QuotaConsumer],
) -> Option<(Role, RoleBinding)> {
    let secret = quota.spec.shared_state.redis.password_secret_ref.as_ref()?;
    let name = password_rbac_name(&quota.name_any());
    let owner = OwnerReference {
        api_version: LlmQuota::api_version(&()).into_owned(),
        kind: LlmQuota::kind(&()).into_owned(),
        name: quota.name_any(),
        uid: quota.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), "llmproxy-operator".to_owned()),
            ("llmproxy.io/quota".to_owned(), quota.name_any()),
        ])),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![secret.name.clone()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    };
    let subjects: Vec<Subject> = allowed
        .iter()
        .filter(|c| c.allowed)
        .map(|c| Subject {
            kind: "ServiceAccount".into(),
            name: crate::children::proxy_identity(&c.name),
            namespace: Some(c.namespace.clone()),
            api_group: None,
        })
        .collect();
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name },
        subjects: Some(subjects),
    };
    Some((role, binding))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn quota(selector: Option<LabelSelector>) -> LlmQuota {
        let yaml = "apiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {name: org, uid: u1}\nspec:\n  requestsPerMinute: 6000\n  sharedState: {redis: {url: 'redis://r:6379', passwordSecretRef: {name: redis-auth}}}\n";
        let mut q: LlmQuota = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
        q.spec.allowed_namespaces = selector;
        q
    }

    fn candidate(ns: &str, team: &str, guaranteed: Option<i32>, created: i64) -> Candidate {
        Candidate {
            namespace: ns.into(),
            name: "p".into(),
            namespace_labels: BTreeMap::from([("team".to_owned(), team.to_owned())]),
            weight: 1,
            guaranteed,
            created: k8s_openapi::jiff::Timestamp::from_second(created).ok(),
        }
    }

    #[test]
    fn namespaces_and_guarantees_decide_who_may_draw() {
        let sel = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "team".into(),
                operator: "In".into(),
                values: Some(vec!["a".into(), "b".into()]),
            }]),
            ..LabelSelector::default()
        };
        let q = quota(Some(sel));
        let v = verdicts(
            &q,
            &[
                candidate("ns-late", "b", Some(50), 30),
                candidate("ns-a", "a", Some(60), 10),
                candidate("ns-x", "x", None, 20),
            ],
        );
        let summary: Vec<(&str, bool)> = v.iter().map(|c| (c.namespace.as_str(), c.allowed)).collect();
        assert_eq!(summary, [("ns-a", true), ("ns-x", false), ("ns-late", false)]);
        assert!(v[1].reason.as_deref().is_some_and(|r| r.contains("allowedNamespaces")));
        assert!(v[2].reason.as_deref().is_some_and(|r| r.contains("earlier consumers hold 60 %")));
        assert!(
            verdicts(&quota(None), &[candidate("ns-a", "a", None, 1)]).iter().all(|c| !c.allowed),
            "closed without a selector"
        );
    }

    #[test]
    fn only_allowed_consumers_read_the_password_and_only_that_secret() {
        let q = quota(None);
        let consumers = [
            QuotaConsumer {
                namespace: "a".into(),
                name: "p".into(),
                allowed: true,
                ..QuotaConsumer::default()
            },
            QuotaConsumer {
                namespace: "b".into(),
                name: "q".into(),
                allowed: false,
                ..QuotaConsumer::default()
            },
        ];
        let (role, binding) =
            password_rbac(&q, "llmproxy-system", &consumers).unwrap_or_else(|| panic!("rbac"));
        let rule = &role.rules.unwrap_or_default()[0];
        assert_eq!(rule.resource_names.as_deref(), Some(&["redis-auth".to_owned()][..]));
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        let subjects = binding.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        assert_eq!((subjects[0].namespace.as_deref(), subjects[0].name.as_str()), (Some("a"), "p-proxy"));
        assert_eq!(role.metadata.namespace.as_deref(), Some("llmproxy-system"));
    }
}
