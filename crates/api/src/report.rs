//! What a proxy pod reports about itself on its admin port (`GET /status`), and the operator
//! reads into the LlmProxy's status. JSON, camelCase, the same field names as the status.

use serde::{Deserialize, Serialize};

use crate::crd::UpstreamStatus;

/// One proxy pod's view.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyReport {
    /// Each upstream endpoint as this pod sees it.
    #[serde(default)]
    pub upstreams: Vec<UpstreamStatus>,

    /// Requests this pod sent upstream in the last minute.
    #[serde(default)]
    pub requests_last_minute: u64,

    /// Tokens this pod charged in the last minute.
    #[serde(default)]
    pub tokens_last_minute: u64,

    /// Requests waiting in its queue now.
    #[serde(default)]
    pub queue_depth: u64,

    /// Requests upstream now.
    #[serde(default)]
    pub inflight: u64,

    /// Its `limits.maxConcurrent`.
    #[serde(default)]
    pub max_concurrent: u64,

    /// The 99th percentile of its queue waits over the last minute, seconds.
    #[serde(default)]
    pub queue_wait_p99_seconds: f64,

    /// Upstream 429s in the last minute.
    #[serde(default)]
    pub upstream429s_last_minute: u64,

    /// Upstream 5xx, connection errors and timeouts in the last minute.
    #[serde(default)]
    pub upstream_errors_last_minute: u64,

    /// How its shared buckets run: `shared` (through Redis) or `local` (Redis unreachable);
    /// absent without shared state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_mode: Option<String>,
}
