//! The cluster-scoped `LlmQuota`: several LlmProxies, in several namespaces, share one
//! organisation-wide quota; and an LlmProxy's reference to it and grant from it.
// clippy reads the repeated `type_ = ...` inside separate `printcolumn(...)`s as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{RedisSpec, SharedStateSpec};
use super::defaults::default_weight;

/// An LlmProxy's draw on an `LlmQuota`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaRef {
    /// The LlmQuota's name (cluster-scoped).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,

    /// At most this weight under contention: the LlmQuota's owner sets each consumer's weight
    /// (`spec.consumers`), and this can only ask for less. Absent: what the owner grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: Option<i32>,

    /// At most this guaranteed percent: the owner sets each consumer's guarantee
    /// (`spec.consumers`), and this can only ask for less. Absent: what the owner grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub guaranteed: Option<i32>,
}

/// The share the LlmQuota's owner gives the consumers one entry matches: by namespace (and
/// name), or by a namespace label selector.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.namespace) != has(self.namespaceSelector)", "message": "set exactly one of namespace or namespaceSelector"},
    {"rule": "!has(self.name) || has(self.namespace)", "message": "name needs namespace"},
    {"rule": "!has(self.guaranteed) || has(self.name)", "message": "a guarantee names one LlmProxy: set namespace and name"},
]))]
pub struct QuotaShareSpec {
    /// The consumers' namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,

    /// One LlmProxy in `namespace`; absent: every LlmProxy in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,

    /// The consumers in the namespaces this label selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Each matching consumer's weight under contention, relative to the others' (default 1).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,

    /// Percent of the quota this one LlmProxy can always get, whatever the others do; all
    /// entries' guarantees sum to at most 100. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub guaranteed: Option<i32>,
}

impl QuotaShareSpec {
    /// Whether this entry is about LlmProxy `namespace/name`, whose namespace has `labels`.
    pub fn matches(&self, namespace: &str, name: &str, labels: &BTreeMap<String, String>) -> bool {
        match (&self.namespace, &self.namespace_selector) {
            (Some(ns), _) => ns == namespace && self.name.as_deref().is_none_or(|n| n == name),
            (None, Some(selector)) => selects(Some(selector), labels),
            (None, None) => false,
        }
    }
}

/// Whether labels `labels` match `selector` (`matchLabels` and `matchExpressions`, as the API
/// server evaluates them). An absent selector matches nothing: a quota is closed until its
/// owner says who may draw from it.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(s) = selector else { return false };
    let by_labels = s.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// What one consumer is granted of an LlmQuota under contention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Weight (1..=1000).
    pub weight: i32,
    /// Guaranteed percent (0..=100).
    pub guaranteed: i32,
}

impl LlmQuotaSpec {
    /// The share of consumer `namespace/name` (its namespace labelled `labels`, its reference
    /// `asked`): the first `consumers` entry that matches it, else `defaultWeight` and no
    /// guarantee; its own reference only lowers either. The owner decides, so no consumer can
    /// take another's share by asking for more.
    pub fn share_of(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        asked: &QuotaRef,
    ) -> Share {
        let entry = self.consumers.iter().find(|c| c.matches(namespace, name, labels));
        let weight = entry.map_or(self.default_weight.unwrap_or(1), |e| e.weight).clamp(1, 1000);
        let guaranteed = entry.and_then(|e| e.guaranteed).unwrap_or(0).clamp(0, 100);
        Share {
            weight: asked.weight.map_or(weight, |w| w.clamp(1, weight)),
            guaranteed: asked.guaranteed.map_or(guaranteed, |g| g.clamp(0, guaranteed)),
        }
    }

    /// What the schema's rules say, checked again (a standalone file, an object stored before
    /// a rule existed): one message per problem.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let sum: i64 = self.consumers.iter().map(|c| i64::from(c.guaranteed.unwrap_or(0).max(0))).sum();
        if sum > 100 {
            out.push(format!("spec.consumers: the guarantees sum to {sum} %, more than 100 %"));
        }
        for (i, c) in self.consumers.iter().enumerate() {
            if c.namespace.is_some() == c.namespace_selector.is_some() {
                out.push(format!("spec.consumers[{i}]: set exactly one of namespace or namespaceSelector"));
            }
            if c.guaranteed.is_some() && (c.name.is_none() || c.namespace.is_none()) {
                out.push(format!(
                    "spec.consumers[{i}].guaranteed: a guarantee names one LlmProxy: set namespace and name"
                ));
            }
            if !(1..=1000).contains(&c.weight) || !(0..=100).contains(&c.guaranteed.unwrap_or(0)) {
                out.push(format!("spec.consumers[{i}]: weight 1..=1000, guaranteed 0..=100"));
            }
        }
        if self.default_weight.is_some_and(|w| !(1..=1000).contains(&w)) {
            out.push("spec.defaultWeight: must be 1..=1000".into());
        }
        out
    }
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
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.consumers) || self.consumers.map(c, has(c.guaranteed) ? c.guaranteed : 0).sum() <= 100",
    "message": "the consumers' guarantees sum to more than 100 %",
}]))]
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
    pub models: BTreeMap<String, QuotaModelLimitsSpec>,

    /// Where the shared buckets live.
    pub shared_state: SharedStateSpec,

    /// The namespaces whose LlmProxies may draw from it (a label selector on namespaces;
    /// `kubernetes.io/metadata.name` names one). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<LabelSelector>,

    /// Each allowed consumer's share under contention, set by the quota's owner: the first
    /// entry matching a consumer gives its weight and guarantee (its `quotaRef` may only ask
    /// for less); the guarantees sum to at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub consumers: Vec<QuotaShareSpec>,

    /// The weight of an allowed consumer no entry of `consumers` matches (default 1; no
    /// guarantee).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub default_weight: Option<i32>,
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
    /// The weight granted it.
    pub weight: i32,
    /// The guaranteed percent granted it.
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
    pub models: BTreeMap<String, QuotaModelLimitsSpec>,
    /// Its Redis (a password Secret is in `passwordNamespace`).
    pub redis: RedisSpec,
    /// Where the Redis password Secret is (the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_namespace: Option<String>,
    /// This consumer's own Redis user (its password is in `redis.passwordSecretRef`): it may
    /// write only this consumer's entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// This consumer's weight.
    pub weight: i32,
    /// This consumer's guaranteed percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed: Option<i32>,
}

/// One model's limits within an organisation's quota.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaModelLimitsSpec {
    /// Requests per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub requests_per_minute: Option<i64>,

    /// Tokens per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub tokens_per_minute: Option<i64>,
}
