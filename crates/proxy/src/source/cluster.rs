//! Cluster mode's policy source: the proxy watches its own LlmProxy and the Secret it names
//! through the Kubernetes API (in-cluster service account or KUBECONFIG) and reloads in place:
//! new limits within a second, a rotated key on the next request, no restart.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use llmproxy_api::{LlmProxy, Policy};

use crate::proxy::Proxy;
use crate::source::supervise::AbortOnDrop;
use crate::telemetry::labels::Reload;
use crate::upstream::ApiKey;
use llmproxy_api::ClientKeys;

/// `namespace/name` of the LlmProxy to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::str::FromStr for ResourceRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self { namespace: ns.to_owned(), name: name.to_owned() })
            }
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}

/// How many pods share the quota: the most of what is wanted and what runs, so that a scale-up
/// never briefly grants every pod the whole quota.
pub(crate) fn sharing_pods(p: &LlmProxy) -> u32 {
    llmproxy_api::replicas::sharing(p)
}

/// This pod's policy for an LlmProxy.
/// With `spec.quotaRef`, only once the operator granted the quota (wrote it into the status):
/// the proxies draw from no LlmQuota the operator did not check.
pub(crate) fn policy_for(p: &LlmProxy) -> Result<Policy, llmproxy_api::PolicyError> {
    let mut policy = Policy::from_spec(&p.spec)?;
    if let Some(reason) = quota_not_granted(p) {
        return Err(llmproxy_api::PolicyError::one("spec.quotaRef", reason));
    }
    if let Some(granted) = p.status.as_ref().and_then(|s| s.quota.as_ref())
        && p.spec.quota_ref.as_ref().is_some_and(|r| r.name == granted.name)
    {
        policy = policy.with_quota(granted)?;
    }
    Ok(policy.for_replicas(sharing_pods(p)))
}

/// Why the LlmQuota the spec names may not be drawn on, if it may not: the operator has not
/// granted it (or withdrew the grant) in the status.
pub fn quota_not_granted(p: &LlmProxy) -> Option<String> {
    let r = p.spec.quota_ref.as_ref()?;
    let granted = p.status.as_ref().and_then(|s| s.quota.as_ref()).is_some_and(|q| q.name == r.name);
    (!granted).then(|| format!("LlmQuota {:?} is not granted to this LlmProxy (see its conditions)", r.name))
}

