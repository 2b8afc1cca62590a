//! The proxy over real loopback HTTP, in front of the mock upstream that enforces real limits.

use std::time::Duration;

use llmproxy_mock::load;
use llmproxy_mock::{Fault, MockConfig};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::proxy_env::{TestProxy, manifest, metric, mock, post_json, raw_http, stream};

fn chat(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello there"}]})
}

fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let err = &v["error"];
    assert!(
        err["type"].is_string() && err.get("code").is_some() && err.get("param").is_some(),
        "not an OpenAI error: {body}"
    );
    err["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_succeeds_at_the_upstream_rate_without_429s() {
    let upstream = mock(MockConfig { requests_per_minute: Some(600), ..MockConfig::default() }).await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 600}", ""), None).await;
    let client = llmproxy_mock::load::client();
    let clients = 50;
    let summary = load::burst(&client, &proxy.url("/chat/completions"), None, clients).await;

    assert_eq!((summary.ok, summary.rate_limited, summary.other), (clients, 0, 0), "{summary:?}");
    let upstream_429 = upstream.mock.stats().rate_limited;
    assert!(upstream_429 <= 2, "upstream 429s should stay near zero, got {upstream_429}");
    // 10 at once (one second's burst), then 40 at 10/s: 4 s at best.
    let ideal = Duration::from_secs(4);
    assert!(summary.wall < ideal.mul_f64(1.5), "took {:?}, ideal {ideal:?}", summary.wall);
    assert!(summary.wall >= Duration::from_millis(3900), "faster than the limit allows: {:?}", summary.wall);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "llmproxy_requests_total{outcome=\"ok\"}"), 50.0);
}

#[tokio::test]
async fn retry_after_from_the_upstream_is_honoured() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.inject(Fault::Status { status: 429, retry_after_secs: Some(1), code: None }, 1);
    let proxy = TestProxy::start(
        &manifest(&upstream.url(), "{requestsPerMinute: 6000}", "  retry: {initialBackoff: 10ms}\n"),
        None,
    )
    .await;
    let (status, headers, _) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-llmproxy-attempts").and_then(|v| v.to_str().ok()), Some("2"));
    let seen = upstream.mock.seen();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}, the upstream asked for 1s");
    assert_eq!(metric(&proxy.metrics().await, "llmproxy_retries_total{reason=\"status_429\"}"), 1.0);
}

#[tokio::test]
async fn backoff_grows_between_retries_of_5xx() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.inject(Fault::Status { status: 503, retry_after_secs: None, code: None }, 3);
    let retry =
        "  retry: {maxAttempts: 4, initialBackoff: 100ms, multiplier: 2, maxBackoff: 1s, jitter: false}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", retry), None).await;
    let (status, _, _) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 200);
    let at: Vec<Instant> = upstream.mock.seen().iter().map(|s| s.at).collect();
    assert_eq!(at.len(), 4, "three failures and a success");
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, want) in gaps.iter().zip([100, 200, 400]) {
        assert!(*gap >= Duration::from_millis(want), "gaps {gaps:?}: expected at least {want} ms");
    }
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "back-off should grow: {gaps:?}");
}

#[tokio::test]
async fn exhausted_retries_return_the_upstream_error() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.inject(Fault::Status { status: 500, retry_after_secs: None, code: None }, 5);
    let retry = "  retry: {maxAttempts: 2, initialBackoff: 10ms}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", retry), None).await;
    let (status, _, body) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 500);
    assert!(!error_message(&body).is_empty());
    assert_eq!(upstream.mock.seen().len(), 2);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let upstream = mock(MockConfig { api_key: Some("sk-right".into()), ..MockConfig::default() }).await;
    let limits = "{requestsPerMinute: 6000}";
    let retry = "  retry: {initialBackoff: 10ms}\n";
    // 401: the proxy holds the wrong key.
    let proxy = TestProxy::start(&manifest(&upstream.url(), limits, retry), Some("sk-wrong")).await;
    let (status, _, body) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 401);
    assert!(
        body.contains("upstream_auth_failed") && error_message(&body).contains("apiKeySecretRef"),
        "{body}"
    );
    assert!(!body.contains("Incorrect API key"), "the upstream's body (which quotes the key) is not relayed");
    assert_eq!(upstream.mock.seen().len(), 1);
    // 400 from the upstream.
    proxy.proxy.set_api_key(llmproxy_proxy::ApiKey::new("sk-right"));
    upstream.mock.inject(Fault::Status { status: 400, retry_after_secs: None, code: None }, 1);
    let (status, _, _) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 400);
    assert_eq!(upstream.mock.seen().len(), 2);
    assert_eq!(metric(&proxy.metrics().await, "llmproxy_retries_total"), 0.0);
}

