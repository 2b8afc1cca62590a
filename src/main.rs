//! `llmproxy`: one binary for the proxy, the operator and their tools.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not the system allocator: hyper's per-connection buffers that are allocated and
/// never written cost no resident memory in its page-aligned size classes, so thousands of
/// waiting connections stay small (figures in docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
