//! `llmproxy demo`: the whole point without a key or a cluster. A mock upstream that enforces a
//! small quota, a burst of naive clients straight at it, then the same burst through llmproxy.

use std::time::Duration;

use llmproxy_mock::load::{self, Summary};
use llmproxy_mock::{MockConfig, MockServer};
use llmproxy_proxy::{Metrics, Options, Proxy};

/// Flags of `llmproxy demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Concurrent clients in the burst.
    #[arg(long, default_value_t = 60)]
    clients: usize,
    /// The mock upstream's requests-per-minute limit.
    #[arg(long, default_value_t = 600)]
    rpm: u64,
}

fn manifest(upstream: &str, rpm: u64) -> String {
    format!(
        "apiVersion: llmproxy.io/v1alpha1
kind: LlmProxy
metadata: {{name: demo}}
spec:
  upstream: {{url: '{upstream}'}}
  limits: {{requestsPerMinute: {rpm}}}
  queue: {{maxSize: 10000, maxWait: 2m}}
"
    )
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// Run both phases and print the table.
#[allow(clippy::print_stdout)]
pub async fn run(args: Args) -> anyhow::Result<()> {
    let _logs = super::init_logging(super::LogFormat::Text, "warn");
    let config = MockConfig {
        requests_per_minute: Some(args.rpm),
        api_key: Some("sk-demo".into()),
        ..MockConfig::default()
    };
    let mock = MockServer::start_local(config).await?;
    let (_, policy) = llmproxy_api::from_yaml(&manifest(&mock.url(), args.rpm))?;
    let proxy = Proxy::new(policy, Metrics::new(Default::default())?, Options::default());
    proxy.set_api_key(llmproxy_proxy::ApiKey::new("sk-demo"));
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_url = format!("http://{}/v1/chat/completions", api.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let quick = llmproxy_proxy::ServeOptions { drain_delay: Duration::ZERO, ..Default::default() };
    let server = tokio::spawn(llmproxy_proxy::serve(proxy.clone(), api, admin, quick, async move {
        let _ = stopped.await;
    }));

    let per_second = args.rpm as f64 / 60.0;
    println!(
        "llmproxy demo: {} clients send one chat request each, all at once, with no retries of their own.",
        args.clients
    );
    println!(
        "The mock upstream allows {} requests/minute ({per_second:.0}/s) and answers 429 beyond that.\n",
        args.rpm
    );

    let client = load::client();
    let direct =
        load::burst(&client, &format!("{}/chat/completions", mock.url()), Some("sk-demo"), args.clients)
            .await;
    let direct_upstream_429 = mock.mock.stats().rate_limited;

    // Let the upstream's quota refill before the second round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    mock.mock.reset_stats();
    let proxied = load::burst(&client, &proxy_url, None, args.clients).await;
    let proxied_upstream_429 = mock.mock.stats().rate_limited;

    let row = |name: &str, s: &Summary, upstream_429: u64| {
        println!(
            "{name:<20} {:>5} {:>5} {:>6} {:>14} {:>10} {:>8} {:>8}",
            s.ok,
            s.rate_limited,
            s.other,
            upstream_429,
            secs(s.wall),
            secs(s.p50),
            secs(s.p99)
        );
    };
    println!(
        "{:<20} {:>5} {:>5} {:>6} {:>14} {:>10} {:>8} {:>8}",
        "", "ok", "429", "other", "upstream 429s", "wall time", "p50", "p99"
    );
    row("direct to upstream", &direct, direct_upstream_429);
    row("through llmproxy", &proxied, proxied_upstream_429);
    let ideal = Duration::from_secs_f64((args.clients as f64 - per_second).max(0.0) / per_second);
    println!(
        "\nDirect, {} of {} requests failed with 429. Through llmproxy {} of {} succeeded: the proxy queued the burst \
         and released it at the upstream's pace ({} at best for this quota).",
        direct.rate_limited,
        args.clients,
        proxied.ok,
        args.clients,
        secs(ideal)
    );
    if proxied_upstream_429 > 0 {
        println!(
            "The {proxied_upstream_429} upstream 429(s) in the second row never reached a client: llmproxy paused the queue \
             for the upstream's Retry-After and retried them."
        );
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
