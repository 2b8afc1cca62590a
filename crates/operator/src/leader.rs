//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles. Writes use the Lease's resourceVersion (optimistic concurrency), so
//! two candidates can never both win the same term.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use std::sync::Arc;

use crate::health::Health;
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

/// The Lease record as this candidate last saw it, and since when (local clock): another
/// holder's term is judged by how long its record has not changed here, as client-go does, so
/// clock skew between machines cannot make a live Lease look expired.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    record: Option<(String, tokio::time::Instant)>,
}

impl Observed {
    /// Note the record's version; returns how long it has been unchanged.
    fn unchanged_for(&mut self, version: &str) -> Duration {
        match &self.record {
            Some((v, since)) if v == version => since.elapsed(),
            _ => {
                self.record = Some((version.to_owned(), tokio::time::Instant::now()));
                Duration::ZERO
            }
        }
    }
}

/// Take or renew the Lease if it is ours, free, or unrenewed for a whole term as observed
/// here. `Ok(true)`: we lead this term.
pub(crate) async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
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
    let unchanged = observed.unchanged_for(&lease.resource_version().unwrap_or_default());
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
    let term_secs = spec.lease_duration_seconds.unwrap_or(secs(cfg.duration));
    let expired = unchanged >= Duration::from_secs(u64::try_from(term_secs).unwrap_or(0));
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
pub(crate) async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let _ = tokio::time::timeout(Duration::from_secs(5), release_now(api, cfg)).await;
}

async fn release_now(api: &Api<Lease>, cfg: &LeaseConfig) {
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
pub(crate) async fn run_elected<F, Fut>(
    client: Client,
    cfg: LeaseConfig,
    metrics: Metrics,
    health: Arc<Health>,
    mut work: F,
    shutdown: impl Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed = Observed::default();
    // A call that hangs must not keep a deposed leader working: each has a bound, and the leader
    // stops after two thirds of a term without a successful renewal, before anyone else may
    // take over (a whole term unrenewed, as they observe it).
    let call_timeout = cfg.retry.max(Duration::from_secs(1));
    let renew_deadline = cfg.duration * 2 / 3;
    tokio::pin!(shutdown);
    loop {
        // Campaign.
        loop {
            let attempt = tokio::time::timeout(call_timeout, try_acquire(&api, &cfg, &mut observed)).await;
            health.set_lease_reachable(matches!(attempt, Ok(Ok(_))));
            match attempt {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
                Err(_) => tracing::warn!("leader election: the API server did not answer in time"),
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(cfg.retry) => {}
            }
        }
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, "leading");
        metrics.leader.set(1);
        health.set_leading(true);
        let renew = async {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(cfg.retry).await;
                match tokio::time::timeout(call_timeout, try_acquire(&api, &cfg, &mut observed)).await {
                    Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                    Ok(Ok(false)) => return,
                    Ok(Err(e)) => tracing::warn!(error = %e, "Lease renewal failed; retrying"),
                    Err(_) => tracing::warn!("Lease renewal timed out; retrying"),
                }
                if last_ok.elapsed() > renew_deadline {
                    tracing::warn!("could not renew the Lease in time");
                    return;
                }
            }
        };
        tokio::select! {
            () = work() => {
                metrics.leader.set(0);
                health.set_leading(false);
                release(&api, &cfg).await;
                return;
            }
            () = renew => {
                tracing::warn!(identity = %cfg.identity, "lost the Lease; stopped reconciling");
                metrics.leader.set(0);
                health.set_leading(false);
            }
            () = &mut shutdown => {
                metrics.leader.set(0);
                health.set_leading(false);
                release(&api, &cfg).await;
                return;
            }
        }
    }
}
