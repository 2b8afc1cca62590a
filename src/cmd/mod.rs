//! The subcommands.

mod demo;
mod docs;
mod logsink;
mod mock;
mod operator;
mod proxy;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// Safe, fast, rate-limited access to LLM APIs for every team: a proxy that queues bursts
/// instead of returning 429s, and a Kubernetes operator that runs those proxies.
#[derive(Parser)]
#[command(name = "llmproxy", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the point in ten seconds, no key and no cluster: a burst of clients straight at a
    /// rate-limited mock upstream (429s), then the same burst through llmproxy (none).
    Demo(demo::Args),
    /// Run the proxy for one LlmProxy: from a manifest file (standalone, no Kubernetes needed)
    /// or from the cluster (--resource NAMESPACE/NAME).
    Proxy(proxy::Args),
    /// Run the operator: reconcile LlmProxy resources into proxy Deployments, Services and RBAC.
    Operator(operator::Args),
    /// Run the OpenAI-compatible mock upstream that enforces RPM/TPM with real 429s.
    MockUpstream(mock::Args),
    /// Print the LlmProxy CustomResourceDefinition as YAML (pipe it to `kubectl apply -f -`);
    /// `crd llmquota`: the LlmQuota one.
    Crd {
        /// `llmproxy` (default) or `llmquota`.
        #[arg(value_enum, default_value = "llmproxy")]
        kind: CrdKind,
    },
    /// Print the configuration reference (every field of LlmProxy and LlmQuota) as Markdown,
    /// generated from the CRD schemas: `llmproxy docs > docs/configuration.md`.
    Docs,
    /// Check an LlmProxy manifest the way the proxy will read it, and print the resolved policy.
    Check {
        /// Path to an LlmProxy YAML manifest.
        file: PathBuf,
    },
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log pipelines).
    Json,
    /// Human-readable text.
    Text,
}

/// Log to stderr, through the batching writer thread (`logsink`); `RUST_LOG` overrides the
/// default level. Hold the guard until the end: dropping it writes out what is still queued.
#[must_use]
pub fn init_logging(format: LogFormat, default: &str) -> Option<logsink::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let (sink, guard) = logsink::start();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(sink);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Which CRD `llmproxy crd` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CrdKind {
    /// The namespaced LlmProxy.
    Llmproxy,
    /// The cluster-scoped LlmQuota.
    Llmquota,
}

/// Run one subcommand to completion.
#[allow(clippy::print_stdout)]
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd { kind: CrdKind::Llmproxy } => print!("{}", llmproxy_api::crd_yaml()),
        Command::Crd { kind: CrdKind::Llmquota } => print!("{}", llmproxy_api::quota_crd_yaml()),
        Command::Docs => print!("{}", docs::page()),
        Command::Check { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            match llmproxy_api::from_yaml(&text) {
                Ok((proxy, _)) => {
                    // The manifest as the proxy reads it, every default filled in: valid YAML
                    // that reads back to the same policy.
                    let mut yaml = serde_yaml::to_string(&proxy).context("printing the manifest")?;
                    // The LlmQuota documents the file holds beside it, as they are.
                    for doc in serde_yaml::Deserializer::from_str(&text) {
                        let v =
                            <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap_or_default();
                        if v["kind"] == "LlmQuota" {
                            yaml.push_str("---\n");
                            yaml.push_str(&serde_yaml::to_string(&v).context("printing the manifest")?);
                        }
                    }
                    println!("# {}: ok (every default filled in)\n{yaml}", file.display());
                }
                Err(e) => {
                    let head: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_default();
                    let name = head["metadata"]["name"].as_str().unwrap_or("?").to_owned();
                    let problems: Vec<String> = match &e {
                        llmproxy_api::ManifestError::Invalid(p) => {
                            p.0.iter().map(|f| format!("* {}: {}", f.field, f.message)).collect()
                        }
                        other => vec![format!("* {other}")],
                    };
                    anyhow::bail!(
                        "{}: The LlmProxy {name:?} is invalid:\n{}",
                        file.display(),
                        problems.join("\n")
                    );
                }
            }
        }
        Command::Demo(args) => runtime()?.block_on(demo::run(args))?,
        Command::Proxy(args) => runtime()?.block_on(proxy::run(args))?,
        Command::Operator(args) => runtime()?.block_on(operator::run(args))?,
        Command::MockUpstream(args) => runtime()?.block_on(mock::run(args))?,
    }
    Ok(())
}

/// A Go duration flag (`500ms`, `30s`, `5m`).
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<llmproxy_api::Duration>().map(|d| d.get()).map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
