//! Tokens per minute counted the way the provider counts them: TPM-bound bursts against a mock
//! that counts the same way (and one that does not), over real loopback HTTP.

use std::time::Duration;

use llmproxy_mock::{Accounting, MockConfig, load};
use serde_json::{Value, json};

use crate::support::proxy_env::{TestProxy, manifest, metric, mock, post_json};

/// Tokens per second both sides allow (one second's worth may go at once).
const RATE: u64 = 10_000;
const MAX_TOKENS: u64 = 100;
const REQUESTS: usize = 300;
const CLIENTS: usize = 50;

fn content(i: usize) -> String {
    format!("Say hello to user number {i}.")
}

fn body(i: usize) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": content(i)}]})
}

/// The provider's estimate of request `i`'s prompt: characters / 4 over its text ("user" too).
fn prompt_tokens(i: usize) -> u64 {
    (4 + content(i).chars().count() as u64).div_ceil(4)
}

struct Run {
    ok: usize,
    client_429: usize,
    upstream_429: u64,
    wall: Duration,
    /// The least time the quota allows for what the upstream charged.
    ideal: Duration,
}

/// A TPM-bound burst: `REQUESTS` chat requests with `max_tokens: 100` from `CLIENTS` naive
/// clients, the proxy set to exactly the upstream's limits.
async fn tpm_bound_burst(proxy_counts: &str, upstream_counts: Accounting, rate: u64) -> Run {
    let tpm = rate * 60;
    let upstream = mock(MockConfig {
        requests_per_minute: Some(600_000),
        tokens_per_minute: Some(tpm),
        token_accounting: upstream_counts,
        ..MockConfig::default()
    })
    .await;
    let limits = format!(
        "{{requestsPerMinute: 600000, tokensPerMinute: {tpm}, tokenAccounting: {proxy_counts}, maxConcurrent: 64}}"
    );
    let queue = "  queue: {maxSize: 1000, maxWait: 60s}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), &limits, queue), None).await;
    let (shots, wall) =
        load::clients(&load::client(), &proxy.url("/chat/completions"), CLIENTS, REQUESTS, body).await;
    let summary = load::Summary::of(&shots, wall);
    let stats = upstream.mock.stats();
    let charged = stats.charged_tokens;
    if upstream_counts == Accounting::Requested {
        let expected: u64 = (0..REQUESTS).map(|i| prompt_tokens(i) + MAX_TOKENS).sum();
        assert_eq!(charged, expected, "the mock counts as the provider documents");
    }
    let ideal = Duration::from_secs_f64(charged.saturating_sub(rate) as f64 / rate as f64);
    Run { ok: summary.ok, client_429: summary.rate_limited, upstream_429: stats.rate_limited, wall, ideal }
}

fn check(run: &Run, max_upstream_429_share: f64) {
    let what = format!(
        "ok {} / client 429s {} / upstream 429s {} / wall {:?} (ideal {:?})",
        run.ok, run.client_429, run.upstream_429, run.wall, run.ideal
    );
    eprintln!("{what}");
    assert_eq!(run.ok, REQUESTS, "every request succeeds: {what}");
    let share = run.upstream_429 as f64 / REQUESTS as f64;
    assert!(share <= max_upstream_429_share, "upstream 429s: {what}");
    // Generous: the machine is shared; the tight figure is in the bench.
    assert!(run.wall <= run.ideal.mul_f64(1.5) + Duration::from_secs(1), "too slow: {what}");
    assert!(run.wall + Duration::from_millis(200) >= run.ideal, "faster than the quota allows: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_bound_burst_counted_as_requested_gets_no_429s() {
    let run = tpm_bound_burst("requested", Accounting::Requested, RATE).await;
    check(&run, 0.01);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_bound_burst_counted_as_used_gets_no_429s() {
    // Settled to real usage (16 completion tokens of the 100 asked for) the quota binds at a
    // lower rate.
    let run = tpm_bound_burst("used", Accounting::Used, RATE / 5).await;
    check(&run, 0.01);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refunds_what_the_upstream_keeps_is_corrected_by_the_upstreams_word() {
    // The proxy gives unused completion tokens back; the upstream keeps them. Its headers say
    // what really remains, and its 429s set the buckets to it: few upstream 429s, no failures.
    let run = tpm_bound_burst("used", Accounting::Requested, RATE).await;
    check(&run, 0.05);
}

#[tokio::test]
async fn n_choices_and_streams_are_charged_like_the_provider_charges_them() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(
        &manifest(&upstream.url(), "{requestsPerMinute: 6000, tokensPerMinute: 600000}", ""),
        None,
    )
    .await;
    let reserved = || async { metric(&proxy.metrics().await, "llmproxy_tokens_total{kind=\"reserved\"}") };
    let mut req = body(1);
    req["n"] = json!(3);
    let (status, _, _) = post_json(&proxy.url("/chat/completions"), &req).await;
    assert_eq!(status, 200);
    let one = reserved().await;
    assert_eq!(one, (prompt_tokens(1) + 3 * MAX_TOKENS) as f64, "n times the completion budget");
    req["stream"] = json!(true);
    let (status, _, _) = post_json(&proxy.url("/chat/completions"), &req).await;
    assert_eq!(status, 200);
    assert_eq!(reserved().await, 2.0 * one, "a stream is charged like the same request unstreamed");
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_refused_at_once_and_locks_nothing() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(
        &manifest(&upstream.url(), "{requestsPerMinute: 6000, tokensPerMinute: 6000}", ""),
        None,
    )
    .await;
    let client = load::client();
    // A trillion max_tokens from a client that goes away: a charge that can never fit is
    // refused at once and holds no capacity for anyone behind it.
    let mut huge = body(1);
    huge["max_tokens"] = json!(1_000_000_000_000u64);
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        client
            .post(proxy.url("/chat/completions"))
            .header("content-type", "application/json")
            .body(huge.to_string())
            .send(),
    )
    .await;
    if let Ok(Ok(resp)) = gone {
        assert_eq!(resp.status(), 400);
        let text = resp.text().await.unwrap_or_default();
        assert!(
            text.contains("tokens-per-minute limit of 6000") && text.contains("request_too_large"),
            "{text}"
        );
    }
    for big in [json!(1_000_000_000_000u64), json!(u64::MAX)] {
        let mut req = body(2);
        req["max_tokens"] = big;
        req["n"] = json!(128);
        let (status, _, text) = post_json(&proxy.url("/chat/completions"), &req).await;
        assert_eq!(status, 400, "{text}");
    }
    assert!(upstream.mock.seen().is_empty(), "none of them reached the upstream");
    let (status, headers, text) = post_json(&proxy.url("/chat/completions"), &body(3)).await;
    assert_eq!(status, 200, "a normal request right after: {text}");
    assert!(headers.get("retry-after").is_none());
    // Larger than the per-second burst (100) but within the minute: admissible, as before.
    let mut large = body(4);
    large["max_tokens"] = json!(2000);
    let (status, _, text) = post_json(&proxy.url("/chat/completions"), &large).await;
    assert_eq!(status, 200, "{text}");
}
