//! Out-of-process control of the mock: `/mock/stats`, `/mock/faults`, `/mock/limits`,
//! `/mock/models`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;

use crate::{Fault, Mock, NewLimits};

/// The control routes, for the mock's router.
pub(crate) fn routes() -> Router<Arc<Mock>> {
    Router::new()
        .route("/mock/stats", get(stats))
        .route("/mock/faults", post(faults))
        .route("/mock/limits", post(set_limits))
        .route("/mock/models", post(set_model))
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<crate::Stats> {
    Json(mock.stats())
}

#[derive(serde::Deserialize)]
struct Inject {
    #[serde(flatten)]
    fault: Fault,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

async fn faults(State(mock): State<Arc<Mock>>, Json(req): Json<Inject>) -> StatusCode {
    mock.inject(req.fault, req.count);
    StatusCode::NO_CONTENT
}

/// `POST /mock/limits {"requests_per_minute": N, "tokens_per_minute": M,
/// "input_tokens_per_minute": I, "output_tokens_per_minute": O}`: new limits now (a limit left
/// out is lifted).
async fn set_limits(State(mock): State<Arc<Mock>>, Json(req): Json<NewLimits>) -> StatusCode {
    mock.set_limits(req);
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct ModelRule {
    model: String,
    /// Answer it with 429 (true) or serve it again (false).
    refuse: bool,
    #[serde(default)]
    retry_after_secs: Option<u64>,
}

/// `POST /mock/models {"model": "m", "refuse": true, "retry_after_secs": 5}`.
async fn set_model(State(mock): State<Arc<Mock>>, Json(req): Json<ModelRule>) -> StatusCode {
    if req.refuse {
        mock.refuse_model(&req.model, req.retry_after_secs);
    } else {
        mock.allow_model(&req.model);
    }
    StatusCode::NO_CONTENT
}