#[tokio::test]
async fn dropped_connections_are_retried_but_a_timed_out_attempt_is_not_sent_twice() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.inject(Fault::Drop, 1);
    let spec = "  retry: {initialBackoff: 10ms}\n";
    let with_timeout =
        manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec).replace("'}", "', timeout: 300ms}");
    let proxy = TestProxy::start(&with_timeout, None).await;
    let (status, headers, _) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-llmproxy-attempts").and_then(|v| v.to_str().ok()), Some("2"));
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "llmproxy_retries_total{reason=\"connect_error\"}"), 1.0, "{m}");

    // An answer slower than upstream.timeout is not sent again: each attempt may run (and be
    // billed) upstream, and a second one would end in the same 504. Once is enough to learn that.
    upstream.mock.reset_stats();
    upstream.mock.inject(Fault::Delay { ms: 2_000 }, 4);
    let (status, _, body) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 504, "{body}");
    assert!(error_message(&body).contains("did not answer in time"), "{body}");
    assert_eq!(upstream.mock.stats().requests, 1, "sent once");
}

#[tokio::test]
async fn a_broken_stream_is_not_retried_once_bytes_went_out() {
    // Chunks 50 ms apart, so the first ones are on the wire before the upstream breaks off.
    let upstream = mock(MockConfig { chunk_delay: Duration::from_millis(50), ..MockConfig::default() }).await;
    upstream.mock.inject(Fault::CutStream { after_chunks: 3 }, 1);
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", ""), None).await;
    let mut body = chat(10);
    body["stream"] = json!(true);
    let got = stream(&proxy.url("/chat/completions"), &body).await;
    assert_eq!(got.status, 200);
    assert!(got.broke, "the client must see the stream break, not a clean end");
    assert!(got.text.contains("data: ") && !got.text.contains("[DONE]"), "{}", got.text);
    assert_eq!(upstream.mock.seen().len(), 1, "no second attempt after the first byte");
}

#[tokio::test]
async fn an_unmeetable_deadline_gets_a_clear_429_not_a_hang() {
    let upstream = mock(MockConfig::default()).await;
    let spec = "  queue: {maxSize: 10, maxWait: 500ms}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 30}", spec), None).await;
    let (first, _, _) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(first, 200);
    let start = Instant::now();
    let (status, headers, body) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 429);
    assert!(start.elapsed() < Duration::from_secs(5), "answered after {:?}", start.elapsed());
    let retry_after: u64 =
        headers.get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    let msg = error_message(&body);
    assert!(msg.contains("requests-per-minute"), "{msg}");
    assert!(body.contains("rate_limit_exceeded"), "{body}");
    assert_eq!(upstream.mock.seen().len(), 1, "the refused request never reached the upstream");
}

#[tokio::test]
async fn a_full_queue_refuses_with_429() {
    let upstream = mock(MockConfig::default()).await;
    let spec = "  queue: {maxSize: 1, maxWait: 30s}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 60}", spec), None).await;
    let client = llmproxy_mock::load::client();
    // One goes at once, one waits its second, the third finds the queue full.
    let summary = load::burst(&client, &proxy.url("/chat/completions"), None, 3).await;
    assert_eq!((summary.ok, summary.rate_limited), (2, 1), "{summary:?}");
    assert_eq!(metric(&proxy.metrics().await, "llmproxy_requests_total{outcome=\"queue_full\"}"), 1.0);
}

