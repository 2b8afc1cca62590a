//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles. Writes use the Lease's resourceVersion (optimistic concurrency), so
//! two candidates can never both win the same term.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::metrics::Metrics;

/// Where the Lease lives and who competes for it.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This candidate (usually the pod name).
    pub identity: String,
    /// How long a term lasts without renewal.
    pub duration: Duration,
    /// How often the leader renews, and candidates retry.
    pub retry: Duration,
}

impl LeaseConfig {
    /// Defaults: a 15 s term renewed every 2 s.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: "llmproxy-operator".to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Take or renew the Lease if it is ours or has expired. `Ok(true)`: we lead this term.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.name.clone()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs(cfg.duration)),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
    let term =
        SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs(cfg.duration))));
    let expired = spec.renew_time.as_ref().is_none_or(|t| t.0 + term < now);
    if !ours && held && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(secs(cfg.duration));
    spec.renew_time = Some(MicroTime(now));
    // The resourceVersion we read makes this a compare-and-swap.
    match api.replace(&lease.name_any(), &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Give the Lease up (on shutdown), so a standby takes over at once instead of after a term.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}

/// Run `work` only while leading: wait for the Lease, run `work` and renew alongside; if a
/// renewal fails for longer than a term, stop `work` and compete again. Returns when `work`
/// finishes or `shutdown` resolves (the Lease is released then).
pub async fn run_elected<F, Fut>(
    client: Client,
    cfg: LeaseConfig,
    metrics: Metrics,
    mut work: F,
    shutdown: impl Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    tokio::pin!(shutdown);
    loop {
        // Campaign.
        loop {
            match try_acquire(&api, &cfg).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(cfg.retry) => {}
            }
        }
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, "leading");
        metrics.leader.set(1);
        let renew = async {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(cfg.retry).await;
                match try_acquire(&api, &cfg).await {
                    Ok(true) => last_ok = tokio::time::Instant::now(),
                    Ok(false) => return,
                    Err(e) if last_ok.elapsed() > cfg.duration => {
                        tracing::warn!(error = %e, "could not renew the Lease within a term");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "Lease renewal failed; retrying"),
                }
            }
        };
        tokio::select! {
            () = work() => {
                metrics.leader.set(0);
                release(&api, &cfg).await;
                return;
            }
            () = renew => {
                tracing::warn!(identity = %cfg.identity, "lost the Lease; stopped reconciling");
                metrics.leader.set(0);
            }
            () = &mut shutdown => {
                metrics.leader.set(0);
                release(&api, &cfg).await;
                return;
            }
        }
    }
}
