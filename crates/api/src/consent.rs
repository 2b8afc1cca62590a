//! A Secret's consent to being read by proxies: a label per use, optionally narrowed to some
//! LlmProxies, and for an upstream key to some destination hosts. The operator (before it
//! grants access) and the proxies (before they apply a spec or use a key) apply this one rule,
//! so a Secret given for one use is never read for another or sent somewhere its owner did not
//! name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::LlmProxySpec;

/// Annotation on an upstream-key Secret pinning where its key may go: comma-separated host
/// names, each exact or `*.` and a domain (one more label in front, as a TLS wildcard).
pub const ALLOWED_UPSTREAM_HOSTS: &str = "llmproxy.io/allowed-upstream-hosts";

/// Why a proxy reads a Secret; each use has its own opt-in label, so a Secret's owner agrees to
/// exactly the uses they labelled it for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretUse {
    /// An upstream's `apiKeySecretRef`: the key sent upstream.
    UpstreamKey,
    /// `spec.clients.keysSecretRef`: the keys clients must present.
    ClientKeys,
    /// `spec.sharedState.redis.passwordSecretRef`: the shared buckets' Redis password.
    RedisPassword,
}

impl SecretUse {
    /// The spec field that names the Secret.
    pub fn field(self) -> &'static str {
        match self {
            SecretUse::UpstreamKey => "an upstream's apiKeySecretRef",
            SecretUse::ClientKeys => "spec.clients.keysSecretRef",
            SecretUse::RedisPassword => "spec.sharedState.redis.passwordSecretRef",
        }
    }

    /// The label (value `"true"`) with which the Secret's owner lets proxies read it.
    pub fn label(self) -> &'static str {
        match self {
            SecretUse::UpstreamKey => crate::SECRET_OPT_IN_LABEL,
            SecretUse::ClientKeys => crate::CLIENT_KEYS_LABEL,
            SecretUse::RedisPassword => crate::REDIS_PASSWORD_LABEL,
        }
    }
}

/// One read of a Secret that a spec asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRead {
    /// The Secret's name (in the LlmProxy's namespace).
    pub secret: String,
    /// The data key read; `None` when the whole Secret is (client keys).
    pub key: Option<String>,
    /// What it is read for.
    pub use_: SecretUse,
    /// For an upstream key, the URL it is sent to.
    pub url: Option<String>,
}

/// Why a Secret may not be read for a use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It lacks the use's label with value `"true"`.
    NotOptedIn,
    /// Its `llmproxy.io/allowed-proxies` annotation does not name this LlmProxy.
    NotThisProxy,
    /// Its `llmproxy.io/allowed-upstream-hosts` annotation does not allow the URL's host.
    HostNotAllowed {
        /// The host the spec would send the key to.
        host: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotOptedIn => write!(f, "it has not opted in to this use"),
            Refusal::NotThisProxy => {
                write!(f, "its annotation {} does not name this LlmProxy", crate::SECRET_ALLOWED_PROXIES)
            }
            Refusal::HostNotAllowed { host } => {
                write!(f, "its annotation {ALLOWED_UPSTREAM_HOSTS} does not allow host {host:?}")
            }
        }
    }
}

/// Every Secret read `spec` asks for: each endpoint's upstream key with its URL, the Redis
/// password, the client keys. A Secret named twice appears once per use (and per URL).
pub fn reads(spec: &LlmProxySpec) -> Vec<SecretRead> {
    let mut out: Vec<SecretRead> = Vec::new();
    for (_, _, u) in spec.endpoints() {
        if let Some(r) = &u.api_key_secret_ref {
            out.push(SecretRead {
                secret: r.name.clone(),
                key: Some(r.key.clone()),
                use_: SecretUse::UpstreamKey,
                url: Some(u.url.clone()),
            });
        }
    }
    if let Some(r) = spec.shared_state.as_ref().and_then(|s| s.redis.password_secret_ref.as_ref()) {
        out.push(SecretRead {
            secret: r.name.clone(),
            key: Some(r.key.clone()),
            use_: SecretUse::RedisPassword,
            url: None,
        });
    }
    if let Some(r) = spec.clients.as_ref().and_then(|c| c.keys_secret_ref.as_ref()) {
        out.push(SecretRead { secret: r.name.clone(), key: None, use_: SecretUse::ClientKeys, url: None });
    }
    let mut seen = Vec::new();
    out.retain(|r| {
        let new = !seen.contains(r);
        if new {
            seen.push(r.clone());
        }
        new
    });
    out
}