#[tokio::test]
async fn under_used_accounting_unused_tokens_are_released_for_the_next_request() {
    // The proxy limits tokens (600/min = 10/s, a bucket of 10); the mock does not.
    let upstream = mock(MockConfig { completion_tokens: 8, ..MockConfig::default() }).await;
    let spec = "  queue: {maxWait: 8s}\n";
    let proxy = TestProxy::start(
        &manifest(
            &upstream.url(),
            "{requestsPerMinute: 6000, tokensPerMinute: 600, tokenAccounting: used}",
            spec,
        ),
        None,
    )
    .await;
    // Each request reserves ~205 tokens (prompt + max_tokens 200) and really uses ~11.
    let (a, _, _) = post_json(&proxy.url("/chat/completions"), &chat(200)).await;
    assert_eq!(a, 200);
    let debt = proxy.proxy.admission().tokens_available().unwrap_or(f64::NAN);
    assert!(debt > -50.0, "after settling, the bucket owes only the real usage, got {debt}");
    // Unsettled, the second request would owe ~195 tokens at 10/s (~20 s): more than maxWait,
    // so it would be refused at once. Settled, it waits ~2 s and succeeds.
    let (b, _, body) = post_json(&proxy.url("/chat/completions"), &chat(200)).await;
    assert_eq!(b, 200, "{body}");
    let m = proxy.metrics().await;
    assert!(metric(&m, "llmproxy_tokens_total{kind=\"output\"}") >= 16.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reach_the_client_before_the_upstream_finishes() {
    let upstream = mock(MockConfig {
        chunk_delay: Duration::from_millis(200),
        completion_tokens: 5,
        ..MockConfig::default()
    })
    .await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", ""), None).await;
    let mut body = chat(5);
    body["stream"] = json!(true);
    let got = stream(&proxy.url("/chat/completions"), &body).await;
    let content_type = got.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    assert!(!got.broke);
    let (first_at, text) = (got.first_chunk_at, got.text);
    let last_sent = upstream.mock.last_chunk_at().expect("the mock streamed nothing");
    let first_at = first_at.expect("no chunk received");
    assert!(first_at < last_sent, "the first chunk arrived only after the upstream sent its last: buffered");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The proxy asked for usage on the client's behalf and removed that event again.
    assert!(!text.contains("\"usage\":{"), "usage event leaked to a client that did not ask: {text}");
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "llmproxy_tokens_total{kind=\"output\"}") >= 5.0,
        "usage was read from the stream: {m}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_openai_style_errors() {
    let upstream = mock(MockConfig::default()).await;
    let options = llmproxy_proxy::Options { max_request_bytes: 1024, ..Default::default() };
    let proxy =
        TestProxy::start_with(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", ""), None, options)
            .await;
    let client = llmproxy_mock::load::client();
    let send = |path: &str, body: String| {
        client.post(proxy.url(path)).header("content-type", "application/json").body(body).send()
    };

    let resp = send("/chat/completions", "{\"model\": ".into()).await.unwrap();
    assert_eq!(resp.status(), 400);
    let msg = error_message(&resp.text().await.unwrap_or_default());
    assert!(msg.contains("invalid JSON"), "{msg}");

    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]}).to_string();
    let resp = send("/chat/completions", big).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert!(error_message(&resp.text().await.unwrap_or_default()).contains("1024 bytes"));

    let resp = client.get(format!("http://{}/admin/secret", proxy.addr)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(error_message(&resp.text().await.unwrap_or_default()).contains("/v1/"));

    assert!(upstream.mock.seen().is_empty(), "nothing bad reached the upstream");
    assert_eq!(metric(&proxy.metrics().await, "llmproxy_requests_total{outcome=\"bad_request\"}"), 2.0);
}

