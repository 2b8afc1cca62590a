//! The mock's routes and accept loop. Each connection carries a kill switch in its requests'
//! extensions so a handler can drop the connection without answering, as a crashed upstream
//! would.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::HeaderMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::gate::Kill;
use crate::{Mock, anthropic, control, handlers};

fn router(mock: Arc<Mock>) -> Router {
    let mut router = Router::new();
    // OpenAI's routes, under `/v1`, Gemini's `/v1beta/openai` and Azure's `/openai/v1`.
    for prefix in ["/v1", "/v1beta/openai", "/openai/v1"] {
        router = router
            .route(&format!("{prefix}/chat/completions"), post(handlers::chat))
            .route(&format!("{prefix}/completions"), post(handlers::completions))
            .route(&format!("{prefix}/embeddings"), post(handlers::embeddings))
            .route(&format!("{prefix}/responses"), post(handlers::responses));
    }
    router
        .route("/openai/deployments/{deployment}/{*op}", post(handlers::azure))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .merge(control::routes())
        .fallback(handlers::not_found)
        // Large prompts are part of the test workloads; axum's default limit is 2 MB.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(mock)
}

/// `GET /v1/models` in the shape of the API the client speaks: Anthropic's when it sends
/// Anthropic's headers.
async fn models(state: State<Arc<Mock>>, kill: Extension<Kill>, headers: HeaderMap) -> Response {
    if anthropic::speaks(&headers) {
        anthropic::models(state, kill, headers).await
    } else {
        handlers::models(state, kill, headers).await
    }
}

/// `GET /v1/models/{id}`, shaped like `models`.
async fn model(
    state: State<Arc<Mock>>,
    kill: Extension<Kill>,
    headers: HeaderMap,
    id: Path<String>,
) -> Response {
    if anthropic::speaks(&headers) {
        anthropic::model(state, kill, headers, id).await
    } else {
        handlers::model(state, kill, headers, id).await
    }
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, mock: Arc<Mock>, stop: CancellationToken) {
    let router = router(Arc::clone(&mock));
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mock upstream: accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        crate::lock(&mock.stats).connections += 1;
        let max_streams = crate::lock(&mock.config).http2_max_streams;
        let kill = CancellationToken::new();
        let router = router.clone();
        let conn_kill = kill.clone();
        let early_mock = Arc::clone(&mock);
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(Kill(conn_kill.clone()));
            if req.version() == http::Version::HTTP_2 {
                crate::lock(&early_mock.stats).http2_requests += 1;
            }
            let mut router = router.clone();
            let early = early_mock.take_early();
            let anthropic = anthropic::is_messages_path(req.uri().path());
            async move {
                if let Some(status) = early {
                    return Ok(handlers::early(status, anthropic));
                }
                router.call(req.map(Body::new)).await
            }
        });
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            if let Some(n) = max_streams {
                builder.http2().max_concurrent_streams(n);
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = kill.cancelled() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}