/// Whether a Secret with metadata `meta` consents to `read` by the proxies of LlmProxy `proxy`.
pub fn verdict(meta: &ObjectMeta, read: &SecretRead, proxy: &str) -> Result<(), Refusal> {
    let labels = meta.labels.as_ref();
    let annotations = meta.annotations.as_ref();
    if labels.and_then(|l| l.get(read.use_.label())).is_none_or(|v| v != "true") {
        return Err(Refusal::NotOptedIn);
    }
    let listed = annotations
        .and_then(|a| a.get(crate::SECRET_ALLOWED_PROXIES))
        .is_none_or(|names| names.split(',').any(|n| n.trim() == proxy));
    if !listed {
        return Err(Refusal::NotThisProxy);
    }
    if read.use_ == SecretUse::UpstreamKey
        && let Some(patterns) = annotations.and_then(|a| a.get(ALLOWED_UPSTREAM_HOSTS))
    {
        let url = read.url.as_deref().unwrap_or_default();
        match upstream_host(url) {
            Some(host) if host_allowed(patterns, &host) => {}
            Some(host) => return Err(Refusal::HostNotAllowed { host }),
            None => return Err(Refusal::HostNotAllowed { host: url.to_owned() }),
        }
    }
    Ok(())
}

/// Whether a Secret with metadata `meta` consents to being read by LlmProxy `proxy` for any
/// use at all (the label of one, and not narrowed to other LlmProxies).
pub fn consents_to_any_use(meta: &ObjectMeta, proxy: &str) -> bool {
    [SecretUse::UpstreamKey, SecretUse::ClientKeys, SecretUse::RedisPassword].into_iter().any(|use_| {
        let read = SecretRead { secret: String::new(), key: None, use_, url: None };
        !matches!(verdict(meta, &read, proxy), Err(Refusal::NotOptedIn | Refusal::NotThisProxy))
    })
}