#[tokio::test]
async fn every_openai_path_passes_through_with_headers_and_the_upstream_key() {
    let upstream = mock(MockConfig {
        api_key: Some("sk-upstream".into()),
        requests_per_minute: Some(6000),
        ..MockConfig::default()
    })
    .await;
    let proxy =
        TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", ""), Some("sk-upstream"))
            .await;
    let client = llmproxy_mock::load::client();

    let resp = client.get(proxy.url("/models?limit=2")).bearer_auth("client-key").send().await.unwrap();
    assert_eq!(resp.status(), 200, "client's Authorization replaced by the upstream key");
    assert!(resp.headers().contains_key("x-ratelimit-remaining-requests"), "x-ratelimit-* come back");
    assert!(resp.headers().contains_key("x-request-id"));
    let models: Value = serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or_default();
    assert_eq!(models["object"], "list");

    let (status, _, body) = post_json(
        &proxy.url("/embeddings"),
        &json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap_or_default()["data"].as_array().map(Vec::len),
        Some(2)
    );

    let (status, _, body) =
        post_json(&proxy.url("/completions"), &json!({"model": "m", "prompt": "hi", "max_tokens": 3})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post_json(&proxy.url("/responses"), &json!({"model": "m", "input": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    let resp = client.get(proxy.url("/models/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404, "upstream 404 passed through");
    assert!(upstream.mock.seen().iter().all(|s| s.key.as_deref() == Some("sk-upstream")));
}

#[tokio::test]
async fn upstream_429s_are_waited_out_in_line_not_counted_as_attempts() {
    let upstream = mock(MockConfig::default()).await;
    // Five 429s in a row with a short window, and only two attempts allowed for errors.
    upstream.mock.inject(Fault::Status { status: 429, retry_after_secs: Some(0), code: None }, 5);
    let spec = "  retry: {maxAttempts: 2, initialBackoff: 10ms, maxBackoff: 50ms}\n";
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec), None).await;
    let (status, headers, body) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get("x-llmproxy-attempts").and_then(|v| v.to_str().ok()), Some("6"));
    assert_eq!(metric(&proxy.metrics().await, "llmproxy_retries_total{reason=\"status_429\"}"), 5.0);
    // Out of credit is another matter: waiting cannot fix it, so it is answered at once.
    let code = Some("insufficient_quota".to_owned());
    upstream.mock.inject(Fault::Status { status: 429, retry_after_secs: None, code }, 1);
    let (status, headers, body) = post_json(&proxy.url("/chat/completions"), &chat(5)).await;
    assert_eq!(status, 429);
    assert!(body.contains("insufficient_quota"), "the upstream's own answer: {body}");
    assert_eq!(headers.get("x-llmproxy-attempts").and_then(|v| v.to_str().ok()), Some("1"));
}

#[tokio::test]
async fn a_429_for_one_model_does_not_hold_the_others() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", ""), None).await;
    upstream.mock.inject(Fault::Status { status: 429, retry_after_secs: Some(3600), code: None }, 1);
    let model = |m: &str| {
        let mut body = chat(5);
        body["model"] = json!(m);
        body
    };
    let start = Instant::now();
    // Model A's window is spent for an hour: more than its queue wait, so it hears so at once.
    let (status, headers, _) = post_json(&proxy.url("/chat/completions"), &model("model-a")).await;
    assert_eq!(status, 429);
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("3600"));
    // Model B is not affected.
    let (status, _, body) = post_json(&proxy.url("/chat/completions"), &model("model-b")).await;
    assert_eq!(status, 200, "{body}");
    assert!(start.elapsed() < Duration::from_secs(5), "model b waited {:?}", start.elapsed());
    assert_eq!(upstream.mock.seen().len(), 2);
}

#[tokio::test]
async fn only_plain_allowed_paths_reach_the_upstream() {
    let upstream = mock(MockConfig::default()).await;
    let proxy =
        TestProxy::start(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", ""), Some("sk-upstream"))
            .await;
    // The mock's admin API, with the key attached, through a dot segment, must stay out of reach.
    for path in [
        "/v1/../mock/stats",
        "/v1/%2e%2e/mock/stats",
        "/v1/%2E%2E%2Fmock%2Fstats",
        "/v1/models/..%5C..%5Cmock",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let (status, body) = raw_http(proxy.addr, &req).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(error_message(&body).contains("plain /v1/"), "{body}");
    }
    // Allowed by default: inference and the model list; not: files, fine-tunes, deletes.
    let client = load::client();
    for (method, path) in
        [("GET", "/files/file-1/content"), ("DELETE", "/models/ft-1"), ("POST", "/fine_tuning/jobs")]
    {
        let resp = client.request(method.parse().unwrap_or_default(), proxy.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{method} {path}");
        let body = resp.text().await.unwrap_or_default();
        assert!(body.contains("path_not_allowed") && body.contains("allowedPaths"), "{body}");
    }
    assert!(upstream.mock.seen().is_empty(), "nothing reached the upstream");
    let resp = client.get(proxy.url("/models")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // A policy can open more paths.
    let open =
        "  upstream: {url: 'URL', allowedPaths: ['GET /v1/files/**']}\n".replace("URL", &upstream.url());
    let manifest = format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: t}}\nspec:\n{open}  limits: {{requestsPerMinute: 6000}}\n"
    );
    let (_, policy) = llmproxy_api::from_yaml(&manifest).unwrap();
    proxy.proxy.apply_policy(policy);
    let resp = client.get(proxy.url("/files/file-1")).send().await.unwrap();
    assert_eq!(resp.status(), 404, "let through, and the mock has no such path");
    let resp = client.get(proxy.url("/models")).send().await.unwrap();
    assert_eq!(resp.status(), 403, "the explicit list replaces the default");
}

#[tokio::test]
async fn account_headers_pass_only_where_allowed_and_change_the_cache_key() {
    let upstream = mock(MockConfig::default()).await;
    let proxy = TestProxy::start(
        &manifest(&upstream.url(), "{requestsPerMinute: 6000}", "  cache: {ttl: 5m}\n"),
        None,
    )
    .await;
    let client = load::client();
    let send = |org: &'static str| {
        client
            .post(proxy.url("/chat/completions"))
            .header("content-type", "application/json")
            .header("openai-organization", org)
            .body(chat(5).to_string())
            .send()
    };
    assert_eq!(send("org-other").await.map(|r| r.status().as_u16()).ok(), Some(200));
    assert_eq!(upstream.mock.seen()[0].organization, None, "dropped by default");

    let allowed = manifest(&upstream.url(), "{requestsPerMinute: 6000}", "  cache: {ttl: 5m}\n")
        .replace("'}\n", "', allowedClientHeaders: [openai-organization]}\n");
    let (_, policy) = llmproxy_api::from_yaml(&allowed).unwrap();
    proxy.proxy.apply_policy(policy);
    for org in ["org-a", "org-b"] {
        let resp = send(org).await.unwrap();
        assert_eq!(
            resp.headers().get("x-llmproxy-cache").and_then(|v| v.to_str().ok()),
            Some("miss"),
            "{org}"
        );
    }
    let orgs: Vec<Option<String>> = upstream.mock.seen().iter().map(|s| s.organization.clone()).collect();
    assert_eq!(orgs, [None, Some("org-a".to_owned()), Some("org-b".to_owned())]);
}

