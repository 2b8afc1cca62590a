//! HTTP tests of the Anthropic routes over loopback.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::dialect::rfc3339;
use crate::{Fault, MockConfig, MockServer};

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `(type, message)` of an Anthropic error body.
    fn error(&self) -> (String, String) {
        let v = self.json();
        assert_eq!(v["type"], "error", "{}", self.body);
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_owned();
        (s("/error/type"), s("/error/message"))
    }
}

const KEY: &str = "sk-ant-test";

async fn start(config: MockConfig) -> MockServer {
    let config = MockConfig { api_key: Some(KEY.into()), ..config };
    MockServer::start_local(config).await.unwrap()
}

async fn send(server: &MockServer, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> Reply {
    let url = format!("http://{}{path}", server.addr);
    let client = crate::load::client();
    let mut req = match body {
        Some(b) => client.post(url).header("content-type", "application/json").body(b.to_string()),
        None => client.get(url),
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    Reply { status, headers, body }
}

const SDK: &[(&str, &str)] = &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")];

async fn message(server: &MockServer, body: &Value) -> Reply {
    send(server, "/v1/messages", SDK, Some(body)).await
}

fn hello(max_tokens: u64) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Hello, Claude"}]})
}

#[tokio::test]
async fn answers_a_message_in_anthropic_shape() {
    let server = start(MockConfig { requests_per_minute: Some(600), ..MockConfig::default() }).await;
    let r = message(&server, &hello(1024)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("msg_")), "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(v["content"][0]["type"], "text");
    assert!(v["content"][0]["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    // "Hello, Claude": 13 characters.
    let usage = json!({"input_tokens": 4, "output_tokens": 16, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    assert_eq!(v["usage"], usage);
    assert!(r.header("request-id").is_some_and(|id| id.starts_with("req_")));
    assert_eq!(r.header("anthropic-ratelimit-requests-limit"), Some("600"));
    assert!(r.header("anthropic-ratelimit-input-tokens-limit").is_none(), "only configured limits");
    assert!(!r.headers.keys().any(|k| k.as_str().starts_with("x-ratelimit")), "{:?}", r.headers);
    let stats = server.mock.stats();
    assert_eq!((stats.ok, stats.anthropic_input_tokens, stats.anthropic_output_tokens), (1, 4, 16));
    assert_eq!(stats.ok_by_model.get("claude-sonnet-4-5"), Some(&1));
}

/// The SSE events of a body: `(event name, data)`.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| {
            let (event, data) = f.split_once('\n').unwrap_or((f, ""));
            let name = event.strip_prefix("event: ").unwrap_or_default().to_owned();
            let data =
                serde_json::from_str(data.strip_prefix("data: ").unwrap_or_default()).unwrap_or(Value::Null);
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn streams_anthropic_events_in_order() {
    let server = start(MockConfig { completion_tokens: 5, ..MockConfig::default() }).await;
    let mut body = hello(1024);
    body["stream"] = json!(true);
    let r = message(&server, &body).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")));
    let events = events(&r.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected, "{}", r.body);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "each data names its event");
    }
    let start = &events[0].1["message"];
    assert_eq!(start["usage"]["input_tokens"], 4);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(start["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(events[3].1["delta"]["type"], "text_delta");
    let text: String = events[3..8].iter().filter_map(|(_, d)| d["delta"]["text"].as_str()).collect();
    assert_eq!(text.split(' ').count(), 5);
    let end = &events[8 + 1].1;
    assert_eq!(end["delta"], json!({"stop_reason": "end_turn", "stop_sequence": null}));
    assert_eq!(end["usage"], json!({"output_tokens": 5}));
}

#[tokio::test]
async fn a_cut_stream_breaks_after_its_events() {
    // Paced, so that the head goes out before the break.
    let server = start(MockConfig { chunk_delay: Duration::from_millis(20), ..MockConfig::default() }).await;
    server.mock.inject(Fault::CutStream { after_chunks: 2 }, 1);
    let mut body = hello(64);
    body["stream"] = json!(true);
    let url = format!("http://{}/v1/messages", server.addr);
    let mut req = crate::load::client().post(url).body(body.to_string());
    for (k, v) in SDK {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err(), "the body breaks");
    assert!(server.mock.last_chunk_at().is_some());
}

#[tokio::test]
async fn refuses_requests_anthropic_would_refuse() {
    let server = start(MockConfig::default()).await;
    let mut body = hello(16);
    body.as_object_mut().map(|m| m.remove("max_tokens"));
    let r = message(&server, &body).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error(), ("invalid_request_error".into(), "max_tokens: Field required".into()));
    assert!(r.header("request-id").is_some_and(|id| id.starts_with("req_")));
    let r = message(&server, &hello(0)).await;
    assert_eq!(r.status, 400);
    assert!(r.error().1.starts_with("max_tokens:"));
    let r = message(&server, &json!({"model": "m", "max_tokens": 5, "messages": []})).await;
    assert_eq!((r.status, r.error().0.as_str()), (400, "invalid_request_error"));
    let r = send(&server, "/v1/messages", &[("x-api-key", KEY)], Some(&hello(16))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error().1, "anthropic-version: header is required");
    let r = send(&server, "/v1/messages", &SDK[..1], Some(&json!("not json{"))).await;
    assert_eq!(r.status, 400);
    assert_eq!(server.mock.stats().ok, 0);
}

#[tokio::test]
async fn takes_the_key_as_x_api_key_or_bearer() {
    let server = start(MockConfig::default()).await;
    let beta = ("anthropic-beta", "prompt-caching-2024-07-31");
    let r = send(&server, "/v1/messages", &[SDK[0], SDK[1], beta], Some(&hello(8))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let bearer = format!("Bearer {KEY}");
    let r = send(&server, "/v1/messages", &[("authorization", &bearer), SDK[1]], Some(&hello(8))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send(&server, "/v1/messages", &[("x-api-key", "sk-wrong"), SDK[1]], Some(&hello(8))).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error().0, "authentication_error");
    let seen = server.mock.seen();
    let keys: Vec<Option<&str>> = seen.iter().map(|s| s.key.as_deref()).collect();
    assert_eq!(keys, [Some(KEY), Some(KEY), Some("sk-wrong")]);
    assert_eq!(seen[0].anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(seen[0].anthropic_beta.as_deref(), Some(beta.1));
    assert_eq!(seen[1].anthropic_beta, None);
    assert_eq!(server.mock.stats().unauthorized, 1);
}

#[tokio::test]
async fn input_tokens_per_minute_excludes_cache_reads() {
    // 600 input tokens a minute, 100 of them at once (a 10 s window): refills 1 per 100 ms.
    let window = Duration::from_secs(10);
    let server =
        start(MockConfig { input_tokens_per_minute: Some(600), window, ..MockConfig::default() }).await;
    let long = "x".repeat(4 * 80);
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 8,
        "system": [{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "abcd"}]});
    let r = message(&server, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["cache_creation_input_tokens"], 80);
    assert_eq!(r.json()["usage"]["input_tokens"], 1);
    let remaining: u64 =
        r.header("anthropic-ratelimit-input-tokens-remaining").and_then(|v| v.parse().ok()).unwrap();
    assert!(remaining <= 20, "{remaining}");
    // A repeat reads the prefix from the cache: only its 1 uncached token counts.
    let r = message(&server, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["cache_read_input_tokens"], 80);
    assert_eq!(r.json()["usage"]["cache_creation_input_tokens"], 0);
    // Another 80 uncached tokens do not fit.
    let other = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": long}]});
    let r = message(&server, &other).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error().0, "rate_limit_error");
    let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    assert!(r.header("anthropic-ratelimit-input-tokens-reset").is_some());
    let stats = server.mock.stats();
    assert_eq!(
        (stats.rate_limited, stats.anthropic_cache_read_tokens, stats.anthropic_cache_creation_tokens),
        (1, 80, 80)
    );
}

#[tokio::test]
async fn output_tokens_are_charged_at_max_then_settled() {
    // 600 output tokens a minute, 100 at once (a 10 s window): refills 1 per 100 ms.
    let window = Duration::from_secs(10);
    let server =
        start(MockConfig { output_tokens_per_minute: Some(600), window, ..MockConfig::default() }).await;
    server.mock.hold();
    let first = tokio::spawn({
        let url = format!("http://{}/v1/messages", server.addr);
        async move {
            let mut req = crate::load::client().post(url).body(hello(90).to_string());
            for (k, v) in SDK {
                req = req.header(*k, *v);
            }
            req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.mock.stats().ok < 1 {
        assert!(tokio::time::Instant::now() < deadline, "first request not admitted");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 90 of 100 are taken while the first answer is held: 50 more do not fit.
    let r = message(&server, &hello(50)).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.error().0, "rate_limit_error");
    assert!(r.header("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1));
    server.mock.release();
    assert_eq!(first.await.unwrap(), 200);
    // The first used 16 of its 90: the 74 given back make room.
    let r = message(&server, &hello(50)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(server.mock.stats().rate_limited, 1);
}

#[tokio::test]
async fn reset_headers_are_rfc3339() {
    let config = MockConfig {
        requests_per_minute: Some(60),
        tokens_per_minute: Some(6000),
        input_tokens_per_minute: Some(6000),
        output_tokens_per_minute: Some(6000),
        ..MockConfig::default()
    };
    let server = start(config).await;
    let before = rfc3339(SystemTime::now() - Duration::from_secs(1));
    let r = message(&server, &hello(100)).await;
    let after = rfc3339(SystemTime::now() + Duration::from_secs(61));
    assert_eq!(r.status, 200);
    for what in ["requests", "tokens", "input-tokens", "output-tokens"] {
        let reset = r.header(&format!("anthropic-ratelimit-{what}-reset")).unwrap_or_default();
        assert!(is_rfc3339_utc(reset), "{what}: {reset}");
        // One format, one zone: the strings order as the times do.
        assert!(before.as_str() <= reset && reset <= after.as_str(), "{before} <= {reset} <= {after}");
        assert!(r.header(&format!("anthropic-ratelimit-{what}-limit")).is_some());
        assert!(r.header(&format!("anthropic-ratelimit-{what}-remaining")).is_some());
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` with fields in range.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| s.get(r).and_then(|d| d.parse::<u32>().ok());
    b.len() == 20
        && (b[4], b[7], b[10], b[13], b[16], b[19]) == (b'-', b'-', b'T', b':', b':', b'Z')
        && digits(0..4).is_some()
        && digits(5..7).is_some_and(|m| (1..=12).contains(&m))
        && digits(8..10).is_some_and(|d| (1..=31).contains(&d))
        && digits(11..13).is_some_and(|h| h < 24)
        && digits(14..16).is_some_and(|m| m < 60)
        && digits(17..19).is_some_and(|s| s < 60)
}

#[tokio::test]
async fn faults_answer_in_anthropic_shape() {
    let server = start(MockConfig { overloaded_every: Some(3), ..MockConfig::default() }).await;
    server.mock.inject(Fault::Status { status: 529, retry_after_secs: None, code: None }, 1);
    let r = message(&server, &hello(8)).await;
    assert_eq!((r.status, r.error().0.as_str()), (529, "overloaded_error"));
    let code = Some("rate_limit_error: This request would exceed your monthly spend limit".into());
    server.mock.inject(Fault::Status { status: 429, retry_after_secs: Some(30), code }, 1);
    let r = message(&server, &hello(8)).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.error(),
        ("rate_limit_error".into(), "This request would exceed your monthly spend limit".into())
    );
    assert_eq!(r.header("retry-after"), Some("30"));
    // Every third message (counted past faults) is overloaded.
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(message(&server, &hello(8)).await.status);
    }
    assert_eq!(got, [200, 200, 529, 200, 200, 529]);
    let stats = server.mock.stats();
    assert_eq!((stats.overloaded, stats.faults, stats.rate_limited), (3, 2, 0));
}

#[tokio::test]
async fn models_answer_in_the_shape_the_client_speaks() {
    let server = MockServer::start_local(MockConfig::default()).await.unwrap();
    let r = send(&server, "/v1/models", &[("anthropic-version", "2023-06-01")], None).await;
    let v = r.json();
    assert_eq!(v["has_more"], false);
    assert_eq!(v["data"][0]["type"], "model");
    assert!(v["data"][0]["id"].as_str().is_some_and(|id| id.starts_with("claude-")));
    assert_eq!(v["first_id"], v["data"][0]["id"]);
    assert!(v["data"][0]["display_name"].is_string());
    assert_eq!(v["data"][0]["created_at"], "2025-01-01T00:00:00Z");
    let r = send(&server, "/v1/models", &[("x-api-key", "k")], None).await;
    assert_eq!(r.json()["has_more"], false);
    let r = send(&server, "/v1/models", &[("authorization", "Bearer k")], None).await;
    assert_eq!(r.json()["object"], "list");
    let r = send(&server, "/v1/models/claude-nope", &[("x-api-key", "k")], None).await;
    assert_eq!((r.status, r.error().0.as_str()), (404, "not_found_error"));
}

#[tokio::test]
async fn counts_tokens() {
    let server = start(MockConfig { input_tokens_per_minute: Some(60), ..MockConfig::default() }).await;
    let body = json!({"model": "claude-sonnet-4-5", "system": "12345678", "messages": [{"role": "user", "content": "abcdefgh"}]});
    let r = send(&server, "/v1/messages/count_tokens", SDK, Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"input_tokens": 4}));
    let r = send(&server, "/v1/messages/count_tokens", SDK, Some(&json!({"model": "m"}))).await;
    assert_eq!(r.error(), ("invalid_request_error".into(), "messages: Field required".into()));
}

#[tokio::test]
async fn answer_lengths_spread_over_a_range_within_max_tokens() {
    let server = start(MockConfig { answer_tokens: Some(20..=60), ..MockConfig::default() }).await;
    let ask = |i: usize, max: u64| json!({"model": "claude-haiku-4-5", "max_tokens": max, "messages": [{"role": "user", "content": format!("q{i}")}]});
    let mut lengths = Vec::new();
    for i in 0..8 {
        let v = message(&server, &ask(i, 1000)).await.json();
        let n = v["usage"]["output_tokens"].as_u64().unwrap_or_default();
        assert!((20..=60).contains(&n), "{n}");
        assert_eq!(message(&server, &ask(i, 1000)).await.json()["usage"]["output_tokens"], n, "per prompt");
        lengths.push(n);
    }
    assert!(lengths.iter().any(|n| *n != lengths[0]), "{lengths:?}");
    let v = message(&server, &ask(0, 10)).await.json();
    assert_eq!(
        (v["usage"]["output_tokens"].as_u64(), v["stop_reason"].as_str()),
        (Some(10), Some("max_tokens"))
    );
}

#[tokio::test]
async fn limits_can_be_set_over_http() {
    let server = start(MockConfig::default()).await;
    let url = format!("http://{}/mock/limits", server.addr);
    let body = json!({"input_tokens_per_minute": 60, "output_tokens_per_minute": 120});
    let resp = crate::load::client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let r = message(&server, &hello(1)).await;
    assert_eq!(r.header("anthropic-ratelimit-input-tokens-limit"), Some("60"));
    assert_eq!(r.header("anthropic-ratelimit-output-tokens-limit"), Some("120"));
    assert!(r.header("anthropic-ratelimit-requests-limit").is_none());
}
