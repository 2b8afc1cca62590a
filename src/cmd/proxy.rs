//! `llmproxy proxy`: serve one LlmProxy from a manifest file, reloading it on change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use llmproxy_proxy::source::cluster;
use llmproxy_proxy::source::file::{self as source_file, FileWatcher};
use llmproxy_proxy::source::supervise::supervise;
use llmproxy_proxy::{ApiKey, Metrics, Options, Proxy, ServeOptions};

use super::LogFormat;

/// Flags of `llmproxy proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// LlmProxy manifest (the YAML you would `kubectl apply`); edits apply within a second.
    #[arg(long, value_name = "FILE", required_unless_present = "resource", conflicts_with = "resource")]
    config: Option<PathBuf>,
    /// Cluster mode: serve the LlmProxy NAMESPACE/NAME, watched through the Kubernetes API
    /// (in-cluster service account, or KUBECONFIG); its Secret supplies the upstream key.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    resource: Option<llmproxy_proxy::source::cluster::ResourceRef>,
    /// Address of the OpenAI-compatible API.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// File holding the upstream API key (re-read when it changes).
    #[arg(long, value_name = "PATH", conflicts_with = "upstream_api_key")]
    upstream_api_key_file: Option<PathBuf>,
    /// The upstream API key (prefer the file: environment variables leak into process listings
    /// less than flags, files less than both).
    #[arg(long, env = "LLMPROXY_UPSTREAM_API_KEY", hide_env_values = true)]
    upstream_api_key: Option<String>,
    /// Client keys (YAML `client name: key` lines, a key also as `sha256:<hex>`): every request
    /// must then carry one. Re-read when it changes. Cluster mode reads them from the Secret
    /// `spec.clients.keysSecretRef` names instead.
    #[arg(long, value_name = "PATH", conflicts_with = "resource")]
    client_keys_file: Option<PathBuf>,
    /// Secrets laid out as Kubernetes mounts them, `DIR/<secret name>/<key>`: every
    /// `apiKeySecretRef` of the manifest is read from here (and the client keys Secret, one file
    /// per client, when no --client-keys-file is given). Re-read when they change.
    #[arg(long, value_name = "DIR", conflicts_with = "resource")]
    secrets_dir: Option<PathBuf>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 8 << 20)]
    max_request_bytes: usize,
    /// Request header that names the client in request records (else the body's `user`).
    #[arg(long, value_name = "HEADER")]
    client_id_header: Option<http::HeaderName>,
    /// Percentage of requests that get a request record (log line); 0 turns them off.
    /// Metrics count every request regardless.
    #[arg(long, value_name = "PERCENT", default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    request_records: u8,
    /// Longest wait for a request's headers, and for the next request on an idle connection.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::duration)]
    header_read_timeout: std::time::Duration,
    /// Longest time to receive a request's whole body; slower uploads get a 408.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::duration)]
    body_read_timeout: std::time::Duration,
    /// Longest a response may wait for a client that stopped reading it.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = super::duration)]
    write_timeout: std::time::Duration,
    /// Most client connections at once (each needs a file descriptor).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_connections: usize,
    /// After SIGTERM, keep accepting this long while reporting not ready (Service endpoints
    /// take a few seconds to drop a terminating pod); 0s closes the listener at once.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::duration)]
    drain_delay: std::time::Duration,
    /// Serving threads (each its own event loop and upstream connections); default: the CPUs
    /// this process may use (the container's CPU limit counts).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Log format.
    #[arg(long, value_enum, default_value = "json")]
    log_format: LogFormat,
}

/// Run until SIGTERM/SIGINT, then drain and exit.
/// This process among the replicas sharing buckets: host, port and process id.
fn member_id(listen: SocketAddr) -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{host}:{}:{}", listen.port(), std::process::id())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let _logs = super::init_logging(args.log_format, "info");
    let options = Options {
        max_request_bytes: args.max_request_bytes,
        client_id_header: args.client_id_header.clone(),
        record_percent: args.request_records,
        body_read_timeout: args.body_read_timeout,
        ..Options::default()
    };
    let serve_options = ServeOptions {
        header_read_timeout: args.header_read_timeout,
        write_timeout: args.write_timeout,
        max_connections: args.max_connections,
        drain_delay: args.drain_delay,
        workers: args.workers.map_or_else(llmproxy_proxy::default_workers, usize::from),
    };
    let metrics = Metrics::new(llmproxy_proxy::Registry::new())?;
    let (proxy, source, name) = match (&args.config, &args.resource) {
        (Some(file), _) => from_file(&args, file, metrics, options)?,
        (None, Some(r)) => from_cluster(&args, r, metrics, options).await?,
        (None, None) => anyhow::bail!("give --config FILE or --resource NAMESPACE/NAME"),
    };

    let api = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;
    tracing::info!(
        name = %name,
        listen = %api.local_addr()?,
        admin = %admin.local_addr()?,
        upstreams = ?proxy.policy().upstreams.iter().map(|u| u.url.as_str()).collect::<Vec<_>>(),
        "llmproxy serving"
    );
    llmproxy_proxy::serve(proxy, api, admin, serve_options, super::shutdown_signal()).await?;
    source.abort();
    tracing::info!("stopped");
    Ok(())
}

