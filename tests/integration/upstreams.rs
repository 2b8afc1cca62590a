//! Several upstreams behind one proxy: quota-aware balancing, failover, ejection and probes, the
//! retry budget, per-model 429s, calibration from the upstream's own headers, and keys that
//! never cross endpoints. Real HTTP over loopback against mock upstreams (in-process, or as
//! `llmproxy mock-upstream` processes where one must die).

use std::time::Duration;

use futures_util::future::join_all;
use llmproxy_mock::{Fault, MockConfig, load};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::eventually;
use crate::support::proxy_env::{MockProcess, ProxyProcess, TestProxy, get_text, metric, mock};

/// A manifest with `upstreams` (YAML list items, indented four spaces) and `spec_extra`.
fn several(upstreams: &str, limits: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: test}}\nspec:\n  upstreams:\n{upstreams}  limits: {limits}\n{spec_extra}"
    )
}

fn chat(model: &str, i: usize) -> Value {
    json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": format!("hello {i}")}]})
}

/// `n` requests at once; their statuses.
async fn burst(url: &str, n: usize, body: impl Fn(usize) -> Value) -> Vec<u16> {
    let client = load::client();
    join_all((0..n).map(|i| {
        let (client, body) = (client.clone(), body(i));
        async move { load::shoot(&client, url, None, &body).await.status.unwrap_or(0) }
    }))
    .await
}