/// The host a URL's requests go to, lower-case, without port, brackets or a final dot: the same
/// parse (`http::Uri`) the proxy connects with.
pub(crate) fn upstream_host(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// Whether `host` (as [`upstream_host`] gives it) matches one of the comma-separated
/// `patterns`: a host name exactly, or `*.DOMAIN` for exactly one label in front of DOMAIN.
/// Anything else (an empty list, `*` alone, a port) matches nothing.
pub(crate) fn host_allowed(patterns: &str, host: &str) -> bool {
    patterns.split(',').any(|p| {
        let p = p.trim().to_ascii_lowercase();
        let p = p.strip_suffix('.').unwrap_or(&p);
        let p = p.trim_start_matches('[').trim_end_matches(']');
        if p.is_empty() || p.contains(['/', '@', ' ']) {
            return false;
        }
        match p.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => host
                .strip_suffix(domain)
                .and_then(|front| front.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            Some(_) => false,
            None => !p.contains('*') && p == host,
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn meta(labels: &[&str], annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            labels: Some(labels.iter().map(|l| ((*l).to_owned(), "true".to_owned())).collect()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..ObjectMeta::default()
        }
    }

    fn upstream_key(url: &str) -> SecretRead {
        SecretRead {
            secret: "k".into(),
            key: Some("api-key".into()),
            use_: SecretUse::UpstreamKey,
            url: Some(url.into()),
        }
    }

    #[test]
    fn consent_is_per_use() {
        let client_keys_only = meta(&[crate::CLIENT_KEYS_LABEL], &[]);
        let as_upstream = upstream_key("https://attacker.example/v1");
        assert_eq!(verdict(&client_keys_only, &as_upstream, "p"), Err(Refusal::NotOptedIn));
        let as_redis = SecretRead { use_: SecretUse::RedisPassword, url: None, ..as_upstream.clone() };
        assert_eq!(verdict(&client_keys_only, &as_redis, "p"), Err(Refusal::NotOptedIn));
        let as_clients =
            SecretRead { use_: SecretUse::ClientKeys, key: None, url: None, ..as_upstream.clone() };
        assert_eq!(verdict(&client_keys_only, &as_clients, "p"), Ok(()));
        let upstream_only = meta(&[crate::SECRET_OPT_IN_LABEL], &[]);
        assert_eq!(verdict(&upstream_only, &as_upstream, "p"), Ok(()));
        assert_eq!(verdict(&upstream_only, &as_clients, "p"), Err(Refusal::NotOptedIn));
        let mut wrong_value = upstream_only.clone();
        wrong_value.labels = Some([(crate::SECRET_OPT_IN_LABEL.to_owned(), "yes".to_owned())].into());
        assert_eq!(verdict(&wrong_value, &as_upstream, "p"), Err(Refusal::NotOptedIn));
        let narrowed = meta(&[crate::SECRET_OPT_IN_LABEL], &[(crate::SECRET_ALLOWED_PROXIES, "a, b")]);
        assert_eq!(verdict(&narrowed, &as_upstream, "b"), Ok(()));
        assert_eq!(verdict(&narrowed, &as_upstream, "p"), Err(Refusal::NotThisProxy));
        assert!(consents_to_any_use(&client_keys_only, "p") && consents_to_any_use(&narrowed, "a"));
        assert!(!consents_to_any_use(&narrowed, "p") && !consents_to_any_use(&meta(&[], &[]), "p"));
    }

    #[test]
    fn a_pinned_key_goes_only_to_the_hosts_its_owner_named() {
        let pinned = meta(
            &[crate::SECRET_OPT_IN_LABEL],
            &[(ALLOWED_UPSTREAM_HOSTS, "api.openai.com, *.openai.azure.com")],
        );
        let ok = |url: &str| verdict(&pinned, &upstream_key(url), "p");
        for good in [
            "https://api.openai.com/v1",
            "https://API.OpenAI.com:443/v1",
            "https://api.openai.com./v1",
            "https://team-a.openai.azure.com/openai/v1",
        ] {
            assert_eq!(ok(good), Ok(()), "{good}");
        }
        for (bad, host) in [
            ("https://attacker.example/v1", "attacker.example"),
            ("https://api.openai.com.attacker.example/v1", "api.openai.com.attacker.example"),
            ("https://openai.azure.com/v1", "openai.azure.com"),
            ("https://a.b.openai.azure.com/v1", "a.b.openai.azure.com"),
            ("https://xopenai.azure.com/v1", "xopenai.azure.com"),
            ("http://127.0.0.1:8080/v1", "127.0.0.1"),
        ] {
            assert_eq!(ok(bad), Err(Refusal::HostNotAllowed { host: host.into() }), "{bad}");
        }
        // The pin is about the upstream key only; unpinned keys go wherever the spec says.
        let unpinned = meta(&[crate::SECRET_OPT_IN_LABEL], &[]);
        assert_eq!(verdict(&unpinned, &upstream_key("https://attacker.example/v1"), "p"), Ok(()));
    }

    #[test]
    fn host_patterns_match_narrowly() {
        assert!(host_allowed("localhost", "localhost"));
        assert!(host_allowed("::1", "::1") && host_allowed("[::1]", "::1"));
        assert!(host_allowed(" 127.0.0.1 ,x", "127.0.0.1"));
        for (patterns, host) in [
            ("", "api.openai.com"),
            ("*", "api.openai.com"),
            ("*.", "api.openai.com"),
            ("api.*.com", "api.openai.com"),
            ("api.openai.com:443", "api.openai.com"),
            ("*.*.com", "a.b.com"),
        ] {
            assert!(!host_allowed(patterns, host), "{patterns:?} ~ {host:?}");
        }
    }

    #[test]
    fn a_spec_asks_for_each_read_once_per_use() {
        let (p, _) = crate::from_yaml(
            r"
apiVersion: llmproxy.io/v1alpha1
kind: LlmProxy
metadata: {name: p, namespace: n}
spec:
  upstreams:
  - {name: a, url: 'https://api.openai.com/v1', apiKeySecretRef: {name: shared}}
  - {name: b, url: 'https://evil.example/v1', apiKeySecretRef: {name: shared}}
  limits: {requestsPerMinute: 60}
  clients: {keysSecretRef: {name: shared}}
  sharedState: {redis: {url: 'redis://r:6379', passwordSecretRef: {name: shared}}}
",
        )
        .unwrap();
        let reads = reads(&p.spec);
        let uses: Vec<(SecretUse, Option<&str>)> = reads.iter().map(|r| (r.use_, r.url.as_deref())).collect();
        assert_eq!(
            uses,
            [
                (SecretUse::UpstreamKey, Some("https://api.openai.com/v1")),
                (SecretUse::UpstreamKey, Some("https://evil.example/v1")),
                (SecretUse::RedisPassword, None),
                (SecretUse::ClientKeys, None),
            ]
        );
    }
}
