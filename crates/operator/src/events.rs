//! Kubernetes Events for what changed in an LlmProxy's status.

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use llmproxy_api::{LlmProxy, LlmProxyStatus};

use crate::context::Context;
use crate::status::{self};

/// Events for what changed: first creation, becoming degraded or recovering, becoming ready.
pub(crate) async fn publish_transitions(
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
