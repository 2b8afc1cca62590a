//! The response cache and request coalescing over real HTTP, and the per-request records.

use std::time::Duration;

use futures_util::future::join_all;
use llmproxy_mock::{Fault, MockConfig, load};
use serde_json::{Value, json};

use crate::support::eventually;
use crate::support::proxy_env::{ProxyProcess, TestProxy, get_text, manifest, metric, mock, stream};

const CACHED: &str = "  cache: {ttl: 5m}\n";

fn prompt(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": text}]})
}

/// POST a raw body; status, `x-llmproxy-cache`, body.
async fn send(url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut req = load::client().post(url).header("content-type", "application/json").body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let cache = resp.headers().get("x-llmproxy-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (status, cache, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn identical_requests_hit_the_cache_whatever_their_formatting() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", CACHED), None).await;
    let url = proxy.url("/chat/completions");

    let (s1, c1, b1) = send(&url, &prompt("hello").to_string(), &[]).await;
    assert_eq!((s1, c1.as_str()), (200, "miss"));
    let (s2, c2, b2) = send(&url, &prompt("hello").to_string(), &[]).await;
    assert_eq!((s2, c2.as_str()), (200, "hit"));
    assert_eq!(b1, b2, "a hit returns the stored answer");
    let reordered = r#"{ "messages": [ {"content": "hello", "role": "user"} ],
                         "user": "someone-else", "temperature": 0, "max_tokens": 8, "model": "gpt-4o-mini" }"#;
    assert_eq!(send(&url, reordered, &[]).await.1, "hit", "key order, whitespace and `user` do not matter");
    assert_eq!(upstream.mock.seen().len(), 1, "one upstream call so far");

    let mut other_model = prompt("hello");
    other_model["model"] = json!("gpt-4o");
    assert_eq!(send(&url, &other_model.to_string(), &[]).await.1, "miss");
    let (_, bypass, _) = send(&url, &prompt("hello").to_string(), &[("cache-control", "no-cache")]).await;
    assert_eq!(bypass, "bypass");
    assert_eq!(upstream.mock.seen().len(), 3);

    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "llmproxy_cache_requests_total{result=\"hit\"}"), 2.0, "{m}");
    assert_eq!(metric(&m, "llmproxy_cache_requests_total{result=\"miss\"}"), 2.0, "{m}");
    assert_eq!(metric(&m, "llmproxy_cache_requests_total{result=\"bypass\"}"), 1.0, "{m}");
    assert!(metric(&m, "llmproxy_cache_saved_tokens_total") > 0.0, "{m}");
    assert_eq!(metric(&m, "llmproxy_requests_total{outcome=\"cache_hit\"}"), 2.0, "{m}");

    // Turning the cache off on reload empties it; turning it on again starts cold.
    let (_, off) =
        llmproxy_api::from_yaml(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", "")).unwrap();
    proxy.proxy.apply_policy(off);
    assert_eq!(send(&url, &prompt("hello").to_string(), &[]).await.1, "", "not cacheable while off");
    let (_, on) =
        llmproxy_api::from_yaml(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", CACHED)).unwrap();
    proxy.proxy.apply_policy(on);
    assert_eq!(send(&url, &prompt("hello").to_string(), &[]).await.1, "miss");
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let upstream = mock(MockConfig::default()).await;
    let spec = "  cache: {ttl: 300ms}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec), None).await;
    let url = proxy.url("/chat/completions");
    let body = prompt("short-lived").to_string();
    assert_eq!(send(&url, &body, &[]).await.1, "miss");
    eventually("the entry to expire", Duration::from_secs(10), || {
        let (url, body) = (url.clone(), body.clone());
        async move { (send(&url, &body, &[]).await.1 == "miss").then_some(()) }
    })
    .await;
    assert_eq!(upstream.mock.seen().len(), 2);
}

async fn stream_text(url: &str, body: &Value) -> (String, String, bool) {
    let got = stream(url, body).await;
    let cache = got.headers.get("x-llmproxy-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (cache, got.text, got.broke)
}

#[tokio::test]
async fn completed_streams_are_replayed_and_broken_ones_are_not_kept() {
    let upstream = mock(MockConfig { chunk_delay: Duration::from_millis(20), ..MockConfig::default() }).await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", CACHED), None).await;
    let url = proxy.url("/chat/completions");
    let mut body = prompt("stream me");
    body["stream"] = json!(true);

    let (c1, t1, _) = stream_text(&url, &body).await;
    let (c2, t2, _) = stream_text(&url, &body).await;
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
    assert_eq!(t1, t2, "the replay is the same SSE stream");
    assert!(t2.ends_with("data: [DONE]\n\n") && !t2.contains("\"usage\":{"), "{t2}");
    // A client that asks for usage gets the usage event from the same entry.
    body["stream_options"] = json!({"include_usage": true});
    let (c3, t3, _) = stream_text(&url, &body).await;
    assert_eq!(c3, "hit");
    assert!(t3.contains("\"usage\":{"), "{t3}");
    assert_eq!(upstream.mock.seen().len(), 1);

    let mut broken = prompt("this stream breaks");
    broken["stream"] = json!(true);
    upstream.mock.inject(Fault::CutStream { after_chunks: 3 }, 1);
    let (_, _, broke) = stream_text(&url, &broken).await;
    assert!(broke, "the first attempt broke off mid-stream");
    let (again, text, broke) = stream_text(&url, &broken).await;
    assert_eq!(again, "miss", "an interrupted stream is not cached");
    assert!(!broke && text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_requests_make_one_upstream_call() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", CACHED), None).await;
    let url = proxy.url("/chat/completions");
    let body = prompt("everyone asks this").to_string();
    // The upstream holds its answer until all 50 are in: one leader upstream, 49 following it.
    upstream.mock.hold();
    let requests = tokio::spawn({
        let (url, body) = (url.clone(), body.clone());
        async move { join_all((0..50).map(|_| send(&url, &body, &[]))).await }
    });
    let flights = std::sync::Arc::clone(proxy.proxy.flights());
    eventually("49 followers behind one leader", Duration::from_secs(20), || {
        let n = flights.followers();
        async move { (n == 49).then_some(()) }
    })
    .await;
    upstream.mock.release();
    let results = requests.await.unwrap();
    assert_eq!(upstream.mock.seen().len(), 1, "one upstream call for 50 identical requests");
    assert!(results.iter().all(|(s, _, b)| *s == 200 && *b == results[0].2), "50 identical answers");
    let miss = results.iter().filter(|r| r.1 == "miss").count();
    let shared = results.iter().filter(|r| r.1 == "coalesced" || r.1 == "hit").count();
    assert_eq!((miss, shared), (1, 49));
    let m = proxy.metrics().await;
    assert!(metric(&m, "llmproxy_coalesced_requests_total") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_leader_does_not_take_its_followers_down() {
    let upstream = mock(MockConfig { latency: Duration::from_millis(300), ..MockConfig::default() }).await;
    // The leader's request meets a 400 (not retried); a follower leads the next attempt.
    upstream.mock.inject(Fault::Status { status: 400, retry_after_secs: None, code: None }, 1);
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", CACHED), None).await;
    let url = proxy.url("/chat/completions");
    let body = prompt("fragile").to_string();
    let results =
        tokio::time::timeout(Duration::from_secs(30), join_all((0..10).map(|_| send(&url, &body, &[]))))
            .await;
    let results = results.expect("followers hung after the leader failed");
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 9, "{statuses:?}");
    assert_eq!(upstream.mock.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_only_the_close_ended_is_kept_only_if_its_json_parses() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", CACHED), None).await;
    let url = proxy.url("/chat/completions");
    let body = prompt("cut me off").to_string();

    // A 2xx without Content-Length or chunked encoding, closed half way: relayed, not stored.
    upstream.mock.inject(Fault::Unframed { cut: true }, 1);
    let (status, cache, text) = send(&url, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert!(serde_json::from_str::<Value>(&text).is_err(), "the client got the cut answer: {text}");
    let (status, cache, text) = send(&url, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"), "a cut answer is never served as a hit: {text}");
    assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
    assert_eq!(send(&url, &body, &[]).await.1, "hit", "the framed answer that followed is kept");
    assert_eq!(upstream.mock.seen().len(), 2);

    // Followers of a leader whose answer was cut are not handed it: one of them asks again.
    let shared = prompt("cut me off, all of you").to_string();
    upstream.mock.inject(Fault::Unframed { cut: true }, 1);
    upstream.mock.hold();
    let requests = tokio::spawn({
        let (url, shared) = (url.clone(), shared.clone());
        async move { join_all((0..4).map(|_| send(&url, &shared, &[]))).await }
    });
    let flights = std::sync::Arc::clone(proxy.proxy.flights());
    eventually("3 followers behind one leader", Duration::from_secs(20), || {
        let n = flights.followers();
        async move { (n == 3).then_some(()) }
    })
    .await;
    upstream.mock.release();
    let results = requests.await.unwrap();
    let whole = results.iter().filter(|r| serde_json::from_str::<Value>(&r.2).is_ok()).count();
    assert_eq!(whole, 3, "only the leader got the cut answer: {results:?}");
    assert_eq!(upstream.mock.seen().len(), 4);

    // Complete and read to the close: it parses, so it is kept.
    let whole = prompt("the close ends me").to_string();
    upstream.mock.inject(Fault::Unframed { cut: false }, 1);
    let (status, cache, text) = send(&url, &whole, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    let (_, again, replay) = send(&url, &whole, &[]).await;
    assert_eq!((again.as_str(), replay), ("hit", text));
    assert_eq!(upstream.mock.seen().len(), 5);
}

/// A proxy with client keys for alice and bob and the cache with `cache` (YAML flow mapping).
async fn with_two_clients(upstream: &str, cache: &str) -> TestProxy {
    let spec = format!("  cache: {cache}\n  clients:\n    keysSecretRef: {{name: keys}}\n");
    let proxy = TestProxy::start(&manifest(upstream, "{requestsPerMinute: 6000}", &spec), None).await;
    let pairs = [("alice", "sk-alice"), ("bob", "sk-bob")];
    let keys = llmproxy_proxy::ClientKeys::from_pairs(pairs).unwrap_or_else(|e| panic!("{e}"));
    proxy.proxy.require_client_keys(true);
    proxy.proxy.set_client_keys(Some(keys));
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_keys_each_client_has_its_own_entries_unless_the_scope_is_shared() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = with_two_clients(&upstream.url(), "{ttl: 5m}").await;
    let url = proxy.url("/chat/completions");
    let body = prompt("what did the others ask?").to_string();
    let (alice, bob) = ([("authorization", "Bearer sk-alice")], [("authorization", "Bearer sk-bob")]);

    assert_eq!(send(&url, &body, &alice).await.1, "miss");
    assert_eq!(send(&url, &body, &alice).await.1, "hit");
    let (status, cache, _) = send(&url, &body, &bob).await;
    assert_eq!((status, cache.as_str()), (200, "miss"), "bob is not told that alice asked the same");
    assert_eq!(send(&url, &body, &bob).await.1, "hit");
    assert_eq!(upstream.mock.seen().len(), 2);

    // Nor does bob wait for alice's answer in flight: both go upstream.
    let other = prompt("asked at the same time").to_string();
    upstream.mock.hold();
    let both = tokio::spawn({
        let (url, other) = (url.clone(), other.clone());
        async move { join_all([send(&url, &other, &alice), send(&url, &other, &bob)]).await }
    });
    let held = std::sync::Arc::clone(&upstream.mock);
    eventually("both requests upstream", Duration::from_secs(20), || {
        let n = held.seen().len();
        async move { (n == 4).then_some(()) }
    })
    .await;
    upstream.mock.release();
    let results = both.await.unwrap();
    assert!(results.iter().all(|(s, c, _)| *s == 200 && c == "miss"), "{results:?}");

    // `scope: shared` shares them across clients, as without client keys.
    let upstream = mock(MockConfig::default()).await;
    let proxy = with_two_clients(&upstream.url(), "{ttl: 5m, scope: shared}").await;
    let url = proxy.url("/chat/completions");
    assert_eq!(send(&url, &body, &alice).await.1, "miss");
    assert_eq!(send(&url, &body, &bob).await.1, "hit");
    assert_eq!(upstream.mock.seen().len(), 1);
}

#[tokio::test]
async fn the_cache_stays_within_its_bounds_under_a_flood() {
    let upstream = mock(MockConfig::default()).await;
    let spec = "  cache: {ttl: 5m, maxEntries: 20, maxBytes: 16Ki}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 60000}", spec), None).await;
    let url = proxy.url("/chat/completions");
    for i in 0..200 {
        let (status, cache, _) = send(&url, &prompt(&format!("distinct prompt {i}")).to_string(), &[]).await;
        assert_eq!((status, cache.as_str()), (200, "miss"));
    }
    let m = proxy.metrics().await;
    let (entries, bytes) = (metric(&m, "llmproxy_cache_entries"), metric(&m, "llmproxy_cache_bytes"));
    assert!(entries > 0.0 && entries <= 20.0, "entries {entries}");
    assert!(bytes > 0.0 && bytes <= 16384.0, "bytes {bytes}");
}

fn records(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "llmproxy::request")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_one_record_without_prompt_or_keys() {
    const UPSTREAM_KEY: &str = "sk-up-RECORDKEY-1";
    const CLIENT_KEY: &str = "sk-client-RECORDKEY-2";
    const MARKER: &str = "zebra-umbrella-quartz";
    let upstream = mock(MockConfig { api_key: Some(UPSTREAM_KEY.into()), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let spec = format!("{CACHED}  retry: {{initialBackoff: 10ms}}\n");
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", &spec)).unwrap();
    let args = ["--client-id-header", "x-team"];
    let proxy = ProxyProcess::start(&file, &args, &[("LLMPROXY_UPSTREAM_API_KEY", UPSTREAM_KEY)]).await;
    let client = load::client();
    let post = |body: Value| {
        client
            .post(proxy.url("/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("x-team", "team-a")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let secret_prompt = prompt(&format!("tell me about {MARKER}"));
    let mut ids = Vec::new();
    upstream.mock.inject(Fault::Status { status: 503, retry_after_secs: None, code: None }, 1);
    for body in
        [secret_prompt.clone(), secret_prompt.clone(), json!({"model": "m", "user": "bob", "input": MARKER})]
    {
        let resp = post(body).await.unwrap();
        ids.push(resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned());
        let _ = resp.bytes().await;
    }
    eventually("three request records", Duration::from_secs(5), || {
        let n = records(&proxy.logs()).len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    let logs = proxy.logs();
    let recs = records(&logs);
    assert_eq!(recs.len(), 3, "one record per request:\n{logs}");
    for (rec, id) in recs.iter().zip(&ids) {
        assert_eq!(rec["request_id"].as_str(), Some(id.as_str()), "x-request-id matches the record");
        for field in ["path", "status", "outcome", "attempts", "queue_wait_ms", "duration_ms", "model"] {
            assert!(!rec[field].is_null(), "{field} missing in {rec}");
        }
    }
    let (first, hit) = (&recs[0], &recs[1]);
    assert_eq!(first["client"], "team-a");
    assert_eq!((first["outcome"].as_str(), first["cache"].as_str()), (Some("ok"), Some("miss")));
    assert_eq!(first["attempts"], 2);
    assert!(first["retry_reasons"].as_str().unwrap_or("").contains("status_5xx"), "{first}");
    assert!(
        first["upstream_latency_ms"].is_u64()
            && first["prompt_tokens"].is_u64()
            && first["completion_tokens"].is_u64()
    );
    assert_eq!(first["prompt_hash"].as_str().map(str::len), Some(16));
    assert_eq!((hit["outcome"].as_str(), hit["cache"].as_str()), (Some("cache_hit"), Some("hit")));
    assert_eq!(hit["prompt_hash"], first["prompt_hash"], "same prompt, same hash");
    assert!(hit["saved_tokens"].as_u64().unwrap_or(0) > 0);
    assert_eq!(recs[2]["client"], "team-a", "the header wins over the body's user");
    for secret in [MARKER, "RECORDKEY"] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs:\n{logs}");
    }

    // --request-records 0: no records, metrics still count.
    let quiet = ProxyProcess::start(
        &file,
        &["--request-records", "0"],
        &[("LLMPROXY_UPSTREAM_API_KEY", UPSTREAM_KEY)],
    )
    .await;
    let resp = client
        .post(quiet.url("/embeddings"))
        .header("content-type", "application/json")
        .body(json!({"model": "m", "input": "x"}).to_string())
        .send()
        .await;
    assert_eq!(resp.map(|r| r.status().as_u16()).ok(), Some(200));
    let m = get_text(&format!("http://{}/metrics", quiet.admin)).await;
    assert_eq!(metric(&m, "llmproxy_requests_total"), 1.0);
    assert!(records(&quiet.logs()).is_empty(), "{}", quiet.logs());
}
