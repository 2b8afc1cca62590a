//! `llmproxy`: one binary for the proxy, the operator and their tools.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
