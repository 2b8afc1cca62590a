//! `llmproxy mock-upstream`: the OpenAI-compatible mock, as a process (for benchmarks and manual
//! experiments; tests and the demo run it in-process).

use std::net::SocketAddr;
use std::time::Duration;

use llmproxy_mock::{MockConfig, MockServer};

use super::LogFormat;

/// Flags of `llmproxy mock-upstream`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Requests per minute to enforce (unlimited when absent).
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute to enforce (unlimited when absent).
    #[arg(long)]
    tpm: Option<u64>,
    /// Input tokens per minute to enforce on `/v1/messages` (Anthropic's ITPM; unlimited when
    /// absent).
    #[arg(long)]
    itpm: Option<u64>,
    /// Output tokens per minute to enforce on `/v1/messages` (Anthropic's OTPM: `max_tokens`
    /// charged at admission, settled to the real output; unlimited when absent).
    #[arg(long)]
    otpm: Option<u64>,
    /// Output tokens of each `/v1/messages` answer, as `MIN-MAX` (picked per request, at most
    /// its `max_tokens`); `--completion-tokens` when absent.
    #[arg(long, value_parser = token_range)]
    answer_tokens: Option<std::ops::RangeInclusive<u64>>,
    /// Enforcement window in milliseconds: this share of the per-minute limit may arrive at once.
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    /// Bearer key to require.
    #[arg(long, env = "MOCK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Delay before each response's headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Completion tokens per answer.
    #[arg(long, default_value_t = 16)]
    completion_tokens: u64,
    /// How tokens count against --tpm: `requested` (OpenAI: prompt + max_tokens, never
    /// refunded) or `used` (settled to the real usage).
    #[arg(long, value_enum, default_value = "requested")]
    token_accounting: Accounting,
    /// Streams one HTTP/2 connection may carry at once (HTTP/2 is spoken to clients that start
    /// with its preface; hyper's default of 200 when absent).
    #[arg(long)]
    http2_max_streams: Option<u32>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Accounting {
    Requested,
    Used,
}

/// `MIN-MAX` as a range of token counts.
fn token_range(s: &str) -> Result<std::ops::RangeInclusive<u64>, String> {
    let (min, max) = s.split_once('-').ok_or("expected MIN-MAX, e.g. 20-60")?;
    let (min, max) = (min.trim().parse::<u64>(), max.trim().parse::<u64>());
    match (min, max) {
        (Ok(min), Ok(max)) if min <= max => Ok(min..=max),
        _ => Err("expected MIN-MAX with MIN <= MAX, e.g. 20-60".into()),
    }
}

/// Serve until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let _logs = super::init_logging(LogFormat::Text, "info");
    let config = MockConfig {
        requests_per_minute: args.rpm,
        tokens_per_minute: args.tpm,
        window: Duration::from_millis(args.window_ms),
        api_key: args.api_key,
        latency: Duration::from_millis(args.latency_ms),
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        completion_tokens: args.completion_tokens,
        token_accounting: match args.token_accounting {
            Accounting::Requested => llmproxy_mock::Accounting::Requested,
            Accounting::Used => llmproxy_mock::Accounting::Used,
        },
        http2_max_streams: args.http2_max_streams,
        input_tokens_per_minute: args.itpm,
        output_tokens_per_minute: args.otpm,
        answer_tokens: args.answer_tokens,
        ..MockConfig::default()
    };
    let server = MockServer::start(config, args.listen).await?;
    tracing::info!(url = %server.url(), "mock upstream serving; GET /mock/stats, POST /mock/faults");
    super::shutdown_signal().await;
    Ok(())
}
