//! The values serde fills in for absent fields; schemars writes the same values into the CRD
//! schema as its `default`s, so `kubectl explain` and the proxy agree.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::duration::Duration;

pub(super) fn default_replicas() -> i32 {
    1
}
pub(super) fn default_upstream_timeout() -> Duration {
    // The OpenAI SDKs wait 600 s: long generations must fit.
    Duration::from_std(std::time::Duration::from_secs(600))
}
pub(super) fn default_secret_key() -> String {
    "api-key".to_owned()
}
pub(super) fn default_max_concurrent() -> i32 {
    64
}
pub(super) fn default_max_tokens() -> i32 {
    1024
}
pub(super) fn default_queue_size() -> i32 {
    1000
}
pub(super) fn default_max_wait() -> Duration {
    Duration::from_std(std::time::Duration::from_secs(30))
}
pub(super) fn default_max_attempts() -> i32 {
    4
}
pub(super) fn default_initial_backoff() -> Duration {
    Duration::from_std(std::time::Duration::from_secs(1))
}
pub(super) fn default_max_backoff() -> Duration {
    Duration::from_std(std::time::Duration::from_secs(30))
}
pub(super) fn default_multiplier() -> f64 {
    2.0
}
pub(super) fn default_batch_max_delay() -> Duration {
    Duration::from_std(std::time::Duration::from_secs(10))
}
pub(super) fn default_weight() -> i32 {
    1
}
pub(super) fn default_budget_percent() -> i32 {
    20
}
pub(super) fn default_budget_floor() -> i32 {
    1
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_cache_entries() -> i64 {
    10_000
}
pub(super) fn default_queue_bytes() -> Quantity {
    Quantity("64Mi".to_owned())
}
pub(super) fn default_cache_bytes() -> Quantity {
    Quantity("64Mi".to_owned())
}
pub(super) fn default_target_saturation() -> i32 {
    80
}
pub(super) fn default_password_key() -> String {
    "password".into()
}
