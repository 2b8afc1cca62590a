//! The reconcile driver: validate (`checks`) -> build the children (`children`, pure) ->
//! apply them (`apply`) -> write status (`status`) and events (`events`); and the back-off.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use llmproxy_api::{LlmProxy, Policy};

use crate::children::{self};
use crate::error::Error;
use crate::status::{self, Problem, Rollout};

use crate::apply::apply_children;
use crate::checks::{check_quota, check_secrets};
pub use crate::context::{Context, MANAGER};
use crate::events::publish_transitions;

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
