//! Types both custom resources use: the Redis that shared buckets live in.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults::default_password_key;

/// Where replicas keep the buckets they share.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedStateSpec {
    /// A Redis (or Valkey, or a managed Redis) that every replica reaches.
    pub redis: RedisSpec,
}

/// A Redis server.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://HOST:PORT/DB` or `rediss://` (TLS); no password in the URL (use
    /// `passwordSecretRef`).
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^rediss?://[^@\s]+$"))]
    pub url: String,

    /// The Secret key holding the password (an LlmProxy's: in its namespace, labelled
    /// `llmproxy.io/redis-password: "true"`; an LlmQuota's: in the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<RedisPasswordRef>,
}

/// A key in a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisPasswordRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,

    /// Key within the Secret's data (default `password`).
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}
