//! What a proxy pod reports about itself on its admin port (`GET /status`), and the operator
//! reads into the LlmProxy's status. JSON, camelCase, the same field names as the status.

use serde::{Deserialize, Serialize};

use crate::spec::UpstreamStatus;

/// One proxy pod's view.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
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

    /// How its shared buckets run: `shared` (through Redis) or `local` (Redis unreachable);
    /// absent without shared state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_mode: Option<String>,
}
