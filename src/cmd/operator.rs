//! `llmproxy operator`: reconcile LlmProxy resources into running proxies.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use std::sync::Arc;

use http::StatusCode;
use llmproxy_operator::{Config, Health, LeaseConfig, Metrics, ObserveConfig, Settings};

use super::LogFormat;

/// Flags of `llmproxy operator`.
#[derive(clap::Args)]
pub struct Args {
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// Image of the proxy pods (the same `llmproxy` image as the operator's).
    #[arg(long, env = "LLMPROXY_PROXY_IMAGE", default_value = concat!("ghcr.io/llmproxy/llmproxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// imagePullPolicy of the proxy pods.
    #[arg(long, env = "LLMPROXY_PROXY_IMAGE_PULL_POLICY")]
    proxy_image_pull_policy: Option<String>,
    /// Namespace whose pods may scrape the proxies' metrics port (besides the operator's own,
    /// the only ones their NetworkPolicy admits there).
    #[arg(long, env = "LLMPROXY_METRICS_NAMESPACE")]
    metrics_namespace: Option<String>,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Elect a leader through a Lease so that only one replica reconciles.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This instance's identity in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often the proxy pods' reports (their admin port's `/status`) are read into the
    /// LlmProxies' status.
    #[arg(long, env = "LLMPROXY_STATUS_INTERVAL", default_value = "10s")]
    status_interval: llmproxy_api::Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "json")]
    log_format: LogFormat,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "llmproxy-operator".into())
}

/// Run until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let _logs = super::init_logging(args.log_format, "info");
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let identity = args.identity.unwrap_or_else(hostname);
    let config = Config {
        settings: Settings {
            image: args.proxy_image,
            image_pull_policy: args.proxy_image_pull_policy,
            metrics_namespace: args.metrics_namespace,
            operator_namespace: Some(args.lease_namespace.clone()),
        },
        namespace: args.namespace,
        lease: args.leader_election.then(|| LeaseConfig::new(&args.lease_namespace, &identity)),
        identity,
        observe: ObserveConfig {
            interval: args.status_interval.get().max(std::time::Duration::from_secs(1)),
            ..ObserveConfig::default()
        },
    };
    let metrics = Metrics::new(prometheus::Registry::new())?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;
    let health = Arc::new(Health::new(config.lease.is_some()));
    let m = metrics.clone();
    let h = Arc::clone(&health);
    let router = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let h = Arc::clone(&h);
                async move {
                    match h.not_ready() {
                        None => (StatusCode::OK, "ok"),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], m.render()) }
            }),
        );
    let admin_task = tokio::spawn(async move { axum::serve(admin, router).await });
    tracing::info!(identity = %config.identity, namespace = ?config.namespace, leader_election = config.lease.is_some(), "llmproxy operator starting");
    llmproxy_operator::run(client, config, metrics, health, super::shutdown_signal()).await;
    admin_task.abort();
    tracing::info!("stopped");
    Ok(())
}
