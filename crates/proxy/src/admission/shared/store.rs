//! The two stores a replica shares its buckets through, and who it is in them.

use llmproxy_api::policy::{Policy, QuotaPolicy, SharedPolicy};

use crate::admission::limiter::lease::LeaseKey;

/// Who this replica is in the shared store.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The LlmProxy's buckets' name: `NAMESPACE/NAME`.
    pub proxy: String,
    /// This replica (pod name, or host and port standalone).
    pub member: String,
    /// Replicas the cluster reports, a floor for the member count without Redis.
    pub replicas: u32,
}

/// Which Redis a lessee serves. The LlmProxy's own buckets live in its `sharedState` (or,
/// without one, in its LlmQuota's Redis); the LlmQuota's buckets always live in the quota's
/// Redis, over a connection of their own with the quota's credentials, whatever the LlmProxy's
/// own `sharedState` says, so a tenant's Redis never holds (or grants) the organisation's quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    /// The LlmProxy's buckets (its limits, models, clients, endpoints).
    Proxy,
    /// The LlmQuota's buckets.
    Quota,
}

impl Store {
    /// Both stores, each served by a lessee of its own so that one Redis failing never stalls
    /// the other.
    pub(crate) const ALL: [Store; 2] = [Store::Proxy, Store::Quota];

    pub(super) fn index(self) -> usize {
        usize::from(self == Store::Quota)
    }

    /// Whether bucket `key` lives in this store.
    pub(super) fn holds(self, key: &LeaseKey) -> bool {
        key.is_quota() == (self == Store::Quota)
    }

    /// This store's Redis under `policy`; `None`: nothing of it is shared.
    pub(super) fn redis(self, policy: &Policy) -> Option<&SharedPolicy> {
        match self {
            Store::Proxy => policy.shared.as_ref(),
            Store::Quota => policy.quota.as_ref().map(|q| &q.redis),
        }
    }

    /// The key of its member set: the LlmProxy's replicas, among its own keys in either store.
    pub(super) fn member_key(self, identity: &Identity, quota: Option<&QuotaPolicy>) -> String {
        match (self, quota) {
            (Store::Quota, Some(q)) => format!("llmproxy:q:{}:f:{}:members", q.name, identity.proxy),
            _ => format!("llmproxy:members:{}", identity.proxy),
        }
    }

    /// The LlmQuota whose buckets this store's exchanges carry.
    pub(super) fn quota(self, quota: Option<&QuotaPolicy>) -> Option<&QuotaPolicy> {
        quota.filter(|_| self == Store::Quota)
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Store::Proxy => "the LlmProxy's",
            Store::Quota => "the LlmQuota's",
        }
    }
}
