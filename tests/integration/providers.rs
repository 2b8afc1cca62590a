//! Azure OpenAI and Gemini behind the proxy, each counted its own way, and the 429s no queue
//! waits out (an account out of credit, a spent daily quota): the official OpenAI Python SDK
//! (its `AzureOpenAI` client and the plain one) and raw HTTP against the mock's Azure and
//! Gemini shapes.

use std::time::Duration;

use llmproxy_mock::{Flavor, MockConfig, MockServer};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::proxy_env::{ProxyProcess, TestProxy, get_text, metric, mock, post_json};
use crate::support::python::python_with_sdks;

fn chat(model: &str, i: usize) -> Value {
    json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": format!("hello {i}")}]})
}

/// A manifest whose one upstream is `upstream_fields` (the URL first).
fn manifest(upstream_fields: &str, limits: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: test}}\nspec:\n  upstream: {{{upstream_fields}}}\n  limits: {limits}\n{spec_extra}"
    )
}

/// The mock's root URL (Azure's `url` is the resource, without a path).
fn root(server: &MockServer) -> String {
    format!("http://{}", server.addr)
}

/// Run `tests/python/openai_providers.py` with `args`; its JSON line.
async fn python(args: &[&str]) -> Value {
    let script = crate::support::repo_path("tests/python/openai_providers.py");
    let out =
        tokio::process::Command::new(python_with_sdks()).arg(&script).args(args).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai_providers.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_default()
}

