//! The observer: what the proxy pods report on their admin port (`GET /status`), read through
//! the EndpointSlices of each LlmProxy's Service and written into its status
//! (`status.upstreams`, `LimitsAboveUpstream`) under a field manager of its own.
//!
//! One pass every interval over every LlmProxy: a list of EndpointSlices and one short GET per
//! ready pod, a handful at a time, each bounded in time and bytes; a status write only when
//! something changed. A pod that does not answer is left out of that pass; a pass that reaches
//! no pod writes nothing (the last known view stays).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use llmproxy_api::{LlmProxy, LlmProxyStatus, LlmQuota, LlmQuotaStatus, Policy, ProxyReport};

use crate::context::lock;
use crate::metrics::Metrics;
use crate::status;

/// The field manager of what the pods report (the reconciler's is [`crate::reconcile::MANAGER`]).
pub(crate) const OBSERVER: &str = "llmproxy-operator-observer";
/// The most a pod's report may take; a larger one is refused as hostile.
const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Pods asked at once, across all LlmProxies.
const CONCURRENT_PODS: usize = 16;

/// How the observer runs.
#[derive(Clone, Copy, Debug)]
pub struct ObserveConfig {
    /// Time between passes (`--status-interval`).
    pub interval: Duration,
    /// The most one pod's answer may take.
    pub timeout: Duration,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(10), timeout: Duration::from_secs(2) }
    }
}

/// Run passes until dropped (the controller's shutdown drops it).
pub(crate) async fn run(
    client: Client,
    store: Store<DeserializeGuard<LlmProxy>>,
    config: ObserveConfig,
    metrics: Metrics,
    operator_namespace: Option<String>,
) {
    // Pods are reached over plain HTTP, but the client's TLS stack wants a provider installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = match reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "status observer cannot build its HTTP client; status.upstreams stays empty");
            return;
        }
    };
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut identities = crate::identities::Applied::default();
    loop {
        tick.tick().await;
        let proxies: Vec<Arc<LlmProxy>> = store
            .state()
            .into_iter()
            .filter_map(|p| p.0.as_ref().ok().map(|p| Arc::new(p.clone())))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let usage: Mutex<HashMap<(String, String), (u64, u64)>> = Mutex::default();
        stream::iter(proxies.clone())
            .for_each_concurrent(CONCURRENT_PODS, |p| {
                let (client, http, metrics, usage) = (client.clone(), http.clone(), metrics.clone(), &usage);
                async move {
                    match observe_one(&client, &http, &p).await {
                        Ok((wrote, used)) => {
                            if wrote {
                                metrics.observed_writes.inc();
                            }
                            if let Some(u) = used {
                                let key = (p.namespace().unwrap_or_default(), p.name_any());
                                lock(usage).insert(key, u);
                            }
                        }
                        Err(e) => {
                            metrics.observe_errors.inc();
                            tracing::debug!(namespace = ?p.namespace(), name = %p.name_any(), error = %e,
                            "could not observe an LlmProxy's pods");
                        }
                    }
                }
            })
            .await;
        let usage = usage.into_inner().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) =
            observe_quotas(&client, &proxies, &usage, operator_namespace.as_deref(), &mut identities).await
        {
            metrics.observe_errors.inc();
            tracing::debug!(error = %e, "could not update the LlmQuotas");
        }
        metrics.observe_passes.inc();
    }
}

/// Each LlmQuota's status (its consumers, allowed or not, and their usage) and its consumers'
/// own Redis identities (`crate::identities`). One writer: this pass.
async fn observe_quotas(
    client: &Client,
    proxies: &[Arc<LlmProxy>],
    usage: &HashMap<(String, String), (u64, u64)>,
    operator_namespace: Option<&str>,
    identities: &mut crate::identities::Applied,
) -> kube::Result<()> {
    let quotas = match Api::<LlmQuota>::all(client.clone()).list(&ListParams::default()).await {
        Ok(q) => q.items,
        // No CRD (an older chart) or no permission: nothing to do.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for q in quotas {
        let name = q.name_any();
        let candidates =
            crate::quota::candidates(client, proxies.iter().map(AsRef::as_ref), &name, &mut labels).await?;
        let mut consumers = crate::quota::verdicts(&q, &candidates);
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (mut requests, mut tokens) = (0u64, 0u64);
        for c in &mut consumers {
            if let Some((r, t)) = usage.get(&(c.namespace.clone(), c.name.clone())) {
                c.requests_last_minute = Some(as_i64(*r));
                c.tokens_last_minute = Some(as_i64(*t));
                requests = requests.saturating_add(*r);
                tokens = tokens.saturating_add(*t);
            }
        }
        let allowed = consumers.iter().filter(|c| c.allowed).count();
        let new = LlmQuotaStatus {
            conditions: q.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default(),
            consumer_count: Some(i32::try_from(allowed).unwrap_or(i32::MAX)),
            requests_last_minute: Some(as_i64(requests)),
            tokens_last_minute: Some(as_i64(tokens)),
            consumers: consumers.clone(),
        };
        if q.status.as_ref() != Some(&new) {
            let body = serde_json::json!({
                "apiVersion": format!("{}/{}", llmproxy_api::GROUP, llmproxy_api::VERSION),
                "kind": "LlmQuota",
                "status": new,
            });
            Api::<LlmQuota>::all(client.clone())
                .patch_status(&name, &PatchParams::apply(OBSERVER).force(), &Patch::Apply(&body))
                .await?;
        }
        // A Redis that is out (or a missing password Secret) must not stall the other quotas.
        if let Some(ns) = operator_namespace
            && let Err(e) = crate::identities::apply(client, &q, ns, &consumers, identities).await
        {
            tracing::warn!(quota = %name, error = %e, "could not give the LlmQuota's consumers their Redis identities");
        }
    }
    Ok(())
}

