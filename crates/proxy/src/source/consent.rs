//! Cluster mode's own check of Secret consent (`llmproxy_api::consent`): the operator grants
//! Secrets by name, so a Secret granted for one use could otherwise be read for any. Run on
//! every LlmProxy version before it is applied (a refused spec leaves the last good policy
//! serving) and on every Secret version before its values are used.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::{Client, ResourceExt};
use llmproxy_api::LlmProxy;
use llmproxy_api::consent::{self, SecretRead};

/// Whether every Secret that `p` reads consents to each use it makes of it, as far as this
/// proxy can see: a Secret that does not exist is no refusal (nothing is read; its watch checks
/// each version that appears), one it may not read is (the operator did not grant it).
pub(crate) async fn check(client: &Client, p: &LlmProxy) -> Result<(), String> {
    let ns = p.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut by_name: BTreeMap<String, Vec<SecretRead>> = BTreeMap::new();
    for read in consent::reads(&p.spec) {
        by_name.entry(read.secret.clone()).or_default().push(read);
    }
    for (name, reads) in by_name {
        let field = reads.first().map_or("", |r| r.use_.field());
        match api.get_opt(&name).await {
            Ok(Some(s)) => allowed(&s.metadata, &reads, &p.name_any())?,
            Ok(None) => {}
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Err(format!(
                    "this proxy may not read Secret {name} ({field}): the operator grants it only once its \
                     owner has consented to each use the spec makes of it"
                ));
            }
            Err(e) => return Err(format!("cannot check Secret {name} ({field}): {e}")),
        }
    }
    Ok(())
}

/// Whether a Secret with metadata `meta` consents to all of `reads` by LlmProxy `proxy`; the
/// refusal names the Secret, the use and the reason (never a value).
pub(crate) fn allowed(meta: &ObjectMeta, reads: &[SecretRead], proxy: &str) -> Result<(), String> {
    for read in reads {
        consent::verdict(meta, read, proxy).map_err(|refusal| {
            format!(
                "Secret {} may not be read for {} (label {}=true): {refusal}",
                read.secret,
                read.use_.field(),
                read.use_.label()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use llmproxy_api::SecretUse;

    use super::*;

    #[test]
    fn a_refusal_names_the_secret_the_use_and_its_label_and_every_use_must_pass() {
        let meta = ObjectMeta {
            labels: Some([(llmproxy_api::CLIENT_KEYS_LABEL.to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        };
        let read = |use_, key: Option<&str>, url: Option<&str>| SecretRead {
            secret: "team-keys".into(),
            key: key.map(str::to_owned),
            use_,
            url: url.map(str::to_owned),
        };
        let as_clients = read(SecretUse::ClientKeys, None, None);
        assert_eq!(allowed(&meta, std::slice::from_ref(&as_clients), "p"), Ok(()));
        let as_upstream = read(SecretUse::UpstreamKey, Some("alice"), Some("https://attacker.example/v1"));
        let refusal = allowed(&meta, &[as_clients, as_upstream], "p").err().unwrap_or_default();
        assert!(
            refusal.contains("team-keys")
                && refusal.contains("apiKeySecretRef")
                && refusal.contains(llmproxy_api::SECRET_OPT_IN_LABEL),
            "{refusal}"
        );
    }
}
