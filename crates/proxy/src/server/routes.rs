//! The two routers of a proxy: the OpenAI-compatible API and the admin port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::{StatusCode, header};

use crate::proxy::Proxy;
use crate::request::error::ApiError;

/// The OpenAI-compatible API: every `/v1/...` path is forwarded.
pub(crate) fn api(proxy: &Arc<Proxy>) -> Router {
    Router::new()
        .route("/v1/{*rest}", any(crate::request::handle))
        .route("/openai/{*rest}", any(crate::request::handle))
        .fallback(not_found)
        .with_state(Arc::clone(proxy))
}

/// The admin port: `/livez`, `/readyz`, `/metrics`, and `/status` (what the operator reads
/// into the LlmProxy's status).
pub(crate) fn admin(proxy: &Arc<Proxy>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(Arc::clone(proxy))
}

async fn status(State(proxy): State<Arc<Proxy>>) -> Response {
    axum::Json(proxy.report()).into_response()
}

async fn readyz(State(proxy): State<Arc<Proxy>>) -> Response {
    match proxy.not_ready() {
        None => "ok".into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    let (entries, bytes) = proxy.cache().usage();
    let metrics = proxy.metrics();
    metrics.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
    metrics.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    metrics.set_endpoints(&proxy.admission().endpoints());
    proxy.update_saturation();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render()).into_response()
}

async fn not_found(uri: http::Uri) -> Response {
    let msg = format!(
        "unknown path {}: llmproxy serves the providers' APIs under /v1/ (and Azure OpenAI's under /openai/)",
        uri.path()
    );
    ApiError::invalid(StatusCode::NOT_FOUND, msg, Some("unknown_url")).into_response()
}