#[tokio::test]
async fn an_upstream_that_answered_during_the_upload_is_answered_not_retried() {
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.inject(Fault::Early { status: 413 }, 1);
    let options = llmproxy_proxy::Options { max_request_bytes: 16 << 20, ..Default::default() };
    let spec = "  retry: {initialBackoff: 10ms}\n";
    let proxy =
        TestProxy::start_with(&manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec), None, options)
            .await;
    let mut big = chat(5);
    big["messages"][0]["content"] = json!("x".repeat(8 << 20));
    let (status, _, body) = post_json(&proxy.url("/chat/completions"), &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request_too_large"), "the upstream's answer: {body}");
    assert_eq!(upstream.mock.stats().requests, 1, "not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_limit_as_high_as_the_configured_one_keeps_the_configured_burst() {
    // The upstream grants the 1,200/min the spec asks for, over 6-second windows (a bucket of
    // 120), and says so in its limit headers: they must not shrink the spec's burst of 100 to
    // one second's worth.
    let upstream = mock(MockConfig {
        requests_per_minute: Some(1200),
        window: Duration::from_secs(6),
        ..MockConfig::default()
    })
    .await;
    let proxy = TestProxy::start(
        &manifest(&upstream.url(), "{requestsPerMinute: 1200, burst: 100, maxConcurrent: 100}", ""),
        None,
    )
    .await;
    let client = load::client();
    let (shots, wall) =
        load::clients(&client, &proxy.url("/chat/completions"), 50, 200, load::chat_body).await;
    let summary = load::Summary::of(&shots, wall);
    assert_eq!((summary.ok, summary.rate_limited, summary.other), (200, 0, 0), "{summary:?}");
    assert!(upstream.mock.stats().rate_limited <= 4, "{:?}", upstream.mock.stats());
    // At best 90 at once (the burst less the tenth kept in hand), then 20/s: 5.5 s. One
    // second's burst instead would take 9 s.
    assert!(
        wall <= Duration::from_millis(7_500),
        "200 requests took {wall:?}: the configured burst was lost"
    );
}
