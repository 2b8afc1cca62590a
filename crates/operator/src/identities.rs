//! Each LlmQuota consumer's own Redis identity: an ACL user limited to its own entries (see
//! `llmproxy_api::redis_acl`), its password in a Secret in the operator's namespace that only
//! that consumer's ServiceAccount may read, and the owner's shares written where every
//! consumer reads them. So no consumer holds the quota's own password, and none can write
//! another's entries or the shares.
//!
//! The Redis side is applied on every observer pass, not only on change: a Redis that restarted
//! has forgotten its ACL users and the shares. The cluster side (Secrets, RBAC) is applied when
//! the allowed consumers change and every few minutes, so a pass costs the API server nothing
//! in the steady state. Revocation runs first in Redis (the user is deleted, and with it the
//! consumer's access), then in the cluster (its Secret and RBAC go).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use llmproxy_api::redis_acl::{
    PASSWORD_KEY, consumer_rules, consumer_secret, consumer_user, redacted, shares_key, users_prefix,
};
use llmproxy_api::{LlmQuota, QuotaConsumer};

/// The field manager of what this module writes.
const MANAGER: &str = "llmproxy-operator-identities";
/// The label naming the LlmQuota a consumer identity belongs to.
const QUOTA_LABEL: &str = "llmproxy.io/quota";
/// The label marking an object as one consumer's identity.
const IDENTITY_LABEL: &str = "llmproxy.io/quota-identity";
/// The most one pass may wait on a quota's Redis, so a dead one never stalls the others.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the cluster side, once applied, is trusted before it is applied again (someone may
/// have deleted a Secret or a Role by hand).
const REAPPLY: Duration = Duration::from_secs(300);

/// What the cluster side last was, per LlmQuota.
#[derive(Default)]
pub(crate) struct Applied {
    quotas: std::collections::HashMap<String, Known>,
}

/// One LlmQuota's cluster side as last applied.
struct Known {
    at: tokio::time::Instant,
    /// The allowed consumers' Secrets.
    keep: BTreeSet<String>,
    /// Each Secret's password (none without a quota password).
    passwords: BTreeMap<String, String>,
}

/// Why a quota's consumers could not be given their identities.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    /// The Kubernetes API refused or failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The quota's Redis refused or failed (never with a password in it).
    #[error("the LlmQuota's Redis: {0}")]
    Redis(String),
    /// The quota's password Secret is missing or has no such key.
    #[error("the LlmQuota's password Secret {0} is missing or lacks its key")]
    NoPassword(String),
}

/// One allowed consumer, as its identity needs it.
struct Consumer {
    /// `NAMESPACE/NAME`, its name in Redis.
    id: String,
    namespace: String,
    name: String,
    /// Its password's Secret in the operator's namespace (and its Role's and binding's name).
    secret: String,
    /// `weight,guaranteed`, as the grant script reads the owner's shares.
    share: String,
}

