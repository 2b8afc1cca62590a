//! Applying the children: server-side apply with the operator's field manager, removing
//! children no longer wanted, and the replica hand-over to an autoscaler.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use llmproxy_api::LlmProxy;
use serde::Serialize;
use serde::de::DeserializeOwned;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::children::{self, Children};
use crate::context::MANAGER;

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
pub(crate) async fn apply_children(
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
    apply(client, ns, &c.network_policy).await?;
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
