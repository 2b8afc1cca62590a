//! Reconcile one LlmProxy as a short pipeline: validate -> build the children (pure) ->
//! server-side apply them with owner references -> write status and events.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use llmproxy_api::{LlmProxy, LlmProxyStatus, Policy, SecretKeyRef};
use serde::Serialize;
use serde::de::DeserializeOwned;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::children::{self, Children, Grants, Settings};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::status::{self, Problem, Rollout, SecretUse};

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "llmproxy-operator";

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// How children are built.
    pub settings: Settings,
    /// Consecutive failures per object, for exponential back-off.
    failures: Mutex<HashMap<ObjectRef<DeserializeGuard<LlmProxy>>, u32>>,
}

impl Context {
    /// A context for one operator process.
    pub fn new(client: Client, recorder: Recorder, metrics: Metrics, settings: Settings) -> Self {
        Self { client, recorder, metrics, settings, failures: Mutex::default() }
    }
}

/// Server-side apply `obj` in `ns`, forcing ownership of the fields it sets.
async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj)).await
}

/// Delete `name` if it exists and `owner` controls it (a PDB or HPA no longer wanted).
async fn remove_owned<K>(client: &Client, ns: &str, name: &str, owner: &LlmProxy) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let Some(existing) = api.get_opt(name).await? else { return Ok(()) };
    let uid = owner.uid();
    if existing.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true))
    {
        api.delete(name, &DeleteParams::default()).await?;
    }
    Ok(())
}

/// The field manager that keeps `spec.replicas` when autoscaling takes the count over.
const REPLICAS_HANDOFF: &str = "llmproxy-operator-replicas";

/// Apply every child; the Deployment as the API server returned it.
async fn apply_children(
    client: &Client,
    ns: &str,
    p: &LlmProxy,
    c: &Children,
) -> Result<Deployment, kube::Error> {
    apply(client, ns, &c.service_account).await?;
    apply(client, ns, &c.role).await?;
    apply(client, ns, &c.role_binding).await?;
    apply(client, ns, &c.service).await?;
    if c.hpa.is_some() || c.scaled_object.is_some() {
        hand_over_replicas(client, ns, &p.name_any()).await?;
    }
    let deployment = apply(client, ns, &c.deployment).await?;
    let name = p.name_any();
    match &c.pdb {
        Some(pdb) => drop(apply(client, ns, pdb).await?),
        None => remove_owned::<PodDisruptionBudget>(client, ns, &name, p).await?,
    }
    match &c.hpa {
        Some(hpa) => drop(apply(client, ns, hpa).await?),
        None => remove_owned::<HorizontalPodAutoscaler>(client, ns, &name, p).await?,
    }
    match &c.network_policy {
        Some(np) => drop(apply(client, ns, np).await?),
        None => remove_owned::<NetworkPolicy>(client, ns, &name, p).await?,
    }
    let scaled: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &children::scaled_object_resource());
    match &c.scaled_object {
        Some(so) => {
            match scaled.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(so)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    let message = "spec.autoscaling.keda: KEDA's ScaledObject (keda.sh/v1alpha1) is not installed \
                               in this cluster; install KEDA or scale with the HPA (remove keda)";
                    return Err(kube::Error::Api(
                        kube::core::Status::failure(message, "NotFound").with_code(422).boxed(),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        // Gone from the spec: remove ours, if KEDA is there at all.
        None => match scaled.get_opt(&name).await {
            Ok(Some(existing)) => {
                let uid = p.uid();
                if existing.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref()) {
                    scaled.delete(&name, &DeleteParams::default()).await?;
                }
            }
            Ok(None) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e),
        },
    }
    Ok(deployment)
}

/// With autoscaling the operator stops applying `spec.replicas`. A field its only manager
/// drops is removed, and a Deployment without `replicas` scales to 1 until the HPA reacts;
/// so before that, a second manager applies the current count once, keeping the field.
async fn hand_over_replicas(client: &Client, ns: &str, name: &str) -> Result<(), kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(current) = api.get_opt(name).await?.and_then(|d| d.spec?.replicas) else { return Ok(()) };
    let body = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                                  "spec": {"replicas": current}});
    api.patch(name, &PatchParams::apply(REPLICAS_HANDOFF).force(), &Patch::Apply(&body)).await.map(drop)
}