fn report(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_spread_over_two_endpoints_by_their_quotas() {
    // a: 60/s, b: 30/s (bursts of one second's worth); the proxy knows each one's quota.
    let a = mock(MockConfig { requests_per_minute: Some(3600), ..MockConfig::default() }).await;
    let b = mock(MockConfig { requests_per_minute: Some(1800), ..MockConfig::default() }).await;
    let upstreams = format!(
        "    - {{name: a, url: '{}', limits: {{requestsPerMinute: 3600}}}}\n    - {{name: b, url: '{}', limits: {{requestsPerMinute: 1800}}}}\n",
        a.url(),
        b.url()
    );
    let proxy = TestProxy::start(
        &several(
            &upstreams,
            "{requestsPerMinute: 100000, maxConcurrent: 1000}",
            "  queue: {maxSize: 5000, maxWait: 60s}\n",
        ),
        None,
    )
    .await;
    // Three times the combined burst (90) at once: 90 go at once, 180 more at 90/s.
    let start = Instant::now();
    let statuses = burst(&proxy.url("/chat/completions"), 270, |i| chat("gpt-4o-mini", i)).await;
    let wall = start.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "no client sees a 429: {statuses:?}");
    let (sa, sb) = (a.mock.stats(), b.mock.stats());
    let upstream_429s = sa.rate_limited + sb.rate_limited;
    assert!(upstream_429s <= 5, "upstream 429s {upstream_429s} (at most 2 %)");
    let least = Duration::from_secs(2);
    assert!(
        wall <= least * 3 / 2 + Duration::from_millis(500),
        "{wall:?} against a least possible {least:?}"
    );
    #[allow(clippy::cast_precision_loss)]
    let share = sa.ok as f64 / (sa.ok + sb.ok) as f64;
    assert!((0.56..=0.78).contains(&share), "a served {share:.2} of the burst; its quota is 2/3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_taken_out_probed_and_brought_back() {
    let mut a = MockProcess::start(&[]).await;
    let b = MockProcess::start(&[]).await;
    let upstreams = format!("    - {{name: a, url: '{}'}}\n    - {{name: b, url: '{}'}}\n", a.url(), b.url());
    let spec = "  retry: {initialBackoff: 200ms, maxBackoff: 1s}\n  queue: {maxWait: 30s}\n";
    let proxy = TestProxy::start(&several(&upstreams, "{requestsPerMinute: 100000}", spec), None).await;
    let url = proxy.url("/chat/completions");
    let client = load::client();
    let send = |i: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move { load::shoot(&client, &url, None, &chat("m", i)).await.status }
    };
    // Steady traffic; a dies half way.
    let mut statuses = Vec::new();
    for i in 0..40 {
        if i == 10 {
            a.kill();
        }
        statuses.push(send(i).await);
    }
    assert!(statuses.iter().all(|s| *s == Some(200)), "every request still succeeds: {statuses:?}");
    let status_url = format!("http://{}/status", proxy.admin);
    let r = report(&get_text(&status_url).await);
    assert_eq!(r["upstreams"][0]["name"], "a");
    assert_eq!(r["upstreams"][0]["healthy"], false, "{r}");
    assert!(r["upstreams"][0]["lastError"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    assert!(metric(&proxy.metrics().await, "llmproxy_upstream_ejections_total{upstream=\"a\"}") >= 1.0);
    // It comes back: a probe finds it, and it takes its share again.
    a.restart().await;
    eventually("a to be probed back in", Duration::from_secs(30), || {
        let (url, status_url) = (url.clone(), status_url.clone());
        let client = client.clone();
        async move {
            let _ = load::shoot(&client, &url, None, &chat("m", 999)).await;
            (report(&get_text(&status_url).await)["upstreams"][0]["healthy"] == true).then_some(())
        }
    })
    .await;
    for i in 0..20 {
        assert_eq!(send(100 + i).await, Some(200));
    }
    assert!(a.stats().await["ok"].as_u64().unwrap_or(0) >= 5, "a serves again after its return");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_keeps_an_outage_from_being_multiplied() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.inject(Fault::Status { status: 503, retry_after_secs: None, code: None }, 100_000);
    let manifest = crate::support::proxy_env::manifest(
        &upstream.url(),
        "{requestsPerMinute: 100000}",
        "  retry: {maxAttempts: 5, initialBackoff: 10ms, maxBackoff: 20ms}\n",
    );
    let proxy = TestProxy::start(&manifest, None).await;
    let statuses = burst(&proxy.url("/chat/completions"), 100, |i| chat("m", i)).await;
    assert!(statuses.iter().all(|s| *s == 503), "the upstream's own answer comes back: {statuses:?}");
    let calls = upstream.mock.stats().requests;
    // Without a budget: 500 calls. With 20 % plus 1/s over a 10 s window: 100 + 20 + 10.
    assert!((100..=135).contains(&calls), "{calls} upstream calls for 100 requests");
    let m = proxy.metrics().await;
    assert!(metric(&m, "llmproxy_retry_budget_exhausted_total") >= 50.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_for_one_model_sends_that_model_elsewhere_and_the_others_keep_flowing() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    a.mock.refuse_model("gpt-a", Some(30));
    let upstreams = format!("    - {{name: a, url: '{}'}}\n    - {{name: b, url: '{}'}}\n", a.url(), b.url());
    let proxy = TestProxy::start(&several(&upstreams, "{requestsPerMinute: 100000}", ""), None).await;
    let url = proxy.url("/chat/completions");
    let statuses = burst(&url, 60, |i| chat(if i % 2 == 0 { "gpt-a" } else { "gpt-b" }, i)).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (sa, sb) = (a.mock.stats(), b.mock.stats());
    assert_eq!(sa.ok_by_model.get("gpt-a"), None, "a refuses gpt-a");
    assert_eq!(sb.ok_by_model.get("gpt-a"), Some(&30), "so b serves all of it");
    assert!(sa.ok_by_model.get("gpt-b").is_some_and(|n| *n >= 5), "gpt-b still flows through a: {sa:?}");
    // The pause holds gpt-a at a after its first refusals: later ones do not try it.
    assert!(sa.rate_limited <= 30, "{sa:?}");
    let later = burst(&url, 20, |i| chat("gpt-a", 100 + i)).await;
    assert!(later.iter().all(|s| *s == 200));
    assert_eq!(a.mock.stats().rate_limited, sa.rate_limited, "paused: no more attempts at a for gpt-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_reported_limit_is_kept_when_the_spec_asks_for_more() {
    // The spec says 200/s; the upstream grants 100/s, and says so in every answer.
    let upstream = mock(MockConfig { requests_per_minute: Some(6000), ..MockConfig::default() }).await;
    let manifest = crate::support::proxy_env::manifest(
        &upstream.url(),
        "{requestsPerMinute: 12000, maxConcurrent: 1000}",
        "  queue: {maxSize: 5000, maxWait: 60s}\n",
    );
    let proxy = TestProxy::start(&manifest, None).await;
    let url = proxy.url("/chat/completions");
    // One answer teaches it; then 600 requests at once.
    assert_eq!(burst(&url, 1, |i| chat("gpt-4o-mini", i)).await, [200]);
    let start = Instant::now();
    let statuses = burst(&url, 600, |i| chat("gpt-4o-mini", i)).await;
    let wall = start.elapsed();
    assert!(statuses.iter().all(|s| *s == 200));
    let limited = upstream.mock.stats().rate_limited;
    assert!(limited <= 6, "{limited} upstream 429s in 600 (at most 1 %)");
    // Paced at the upstream's 100/s, not the spec's 200/s: 500 after the first second's burst.
    assert!(wall >= Duration::from_millis(4500), "{wall:?}");
    let r = report(&get_text(&format!("http://{}/status", proxy.admin)).await);
    assert_eq!(r["upstreams"][0]["observedLimits"]["requestsPerMinute"], 6000, "{r}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "llmproxy_upstream_limit_per_minute{kind=\"requests\",upstream=\"default\"}"),
        6000.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_of_the_key_is_noticed_through_remaining() {
    let upstream = mock(MockConfig { requests_per_minute: Some(6000), ..MockConfig::default() }).await;
    let manifest = crate::support::proxy_env::manifest(
        &upstream.url(),
        "{requestsPerMinute: 6000, maxConcurrent: 1000}",
        "  queue: {maxSize: 5000, maxWait: 60s}\n",
    );
    let proxy = TestProxy::start(&manifest, None).await;
    let url = proxy.url("/chat/completions");
    // Someone else spends half of the upstream's 100/s directly: 50 at once, every second.
    let direct = {
        let mock_url = format!("{}/chat/completions", upstream.url());
        tokio::spawn(async move {
            let mut refused = 0;
            for round in 0..6 {
                let statuses = burst(&mock_url, 50, |i| chat("gpt-4o-mini", 10_000 + round * 100 + i)).await;
                refused += statuses.iter().filter(|s| **s == 429).count();
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            refused
        })
    };
    let statuses = burst(&url, 300, |i| chat("gpt-4o-mini", i)).await;
    let direct_refused = direct.await.unwrap_or_default() as u64;
    assert!(statuses.iter().all(|s| *s == 200));
    let proxy_429s = upstream.mock.stats().rate_limited.saturating_sub(direct_refused);
    // Blind to the other user, the proxy would send at the full 100/s while the upstream has
    // about 50/s left for it: a third of its 300 refused. Through `remaining` it learns of the
    // other user on every answer; what it cannot see is the other's next burst while its own
    // requests are in flight. Alone this run sees 1 to 6; with the whole suite running beside
    // it on two cores answers slow down, more requests are in flight at each burst, and up to
    // 33 were seen: the bound sits above that, well below the blind third.
    assert!(proxy_429s <= 45, "{proxy_429s} upstream 429s for the proxy's 300 (at most 15 %)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_gets_its_own_key_the_way_it_takes_it() {
    let a = mock(MockConfig { api_key: Some("sk-a".into()), ..MockConfig::default() }).await;
    let b = mock(MockConfig { api_key: Some("azure-b".into()), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    for (secret, key, value) in [("openai", "api-key", "sk-a\n"), ("azure", "key1", "azure-b")] {
        std::fs::create_dir_all(secrets.join(secret)).unwrap();
        std::fs::write(secrets.join(secret).join(key), value).unwrap();
    }
    let upstreams = format!(
        "    - {{name: a, url: '{}', apiKeySecretRef: {{name: openai}}, models: [gpt-a]}}\n    - {{name: b, url: '{}', apiKeySecretRef: {{name: azure, key: key1}}, keyHeader: api-key, models: [gpt-b]}}\n",
        a.url(),
        b.url()
    );
    let file = dir.path().join("llmproxy.yaml");
    std::fs::write(&file, several(&upstreams, "{requestsPerMinute: 6000}", "")).unwrap();
    let secrets_arg = secrets.display().to_string();
    let proxy = ProxyProcess::start(&file, &["--secrets-dir", &secrets_arg], &[]).await;
    let url = proxy.url("/chat/completions");
    for model in ["gpt-a", "gpt-b"] {
        assert_eq!(burst(&url, 3, |i| chat(model, i)).await, [200, 200, 200], "{model}");
    }
    assert!(a.mock.seen().iter().all(|s| s.key.as_deref() == Some("sk-a")));
    assert!(b.mock.seen().iter().all(|s| s.key.as_deref() == Some("azure-b")), "b's key, as api-key");
    // A model neither serves is refused before it is queued.
    let (status, _, body) = crate::support::proxy_env::post_json(&url, &chat("gpt-c", 1)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    // b's key rotates in its Secret file: the next requests use it.
    b.mock.set_api_key(Some("azure-b2".into()));
    std::fs::write(secrets.join("azure").join("key1"), "azure-b2").unwrap();
    eventually("the rotated key to be used", Duration::from_secs(10), || {
        let url = url.clone();
        async move { (burst(&url, 1, |i| chat("gpt-b", 50 + i)).await == [200]).then_some(()) }
    })
    .await;
    let logs = proxy.logs();
    for secret in ["sk-a", "azure-b"] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_upstreams_standalone_need_the_secrets_dir() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let upstreams = "    - {name: a, url: 'http://127.0.0.1:9/v1', apiKeySecretRef: {name: openai}}\n    - {name: b, url: 'http://127.0.0.1:9/v1'}\n";
    std::fs::write(&file, several(upstreams, "{requestsPerMinute: 60}", "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(["proxy", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("LLMPROXY_UPSTREAM_API_KEY", "sk-not-for-several")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--secrets-dir"), "{stderr}");
    assert!(!stderr.contains("sk-not-for-several"));
}
