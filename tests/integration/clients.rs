//! Who may use a proxy, and fairly: client keys, fair queueing between clients, weights, caps
//! and priority, over real loopback HTTP against the mock (which enforces its own limit).

use std::time::Duration;

use futures_util::future::join_all;
use llmproxy_mock::{MockConfig, load};
use llmproxy_proxy::ClientKeys;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::eventually;
use crate::support::proxy_env::{ProxyProcess, TestProxy, get_text, manifest, metric, mock};

const KEYS: &[(&str, &str)] =
    &[("flood", "sk-flood"), ("quiet", "sk-quiet"), ("heavy", "sk-heavy"), ("light", "sk-light")];

/// A proxy in front of a mock allowing `per_second` requests, with client keys and `clients`
/// (YAML lines under `clients:`).
async fn proxy_with_clients(upstream: &str, per_second: u64, clients: &str) -> TestProxy {
    let rpm = per_second * 60;
    let spec = format!(
        "  queue: {{maxSize: 5000, maxWait: 120s}}\n  clients:\n    keysSecretRef: {{name: keys}}\n{clients}"
    );
    let proxy =
        TestProxy::start(&manifest(upstream, &format!("{{requestsPerMinute: {rpm}}}"), &spec), None).await;
    let keys = ClientKeys::from_pairs(KEYS.iter().copied()).unwrap();
    proxy.proxy.require_client_keys(true);
    proxy.proxy.set_client_keys(Some(keys));
    proxy
}

fn chat(i: usize) -> Value {
    load::chat_body(i)
}

/// A proxy's chat endpoint with one pooled client per test: a client per request would spend
/// the test's time building TLS configurations, not waiting in the proxy.
#[derive(Clone)]
struct Target {
    url: String,
    client: reqwest::Client,
}

fn target(proxy: &TestProxy) -> Target {
    Target { url: proxy.url("/chat/completions"), client: load::client() }
}

