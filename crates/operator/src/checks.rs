//! What the schema cannot check before building: the Secrets the proxies will read (they
//! exist, consent to each use and destination, hold the key) and the LlmQuota reference.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::Api;
use kube::{Client, ResourceExt};
use llmproxy_api::LlmProxy;
use llmproxy_api::consent::{self, Refusal, SecretRead};

use crate::children::{Grants, Settings};
use crate::status::Problem;

/// Whether a proxy of `proxy` may read `secret` for `read` (it opted in to that use, does not
/// exclude this proxy, and for an upstream key allows its host), and what is wrong with it if
/// anything. Pure, for tests.
pub(crate) fn secret_verdict(
    secret: Option<&Secret>,
    read: &SecretRead,
    proxy: &str,
) -> (Option<Problem>, bool) {
    let name = read.secret.clone();
    let Some(s) = secret else {
        return (Some(Problem::SecretNotFound { secret: name, use_: read.use_ }), false);
    };
    match consent::verdict(&s.metadata, read, proxy) {
        Ok(()) => (None, true),
        Err(Refusal::HostNotAllowed { host }) => {
            (Some(Problem::UpstreamHostNotAllowed { secret: name, host }), false)
        }
        Err(Refusal::NotOptedIn | Refusal::NotThisProxy) => {
            (Some(Problem::SecretNotAllowed { secret: name, use_: read.use_ }), false)
        }
    }
}

/// What a Secret the proxies may read lacks for `read`, if anything.
fn content_problem(s: &Secret, read: &SecretRead) -> Option<Problem> {
    let Some(key) = &read.key else { return client_keys_problem(s, &read.secret) };
    let present = s.data.as_ref().is_some_and(|d| d.contains_key(key));
    (!present).then(|| Problem::SecretKeyMissing { secret: read.secret.clone(), key: key.clone() })
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

/// Check the Secrets the proxies will read: they exist, consent to each use the spec makes of
/// them (and, for an upstream key, to its host), and hold what the proxy needs. Only those that
/// consent to a use are granted; while any use is refused, the proxies' Role keeps what it
/// grants (they serve their last good policy) less what lost all consent, and a refused spec
/// never widens it. The first problem is reported.
pub(crate) async fn check_secrets(
    client: &Client,
    ns: &str,
    p: &LlmProxy,
) -> Result<(Option<Problem>, Grants), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut fetched: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let (mut problems, mut grants, mut refused) = (Vec::new(), Grants::default(), false);
    for read in consent::reads(&p.spec) {
        if !fetched.contains_key(&read.secret) {
            let secret = secrets.get_opt(&read.secret).await?;
            fetched.insert(read.secret.clone(), secret);
        }
        let secret = fetched.get(&read.secret).and_then(Option::as_ref);
        let (problem, readable) = secret_verdict(secret, &read, &p.name_any());
        refused |= matches!(
            problem,
            Some(Problem::SecretNotAllowed { .. } | Problem::UpstreamHostNotAllowed { .. })
        );
        problems.extend(problem.or_else(|| content_problem(secret?, &read)));
        if readable && !grants.secrets.contains(&read.secret) {
            grants.secrets.push(read.secret.clone());
        }
    }
    if refused {
        // The running proxies keep their last good policy: keep what their Role grants (less
        // any Secret whose owner withdrew all consent), and add nothing.
        grants.secrets.clear();
        for name in granted_secrets(client, ns, p).await? {
            if !fetched.contains_key(&name) {
                let secret = secrets.get_opt(&name).await?;
                fetched.insert(name.clone(), secret);
            }
            let consents = fetched
                .get(&name)
                .and_then(Option::as_ref)
                .is_some_and(|s| consent::consents_to_any_use(&s.metadata, &p.name_any()));
            if consents && !grants.secrets.contains(&name) {
                grants.secrets.push(name);
            }
        }
    }
    Ok((problems.into_iter().next(), grants))
}

