//! The llmproxy operator: watches `LlmProxy` resources and keeps, for each, a proxy Deployment,
//! Service, ServiceAccount and least-privilege RBAC (plus a PodDisruptionBudget and an
//! autoscaler where asked), and reports status conditions and events.
#![warn(unreachable_pub)]

mod apply;
mod checks;
mod children;
mod context;
mod error;
mod events;
mod health;
mod identities;
mod leader;
mod metrics;
mod observe;
mod quota;
mod reconcile;
mod status;

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, predicates, reflector, watcher};

use kube::{Client, ResourceExt};
use llmproxy_api::LlmProxy;

pub use children::{Settings, scaled_object_resource};
pub use health::Health;
pub use leader::LeaseConfig;
pub use metrics::Metrics;
pub use observe::ObserveConfig;
pub use status::condition_status;

use reconcile::Context;

/// How to run the operator.
#[derive(Clone, Debug)]
pub struct Config {
    /// How children are built.
    pub settings: Settings,
    /// Watch only this namespace; `None`: all.
    pub namespace: Option<String>,
    /// Elect a leader through this Lease; `None`: reconcile unconditionally (one replica).
    pub lease: Option<LeaseConfig>,
    /// Name this instance reports in Events.
    pub identity: String,
    /// How often the pods' reports are read into status.
    pub observe: ObserveConfig,
}

const MANAGED: &str = "app.kubernetes.io/managed-by=llmproxy-operator";

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The controller: reconciles until `shutdown` resolves.
pub async fn controller(
    client: Client,
    config: &Config,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = config.namespace.as_deref();
    let reporter =
        Reporter { controller: reconcile::MANAGER.into(), instance: Some(config.identity.clone()) };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        metrics,
        config.settings.clone(),
    ));
    let (reader, writer) = reflector::store();
    let controller = Controller::for_stream(proxies(&client, ns, Arc::clone(&health), writer), reader);
    let store = controller.store();
    let observer = observe::run(
        client.clone(),
        controller.store(),
        config.observe,
        ctx.metrics.clone(),
        config.settings.operator_namespace.clone(),
    );
    let quota_store = controller.store();
    // An LlmQuota that changes (or appears) reconciles the LlmProxies that name it.
    let quotas = watcher(Api::<llmproxy_api::LlmQuota>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .touched_objects();
    // Secrets are watched by metadata only (no cache of key material in the operator), to
    // reconcile an LlmProxy as soon as its missing Secret appears; a reconcile reads just the one
    // Secret its LlmProxy names, to check that the key is there.
    let secrets = watcher(api::<PartialObjectMeta<Secret>>(&client, ns), watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let running = owning_children(controller, &client, ns)
        .watches_stream(secrets, move |secret| naming_secret(&store, &secret))
        .watches_stream(quotas, move |quota| drawing_from(&quota_store, &quota))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // The observer runs as long as the controller (under the same leadership), and stops with it.
    tokio::pin!(running, observer);
    tokio::select! {
        () = &mut running => {}
        () = &mut observer => {
            tracing::error!("status observer stopped; reconciling goes on without it");
            running.await;
        }
    }
    health.set_watching(false);
}

/// The LlmProxies to reconcile, recorded in the store `writer` fills. Only spec changes (a new
/// generation) trigger from the LlmProxy itself: the operator's own status writes must not come
/// back as work.
fn proxies(
    client: &Client,
    ns: Option<&str>,
    health: Arc<Health>,
    writer: reflector::store::Writer<DeserializeGuard<LlmProxy>>,
) -> impl futures_util::Stream<Item = Result<DeserializeGuard<LlmProxy>, watcher::Error>> + Send + 'static {
    // Objects that do not deserialize (stored under an older schema, or written around it)
    // arrive as errors of their own, so one bad object never stops the watch for the others.
    // The watch is established once its initial list is done, and not while it fails.
    watcher(api::<DeserializeGuard<LlmProxy>>(client, ns), watcher::Config::default())
        .default_backoff()
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => health.set_watching(true),
            Err(_) => health.set_watching(false),
            Ok(_) => {}
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default())
}

/// Every child kind is watched: drift in any of them is repaired at once, not at the next
/// periodic requeue.
fn owning_children(
    controller: Controller<DeserializeGuard<LlmProxy>>,
    client: &Client,
    ns: Option<&str>,
) -> Controller<DeserializeGuard<LlmProxy>> {
    let children = || watcher::Config::default().labels(MANAGED);
    controller
        .owns(api::<Deployment>(client, ns), children())
        .owns(api::<Service>(client, ns), children())
        .owns(api::<ServiceAccount>(client, ns), children())
        .owns(api::<Role>(client, ns), children())
        .owns(api::<RoleBinding>(client, ns), children())
        .owns(api::<PodDisruptionBudget>(client, ns), children())
        .owns(api::<HorizontalPodAutoscaler>(client, ns), children())
        .owns(api::<NetworkPolicy>(client, ns), children())
}

/// The LlmProxies of `store` that name Secret `secret` (for an upstream key or client keys).
fn naming_secret(
    store: &reflector::Store<DeserializeGuard<LlmProxy>>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<DeserializeGuard<LlmProxy>>> {
    let (ns, name) = (secret.namespace(), secret.name_any());
    store
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace() == ns
                && p.0.as_ref().is_ok_and(|p| {
                    p.spec.upstream_key_refs().iter().any(|r| r.name == name)
                        || p.spec
                            .clients
                            .as_ref()
                            .and_then(|c| c.keys_secret_ref.as_ref())
                            .is_some_and(|r| r.name == name)
                })
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The LlmProxies of `store` whose `quotaRef` names `quota`.
fn drawing_from(
    store: &reflector::Store<DeserializeGuard<LlmProxy>>,
    quota: &llmproxy_api::LlmQuota,
) -> Vec<ObjectRef<DeserializeGuard<LlmProxy>>> {
    let name = quota.name_any();
    store
        .state()
        .into_iter()
        .filter(|p| p.0.as_ref().is_ok_and(|p| p.spec.quota_ref.as_ref().is_some_and(|r| r.name == name)))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Run the operator: with leader election if configured, until `shutdown` resolves; `health`
/// follows what it does (for `/readyz`).
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let work = {
        let (client, config, metrics, stopped, health) =
            (client.clone(), config.clone(), metrics.clone(), stopped.clone(), Arc::clone(&health));
        move || {
            let (client, config, metrics, stopped, health) =
                (client.clone(), config.clone(), metrics.clone(), stopped.clone(), Arc::clone(&health));
            async move { controller(client, &config, metrics, health, stopped()).await }
        }
    };
    match config.lease.clone() {
        Some(lease) => {
            tokio::join!(stopping, leader::run_elected(client, lease, metrics, health, work, stopped()));
        }
        None => {
            metrics.leader.set(1);
            tokio::join!(stopping, work());
        }
    }
}