/// Give every allowed consumer among `consumers` of `quota` its identity, and take it from
/// every other; `namespace` is the operator's, where the quota's password Secret is.
pub(crate) async fn apply(
    client: &Client,
    quota: &LlmQuota,
    namespace: &str,
    consumers: &[QuotaConsumer],
    applied: &mut Applied,
) -> Result<(), IdentityError> {
    let name = quota.name_any();
    let allowed: Vec<Consumer> = consumers
        .iter()
        .filter(|c| c.allowed)
        .map(|c| Consumer {
            id: format!("{}/{}", c.namespace, c.name),
            secret: consumer_secret(&name, &c.namespace, &c.name),
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            share: format!("{},{}", c.weight.clamp(1, 1000), c.guaranteed.unwrap_or(0).clamp(0, 100)),
        })
        .collect();
    let redis = &quota.spec.shared_state.redis;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut users = Vec::new();
    let admin = match &redis.password_secret_ref {
        Some(r) => {
            let secret = secrets.get_opt(&r.name).await?;
            let value = secret.as_ref().and_then(|s| s.data.as_ref()?.get(&r.key)).map(|v| v.0.clone());
            let value = value.and_then(|v| String::from_utf8(v).ok()).filter(|v| !v.is_empty());
            Some(value.ok_or_else(|| IdentityError::NoPassword(format!("{namespace}/{}", r.name)))?)
        }
        None => None,
    };
    let keep: BTreeSet<String> = allowed.iter().map(|c| c.secret.clone()).collect();
    let now = tokio::time::Instant::now();
    let known = applied.quotas.get(&name).filter(|k| {
        now.duration_since(k.at) < REAPPLY && k.keep == keep && k.passwords.is_empty() == admin.is_none()
    });
    let cluster_due = known.is_none();
    let mut passwords = known.map(|k| k.passwords.clone()).unwrap_or_default();
    if admin.is_some() && cluster_due {
        passwords.clear();
        for c in &allowed {
            let password = password(&secrets, quota, namespace, c).await?;
            rbac(client, quota, namespace, c).await?;
            passwords.insert(c.secret.clone(), password);
        }
    }
    for c in allowed.iter().filter(|_| admin.is_some()) {
        if let Some(password) = passwords.get(&c.secret) {
            users.push((consumer_user(&name, &c.id), digest(password), c.id.clone()));
        }
    }
    let shares: Vec<(String, String)> = allowed.iter().map(|c| (c.id.clone(), c.share.clone())).collect();
    let written =
        tokio::time::timeout(REDIS_TIMEOUT, in_redis(&redis.url, admin.as_deref(), &name, &users, &shares))
            .await
            .map_err(|_| IdentityError::Redis("no answer in time".into()))
            .and_then(|r| r);
    // What no allowed consumer is: gone from the cluster too, once Redis has forgotten it (or
    // right away when Redis is out: a Secret nobody may read is no access).
    if cluster_due {
        remove_others(client, &name, namespace, &keep).await?;
        applied.quotas.insert(name, Known { at: now, keep, passwords });
    }
    written
}

/// The consumer's password: the one its Secret holds, or a new random one in a new Secret.
async fn password(
    secrets: &Api<Secret>,
    quota: &LlmQuota,
    namespace: &str,
    c: &Consumer,
) -> Result<String, IdentityError> {
    let name = c.secret.as_str();
    if let Some(s) = secrets.get_opt(name).await?
        && let Some(v) = s.data.as_ref().and_then(|d| d.get(PASSWORD_KEY))
        && let Ok(v) = String::from_utf8(v.0.clone())
        && v.len() >= 32
    {
        return Ok(v);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| IdentityError::Redis(format!("no randomness for a password: {e}")))?;
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = Secret {
        metadata: meta(quota, namespace, name, c),
        data: Some(BTreeMap::from([(PASSWORD_KEY.to_owned(), ByteString(value.clone().into_bytes()))])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    secrets.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&secret)).await?;
    Ok(value)
}