/// Read the LlmProxy once, retrying until it exists and is valid.
pub async fn initial(client: &Client, r: &ResourceRef) -> Policy {
    let api: Api<LlmProxy> = Api::namespaced(client.clone(), &r.namespace);
    let mut delay = Duration::from_millis(500);
    loop {
        match api.get(&r.name).await {
            Ok(p) => match policy_for(&p) {
                Ok(policy) => match crate::source::consent::check(client, &p).await {
                    Ok(()) => return policy,
                    Err(e) => {
                        tracing::error!(error = %e, "LlmProxy {}/{} cannot run yet", r.namespace, r.name)
                    }
                },
                Err(e) => tracing::error!(error = %e, "LlmProxy {}/{} cannot run yet", r.namespace, r.name),
            },
            Err(e) => tracing::error!(error = %e, "cannot read LlmProxy {}/{}", r.namespace, r.name),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The keys read from one Secret, and every use the spec makes of them.
type Reads = (Vec<String>, Vec<llmproxy_api::consent::SecretRead>);

/// How often a version refused for a Secret's consent is checked again.
const RECHECK: Duration = Duration::from_secs(5);

fn by_name(name: &str) -> watcher::Config {
    // A field selector, so that RBAC scoped to this one name (resourceNames) allows the watch.
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

/// Keep the proxy in step with its LlmProxy and Secret until the task is dropped.
pub async fn watch(proxy: Arc<Proxy>, client: Client, r: ResourceRef) {
    // An object that does not deserialize arrives as an error of its own (refused below), so
    // it never breaks the watch.
    let api: Api<DeserializeGuard<LlmProxy>> = Api::namespaced(client.clone(), &r.namespace);
    let mut updates = watcher(api, by_name(&r.name)).default_backoff().applied_objects().boxed();
    // The Secret and client-key watches of the version in force.
    let mut watches = Watches::default();
    // A version refused for a Secret's consent, checked again until it passes or is replaced
    // (the consent may come, or the operator's grant land, without the LlmProxy changing).
    let mut refused: Option<(LlmProxy, String)> = None;
    loop {
        let (next, last_refusal) = match refused.take() {
            None => (updates.next().await, None),
            Some((p, why)) => {
                let next = tokio::time::timeout(RECHECK, updates.next()).await;
                (next.unwrap_or(Some(Ok(DeserializeGuard(Ok(p))))), Some(why))
            }
        };
        let Some(event) = next else { break };
        let p = match event {
            Ok(DeserializeGuard(Ok(p))) => p,
            Ok(DeserializeGuard(Err(invalid))) => {
                proxy.reject_policy();
                tracing::error!(error = %invalid.error, "LlmProxy cannot be read; the last good policy keeps serving");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "watching the LlmProxy failed; retrying");
                continue;
            }
        };
        if let Err(e) = crate::source::consent::check(&client, &p).await {
            // Counted and logged once per reason, not on every re-check.
            if last_refusal.as_ref() != Some(&e) {
                proxy.reject_policy();
                tracing::error!(error = %e, "policy refused; the last good policy keeps serving");
            }
            refused = Some((p, e));
            continue;
        }
        apply(&proxy, &p);
        watches.follow(&proxy, &client, &p);
    }
}

/// Apply a consented LlmProxy version: the pods sharing its buckets, whether its quota is
/// granted, and its policy (refused, the last good policy keeps serving).
fn apply(proxy: &Proxy, p: &LlmProxy) {
    proxy.set_replicas(sharing_pods(p));
    // A withdrawn grant stops admission at once; the last good policy drew on that quota.
    let not_granted = quota_not_granted(p);
    if proxy.withhold(not_granted.clone()) {
        match &not_granted {
            Some(reason) => {
                tracing::error!(reason = %reason, "quota grant withdrawn; admitting nothing until it is granted again")
            }
            None => tracing::info!("quota granted; admitting requests"),
        }
    }
    match policy_for(p) {
        Ok(policy) => {
            if proxy.apply_policy(policy) == Reload::Applied {
                tracing::info!(generation = p.metadata.generation, pods = sharing_pods(p), "policy reloaded");
            }
        }
        // Said above: nothing is served, the last good policy included.
        Err(_) if not_granted.is_some() => {}
        Err(e) => {
            proxy.reject_policy();
            tracing::error!(error = %e, "policy refused; the last good policy keeps serving");
        }
    }
}

/// The watches one LlmProxy version needs besides its own: one per Secret its upstream keys
/// come from (with the keys read from it and why), the LlmQuota's Redis password, and the
/// client keys. Each ends when dropped.
#[derive(Default)]
struct Watches {
    secrets: std::collections::BTreeMap<String, (Reads, AbortOnDrop)>,
    quota: Option<((String, String, String), AbortOnDrop)>,
    client_keys: Option<(String, AbortOnDrop)>,
}

impl Watches {
    /// Start the watches `p` needs and stop those it no longer does.
    fn follow(&mut self, proxy: &Arc<Proxy>, client: &Client, p: &LlmProxy) {
        let refs = p.spec.upstream_key_refs();
        proxy.set_key_required(!refs.is_empty());
        // Upstream keys and the shared buckets' Redis password, each with the uses it is read for.
        let mut wanted: std::collections::BTreeMap<String, Reads> = Default::default();
        for read in llmproxy_api::consent::reads(&p.spec) {
            let Some(key) = read.key.clone() else { continue };
            let (keys, reads) = wanted.entry(read.secret.clone()).or_default();
            if !keys.contains(&key) {
                keys.push(key);
            }
            reads.push(read);
        }
        // The LlmQuota's password lives in the operator's namespace, readable once granted.
        // It is kept under `NAMESPACE/NAME` (`SharedPolicy::password_slot`), out of reach of
        // the LlmProxy's own references.
        let quota_secret = p.status.as_ref().and_then(|s| s.quota.as_ref()).and_then(|q| {
            let r = q.redis.password_secret_ref.as_ref()?;
            Some((q.password_namespace.clone()?, r.name.clone(), r.key.clone()))
        });
        if quota_secret.as_ref() != self.quota.as_ref().map(|(id, _)| id) {
            if let Some(((ns, name, key), _)) = self.quota.take() {
                proxy.set_secret_key(&llmproxy_api::policy::secret_slot(Some(&ns), &name), &key, None);
            }
            self.quota = quota_secret.map(|(ns, name, key)| {
                let task = AbortOnDrop(tokio::spawn(watch_secret(
                    Arc::clone(proxy),
                    client.clone(),
                    ns.clone(),
                    name.clone(),
                    llmproxy_api::policy::secret_slot(Some(&ns), &name),
                    (vec![key.clone()], Vec::new()),
                    String::new(),
                )));
                ((ns, name, key), task)
            });
        }
        self.secrets.retain(|name, (old, _)| {
            let new = wanted.get(name);
            // A key still read keeps its value until the new watch has checked the Secret again.
            for key in old.0.iter().filter(|k| !new.is_some_and(|(keys, _)| keys.contains(k))) {
                proxy.set_secret_key(name, key, None);
            }
            new == Some(old)
        });
        for (name, reads) in wanted {
            if self.secrets.contains_key(&name) {
                continue;
            }
            let task = AbortOnDrop(tokio::spawn(watch_secret(
                Arc::clone(proxy),
                client.clone(),
                p.namespace().unwrap_or_default(),
                name.clone(),
                name.clone(),
                reads.clone(),
                p.name_any(),
            )));
            self.secrets.insert(name, (reads, task));
        }
        let wanted_keys =
            p.spec.clients.as_ref().and_then(|c| c.keys_secret_ref.as_ref()).map(|r| r.name.clone());
        proxy.require_client_keys(wanted_keys.is_some());
        if wanted_keys.as_ref() != self.client_keys.as_ref().map(|(name, _)| name) {
            drop(self.client_keys.take());
            proxy.set_client_keys(None);
            self.client_keys = wanted_keys.map(|name| {
                let namespace = p.namespace().unwrap_or_default();
                let task = AbortOnDrop(tokio::spawn(watch_client_keys(
                    Arc::clone(proxy),
                    client.clone(),
                    namespace,
                    name.clone(),
                    p.name_any(),
                )));
                (name, task)
            });
        }
    }
}

/// Follow the client keys Secret: every change reaches the next request, as far as the Secret
/// is valid (an invalid entry admits no one and is logged by client name); a deleted Secret, or
/// one a re-list no longer finds, revokes every key; a version that does not consent to this use
/// (by LlmProxy `owner`) admits no one.
async fn watch_client_keys(
    proxy: Arc<Proxy>,
    client: Client,
    namespace: String,
    name: String,
    owner: String,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut updates = watcher(api, by_name(&name)).default_backoff().boxed();
    // Whether the current (re-)list has found the Secret, and whether any keys are in force.
    let (mut listed, mut loaded) = (false, false);
    while let Some(event) = updates.next().await {
        match event {
            Ok(watcher::Event::Init) => listed = false,
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                listed = true;
                let read = llmproxy_api::consent::SecretRead {
                    secret: name.clone(),
                    key: None,
                    use_: llmproxy_api::SecretUse::ClientKeys,
                    url: None,
                };
                if let Err(e) = crate::source::consent::allowed(&s.metadata, &[read], &owner) {
                    proxy.set_client_keys(None);
                    loaded = false;
                    tracing::error!(secret = %name, error = %e, "client keys dropped: no client is admitted");
                    continue;
                }
                loaded = true;
                let data = s.data.unwrap_or_default();
                let mut refused = Vec::new();
                let mut pairs: Vec<(&str, &str)> = Vec::new();
                for (client, key) in &data {
                    match std::str::from_utf8(&key.0) {
                        Ok(key) => pairs.push((client.as_str(), key)),
                        Err(_) => refused.push(format!("client {client:?}: the key is not UTF-8 text")),
                    }
                }
                let mut table = ClientKeys::load_pairs(pairs);
                refused.append(&mut table.refused);
                table.refused = refused;
                let keys = crate::source::file::report_refused(table, &format!("Secret {name}"));
                tracing::info!(secret = %name, clients = keys.names().count(), "client keys loaded");
                proxy.set_client_keys(Some(keys));
            }
            Ok(watcher::Event::Delete(_)) => revoke_client_keys(&proxy, &name, &mut loaded),
            Ok(watcher::Event::InitDone) if !listed => revoke_client_keys(&proxy, &name, &mut loaded),
            Ok(watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(error = %e, "watching the client keys Secret failed; retrying"),
        }
    }
}

/// The client keys Secret is gone: no key it held is in force any more.
fn revoke_client_keys(proxy: &Proxy, name: &str, loaded: &mut bool) {
    if std::mem::take(loaded) {
        proxy.set_client_keys(Some(ClientKeys::default()));
        tracing::error!(secret = %name, "the client keys Secret is gone; every client key is revoked");
    }
}

/// Follow the keys of Secret `namespace/name`, kept under the name `slot`: every change reaches
/// the next upstream request. Each version is checked against the uses `reads` makes of it (by
/// LlmProxy `owner`); a key the Secret does not consent to is dropped, never used. With no reads
/// (the LlmQuota's password, granted by the operator from the quota), no check.
async fn watch_secret(
    proxy: Arc<Proxy>,
    client: Client,
    namespace: String,
    name: String,
    slot: String,
    (keys, reads): Reads,
    owner: String,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut updates = watcher(api, by_name(&name)).default_backoff().applied_objects().boxed();
    while let Some(event) = updates.next().await {
        match event {
            Ok(s) => {
                for key in &keys {
                    let uses: Vec<_> =
                        reads.iter().filter(|r| r.key.as_ref() == Some(key)).cloned().collect();
                    if let Err(e) = crate::source::consent::allowed(&s.metadata, &uses, &owner) {
                        proxy.set_secret_key(&slot, key, None);
                        tracing::error!(secret = %name, key = %key, error = %e, "key not used");
                        continue;
                    }
                    let value =
                        s.data.as_ref().and_then(|d| d.get(key)).and_then(|v| std::str::from_utf8(&v.0).ok());
                    match value.and_then(ApiKey::new) {
                        Some(k) => {
                            proxy.set_secret_key(&slot, key, Some(k));
                            tracing::info!(secret = %name, key = %key, "key loaded from the Secret");
                        }
                        None => tracing::error!(
                            secret = %name,
                            key = %key,
                            "the Secret has no such key (or it is empty); keeping the previous key"
                        ),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching the Secret failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_refs_parse() {
        assert_eq!(
            "team-a/openai".parse(),
            Ok(ResourceRef { namespace: "team-a".into(), name: "openai".into() })
        );
        for bad in ["openai", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<ResourceRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pods_share_by_the_larger_of_wanted_and_running() {
        let mut p: LlmProxy = parse(
            r"
apiVersion: llmproxy.io/v1alpha1
kind: LlmProxy
metadata: {name: p, namespace: n}
spec: {upstream: {url: 'https://x:1'}, limits: {requestsPerMinute: 600}, replicas: 2}
",
        );
        assert_eq!(sharing_pods(&p), 2);
        p.status = Some(llmproxy_api::LlmProxyStatus { replicas: Some(3), ..Default::default() });
        assert_eq!(sharing_pods(&p), 3, "a surge pod during a rollout");
        assert_eq!(policy_for(&p).map(|x| x.limits.requests_per_minute), Ok(200));
    }

    fn parse(text: &str) -> LlmProxy {
        llmproxy_api::from_yaml(text).map(|(p, _)| p).unwrap()
    }
}
