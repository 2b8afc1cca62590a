//! Anthropic's Messages API through the proxy, driven by the official `anthropic` Python SDK
//! and by raw HTTP, against the mock's Anthropic dialect.

use std::time::Duration;

use llmproxy_mock::{MockConfig, MockServer};
use serde_json::{Value, json};

use crate::support::proxy_env::{ProxyProcess, get_text, manifest_with, metric, mock, post_json};
use crate::support::python::python_with_sdks;

/// A message request for `max_tokens`.
fn message(max_tokens: u64) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}]})
}

/// A proxy process in front of `upstream` as an Anthropic endpoint, with `limits` and the
/// rest of its spec (`spec_extra`); the directory holds its manifest.
async fn claude_proxy(
    upstream: &MockServer,
    limits: &str,
    spec_extra: &str,
) -> (tempfile::TempDir, ProxyProcess) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    std::fs::write(&file, manifest_with(&upstream.url(), ", provider: anthropic", limits, spec_extra))
        .unwrap();
    let proxy = ProxyProcess::start(&file, &[], &[]).await;
    (dir, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_python_sdk_works_through_the_proxy() {
    let python = python_with_sdks();
    let upstream =
        mock(MockConfig { api_key: Some("sk-ant-upstream".into()), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let extra = "  clients:\n    keysSecretRef: {name: team-keys}\n";
    let text = manifest_with(&upstream.url(), ", provider: anthropic", "{requestsPerMinute: 6000}", extra);
    std::fs::write(&file, text).unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-ant-upstream\n").unwrap();
    let clients_file = dir.path().join("clients.yaml");
    std::fs::write(&clients_file, "claude-team: sk-team-claude\n").unwrap();
    let (key_arg, clients_arg) = (key_file.display().to_string(), clients_file.display().to_string());
    let args = [
        "--upstream-api-key-file",
        &key_arg,
        "--client-keys-file",
        &clients_arg,
        "--max-request-bytes",
        "16384",
    ];
    let proxy = ProxyProcess::start(&file, &args, &[]).await;

    let script = crate::support::repo_path("tests/python/anthropic_sdk_check.py");
    let base = format!("http://{}", proxy.addr);
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg("sk-team-claude")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "anthropic SDK check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_default();

    // The proxy counted what the answers said, JSON and stream alike.
    let m = get_text(&format!("http://{}/metrics", proxy.admin)).await;
    let counted =
        |kind: &str| metric(&m, &format!("llmproxy_tokens_total{{client=\"claude-team\",kind=\"{kind}\"}}"));
    assert!(seen["input"].as_f64().unwrap_or_default() > 0.0, "{seen}");
    assert_eq!(counted("input"), seen["input"].as_f64().unwrap_or_default(), "{seen}\n{m}");
    assert_eq!(counted("output"), seen["output"].as_f64().unwrap_or_default(), "{seen}\n{m}");
    let stats = upstream.mock.stats();
    assert_eq!(counted("output"), stats.anthropic_output_tokens as f64, "the mock answered that many");

    // Only the upstream key went upstream, as x-api-key, with a version on every request.
    let seen_upstream = upstream.mock.seen();
    assert!(!seen_upstream.is_empty());
    assert!(seen_upstream.iter().all(|s| s.key.as_deref() == Some("sk-ant-upstream")), "{seen_upstream:?}");
    assert!(seen_upstream.iter().all(|s| s.anthropic_version.is_some()), "{seen_upstream:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_headers_are_passed_defaulted_and_errors_come_in_its_shape() {
    let upstream = mock(MockConfig::default()).await;
    let (_dir, proxy) = claude_proxy(&upstream, "{requestsPerMinute: 6000}", "").await;
    let url = proxy.url("/messages");

    // No anthropic-version from the client: the proxy sends the one every SDK accepts.
    let (status, _, body) = post_json(&url, &message(32)).await;
    assert_eq!(status, 200, "{body}");
    // The client's own version and beta are passed as sent.
    let resp = llmproxy_mock::load::client()
        .post(&url)
        .header("anthropic-version", "2025-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .header("content-type", "application/json")
        .body(message(32).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let versions: Vec<_> = upstream
        .mock
        .seen()
        .iter()
        .map(|s| (s.anthropic_version.clone(), s.anthropic_beta.clone()))
        .collect();
    assert_eq!(
        versions,
        [
            (Some("2023-06-01".to_owned()), None),
            (Some("2025-06-01".to_owned()), Some("prompt-caching-2024-07-31".to_owned()))
        ]
    );

    // A message without max_tokens is refused as Anthropic would, in its shape, and never sent.
    let (status, _, body) = post_json(
        &url,
        &json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(
        (err["type"].as_str(), err["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error")),
        "{body}"
    );
    assert!(err["error"]["message"].as_str().unwrap_or_default().contains("max_tokens"), "{body}");
    // OpenAI's paths are not an Anthropic endpoint's.
    let (status, _, body) =
        post_json(&proxy.url("/chat/completions"), &json!({"model": "m", "messages": []})).await;
    assert!(status == 403 || status == 404, "{status} {body}");
    assert_eq!(upstream.mock.seen().len(), 2, "nothing refused went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_answers_are_retried_within_the_budget_and_every_request_succeeds() {
    // Every tenth message is a 529 overloaded_error.
    let upstream = mock(MockConfig { overloaded_every: Some(10), ..MockConfig::default() }).await;
    let retry = "  retry: {maxAttempts: 4, initialBackoff: 50ms, maxBackoff: 200ms}\n";
    let (_dir, proxy) = claude_proxy(&upstream, "{requestsPerMinute: 60000}", retry).await;
    let url = proxy.url("/messages");
    let sends: Vec<_> = (0..60)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post_json(&url, &message(16)).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for s in sends {
        statuses.push(tokio::time::timeout(Duration::from_secs(60), s).await.ok().and_then(Result::ok));
    }
    assert!(statuses.iter().all(|s| *s == Some(200)), "{statuses:?}");
    let stats = upstream.mock.stats();
    assert!(stats.overloaded >= 5, "the mock answered only {} 529s", stats.overloaded);
    let m = get_text(&format!("http://{}/metrics", proxy.admin)).await;
    assert!(metric(&m, "llmproxy_retries_total") >= stats.overloaded as f64, "{m}");
    // A few 529s are the provider being busy, not the endpoint being down.
    assert_eq!(metric(&m, "llmproxy_upstream_healthy{upstream=\"default\"}"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_messages_are_answered_from_the_cache_per_api_version() {
    let upstream = mock(MockConfig::default()).await;
    let (_dir, proxy) = claude_proxy(&upstream, "{requestsPerMinute: 6000}", "  cache: {ttl: 5m}\n").await;
    let url = proxy.url("/messages");
    let send = |version: &'static str, body: Value| {
        let url = url.clone();
        async move {
            let resp = llmproxy_mock::load::client()
                .post(&url)
                .header("anthropic-version", version)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let cache =
                resp.headers().get("x-llmproxy-cache").and_then(|v| v.to_str().ok()).map(str::to_owned);
            (resp.status().as_u16(), cache, resp.text().await.unwrap_or_default())
        }
    };
    let (status, first_cache, first) = send("2023-06-01", message(32)).await;
    assert_eq!(status, 200, "{first}");
    let (_, cache, again) = send("2023-06-01", message(32)).await;
    assert_eq!((first_cache.as_deref(), cache.as_deref()), (Some("miss"), Some("hit")));
    assert_eq!(first, again, "the same answer, from the cache");
    // Another API version, another max_tokens: other answers.
    assert_eq!(send("2025-06-01", message(32)).await.1.as_deref(), Some("miss"));
    assert_eq!(send("2023-06-01", message(33)).await.1.as_deref(), Some("miss"));
    // A stream is cached whole and replayed as its events.
    let mut streamed = message(32);
    streamed["stream"] = json!(true);
    let (_, _, live) = send("2023-06-01", streamed.clone()).await;
    let (_, cache, replayed) = send("2023-06-01", streamed).await;
    assert_eq!(cache.as_deref(), Some("hit"));
    assert!(live.contains("event: message_stop") && replayed == live, "{replayed}");
    assert_eq!(upstream.mock.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_anthropic_endpoints_serve_side_by_side_in_one_proxy() {
    let openai = mock(MockConfig { api_key: Some("sk-openai".into()), ..MockConfig::default() }).await;
    let claude = mock(MockConfig { api_key: Some("sk-ant".into()), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    for (name, key) in [("openai", "sk-openai"), ("claude", "sk-ant")] {
        std::fs::create_dir_all(secrets.join(name)).unwrap();
        std::fs::write(secrets.join(name).join("api-key"), format!("{key}\n")).unwrap();
    }
    let file = dir.path().join("llmproxy.yaml");
    let text = format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: mixed}}\nspec:\n  upstreams:\n    \
         - {{name: gpt, url: '{}', apiKeySecretRef: {{name: openai}}}}\n    \
         - {{name: claude, url: '{}', provider: anthropic, apiKeySecretRef: {{name: claude}}}}\n  \
         limits: {{requestsPerMinute: 6000}}\n",
        openai.url(),
        claude.url()
    );
    std::fs::write(&file, text).unwrap();
    let secrets_arg = secrets.display().to_string();
    let proxy = ProxyProcess::start(&file, &["--secrets-dir", &secrets_arg], &[]).await;
    for _ in 0..3 {
        let (status, _, body) = post_json(&proxy.url("/messages"), &message(16)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"type\":\"message\""), "{body}");
        let (status, _, body) =
            post_json(&proxy.url("/chat/completions"), &llmproxy_mock::load::chat_body(1)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("chat.completion"), "{body}");
    }
    // Each path went to the endpoint of its provider, with that endpoint's key.
    let paths = |m: &llmproxy_mock::MockServer| {
        m.mock.seen().iter().map(|s| (s.path.clone(), s.key.clone())).collect::<Vec<_>>()
    };
    assert!(
        paths(&openai).iter().all(|(p, k)| p == "/v1/chat/completions" && k.as_deref() == Some("sk-openai")),
        "{:?}",
        paths(&openai)
    );
    assert!(
        paths(&claude).iter().all(|(p, k)| p == "/v1/messages" && k.as_deref() == Some("sk-ant")),
        "{:?}",
        paths(&claude)
    );
    assert_eq!((paths(&openai).len(), paths(&claude).len()), (3, 3));
}

/// 200 messages from 50 clients at once, each asking for `max_tokens: 500`, through the
/// official SDK (no retries of its own) at `base`; what they got.
async fn fifty_clients_ask_for_500(python: &std::path::Path, base: &str) -> Value {
    let script = crate::support::repo_path("tests/python/anthropic_load.py");
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .args([base, "200", "50", "500"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "load failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_default()
}

/// An upstream that grants 30,000 output tokens a minute (500/s, two seconds' worth at once:
/// a bucket of 1,000, far below 50 x 500) and answers 20 to 60 tokens whatever `max_tokens`
/// asks.
fn otpm_upstream() -> MockConfig {
    MockConfig {
        output_tokens_per_minute: Some(30_000),
        window: Duration::from_secs(2),
        answer_tokens: Some(20..=60),
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_asking_for_500_output_tokens_queue_instead_of_meeting_429s() {
    let python = python_with_sdks();
    // Straight at the upstream: 50 x 500 output tokens at once against a 500-token burst.
    let direct = mock(otpm_upstream()).await;
    let straight = fifty_clients_ask_for_500(&python, direct.url().trim_end_matches("/v1")).await;
    let refused = straight["statuses"]["429"].as_u64().unwrap_or_default();
    eprintln!("straight at the upstream: {straight}");
    assert!(refused >= 50, "only {refused} of 200 refused straight at the upstream: {straight}");

    let upstream = mock(otpm_upstream()).await;
    let limits = "{requestsPerMinute: 6000, models: {claude-sonnet-4-5: {outputTokensPerMinute: 30000}}}";
    let queue = "  queue: {maxSize: 1000, maxWait: 120s}\n";
    let (_dir, proxy) = claude_proxy(&upstream, limits, queue).await;
    let through = fifty_clients_ask_for_500(&python, &format!("http://{}", proxy.addr)).await;
    eprintln!("through llmproxy: {through}");
    assert_eq!(through["statuses"]["200"].as_u64(), Some(200), "{through}");
    let limited = upstream.mock.stats().rate_limited;
    eprintln!("upstream 429s through llmproxy: {limited}");
    assert!(limited <= 2, "{limited} upstream 429s in 200 (at most 1 %)");
    // Least possible: the output the answers used, at 500 a second, plus the last request's
    // whole max_tokens; settling to the real output is what keeps the wall near it (charging
    // max_tokens alone would take 200 x 500 / 500 = 200 s).
    let used = through["output"].as_f64().unwrap_or_default();
    let least = (used + 500.0) / 500.0;
    let wall = through["wall"].as_f64().unwrap_or_default();
    eprintln!("wall {wall:.1} s, least {least:.1} s ({used} output tokens)");
    assert!(wall <= 4.0 * least + 10.0, "{wall:.1} s for what needs {least:.1} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_limits_learned_from_anthropics_headers_alone_keep_429s_rare() {
    let python = python_with_sdks();
    let upstream = mock(otpm_upstream()).await;
    // The spec gives only a request rate: the output limit comes from anthropic-ratelimit-*.
    let queue = "  queue: {maxSize: 1000, maxWait: 120s}\n";
    let (_dir, proxy) = claude_proxy(&upstream, "{requestsPerMinute: 6000}", queue).await;
    // One answer teaches it.
    let (status, _, body) = post_json(&proxy.url("/messages"), &json!({"model": "claude-sonnet-4-5", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(status, 200, "{body}");
    let through = fifty_clients_ask_for_500(&python, &format!("http://{}", proxy.addr)).await;
    eprintln!("through llmproxy, limits from headers: {through}");
    assert_eq!(through["statuses"]["200"].as_u64(), Some(200), "{through}");
    let limited = upstream.mock.stats().rate_limited;
    assert!(limited <= 10, "{limited} upstream 429s in 200 (at most 5 %)");
    let r: Value =
        serde_json::from_str(&get_text(&format!("http://{}/status", proxy.admin)).await).unwrap_or_default();
    eprintln!("{}", r["upstreams"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_429_is_answered_at_once_then_holds_the_account_and_a_rate_limit_429_waits_its_turn() {
    let upstream = mock(MockConfig::default()).await;
    let queue = "  queue: {maxSize: 100, maxWait: 30s}\n";
    let (_dir, proxy) = claude_proxy(&upstream, "{requestsPerMinute: 6000}", queue).await;
    let url = proxy.url("/messages");
    // A spend limit: no wait fixes it, so the client hears it at once, from one attempt.
    let spend = Some(
        "rate_limit_error: You have reached your specified API usage limits (monthly spend limit)."
            .to_owned(),
    );
    upstream
        .mock
        .inject(llmproxy_mock::Fault::Status { status: 429, retry_after_secs: Some(30), code: spend }, 1);
    let start = std::time::Instant::now();
    let (status, headers, body) = post_json(&url, &message(16)).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "waited {:?} for a 429 no wait fixes",
        start.elapsed()
    );
    assert!(body.contains("spend limit"), "the upstream's own answer: {body}");
    assert_eq!(headers.get("x-llmproxy-attempts").and_then(|v| v.to_str().ok()), Some("1"));
    // The account is spent: the next request is answered at once, in Anthropic's shape, and
    // never reaches the upstream (until a probe a minute on).
    let start = std::time::Instant::now();
    let (status, _, body) = post_json(&url, &message(16)).await;
    assert_eq!(status, 429, "{body}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{body}");
    assert!(body.contains("spend_limit"), "{body}");
    assert_eq!(upstream.mock.seen().len(), 1);

    // A rate limit: it waits out its retry-after and goes again, and the client never sees it.
    let upstream = mock(MockConfig::default()).await;
    let (_dir, proxy) = claude_proxy(&upstream, "{requestsPerMinute: 6000}", queue).await;
    let url = proxy.url("/messages");
    upstream
        .mock
        .inject(llmproxy_mock::Fault::Status { status: 429, retry_after_secs: Some(1), code: None }, 1);
    let (status, headers, body) = post_json(&url, &message(16)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get("x-llmproxy-attempts").and_then(|v| v.to_str().ok()), Some("2"));
    assert_eq!(upstream.mock.seen().len(), 2);
}