fn statuses(v: &Value) -> Vec<(String, u64)> {
    let map = v["statuses"].as_object().cloned().unwrap_or_default();
    map.into_iter().map(|(k, n)| (k, n.as_u64().unwrap_or(0))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_openai_sdk_client_works_through_the_proxy_and_300_requests_fit_the_10_second_slices() {
    // Azure counts 1,200 requests a minute in 10-second slices (200 per slice), reports only
    // what remains, and takes its key in api-key alone.
    let config = MockConfig {
        flavor: Flavor::Azure,
        api_key: Some("azure-upstream-key".into()),
        requests_per_minute: Some(1200),
        window: Duration::from_secs(10),
        latency: Duration::from_millis(20),
        ..MockConfig::default()
    };
    let upstream = mock(config).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let fields = format!("url: '{}', provider: azure", root(&upstream));
    let extra = "  clients:\n    keysSecretRef: {name: team-keys}\n  queue: {maxWait: 120s, maxSize: 1000}\n";
    std::fs::write(&file, manifest(&fields, "{requestsPerMinute: 1200, burst: 1000}", extra)).unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "azure-upstream-key\n").unwrap();
    let clients_file = dir.path().join("clients.yaml");
    std::fs::write(&clients_file, "azure-team: sk-team-azure\n").unwrap();
    let (key_arg, clients_arg) = (key_file.display().to_string(), clients_file.display().to_string());
    let args = ["--upstream-api-key-file", &key_arg, "--client-keys-file", &clients_arg];
    let proxy = ProxyProcess::start(&file, &args, &[]).await;
    let base = format!("http://{}", proxy.addr);

    let checked = python(&["azure-check", &base, "sk-team-azure"]).await;
    assert_eq!(checked["embeddings"], 2, "{checked}");
    let seen = upstream.mock.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Forwarded after the resource URL as the SDK sent them, api-version and all; the
    // deployment is the model; only Azure's key went upstream.
    assert!(
        seen[0].path.starts_with("/openai/deployments/gpt-4o-prod/chat/completions?api-version="),
        "{seen:?}"
    );
    assert!(seen[2].path.starts_with("/openai/deployments/embed-prod/embeddings?api-version="), "{seen:?}");
    assert!(seen.iter().all(|s| s.key.as_deref() == Some("azure-upstream-key")), "{seen:?}");
    let logs = proxy.logs();
    assert!(
        logs.contains("gpt-4o-prod") && logs.contains("embed-prod"),
        "the deployment is the model in records:\n{logs}"
    );
    assert!(
        !logs.contains("azure-upstream-key") && !logs.contains("sk-team-azure"),
        "no key in the logs:\n{logs}"
    );

    // A query parameter other than api-version never reaches Azure.
    let url =
        format!("{base}/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21&debug=1");
    let resp = llmproxy_mock::load::client()
        .post(&url)
        .header("api-key", "sk-team-azure")
        .header("content-type", "application/json")
        .body(chat("x", 0).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap_or_default();
    assert!(text.contains("debug") && text.contains("api-version only"), "{text}");
    assert_eq!(upstream.mock.seen().len(), 3);

    // A configured burst of 1,000 is cut to one slice's worth (200), and the proxy follows the
    // remaining-only headers: 300 requests from 50 SDK clients, all answered.
    upstream.mock.reset_stats();
    let started = Instant::now();
    let load = python(&["load", &base, "sk-team-azure", "300", "50", "gpt-4o-prod", "azure"]).await;
    assert_eq!(statuses(&load), [("200".to_owned(), 300)], "{load}");
    let stats = upstream.mock.stats();
    eprintln!(
        "azure: 300 requests from 50 SDK clients in {:.1?}, {} upstream 429s",
        started.elapsed(),
        stats.rate_limited
    );
    assert!(stats.rate_limited <= 6, "at most 2% upstream 429s: {stats:?}");
    assert!(started.elapsed() < Duration::from_secs(110), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_burst_follows_the_retry_delay_in_its_429_bodies() {
    // Gemini sends no rate-limit headers: the proxy, told a higher limit than Gemini grants,
    // learns the rest from the 429 bodies (in a JSON array, RetryInfo after a Help entry).
    let config = MockConfig {
        flavor: Flavor::Gemini,
        requests_per_minute: Some(600),
        window: Duration::from_secs(1),
        ..MockConfig::default()
    };
    let upstream = mock(config).await;
    let fields = format!("url: '{}/v1beta/openai', provider: gemini", root(&upstream));
    let proxy = TestProxy::start(
        &manifest(&fields, "{requestsPerMinute: 6000}", "  queue: {maxWait: 120s, maxSize: 1000}\n"),
        Some("gemini-key"),
    )
    .await;
    let base = format!("http://{}", proxy.addr);
    let load = python(&["load", &base, "gemini-key", "100", "50", "gemini-2.0-flash"]).await;
    assert_eq!(statuses(&load), [("200".to_owned(), 100)], "{load}");
    let seen = upstream.mock.seen();
    assert!(
        seen.iter().all(|s| s.path == "/v1beta/openai/chat/completions"),
        "url + the rest: {:?}",
        seen[0]
    );
    assert!(seen.iter().all(|s| s.key.as_deref() == Some("gemini-key")));
    let stats = upstream.mock.stats();
    eprintln!(
        "gemini: 100 requests from 50 SDK clients in {}s, {} upstream 429s",
        load["wall"], stats.rate_limited
    );
    assert!(stats.rate_limited > 0, "the burst met Gemini's own limit: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_gemini_daily_quota_is_answered_at_once_and_not_asked_again_or_failed_over() {
    let config = MockConfig { flavor: Flavor::Gemini, requests_per_day: Some(3), ..MockConfig::default() };
    let upstream = mock(config).await;
    let fields = format!("url: '{}/v1beta/openai', provider: gemini", root(&upstream));
    let proxy = TestProxy::start(&manifest(&fields, "{requestsPerMinute: 6000}", ""), None).await;
    let url = proxy.url("/chat/completions");
    for i in 0..3 {
        let (status, _, body) = post_json(&url, &chat("gemini-2.0-flash", i)).await;
        assert_eq!(status, 200, "{body}");
    }
    // The day is spent: Gemini's 429 says so (with a retryDelay all the same, which no wait
    // can honour); the proxy answers at once and sends nothing more for that model.
    for i in 0..3 {
        let started = Instant::now();
        let (status, headers, body) = post_json(&url, &chat("gemini-2.0-flash", 10 + i)).await;
        assert_eq!(status, 429, "{body}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(body.contains("PerDay") || body.contains("daily quota"), "names the daily limit: {body}");
        if i > 0 {
            assert!(body.contains("upstream_quota_exhausted"), "{body}");
            assert!(headers.contains_key("retry-after"), "{headers:?}");
        }
    }
    assert_eq!(upstream.mock.stats().exhausted, 1, "one request met the spent day, no more");
    // Other models still go.
    let (status, _, body) = post_json(&url, &chat("gemini-2.5-pro", 0)).await;
    assert_eq!(status, 200, "{body}");
    let m = proxy.metrics().await;
    let counted = "llmproxy_upstream_quota_exhausted_total{upstream=\"default\",reason=\"requests_per_day\"}";
    assert_eq!(metric(&m, counted), 1.0, "{m}");
    let status: Value =
        serde_json::from_str(&get_text(&format!("http://{}/status", proxy.admin)).await).unwrap_or_default();
    let exhausted = &status["upstreams"][0]["exhausted"][0];
    assert_eq!(exhausted["model"], "gemini-2.0-flash", "{status}");
    assert_eq!(exhausted["reason"], "requests_per_day", "{status}");
    assert!(exhausted["until"].as_str().is_some_and(|u| u.ends_with('Z')), "the reset is known: {status}");

    // With a second endpoint serving the model, the requests go there instead.
    let spare = mock(MockConfig { flavor: Flavor::Gemini, ..MockConfig::default() }).await;
    let spent =
        mock(MockConfig { flavor: Flavor::Gemini, requests_per_day: Some(2), ..MockConfig::default() }).await;
    let upstreams = format!(
        "  upstreams:\n    - {{name: spent, url: '{}/v1beta/openai', provider: gemini}}\n    - {{name: spare, url: '{}/v1beta/openai', provider: gemini}}\n",
        root(&spent),
        root(&spare)
    );
    let text = format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: test}}\nspec:\n{upstreams}  limits: {{requestsPerMinute: 6000}}\n"
    );
    let proxy = TestProxy::start(&text, None).await;
    let url = proxy.url("/chat/completions");
    for i in 0..12 {
        let (status, _, body) = post_json(&url, &chat("gemini-2.0-flash", i)).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    assert_eq!(spent.mock.stats().ok, 2);
    assert_eq!(spent.mock.stats().exhausted, 1, "asked once after its day was spent");
    assert_eq!(spare.mock.stats().ok, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_out_of_credit_is_answered_at_once_and_the_upstream_is_not_asked_again() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.set_out_of_credit(true);
    let fields = format!("url: '{}'", upstream.url());
    let proxy =
        TestProxy::start(&manifest(&fields, "{requestsPerMinute: 6000}", "  queue: {maxWait: 60s}\n"), None)
            .await;
    let url = proxy.url("/chat/completions");
    for i in 0..5 {
        let started = Instant::now();
        let (status, _, body) = post_json(&url, &chat("gpt-4o-mini", i)).await;
        assert_eq!(status, 429, "{body}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(body.contains("insufficient_quota"), "{body}");
        assert!(
            upstream.mock.stats().requests <= i as u64 + 1,
            "at most one upstream request per client request"
        );
    }
    assert_eq!(upstream.mock.stats().requests, 1, "after the first, none until a probe is due");
    let m = proxy.metrics().await;
    let counted =
        "llmproxy_upstream_quota_exhausted_total{upstream=\"default\",reason=\"insufficient_quota\"}";
    assert_eq!(metric(&m, counted), 1.0, "{m}");
    let status: Value =
        serde_json::from_str(&get_text(&format!("http://{}/status", proxy.admin)).await).unwrap_or_default();
    assert_eq!(status["upstreams"][0]["exhausted"][0]["reason"], "insufficient_quota", "{status}");
    assert!(status["upstreams"][0]["exhausted"][0].get("model").is_none(), "the whole account: {status}");
}
