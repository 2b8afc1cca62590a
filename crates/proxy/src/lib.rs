//! llmproxy's data plane: an OpenAI-compatible HTTP proxy that admits requests under the
//! upstream's RPM/TPM/concurrency limits, queues bursts, retries transient failures with
//! back-off, streams responses through, and reloads its policy without a restart.

pub mod body;
pub mod cache;
pub mod cluster;
pub mod error;
pub mod flight;
pub mod labels;
pub mod limiter;
pub mod metrics;
pub mod queue;
pub mod quota;
pub mod reload;
pub mod request;
pub mod retry;
pub mod routes;
pub mod sse;
pub mod state;
pub mod supervise;
pub mod tokens;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

pub use labels::Reload;
pub use metrics::Metrics;
pub use state::{Options, Proxy};
pub use upstream::ApiKey;

/// Serve the API on `api` and the admin endpoints on `admin` until `shutdown` resolves; then
/// report not-ready, stop accepting, and let queued and in-flight requests finish (they are
/// bounded by their own deadlines and timeouts).
pub async fn serve(
    proxy: Arc<Proxy>,
    api: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_router = routes::admin(&proxy);
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, admin_router)
            .with_graceful_shutdown(async move {
                let _ = admin_stopped.await;
            })
            .await
    });
    let draining = Arc::clone(&proxy);
    axum::serve(api, routes::api(&proxy))
        .with_graceful_shutdown(async move {
            shutdown.await;
            draining.set_ready(false);
            tracing::info!("shutting down: no new connections; finishing queued and in-flight requests");
        })
        .await?;
    let _ = admin_stop.send(());
    admin_task.await??;
    Ok(())
}