/// Whether a proxy of `proxy` may read `secret` for `use_` (it opted in to that use, and does
/// not exclude this proxy), and what is wrong with it if anything. Pure, for tests.
pub fn secret_verdict(
    secret: Option<&Secret>,
    name: &str,
    use_: SecretUse,
    proxy: &str,
) -> (Option<Problem>, bool) {
    let Some(s) = secret else {
        return (Some(Problem::SecretNotFound { secret: name.to_owned(), use_ }), false);
    };
    let opted_in = s.labels().get(use_.label()).is_some_and(|v| v == "true");
    let listed = s
        .annotations()
        .get(llmproxy_api::SECRET_ALLOWED_PROXIES)
        .is_none_or(|names| names.split(',').any(|n| n.trim() == proxy));
    if !(opted_in && listed) {
        return (Some(Problem::SecretNotAllowed { secret: name.to_owned(), use_ }), false);
    }
    (None, true)
}

/// What the upstream key Secret lacks, if anything.
fn upstream_key_problem(s: &Secret, r: &SecretKeyRef) -> Option<Problem> {
    let present = s.data.as_ref().is_some_and(|d| d.contains_key(&r.key));
    (!present).then(|| Problem::SecretKeyMissing { secret: r.name.clone(), key: r.key.clone() })
}

/// Whether the client keys Secret loads the way the proxy will load it, with one key at least.
fn client_keys_problem(s: &Secret, name: &str) -> Option<Problem> {
    let data = s.data.clone().unwrap_or_default();
    let mut pairs = Vec::new();
    for (client, key) in &data {
        match std::str::from_utf8(&key.0) {
            Ok(k) => pairs.push((client.as_str(), k)),
            Err(_) => {
                let error = format!("client {client:?}: the key is not UTF-8 text");
                return Some(Problem::ClientKeysInvalid { secret: name.to_owned(), error });
            }
        }
    }
    let error = match llmproxy_api::ClientKeys::from_pairs(pairs) {
        Ok(keys) if keys.names().next().is_none() => "it holds no keys: no client could connect".to_owned(),
        Ok(_) => return None,
        Err(e) => e,
    };
    Some(Problem::ClientKeysInvalid { secret: name.to_owned(), error })
}

/// Check the Secrets the proxies will read: they exist, opted in to their use, and hold what
/// the proxy needs. Only those that opted in are granted; the first problem is reported.
async fn check_secrets(
    client: &Client,
    ns: &str,
    p: &LlmProxy,
) -> Result<(Option<Problem>, Grants), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let (mut problems, mut grants) = (Vec::new(), Grants::default());
    for r in p.spec.upstream_key_refs() {
        let secret = secrets.get_opt(&r.name).await?;
        let (problem, readable) =
            secret_verdict(secret.as_ref(), &r.name, SecretUse::UpstreamKey, &p.name_any());
        problems.extend(problem.or_else(|| upstream_key_problem(secret.as_ref()?, &r)));
        if readable && !grants.secrets.contains(&r.name) {
            grants.secrets.push(r.name.clone());
        }
    }
    if let Some(r) = p.spec.shared_state.as_ref().and_then(|s| s.redis.password_secret_ref.as_ref()) {
        let secret = secrets.get_opt(&r.name).await?;
        let (problem, readable) =
            secret_verdict(secret.as_ref(), &r.name, SecretUse::RedisPassword, &p.name_any());
        let lacks_key = |s: &Secret| {
            let present = s.data.as_ref().is_some_and(|d| d.contains_key(&r.key));
            (!present).then(|| Problem::SecretKeyMissing { secret: r.name.clone(), key: r.key.clone() })
        };
        problems.extend(problem.or_else(|| lacks_key(secret.as_ref()?)));
        if readable && !grants.secrets.contains(&r.name) {
            grants.secrets.push(r.name.clone());
        }
    }
    if let Some(r) = p.spec.clients.as_ref().and_then(|c| c.keys_secret_ref.as_ref()) {
        let secret = secrets.get_opt(&r.name).await?;
        let (problem, readable) =
            secret_verdict(secret.as_ref(), &r.name, SecretUse::ClientKeys, &p.name_any());
        problems.extend(problem.or_else(|| client_keys_problem(secret.as_ref()?, &r.name)));
        if readable && !grants.secrets.contains(&r.name) {
            grants.secrets.push(r.name.clone());
        }
    }
    Ok((problems.into_iter().next(), grants))
}