/// A Role reading only the consumer's Secret, bound only to its LlmProxy's ServiceAccount.
async fn rbac(client: &Client, quota: &LlmQuota, namespace: &str, c: &Consumer) -> Result<(), IdentityError> {
    let name = c.secret.as_str();
    let role = Role {
        metadata: meta(quota, namespace, name, c),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![name.to_owned()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: meta(quota, namespace, name, c),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: crate::children::proxy_identity(&c.name),
            namespace: Some(c.namespace.clone()),
            api_group: None,
        }]),
    };
    let params = PatchParams::apply(MANAGER).force();
    Api::<Role>::namespaced(client.clone(), namespace).patch(name, &params, &Patch::Apply(&role)).await?;
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(name, &params, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

/// Metadata of one consumer's identity object: owned by the LlmQuota, so it goes with it.
fn meta(quota: &LlmQuota, namespace: &str, name: &str, c: &Consumer) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), "llmproxy-operator".to_owned()),
            (QUOTA_LABEL.to_owned(), quota.name_any()),
            (IDENTITY_LABEL.to_owned(), "true".to_owned()),
        ])),
        annotations: Some(BTreeMap::from([("llmproxy.io/consumer".to_owned(), c.id.clone())])),
        owner_references: Some(vec![OwnerReference {
            api_version: LlmQuota::api_version(&()).into_owned(),
            kind: LlmQuota::kind(&()).into_owned(),
            name: quota.name_any(),
            uid: quota.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..ObjectMeta::default()
    }
}

/// The hex SHA-256 of a password: Redis keeps only the digest, and it is all that is sent.
fn digest(password: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(password.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// In the quota's Redis: one ACL user per allowed consumer (`users`: name, password digest,
/// consumer), every other consumer user of the quota deleted, and the owner's shares.
async fn in_redis(
    url: &str,
    admin: Option<&str>,
    quota: &str,
    users: &[(String, String, String)],
    shares: &[(String, String)],
) -> Result<(), IdentityError> {
    use redis::IntoConnectionInfo;
    let fail = |e: redis::RedisError| IdentityError::Redis(redacted(&e.to_string()));
    let mut info = url.into_connection_info().map_err(fail)?;
    if let Some(pw) = admin {
        info = info.clone().set_redis_settings(info.redis_settings().clone().set_password(pw));
    }
    let client = redis::Client::open(info).map_err(fail)?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(fail)?;
    if admin.is_some() {
        let wanted: BTreeSet<&str> = users.iter().map(|(u, _, _)| u.as_str()).collect();
        let existing: Vec<String> =
            redis::cmd("ACL").arg("USERS").query_async(&mut conn).await.map_err(fail)?;
        let prefix = users_prefix(quota);
        for old in existing.iter().filter(|u| u.starts_with(&prefix) && !wanted.contains(u.as_str())) {
            let _: i64 =
                redis::cmd("ACL").arg("DELUSER").arg(old).query_async(&mut conn).await.map_err(fail)?;
            tracing::info!(quota, user = %old, "a consumer's Redis user was removed");
        }
        for (user, digest, consumer) in users {
            let mut cmd = redis::cmd("ACL");
            cmd.arg("SETUSER").arg(user);
            for rule in consumer_rules(quota, consumer, digest) {
                cmd.arg(rule);
            }
            let () = cmd.query_async(&mut conn).await.map_err(fail)?;
        }
    }
    let key = shares_key(quota);
    let mut pipe = redis::pipe();
    pipe.atomic().del(&key).ignore();
    if !shares.is_empty() {
        pipe.hset_multiple(&key, shares).ignore();
    }
    let () = pipe.query_async(&mut conn).await.map_err(fail)?;
    Ok(())
}

/// Delete the identity objects of quota `quota` in `namespace` not named in `keep`, and the
/// Role that once let every consumer read the quota's own password.
async fn remove_others(
    client: &Client,
    quota: &str,
    namespace: &str,
    keep: &BTreeSet<String>,
) -> Result<(), IdentityError> {
    let selector = format!("{QUOTA_LABEL}={quota},{IDENTITY_LABEL}=true");
    let list = ListParams::default().labels(&selector);
    let dp = DeleteParams::default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for s in secrets.list(&list).await?.items.iter().filter(|s| !keep.contains(&s.name_any())) {
        secrets.delete(&s.name_any(), &dp).await?;
    }
    let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    for b in bindings.list(&list).await?.items.iter().filter(|b| !keep.contains(&b.name_any())) {
        bindings.delete(&b.name_any(), &dp).await?;
    }
    for r in roles.list(&list).await?.items.iter().filter(|r| !keep.contains(&r.name_any())) {
        roles.delete(&r.name_any(), &dp).await?;
    }
    let legacy = crate::quota::password_rbac_name(quota);
    if bindings.get_opt(&legacy).await?.is_some() {
        bindings.delete(&legacy, &dp).await?;
    }
    if roles.get_opt(&legacy).await?.is_some() {
        roles.delete(&legacy, &dp).await?;
    }
    Ok(())
}
