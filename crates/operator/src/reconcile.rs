//! The reconcile driver: validate (`checks`) -> build the children (`children`, pure) ->
//! apply them (`apply`) -> write status (`status`) and events (`events`); and the back-off.

use std::sync::Arc;
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
use crate::context::lock;
use crate::error::Error;
use crate::status::{self, Problem, Rollout};

use crate::apply::apply_children;
use crate::checks::{check_quota, check_secrets};
pub(crate) use crate::context::{Context, MANAGER};
use crate::events::publish_transitions;

/// Reconcile one LlmProxy (or report one that cannot be read).
pub(crate) async fn reconcile(
    p: Arc<DeserializeGuard<LlmProxy>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let timer = ctx.metrics.duration.start_timer();
    let result = match &p.0 {
        Ok(proxy) => reconcile_inner(proxy, &ctx).await,
        Err(invalid) => report_unreadable(invalid, &ctx).await,
    };
    timer.observe_duration();
    if result.is_ok() {
        ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
        lock(&ctx.failures).remove(&ObjectRef::from_obj(p.as_ref()));
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
pub(crate) fn error_policy(p: Arc<DeserializeGuard<LlmProxy>>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciles.with_label_values(&["error"]).inc();
    ctx.metrics.failures.with_label_values(&[err.metric_label()]).inc();
    let mut failures = lock(&ctx.failures);
    let n = failures.entry(ObjectRef::from_obj(p.as_ref())).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(5).saturating_mul(1 << (*n - 1).min(6)).min(Duration::from_secs(300));
    tracing::warn!(name = %p.name_any(), namespace = p.namespace().unwrap_or_default(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    //! The driver against a mocked API server (`tower-test`), for the paths a real API server
    //! reaches only by accident: a child refused, a conflict, the replica hand-over.

    use http::{Request, Response, StatusCode};
    use kube::Client;
    use kube::client::Body;
    use kube::runtime::events::{Recorder, Reporter};

    use crate::metrics::Metrics;
    use serde_json::{Value, json};

    use super::*;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context() -> (Arc<Context>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "team");
        let reporter = Reporter { controller: MANAGER.into(), instance: None };
        let settings = crate::children::Settings {
            image: "llmproxy:test".into(),
            image_pull_policy: None,
            metrics_namespace: None,
            operator_namespace: None,
        };
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap();
        (Arc::new(Context::new(client.clone(), Recorder::new(client, reporter), metrics, settings)), handle)
    }

    fn proxy(extra: &str) -> Arc<DeserializeGuard<LlmProxy>> {
        let yaml = format!(
            "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: p, namespace: team, uid: u1, generation: 1}}\nspec:\n  upstream: {{url: 'https://api.openai.com/v1'}}\n  limits: {{requestsPerMinute: 600}}\n{extra}"
        );
        Arc::new(DeserializeGuard(Ok(serde_yaml::from_str(&yaml).unwrap())))
    }

    fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
        Response::builder().status(status).body(Body::from(body.to_string().into_bytes())).unwrap()
    }

    fn failure(code: u16, reason: &str, message: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
    }

    /// Answer each request with what `answer` says (method, path with query, body); every
    /// request is recorded.
    fn serve(
        mut handle: Handle,
        answer: impl Fn(&str, &str, &Value) -> Response<Body> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<(String, String, Value)>> {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let path = parts.uri.path_and_query().map(ToString::to_string).unwrap_or_default();
                let method = parts.method.to_string();
                send.send_response(answer(&method, &path, &body));
                seen.push((method, path, body));
            }
            seen
        })
    }

    /// SSA echoes what was applied (with the object's metadata, and for the status its spec);
    /// a GET finds nothing; events are accepted.
    fn echo(method: &str, path: &str, body: &Value) -> Response<Body> {
        if method == "GET" {
            return json_response(StatusCode::NOT_FOUND, &failure(404, "NotFound", "not found"));
        }
        let mut out = body.clone();
        if let Some(o) = out.as_object_mut() {
            o.entry("metadata").or_insert_with(|| json!({"name": "p", "namespace": "team"}));
            if path.contains("/llmproxies/p/status") {
                o.insert(
                    "spec".into(),
                    json!({"upstream": {"url": "https://api.openai.com/v1"}, "limits": {"requestsPerMinute": 600}}),
                );
            }
        }
        json_response(StatusCode::OK, &out)
    }

    #[tokio::test]
    async fn a_child_the_api_server_refuses_is_reported_and_not_retried() {
        let (ctx, handle) = context();
        let server = serve(handle, |method, path, body| {
            if method == "PATCH" && path.starts_with("/apis/apps/v1/namespaces/team/deployments/p") {
                let msg = "Deployment.apps \"p\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit";
                return json_response(StatusCode::UNPROCESSABLE_ENTITY, &failure(422, "Invalid", msg));
            }
            echo(method, path, body)
        });
        let action = reconcile(proxy(""), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(action, Action::await_change(), "nothing to retry until the LlmProxy changes");
        drop(ctx);
        let seen = server.await.unwrap_or_default();
        let status = seen
            .iter()
            .find(|(m, p, _)| {
                m == "PATCH"
                    && p.starts_with("/apis/llmproxy.io/v1alpha1/namespaces/team/llmproxies/p/status")
            })
            .map(|(_, _, b)| b.clone())
            .unwrap_or_else(|| panic!("no status write: {seen:?}"));
        let degraded = status["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Degraded")
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            (degraded["status"].as_str(), degraded["reason"].as_str()),
            (Some("True"), Some("ChildRejected"))
        );
        assert!(
            degraded["message"]
                .as_str()
                .is_some_and(|m| m.contains("must be less than or equal to cpu limit"))
        );
    }

    #[tokio::test]
    async fn a_conflict_is_a_failure_counted_and_retried_with_back_off() {
        let (ctx, handle) = context();
        let server = serve(handle, |method, path, body| {
            if method == "PATCH" && path.contains("/services/p") {
                return json_response(
                    StatusCode::CONFLICT,
                    &failure(409, "Conflict", "the object has been modified"),
                );
            }
            echo(method, path, body)
        });
        let p = proxy("");
        let err =
            reconcile(Arc::clone(&p), Arc::clone(&ctx)).await.expect_err("a conflict fails the reconcile");
        assert_eq!(err.metric_label(), "conflict");
        let first = error_policy(Arc::clone(&p), &err, Arc::clone(&ctx));
        let second = error_policy(Arc::clone(&p), &err, Arc::clone(&ctx));
        assert_eq!(
            (first, second),
            (Action::requeue(Duration::from_secs(5)), Action::requeue(Duration::from_secs(10)))
        );
        let rendered = ctx.metrics.render();
        assert!(
            rendered.contains("llmproxy_operator_reconcile_errors_total{reason=\"conflict\"} 2"),
            "{rendered}"
        );
        drop(ctx);
        let seen = server.await.unwrap_or_default();
        assert!(
            !seen.iter().any(|(_, p, _)| p.contains("/deployments/")),
            "stopped at the conflict: {seen:?}"
        );
    }

    #[tokio::test]
    async fn autoscaling_takes_the_replica_count_over_without_a_dip() {
        let (ctx, handle) = context();
        let server = serve(handle, |method, path, body| {
            if method == "GET" && path.starts_with("/apis/apps/v1/namespaces/team/deployments/p") {
                return json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "p", "namespace": "team"},
                            "spec": {"replicas": 3, "selector": {}, "template": {}}}),
                );
            }
            echo(method, path, body)
        });
        reconcile(proxy("  autoscaling: {minReplicas: 2, maxReplicas: 6}\n"), Arc::clone(&ctx))
            .await
            .unwrap();
        drop(ctx);
        let seen = server.await.unwrap_or_default();
        let deployment_patches: Vec<&(String, String, Value)> = seen
            .iter()
            .filter(|(m, p, _)| m == "PATCH" && p.starts_with("/apis/apps/v1/namespaces/team/deployments/p"))
            .collect();
        assert_eq!(deployment_patches.len(), 2, "{seen:?}");
        // First a second field manager keeps the running count, then the operator's apply
        // drops `replicas` for the autoscaler.
        let (_, handoff_path, handoff) = deployment_patches[0];
        assert!(handoff_path.contains("fieldManager=llmproxy-operator-replicas"), "{handoff_path}");
        assert_eq!(handoff["spec"]["replicas"], 3);
        let (_, apply_path, applied) = deployment_patches[1];
        assert!(
            apply_path.contains("fieldManager=llmproxy-operator&")
                || apply_path.ends_with("fieldManager=llmproxy-operator"),
            "{apply_path}"
        );
        assert!(applied["spec"].get("replicas").is_none(), "the operator no longer sets replicas: {applied}");
        assert!(
            seen.iter().any(|(m, p, _)| m == "PATCH" && p.contains("/horizontalpodautoscalers/p")),
            "an HPA"
        );
    }
}