/// Read one LlmProxy's pods and write what changed; whether it wrote, and what its pods sent
/// upstream in the last minute (requests, tokens) when any pod reported.
async fn observe_one(
    client: &Client,
    http: &reqwest::Client,
    p: &LlmProxy,
) -> kube::Result<(bool, Option<(u64, u64)>)> {
    let ns = p.namespace().unwrap_or_default();
    let urls = pod_status_urls(client, &ns, &p.name_any()).await?;
    let reports: Vec<ProxyReport> = stream::iter(urls)
        .map(|url| async move {
            match fetch(http, &url).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!(%url, error = %e, "a proxy pod did not report");
                    None
                }
            }
        })
        .buffer_unordered(CONCURRENT_PODS)
        .filter_map(std::future::ready)
        .collect()
        .await;
    if reports.is_empty() {
        return Ok((false, None));
    }
    let used = reports.iter().fold((0u64, 0u64), |(r, t), x| {
        (r.saturating_add(x.requests_last_minute), t.saturating_add(x.tokens_last_minute))
    });
    let upstreams = status::aggregate_upstreams(&reports);
    let now = Time(Timestamp::now());
    let mut conditions = Vec::new();
    if let Ok(policy) = Policy::from_spec(&p.spec) {
        conditions.push(status::limits_above_upstream(
            &policy,
            &upstreams,
            p.metadata.generation,
            p.status.as_ref(),
            &now,
        ));
    }
    if let Some(c) = status::quota_shared(&reports, p.metadata.generation, p.status.as_ref(), &now) {
        conditions.push(c);
    }
    conditions.extend(status::bottlenecks(&reports, p.metadata.generation, p.status.as_ref(), &now));
    conditions.push(status::upstream_quota_exhausted(
        &upstreams,
        p.metadata.generation,
        p.status.as_ref(),
        &now,
    ));
    let usage = status::usage(&reports, Policy::from_spec(&p.spec).ok().as_ref());
    let stored = p.status.clone().unwrap_or_default();
    let same_conditions = conditions.iter().all(|c| {
        status::condition_status(Some(&stored), &c.type_)
            .is_some_and(|o| o.status == c.status && o.reason == c.reason && o.message == c.message)
    });
    if stored.upstreams == upstreams && same_conditions && stored.usage.as_ref() == Some(&usage) {
        return Ok((false, Some(used)));
    }
    let body = serde_json::json!({
        "apiVersion": format!("{}/{}", llmproxy_api::GROUP, llmproxy_api::VERSION),
        "kind": "LlmProxy",
        "status": LlmProxyStatus { upstreams, conditions, usage: Some(usage), ..LlmProxyStatus::default() },
    });
    let api: Api<LlmProxy> = Api::namespaced(client.clone(), &ns);
    api.patch_status(&p.name_any(), &PatchParams::apply(OBSERVER).force(), &Patch::Apply(&body)).await?;
    Ok((true, Some(used)))
}

/// `http://ADDRESS:PORT/status` of each ready pod behind the Service `service`: the port named
/// `metrics` as each EndpointSlice gives it.
async fn pod_status_urls(client: &Client, ns: &str, service: &str) -> kube::Result<Vec<String>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list =
        slices.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}"))).await?;
    Ok(list.items.iter().flat_map(status_urls).collect())
}

fn status_urls(slice: &EndpointSlice) -> Vec<String> {
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first())
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| format!("http://{}/status", std::net::SocketAddr::new(ip, port)))
        .collect()
}

/// Why a pod's report could not be read; logged at debug, the pass goes on without it.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("report larger than {MAX_REPORT_BYTES} bytes")]
    TooLarge,
    #[error("report not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<ProxyReport, FetchError> {
    let mut resp = http.get(url).send().await?.error_for_status()?;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_REPORT_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn endpoint(address: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![address.into()],
            conditions: Some(EndpointConditions { ready, ..EndpointConditions::default() }),
            ..Endpoint::default()
        }
    }

    #[test]
    fn ready_pods_on_the_metrics_port_only_and_never_a_name_for_an_address() {
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint("10.0.0.1", Some(true)),
                endpoint("10.0.0.2", Some(false)),
                endpoint("10.0.0.3", None),
                endpoint("evil.example/x?", Some(true)),
            ],
            ports: Some(vec![
                EndpointPort { name: Some("http".into()), port: Some(8080), ..EndpointPort::default() },
                EndpointPort { name: Some("metrics".into()), port: Some(9090), ..EndpointPort::default() },
            ]),
            ..EndpointSlice::default()
        };
        assert_eq!(status_urls(&slice), ["http://10.0.0.1:9090/status", "http://10.0.0.3:9090/status"]);
        let v6 = EndpointSlice { endpoints: vec![endpoint("fd00::1", Some(true))], ..slice.clone() };
        assert_eq!(status_urls(&v6), ["http://[fd00::1]:9090/status"]);
        let no_port = EndpointSlice { ports: None, ..slice };
        assert!(status_urls(&no_port).is_empty());
    }
}