/// One request with a client key; status and latency.
async fn send(target: &Target, key: &str, body: &Value) -> (u16, Duration) {
    let start = Instant::now();
    let resp = target
        .client
        .post(&target.url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    let status = match resp {
        Ok(r) => {
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            s
        }
        Err(_) => 0,
    };
    (status, start.elapsed())
}

/// `n` requests at once from the client with `key`; statuses and latencies.
async fn many(target: &Target, key: &str, n: usize) -> Vec<(u16, Duration)> {
    join_all((0..n).map(|i| async move { send(target, key, &chat(i)).await })).await
}

/// [`many`] in the background.
fn flood(target: &Target, key: &'static str, n: usize) -> tokio::task::JoinHandle<Vec<(u16, Duration)>> {
    let target = target.clone();
    tokio::spawn(async move { many(&target, key, n).await })
}

fn median<T: Ord + Copy + Default>(mut v: Vec<T>) -> T {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// How many of a flood's requests (all sent at `start`) finished after `t`: the ones a request
/// answered at `t` overtook. Counting, not timing, so a slow machine cannot fail it.
fn overtaken(start: Instant, flood: &[(u16, Duration)], t: Instant) -> usize {
    flood.iter().filter(|(_, latency)| start + *latency > t).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_keys_never_reach_the_upstream_or_the_queue() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = proxy_with_clients(&upstream.url(), 100, "").await;
    let target = target(&proxy);
    let (client, url) = (target.client.clone(), target.url.clone());
    let body = chat(1).to_string();
    let attempts = [
        ("none", client.post(&url)),
        ("unknown bearer", client.post(&url).bearer_auth("sk-nobody")),
        ("wrong scheme", client.post(&url).header("authorization", "Basic c2stZmxvb2Q=")),
        ("unknown api-key", client.post(&url).header("api-key", "sk-nobody")),
    ];
    for (what, req) in attempts {
        let resp = req.header("content-type", "application/json").body(body.clone()).send().await;
        let resp = resp.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status(), 401, "{what}");
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{what}: {text}");
    }
    // Refused before the body is read: an oversized body gets the 401, not a 413.
    let big = "x".repeat(16 << 20);
    let (status, _) =
        send(&target, "sk-nobody", &json!({"messages": [{"role": "user", "content": big}]})).await;
    assert!(status == 401 || status == 0, "{status}");
    assert!(upstream.mock.seen().is_empty(), "nothing reached the upstream");
    assert_eq!(proxy.proxy.admission().waiting(), 0);
    // Each SDK's header works.
    for (header, key) in
        [("authorization", "Bearer sk-quiet"), ("api-key", "sk-flood"), ("x-api-key", "sk-heavy")]
    {
        let resp = client
            .post(&url)
            .header(header, key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        assert_eq!(resp.map(|r| r.status().as_u16()).ok(), Some(200), "{header}");
    }
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "llmproxy_requests_total{outcome=\"unauthorized\"}"), 5.0, "{m}");
    assert_eq!(metric(&m, "llmproxy_requests_total{client=\"quiet\",outcome=\"ok\"}"), 1.0, "{m}");
    assert!(
        !upstream.mock.seen().iter().any(|s| s.key.as_deref().is_some_and(|k| k.starts_with("sk-"))),
        "client keys are not sent upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_is_not_stuck_behind_a_flood() {
    const RATE: u64 = 50;
    let upstream = mock(MockConfig { requests_per_minute: Some(RATE * 60), ..MockConfig::default() }).await;
    let proxy = proxy_with_clients(&upstream.url(), RATE, "").await;
    let url = target(&proxy);
    // The flood: 300 requests at once, six seconds of the upstream's quota.
    let start = Instant::now();
    let flood = flood(&url, "sk-flood", 300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The quiet client: one request every 200 ms while the flood waits.
    let mut quiet = Vec::new();
    for i in 0..15 {
        let (status, latency) = send(&url, "sk-quiet", &chat(10_000 + i)).await;
        assert_eq!(status, 200);
        quiet.push((Instant::now(), latency));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let flood = flood.await.unwrap_or_default();
    assert!(flood.iter().all(|(s, _)| *s == 200), "every flood request succeeds");
    // In one FIFO the first quiet request would wait out the whole flood and overtake nothing;
    // fairly queued, each goes at the next free slot, ahead of what the flood still has waiting.
    let passed: Vec<usize> = quiet.iter().map(|(done, _)| overtaken(start, &flood, *done)).collect();
    let latencies: Vec<Duration> = quiet.iter().map(|(_, l)| *l).collect();
    assert!(passed.iter().all(|n| *n >= 1), "overtaken {passed:?}, latencies {latencies:?}");
    assert!(median(passed.clone()) >= 50, "overtaken {passed:?}, latencies {latencies:?}");
    assert!(upstream.mock.stats().rate_limited <= 3, "{:?}", upstream.mock.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_share_a_saturated_upstream_three_to_one() {
    let upstream = mock(MockConfig { requests_per_minute: Some(3000), ..MockConfig::default() }).await;
    let clients = "    overrides: [{name: heavy, weight: 3}, {name: light, weight: 1}]\n";
    let proxy = proxy_with_clients(&upstream.url(), 50, clients).await;
    let url = target(&proxy);
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let run = |key: &'static str, n: usize| {
        let (url, done) = (url.clone(), std::sync::Arc::clone(&done));
        async move {
            join_all((0..n).map(|i| {
                let (url, done) = (url.clone(), std::sync::Arc::clone(&done));
                async move {
                    let (status, _) = send(&url, key, &chat(i)).await;
                    done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((key, status));
                }
            }))
            .await;
        }
    };
    tokio::join!(run("sk-heavy", 200), run("sk-light", 200));
    let done = done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    assert!(done.iter().all(|(_, s)| *s == 200));
    // While both are busy (the first 200 to finish, after the first second's burst), 3 to 1.
    let contended = &done[50..200];
    let heavy = contended.iter().filter(|(k, _)| *k == "sk-heavy").count() as f64;
    let share = heavy / contended.len() as f64;
    assert!((share - 0.75).abs() <= 0.075, "heavy share {share:.3}, want 0.75 within 10 %");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_client_stays_under_its_cap_and_an_idle_clients_share_is_used() {
    let upstream = mock(MockConfig { requests_per_minute: Some(6000), ..MockConfig::default() }).await;
    let clients = "    overrides: [{name: light, requestsPerMinute: 600}]\n";
    let proxy = proxy_with_clients(&upstream.url(), 100, clients).await;
    let url = target(&proxy);
    // The capped client: 10/s with a burst of 10.
    let start = Instant::now();
    let capped = many(&url, "sk-light", 40).await;
    let wall = start.elapsed();
    assert!(capped.iter().all(|(s, _)| *s == 200));
    assert!(wall >= Duration::from_millis(2900), "40 requests at 10/s after a burst of 10 took {wall:?}");
    // Another client, alone, gets the whole quota (100/s): no share is kept for the idle one.
    let start = Instant::now();
    let alone = many(&url, "sk-heavy", 300).await;
    let wall = start.elapsed();
    assert!(alone.iter().all(|(s, _)| *s == 200));
    assert!(
        wall <= Duration::from_millis(3000) * 3 / 2,
        "300 requests at 100/s after a burst of 100 took {wall:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_requests_pass_batch_work_and_batch_work_still_progresses() {
    const RATE: u64 = 50;
    let upstream = mock(MockConfig { requests_per_minute: Some(RATE * 60), ..MockConfig::default() }).await;
    let clients = "    batchMaxDelay: 1s\n    overrides: [{name: flood, priority: batch}]\n";
    let proxy = proxy_with_clients(&upstream.url(), RATE, clients).await;
    let url = target(&proxy);
    // Batch saturates the queue (four seconds of quota): an interactive request goes next,
    // ahead of nearly all of it.
    let start = Instant::now();
    let batch = flood(&url, "sk-flood", 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, latency) = send(&url, "sk-quiet", &chat(99_999)).await;
    let done = Instant::now();
    assert_eq!(status, 200);
    let batch = batch.await.unwrap_or_default();
    assert!(batch.iter().all(|(s, _)| *s == 200));
    let passed = overtaken(start, &batch, done);
    assert!(passed >= 100, "interactive overtook {passed} batch requests, waited {latency:?}");

    // Interactive saturates (five seconds): a batch request is still served, once it has
    // waited batchMaxDelay, long before the interactive work is done.
    let start = Instant::now();
    let interactive = flood(&url, "sk-quiet", 250);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, latency) = send(&url, "sk-flood", &chat(77_777)).await;
    let done = Instant::now();
    assert_eq!(status, 200);
    assert!(latency >= Duration::from_millis(900), "held back while interactive work waits: {latency:?}");
    let interactive = interactive.await.unwrap_or_default();
    assert!(interactive.iter().all(|(s, _)| *s == 200));
    let passed = overtaken(start, &interactive, done);
    assert!(passed >= 50, "batch overtook {passed} interactive requests after {latency:?}: starved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_keys_take_effect_without_a_restart() {
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let keys = dir.path().join("keys.yaml");
    let spec = "  clients:\n    keysSecretRef: {name: team-keys}\n";
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec)).unwrap();
    std::fs::write(&keys, "team-a: sk-old\n").unwrap();
    // Asking for keys without a keys file is refused outright, never served open.
    let mut refused = ProxyProcess::spawn(&["proxy", "--config", &file.display().to_string()], &[]);
    assert_eq!(refused.wait_exit(Duration::from_secs(20)).await, Some(1));
    assert!(refused.logs().contains("--client-keys-file"), "{}", refused.logs());

    let keys_arg = keys.display().to_string();
    let proxy = ProxyProcess::start(&file, &["--client-keys-file", &keys_arg], &[]).await;
    let pid = proxy.pid();
    let url = Target { url: proxy.url("/chat/completions"), client: load::client() };
    assert_eq!(send(&url, "sk-old", &chat(1)).await.0, 200);
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(b"sk-new").iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    std::fs::write(&keys, format!("team-a: sha256:{sha}\n")).unwrap();
    eventually("the rotated key to work", Duration::from_secs(5), || {
        let url = url.clone();
        async move { (send(&url, "sk-new", &chat(2)).await.0 == 200).then_some(()) }
    })
    .await;
    assert_eq!(send(&url, "sk-old", &chat(3)).await.0, 401, "the old key no longer works");
    assert_eq!(proxy.pid(), pid);
    let m = get_text(&format!("http://{}/metrics", proxy.admin)).await;
    assert_eq!(metric(&m, "llmproxy_requests_total{client=\"team-a\",outcome=\"ok\"}"), 2.0, "{m}");
    let logs = proxy.logs();
    assert!(logs.contains("\"client\":\"team-a\""), "records name the client: {logs}");
    assert!(
        !logs.contains("sk-new") && !logs.contains("sk-old") && !logs.contains(&sha),
        "no key in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_client_is_refused_even_when_another_line_of_the_file_is_invalid() {
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let keys = dir.path().join("keys.yaml");
    let spec = "  clients:\n    keysSecretRef: {name: team-keys}\n";
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec)).unwrap();
    std::fs::write(&keys, "team-a: sk-aaa\nteam-b: sk-bbb\nteam-c: sk-ccc\n").unwrap();
    let keys_arg = keys.display().to_string();
    let proxy = ProxyProcess::start(&file, &["--client-keys-file", &keys_arg], &[]).await;
    let url = Target { url: proxy.url("/chat/completions"), client: load::client() };
    for key in ["sk-aaa", "sk-bbb", "sk-ccc"] {
        assert_eq!(send(&url, key, &chat(1)).await.0, 200, "{key}");
    }
    // team-b removed, and in the same edit a line with a name no client may have.
    std::fs::write(&keys, "team-a: sk-aaa\nteam c: sk-bad\nteam-c: sk-ccc\n").unwrap();
    eventually("team-b's key to be revoked", Duration::from_secs(5), || {
        let url = url.clone();
        async move { (send(&url, "sk-bbb", &chat(2)).await.0 == 401).then_some(()) }
    })
    .await;
    assert_eq!(send(&url, "sk-aaa", &chat(3)).await.0, 200, "the valid entries stay in force");
    assert_eq!(send(&url, "sk-bad", &chat(4)).await.0, 401, "the invalid entry is not admitted");
    // team-c removed, and a line that is not YAML at all: the rest still applies.
    std::fs::write(&keys, "team-a: sk-aaa\nteam-d sk-ddd: [\n").unwrap();
    eventually("team-c's key to be revoked", Duration::from_secs(5), || {
        let url = url.clone();
        async move { (send(&url, "sk-ccc", &chat(5)).await.0 == 401).then_some(()) }
    })
    .await;
    assert_eq!(send(&url, "sk-aaa", &chat(6)).await.0, 200);
    // The file deleted: no key is in force.
    std::fs::remove_file(&keys).unwrap();
    eventually("every key to be revoked", Duration::from_secs(5), || {
        let url = url.clone();
        async move { (send(&url, "sk-aaa", &chat(7)).await.0 == 401).then_some(()) }
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.contains("client name \\\"team c\\\""), "the refused entry is named: {logs}");
    assert!(logs.contains("line 2"), "the line that is not YAML is named: {logs}");
    for key in ["sk-aaa", "sk-bbb", "sk-bad", "sk-ddd"] {
        assert!(!logs.contains(key), "a key leaked into the logs");
    }
}
