//! `llmproxy`: one binary for the operator, the proxy and their tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Safe, fast, rate-limited access to LLM APIs for every team: a proxy that queues bursts
/// instead of returning 429s, and a Kubernetes operator that runs those proxies.
#[derive(Parser)]
#[command(name = "llmproxy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the LlmProxy CustomResourceDefinition as YAML (pipe it to `kubectl apply -f -`).
    Crd,
    /// Check an LlmProxy manifest the way the proxy will read it, and print the resolved policy.
    Check {
        /// Path to an LlmProxy YAML manifest.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => print!("{}", llmproxy_api::crd_yaml()),
        Command::Check { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let (_, policy) = llmproxy_api::from_yaml(&text)
                .with_context(|| format!("{} is not a usable LlmProxy", file.display()))?;
            println!("{}: ok\n{policy:#?}", file.display());
        }
    }
    Ok(())
}
