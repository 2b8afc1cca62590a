//! The `LlmProxy` API: the custom resource types, their generated CRD, and the checked runtime
//! [`Policy`] that the proxy and the operator both derive from a spec.

#![warn(unreachable_pub)]

pub mod client_keys;
pub mod consent;
pub mod crd;
mod duration;
mod fields;
mod manifest;
pub mod paths;
pub mod policy;
mod quantity;
pub mod redis_acl;
mod report;

pub use client_keys::ClientKeys;
pub use consent::{ALLOWED_UPSTREAM_HOSTS, SecretUse};
pub use crd::{
    AutoscalingSpec, CacheScope, CacheSpec, ClientOverride, ClientPriority, ClientSettings, ClientsSpec,
    EndpointLimitsSpec, EndpointSpec, ExhaustedStatus, KeyHeader, LimitsSpec, LlmProxy, LlmProxySpec,
    LlmProxyStatus, ModelLimitsSpec, ObservedLimits, Protocol, Provider, QueueSpec, RetryBudgetSpec,
    RetrySpec, SecretKeyRef, SecretNameRef, TokenAccounting, UpstreamSpec, UpstreamStatus, UsageStatus,
};
pub use crd::{
    GrantedQuota, LlmQuota, LlmQuotaSpec, LlmQuotaStatus, QuotaConsumer, QuotaModelLimitsSpec, QuotaRef,
    QuotaShareSpec, RedisPasswordRef, RedisSpec, Share, SharedStateSpec,
};
pub use duration::Duration;
pub use manifest::{ManifestError, crd_yaml, from_yaml, quota_crd_yaml};
pub use policy::replicas;
pub use policy::{FieldError, Policy, PolicyError};
pub use report::ProxyReport;

/// The label a Secret carries (value `"true"`) before the operator lets any proxy read it: a
/// user who may edit LlmProxy objects but not read Secrets cannot name one of the namespace's
/// Secrets and have a proxy send it to a host of theirs.
pub const SECRET_OPT_IN_LABEL: &str = "llmproxy.io/upstream-key";
/// The label (value `"true"`) a Secret of client keys carries before the operator lets a proxy
/// read it: the same consent as [`SECRET_OPT_IN_LABEL`], for the other use.
pub const CLIENT_KEYS_LABEL: &str = "llmproxy.io/client-keys";
/// The label (value `"true"`) a Secret holding an LlmProxy's Redis password carries before
/// the operator lets its proxies read it.
pub const REDIS_PASSWORD_LABEL: &str = "llmproxy.io/redis-password";
/// Optional annotation on such a Secret narrowing it to some LlmProxies (comma-separated names).
pub const SECRET_ALLOWED_PROXIES: &str = "llmproxy.io/allowed-proxies";

/// The API group, for label keys and RBAC rules.
pub const GROUP: &str = "llmproxy.io";
/// The served version.
pub const VERSION: &str = "v1alpha1";
