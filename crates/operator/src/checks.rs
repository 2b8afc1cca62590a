//! What the schema cannot check before building: the Secrets the proxies will read (they
//! exist, opted in, hold the key) and the LlmQuota reference.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};
use llmproxy_api::{LlmProxy, SecretKeyRef};

use crate::children::{Grants, Settings};
use crate::status::{Problem, SecretUse};

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
pub(crate) async fn check_secrets(
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
pub(crate) async fn check_quota(
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
            Ok((None, Some(crate::quota::grant(&quota, v, settings.operator_namespace.as_deref()))))
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