/// A running proxy, the task that keeps its policy current, and the name it logs.
type Started = (Arc<Proxy>, tokio::task::JoinHandle<()>, String);

/// Standalone: the policy from the manifest `file`, keys from flags and files, reloaded when
/// they change.
fn from_file(args: &Args, file: &Path, metrics: Metrics, options: Options) -> anyhow::Result<Started> {
    let (resource, policy) = source_file::load_policy(file)?;
    let key = match (&args.upstream_api_key_file, &args.upstream_api_key) {
        (Some(path), _) => source_file::load_key(path)?,
        (None, Some(key)) => ApiKey::new(key),
        (None, None) => None,
    };
    let files = source_file::Files {
        manifest: file.to_path_buf(),
        upstream_key: args.upstream_api_key_file.clone(),
        client_keys: args.client_keys_file.clone(),
        secrets_dir: args.secrets_dir.clone(),
    };
    let named_keys = policy.upstreams.iter().any(|u| u.api_key_secret_ref.is_some());
    if key.is_none() && named_keys && args.secrets_dir.is_none() {
        tracing::warn!(
            "spec.upstream.apiKeySecretRef: standalone, the key comes from --secrets-dir, \
             --upstream-api-key-file or LLMPROXY_UPSTREAM_API_KEY; none was given"
        );
    }
    if let Some(gap) = source_file::standalone_gaps(&policy, &files) {
        anyhow::bail!(gap);
    }
    let client_keys = args.client_keys_file.as_deref().map(source_file::load_client_keys).transpose()?;
    let keys_from_dir = source_file::needs_client_keys(&policy) && args.secrets_dir.is_some();
    if client_keys.is_none() && !keys_from_dir {
        tracing::warn!(
            "client auth disabled: anything that can reach this port spends the upstream key \
             (require client keys with spec.clients.keysSecretRef and --client-keys-file)"
        );
    }
    let replicas = u32::try_from(resource.spec.replicas.max(1)).unwrap_or(1);
    let proxy = Proxy::new(policy, metrics, options);
    proxy.share(llmproxy_proxy::Identity {
        proxy: format!(
            "{}/{}",
            resource.metadata.namespace.as_deref().unwrap_or("default"),
            resource.metadata.name.as_deref().unwrap_or_default()
        ),
        member: member_id(args.listen),
        replicas,
    });
    proxy.set_api_key(key);
    proxy.require_client_keys(client_keys.is_some() || keys_from_dir);
    proxy.set_client_keys(client_keys);
    // With a secrets dir, not ready until every named key has been read there.
    proxy.set_key_required(args.secrets_dir.is_some() && named_keys);
    let p = proxy.clone();
    let mut first = true;
    let source = supervise(proxy.clone(), "file", move || {
        let (p, files) = (p.clone(), files.clone());
        let watcher = if std::mem::take(&mut first) {
            FileWatcher::new(p, files)
        } else {
            FileWatcher::fresh(p, files)
        };
        watcher.run()
    });
    Ok((proxy, tokio::spawn(source), resource.metadata.name.unwrap_or_default()))
}

/// In a cluster: the policy from the LlmProxy `r` and its Secrets, watched.
async fn from_cluster(
    args: &Args,
    r: &cluster::ResourceRef,
    metrics: Metrics,
    options: Options,
) -> anyhow::Result<Started> {
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let policy = cluster::initial(&client, r).await;
    let key_required = policy.upstreams.iter().any(|u| u.api_key_secret_ref.is_some());
    let proxy = Proxy::new(policy, metrics, options);
    proxy.share(llmproxy_proxy::Identity {
        proxy: format!("{}/{}", r.namespace, r.name),
        member: std::env::var("POD_NAME").unwrap_or_else(|_| member_id(args.listen)),
        replicas: 1,
    });
    proxy.set_key_required(key_required);
    let (p, r2) = (proxy.clone(), r.clone());
    let source =
        supervise(proxy.clone(), "cluster", move || cluster::watch(p.clone(), client.clone(), r2.clone()));
    let task = tokio::spawn(source);
    Ok((proxy, task, format!("{}/{}", r.namespace, r.name)))
}