/// The Secrets the proxies' Role grants now (none when it does not exist yet).
async fn granted_secrets(client: &Client, ns: &str, p: &LlmProxy) -> Result<Vec<String>, kube::Error> {
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let role = roles.get_opt(&crate::children::proxy_identity(&p.name_any())).await?;
    Ok(role
        .and_then(|r| r.rules)
        .into_iter()
        .flatten()
        .filter(|rule| rule.resources.iter().flatten().any(|r| r == "secrets"))
        .flat_map(|rule| rule.resource_names.unwrap_or_default())
        .collect())
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
        let as_client_keys = SecretRead {
            secret: "k".into(),
            key: None,
            use_: llmproxy_api::SecretUse::ClientKeys,
            url: None,
        };
        let upstream_consent = secret(true, None, "team-a");
        let (problem, readable) = secret_verdict(Some(&upstream_consent), &as_client_keys, "p");
        assert_eq!(
            (problem.map(|p| p.reason()), readable),
            (Some("SecretNotAllowed"), false),
            "consent is per use"
        );
        let good = keys(true, &[("team-a", "sk-a"), ("team-b", "sk-b")]);
        assert!(secret_verdict(Some(&good), &as_client_keys, "p").1);
        assert!(client_keys_problem(&good, "k").is_none());
        let empty = keys(true, &[]);
        assert_eq!(client_keys_problem(&empty, "k").map(|p| p.reason()), Some("ClientKeysInvalid"));
        let twice = keys(true, &[("team-a", "sk-same"), ("team-b", "sk-same")]);
        let message = client_keys_problem(&twice, "k").map(|p| p.message()).unwrap_or_default();
        assert!(message.contains("team-b") && !message.contains("sk-same"), "{message}");
    }

    #[test]
    fn only_a_secret_that_opted_in_is_granted() {
        let r = SecretRead {
            secret: "openai-key".into(),
            key: Some("api-key".into()),
            use_: llmproxy_api::SecretUse::UpstreamKey,
            url: Some("https://api.openai.com/v1".into()),
        };
        let reason = |v: (Option<Problem>, bool)| (v.0.map(|p| p.reason()), v.1);
        let secret_verdict = |s: Option<&Secret>, r: &SecretRead, proxy: &str| {
            let (problem, readable) = secret_verdict(s, r, proxy);
            (problem.or_else(|| content_problem(s?, r)), readable)
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

    #[test]
    fn a_pinned_upstream_key_is_refused_for_another_host_and_the_message_names_the_host() {
        let s = Secret {
            metadata: ObjectMeta {
                labels: Some([(llmproxy_api::SECRET_OPT_IN_LABEL.to_owned(), "true".to_owned())].into()),
                annotations: Some(
                    [(llmproxy_api::ALLOWED_UPSTREAM_HOSTS.to_owned(), "api.openai.com".to_owned())].into(),
                ),
                ..ObjectMeta::default()
            },
            data: Some([("api-key".to_owned(), ByteString(b"sk-org".to_vec()))].into()),
            ..Secret::default()
        };
        let read = |url: &str| SecretRead {
            secret: "org-key".into(),
            key: Some("api-key".into()),
            use_: llmproxy_api::SecretUse::UpstreamKey,
            url: Some(url.into()),
        };
        assert_eq!(secret_verdict(Some(&s), &read("https://api.openai.com/v1"), "p"), (None, true));
        let (problem, readable) = secret_verdict(Some(&s), &read("https://attacker.example/v1"), "p");
        assert!(!readable);
        let problem = problem.expect("refused");
        assert_eq!(problem.reason(), "SecretNotAllowed");
        let message = problem.message();
        assert!(
            message.contains("\"attacker.example\"")
                && message.contains(llmproxy_api::ALLOWED_UPSTREAM_HOSTS),
            "{message}"
        );
        assert!(!message.contains("sk-org"), "{message}");
    }
}