/// The LlmProxies that name quota `name`, as the verdict needs them: from all namespaces
/// where the operator may list them, else `ns` only.
async fn quota_candidates(
    client: &Client,
    name: &str,
    ns: &str,
) -> Result<Vec<crate::quota::Candidate>, kube::Error> {
    let all = match Api::<LlmProxy>::all(client.clone()).list(&Default::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 403 => {
            Api::<LlmProxy>::namespaced(client.clone(), ns).list(&Default::default()).await?.items
        }
        Err(e) => return Err(e),
    };
    crate::quota::candidates(client, &all, name, &mut HashMap::new()).await
}

/// Check `spec.quotaRef`: the LlmQuota exists and lets this LlmProxy draw; what it grants.
async fn check_quota(
    client: &Client,
    ns: &str,
    p: &LlmProxy,
    settings: &Settings,
) -> Result<(Option<Problem>, Option<llmproxy_api::GrantedQuota>), kube::Error> {
    let Some(r) = &p.spec.quota_ref else { return Ok((None, None)) };
    let Some(quota) = Api::<llmproxy_api::LlmQuota>::all(client.clone()).get_opt(&r.name).await? else {
        return Ok((Some(Problem::QuotaNotFound(r.name.clone())), None));
    };
    let candidates = quota_candidates(client, &r.name, ns).await?;
    let verdicts = crate::quota::verdicts(&quota, &candidates);
    let mine = verdicts.iter().find(|v| v.namespace == ns && v.name == p.name_any());
    match mine {
        Some(v) if v.allowed => {
            Ok((None, crate::quota::grant(&quota, p, settings.operator_namespace.as_deref())))
        }
        Some(v) => Ok((
            Some(Problem::QuotaNotAllowed {
                quota: r.name.clone(),
                reason: v.reason.clone().unwrap_or_default(),
            }),
            None,
        )),
        None => {
            Ok((Some(Problem::QuotaNotAllowed { quota: r.name.clone(), reason: "not listed".into() }), None))
        }
    }
}

/// Reconcile one LlmProxy (or report one that cannot be read).
pub async fn reconcile(p: Arc<DeserializeGuard<LlmProxy>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.duration.start_timer();
    let result = match &p.0 {
        Ok(proxy) => reconcile_inner(proxy, &ctx).await,
        Err(invalid) => report_unreadable(invalid, &ctx).await,
    };
    timer.observe_duration();
    if result.is_ok() {
        ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
        ctx.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(&ObjectRef::from_obj(p.as_ref()));
    }
    result
}

async fn reconcile_inner(p: &LlmProxy, ctx: &Context) -> Result<Action, Error> {
    let ns = p.namespace().ok_or(Error::NoNamespace)?;
    let client = &ctx.client;

    // Validate: what the schema cannot express.
    let (secret_problem, grants) = check_secrets(client, &ns, p).await?;
    let (quota_problem, granted) = check_quota(client, &ns, p, &ctx.settings).await?;
    let problem = match Policy::from_spec(&p.spec) {
        Err(e) => Some(Problem::InvalidPolicy(e.to_string())),
        Ok(_) => secret_problem.or(quota_problem),
    };

    // Build (pure) and apply. Children are applied even when the spec has a problem: they do
    // not depend on the policy, and running proxies keep serving their last good one.
    let c = children::build(p, &ctx.settings, &grants);
    let (problem, deployment) = match apply_children(client, &ns, p, &c).await {
        Ok(d) => (problem, Some(d)),
        // The API server refused an object built from the spec (say, resource requests above
        // their limits): the user must change the LlmProxy; retrying cannot help.
        Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => {
            (problem.or(Some(Problem::ChildRejected(s.message))), None)
        }
        Err(e) => return Err(e.into()),
    };

    // Status.
    let deployment = deployment.unwrap_or_default();
    let ds = deployment.status.unwrap_or_default();
    let current = ds.observed_generation.is_some_and(|g| Some(g) >= deployment.metadata.generation);
    let rollout = Rollout {
        desired: deployment.spec.and_then(|s| s.replicas).unwrap_or_else(|| children::desired_replicas(p)),
        replicas: ds.replicas.unwrap_or(0),
        ready: ds.ready_replicas.unwrap_or(0),
        updated: if current { ds.updated_replicas.unwrap_or(0) } else { 0 },
    };
    let now = Time(Timestamp::now());
    let mut new = status::compute(
        p.metadata.generation,
        problem.as_ref(),
        rollout,
        children::endpoint(p),
        p.status.as_ref(),
        &now,
    );
    let keys_required = p.spec.clients.as_ref().is_some_and(|c| c.keys_secret_ref.is_some());
    status::add_client_auth(&mut new, keys_required, p.status.as_ref(), &now);
    new.quota = granted;
    if !status::unchanged(p.status.as_ref(), &new) {
        let api: Api<LlmProxy> = Api::namespaced(client.clone(), &ns);
        let body = serde_json::json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy",
            "status": status::reconciler_part(&new)});
        api.patch_status(&p.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
        publish_transitions(ctx, p, p.status.as_ref(), &new).await;
    }

    Ok(match problem {
        // Nothing will change until the user edits the object: no hot loop.
        Some(Problem::InvalidPolicy(_) | Problem::ChildRejected(_)) => Action::await_change(),
        // The Secret watch brings us back when it appears; this is the fallback.
        Some(_) => Action::requeue(Duration::from_secs(60)),
        None => Action::requeue(Duration::from_secs(300)),
    })
}

