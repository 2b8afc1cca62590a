//! Shared quotas: `spec.sharedState` (an LlmProxy's replicas share its limits through Redis)
//! and the cluster-scoped `LlmQuota` (several LlmProxies, in several namespaces, share one
//! organisation-wide quota).
// clippy reads the repeated `type_ = ...` inside separate `printcolumn(...)`s as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::ModelLimitsSpec;

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

fn default_password_key() -> String {
    "password".into()
}

/// An LlmProxy's draw on an `LlmQuota`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaRef {
    /// The LlmQuota's name (cluster-scoped).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,

    /// Share of the quota under contention, relative to the other consumers' weights
    /// (default 1).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,

    /// Percent of the quota this LlmProxy is always able to get, whatever the others do; the
    /// guarantees of all consumers of one LlmQuota sum to at most 100. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub guaranteed: Option<i32>,
}

fn default_weight() -> i32 {
    1
}

/// An organisation-wide quota that several LlmProxies draw from together: what the provider
/// grants one account, declared once. Each consumer's own `limits` cap it within this quota.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmproxy.io",
    version = "v1alpha1",
    kind = "LlmQuota",
    plural = "llmquotas",
    shortname = "llmq",
    category = "llmproxy",
    status = "LlmQuotaStatus",
    doc = "An organisation-wide LLM API quota shared by LlmProxies, through Redis.",
    printcolumn(name = "RPM", type_ = "integer", json_path = ".spec.requestsPerMinute"),
    printcolumn(name = "TPM", type_ = "integer", json_path = ".spec.tokensPerMinute"),
    printcolumn(name = "Consumers", type_ = "integer", json_path = ".status.consumerCount"),
    printcolumn(name = "Used RPM", type_ = "integer", json_path = ".status.requestsLastMinute"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LlmQuotaSpec {
    /// Requests per minute, for all consumers together.
    #[schemars(range(min = 1, max = 100_000_000))]
    pub requests_per_minute: i64,

    /// Tokens per minute, for all consumers together. Absent: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub tokens_per_minute: Option<i64>,

    /// Per-model limits within the quota.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub models: BTreeMap<String, ModelLimitsSpec>,

    /// Where the shared buckets live.
    pub shared_state: SharedStateSpec,

    /// The namespaces whose LlmProxies may draw from it (a label selector on namespaces;
    /// `kubernetes.io/metadata.name` names one). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<LabelSelector>,
}

/// What the operator reports about an LlmQuota.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmQuotaStatus {
    /// `Ready` (every consumer's reference is valid), with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// LlmProxies that reference it, allowed or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace", "name"]))]
    pub consumers: Vec<QuotaConsumer>,

    /// How many consumers draw from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_count: Option<i32>,

    /// Requests its consumers sent upstream in the last minute, all together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_last_minute: Option<i64>,

    /// Tokens charged in the last minute, all together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_last_minute: Option<i64>,
}

/// One LlmProxy drawing from an LlmQuota.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaConsumer {
    /// The LlmProxy's namespace.
    pub namespace: String,
    /// The LlmProxy's name.
    pub name: String,
    /// Its weight.
    pub weight: i32,
    /// Its guaranteed percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed: Option<i32>,
    /// Whether it may draw (its namespace is allowed and the guarantees fit).
    pub allowed: bool,
    /// Why not, when it may not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Requests its pods sent upstream in the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_last_minute: Option<i64>,
    /// Tokens its pods charged in the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_last_minute: Option<i64>,
}

/// The LlmQuota as resolved for one consumer: what the operator writes into the LlmProxy's
/// status once it has checked the reference (the proxies trust only that).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantedQuota {
    /// The LlmQuota's name (also its buckets' name in Redis).
    pub name: String,
    /// Its `spec.requestsPerMinute`.
    pub requests_per_minute: i64,
    /// Its `spec.tokensPerMinute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<i64>,
    /// Its per-model limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelLimitsSpec>,
    /// Its Redis (a password Secret is in `passwordNamespace`).
    pub redis: RedisSpec,
    /// Where the Redis password Secret is (the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_namespace: Option<String>,
    /// This consumer's weight.
    pub weight: i32,
    /// This consumer's guaranteed percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed: Option<i32>,
}
