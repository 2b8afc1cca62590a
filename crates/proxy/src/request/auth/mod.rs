//! Who is asking, before anything else happens: with client keys required, a request without
//! a known key gets a 401 before its body is read or anything is queued, and never reaches the
//! upstream. The client's settings (weight, priority, caps, wait) come from the policy.

pub(crate) mod clients;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use llmproxy_api::{ClientPriority, Policy};

use crate::admission::queue::Party;
use crate::proxy::Proxy;
use crate::request::auth::clients::presented_key;
use crate::request::error::ApiError;

/// The identified client of a request.
pub(crate) struct Client {
    /// Its name (`None`: no keys required, so nobody in particular).
    pub(crate) name: Option<Arc<str>>,
    /// What admission needs of it.
    pub(crate) party: Party,
    /// Longest its requests wait.
    pub(crate) max_wait: Duration,
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_owned(),
        kind: "invalid_request_error",
        code: Some("invalid_api_key"),
        retry_after: None,
    }
}

/// Identify the client of a request, or refuse it.
pub(crate) fn identify(proxy: &Proxy, policy: &Policy, headers: &HeaderMap) -> Result<Client, ApiError> {
    let name = match proxy.client_keys() {
        None => None,
        Some(None) => {
            let mut err =
                ApiError::upstream(StatusCode::SERVICE_UNAVAILABLE, "the client keys are not loaded yet");
            err.retry_after = Some(Duration::from_secs(1));
            return Err(err);
        }
        Some(Some(keys)) => {
            let Some(key) = presented_key(headers) else {
                return Err(unauthorized(
                    "no client key: send it as Authorization: Bearer <key> (or the api-key or x-api-key header)",
                ));
            };
            Some(keys.identify(key).ok_or_else(|| unauthorized("Incorrect API key provided."))?)
        }
    };
    let settings = policy.clients.as_ref().map(|c| name.as_deref().map_or(&c.default, |n| c.client(n)));
    let party = Party {
        name: name.clone(),
        weight: settings.map_or(1, |s| s.weight),
        batch: settings.is_some_and(|s| s.priority == ClientPriority::Batch),
        max_queued: settings.map_or(usize::MAX, |s| s.max_queued),
        metrics: proxy.metrics().client(name.as_deref()),
    };
    let max_wait = settings.map_or(policy.queue.max_wait, |s| s.max_wait);
    Ok(Client { name, party, max_wait })
}