/// An LlmProxy the operator cannot read (it does not match the types): say so in its status
/// and an event, touch nothing else, and wait for the next edit.
async fn report_unreadable(invalid: &InvalidObject, ctx: &Context) -> Result<Action, Error> {
    let meta = &invalid.metadata;
    let (Some(ns), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else {
        return Err(Error::NoNamespace);
    };
    tracing::warn!(namespace = %ns, name = %name, error = %invalid.error, "LlmProxy cannot be read");
    let problem = Problem::InvalidPolicy(format!("the object cannot be read: {}", invalid.error));
    let now = Time(Timestamp::now());
    let status =
        status::compute(meta.generation, Some(&problem), Rollout::default(), String::new(), None, &now);
    let api: Api<DeserializeGuard<LlmProxy>> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "status": {
        "conditions": status.conditions, "observedGeneration": status.observed_generation}});
    api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
    let reference = ObjectReference {
        api_version: Some(format!("{}/{}", llmproxy_api::GROUP, llmproxy_api::VERSION)),
        kind: Some("LlmProxy".into()),
        name: Some(name),
        namespace: Some(ns),
        uid: meta.uid.clone(),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidPolicy".into(),
        note: Some(problem.message()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
    Ok(Action::await_change())
}

/// Events for what changed: first creation, becoming degraded or recovering, becoming ready.
async fn publish_transitions(
    ctx: &Context,
    p: &LlmProxy,
    old: Option<&LlmProxyStatus>,
    new: &LlmProxyStatus,
) {
    let was = |t: &str| status::condition_status(old, t).map(|c| (c.status.clone(), c.reason.clone()));
    let now = |t: &str| status::condition_status(Some(new), t).map(|c| (c.status.clone(), c.reason.clone()));
    let mut events = Vec::new();
    if old.is_none_or(|s| s.conditions.is_empty()) {
        events.push((
            EventType::Normal,
            "Created",
            "created the proxy Deployment, Service, ServiceAccount and RBAC".to_owned(),
        ));
    }
    if now("Degraded") != was("Degraded")
        && let Some(c) = status::condition_status(Some(new), "Degraded")
    {
        if c.status == "True" {
            events.push((EventType::Warning, "Degraded", format!("{}: {}", c.reason, c.message)));
        } else if old.is_some() {
            events.push((EventType::Normal, "Recovered", "the problem is fixed".to_owned()));
        }
    }
    if now("Ready") != was("Ready") && now("Ready").is_some_and(|(s, _)| s == "True") {
        events.push((EventType::Normal, "Ready", "every proxy pod is ready".to_owned()));
    }
    for (type_, reason, note) in events {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &p.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}

/// Transient failures: count them and retry with exponential back-off (5 s doubling to 5 min).
pub fn error_policy(p: Arc<DeserializeGuard<LlmProxy>>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciles.with_label_values(&["error"]).inc();
    ctx.metrics.failures.with_label_values(&[err.metric_label()]).inc();
    let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let n = failures.entry(ObjectRef::from_obj(p.as_ref())).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(5).saturating_mul(1 << (*n - 1).min(6)).min(Duration::from_secs(300));
    tracing::warn!(name = %p.name_any(), namespace = p.namespace().unwrap_or_default(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    use super::*;

    fn secret(labelled: bool, allowed: Option<&str>, key: &str) -> Secret {
        let mut meta = ObjectMeta { name: Some("openai-key".into()), ..ObjectMeta::default() };
        if labelled {
            meta.labels = Some(BTreeMap::from([(llmproxy_api::SECRET_OPT_IN_LABEL.into(), "true".into())]));
        }
        if let Some(a) = allowed {
            meta.annotations =
                Some(BTreeMap::from([(llmproxy_api::SECRET_ALLOWED_PROXIES.into(), a.into())]));
        }
        Secret {
            metadata: meta,
            data: Some(BTreeMap::from([(key.to_owned(), ByteString(b"sk".to_vec()))])),
            ..Secret::default()
        }
    }

    #[test]
    fn a_client_keys_secret_needs_its_own_consent_and_keys_the_proxy_accepts() {
        let keys = |labelled: bool, data: &[(&str, &str)]| {
            let mut s = secret(false, None, "unused");
            if labelled {
                s.metadata.labels =
                    Some(BTreeMap::from([(llmproxy_api::CLIENT_KEYS_LABEL.into(), "true".into())]));
            }
            s.data = Some(
                data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect(),
            );
            s
        };
        let upstream_consent = secret(true, None, "team-a");
        let (problem, readable) = secret_verdict(Some(&upstream_consent), "k", SecretUse::ClientKeys, "p");
        assert_eq!(
            (problem.map(|p| p.reason()), readable),
            (Some("SecretNotAllowed"), false),
            "consent is per use"
        );
        let good = keys(true, &[("team-a", "sk-a"), ("team-b", "sk-b")]);
        assert!(secret_verdict(Some(&good), "k", SecretUse::ClientKeys, "p").1);
        assert!(client_keys_problem(&good, "k").is_none());
        let empty = keys(true, &[]);
        assert_eq!(client_keys_problem(&empty, "k").map(|p| p.reason()), Some("ClientKeysInvalid"));
        let twice = keys(true, &[("team-a", "sk-same"), ("team-b", "sk-same")]);
        let message = client_keys_problem(&twice, "k").map(|p| p.message()).unwrap_or_default();
        assert!(message.contains("team-b") && !message.contains("sk-same"), "{message}");
    }

    #[test]
    fn only_a_secret_that_opted_in_is_granted() {
        let r = SecretKeyRef { name: "openai-key".into(), key: "api-key".into() };
        let reason = |v: (Option<Problem>, bool)| (v.0.map(|p| p.reason()), v.1);
        let secret_verdict = |s: Option<&Secret>, r: &SecretKeyRef, proxy: &str| {
            let (problem, readable) = secret_verdict(s, &r.name, SecretUse::UpstreamKey, proxy);
            (problem.or_else(|| upstream_key_problem(s?, r)), readable)
        };
        assert_eq!(reason(secret_verdict(None, &r, "p")), (Some("SecretNotFound"), false));
        assert_eq!(
            reason(secret_verdict(Some(&secret(false, None, "api-key")), &r, "p")),
            (Some("SecretNotAllowed"), false)
        );
        assert_eq!(reason(secret_verdict(Some(&secret(true, None, "api-key")), &r, "p")), (None, true));
        assert_eq!(
            reason(secret_verdict(Some(&secret(true, Some("a, p"), "api-key")), &r, "p")),
            (None, true)
        );
        assert_eq!(
            reason(secret_verdict(Some(&secret(true, Some("other"), "api-key")), &r, "p")),
            (Some("SecretNotAllowed"), false),
            "narrowed to other LlmProxies"
        );
        assert_eq!(
            reason(secret_verdict(Some(&secret(true, None, "other-key")), &r, "p")),
            (Some("SecretKeyMissing"), true)
        );
    }
}
