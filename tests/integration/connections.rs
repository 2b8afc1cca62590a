//! Connections cannot be held hostage: slow headers and bodies are cut, connections are
//! capped, and a SIGTERM drains the Kubernetes way.

use std::time::Duration;

use llmproxy_mock::{MockConfig, load};
use llmproxy_proxy::{Options, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::eventually;
use crate::support::proxy_env::{
    ProxyProcess, TestProxy, get_text, manifest, manifest_with, mock, post_json, stream,
};

/// A proxy in front of `upstream_url` at 6,000 requests a minute, served with `serve`.
async fn serving(upstream_url: &str, options: Options, serve: ServeOptions) -> TestProxy {
    TestProxy::start_serving(&manifest(upstream_url, "{requestsPerMinute: 6000}", ""), None, options, serve)
        .await
}

/// Read until the server closes the connection (or `limit` passes); the bytes read.
async fn read_until_closed(conn: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    tokio::time::timeout(limit, conn.read_to_end(&mut buf)).await.ok()?.ok()?;
    Some(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    let upstream = mock(MockConfig::default()).await;
    let options = Options { body_read_timeout: Duration::from_secs(1), ..Options::default() };
    let serve = ServeOptions {
        header_read_timeout: Duration::from_secs(1),
        drain_delay: Duration::ZERO,
        ..ServeOptions::default()
    };
    let proxy = serving(&upstream.url(), options, serve).await;
    // Slowloris: half a request line, then nothing.
    let start = Instant::now();
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let closed = read_until_closed(&mut conn, Duration::from_secs(20)).await;
    assert!(closed.is_some(), "a connection with partial headers stayed open");
    assert!(start.elapsed() < Duration::from_secs(15), "closed only after {:?}", start.elapsed());

    // Headers complete, the body trickles: a 408 once the body read time is up.
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":";
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf))
        .await
        .expect("no answer to a trickling body")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(upstream.mock.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_one() {
    let upstream = mock(MockConfig::default()).await;
    let serve = ServeOptions { max_connections: 2, drain_delay: Duration::ZERO, ..ServeOptions::default() };
    let proxy = serving(&upstream.url(), Options::default(), serve).await;
    let first = TcpStream::connect(proxy.addr).await.unwrap();
    let _second = TcpStream::connect(proxy.addr).await.unwrap();
    let url = proxy.url("/models");
    let third = tokio::spawn(async move { get_text(&url).await });
    // Absence needs a window: the third is not served while two idle connections hold the cap.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "served beyond the connection cap");
    drop(first);
    let body = tokio::time::timeout(Duration::from_secs(10), third).await;
    let body = body.expect("not served after a slot came free").unwrap_or_default();
    assert!(body.contains("\"object\":\"list\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_new_requests_are_still_served_during_the_drain_delay() {
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", "")).unwrap();
    let mut proxy = ProxyProcess::start(&file, &["--drain-delay", "3s", "--log-format", "text"], &[]).await;
    let ready = format!("http://{}/readyz", proxy.admin);
    proxy.terminate();
    eventually("/readyz to turn 503", Duration::from_secs(2), || {
        let ready = ready.clone();
        async move {
            let status = load::client().get(&ready).send().await.ok()?.status().as_u16();
            (status == 503).then_some(())
        }
    })
    .await;
    // Endpoints have not caught up yet: a new client still gets served.
    let (status, _, body) = post_json(&proxy.url("/chat/completions"), &load::chat_body(1)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).await, Some(0), "{}", proxy.logs());
    assert!(proxy.logs().contains("still accepting while endpoints drain"), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_queued_bodies_stay_within_the_memory_budget() {
    // Many large bodies waiting at once: the queue's byte budget, not their number, bounds
    // the memory they hold.
    let upstream = mock(MockConfig::default()).await;
    upstream.mock.hold();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let budget: u64 = 32 << 20;
    let spec = "  queue: {maxSize: 100, maxWait: 60s, maxBytes: 32Mi}\n";
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000, maxConcurrent: 1}", spec))
        .unwrap();
    let proxy = ProxyProcess::start(&file, &["--request-records", "0"], &[]).await;
    let idle = load::rss_bytes(proxy.pid());
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat((4 << 20) - 1024)}]})
        .to_string();
    let url = proxy.url("/chat/completions");
    // A client each: a shared pool could hand a later request the connection of a refused
    // one, which the proxy is closing, and that request would never reach it.
    let sends: Vec<_> = (0..20)
        .map(|_| {
            let req = load::client().post(&url).header("content-type", "application/json").body(body.clone());
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    // Eight fit in the budget (one upstream, held; seven queued); the rest hear so at once.
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let m = get_text(&metrics_url).await;
        let refused =
            crate::support::proxy_env::metric(&m, "llmproxy_throttled_total{limit=\"queue_bytes\"}");
        let waiting = crate::support::proxy_env::metric(&m, "llmproxy_queue_depth");
        if refused == 12.0 && waiting == 7.0 {
            break;
        }
        if Instant::now() > deadline {
            upstream.mock.release();
            let mut statuses = Vec::new();
            for s in sends {
                statuses.push(s.await.unwrap_or(0));
            }
            panic!(
                "the budget did not fill with the rest refused: {refused} refused, {waiting} waiting, \
                 answers {statuses:?}\n{m}\n{}",
                proxy.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = load::rss_bytes(proxy.pid());
    eprintln!("RSS idle {} MiB, with the budget full {} MiB", idle >> 20, held >> 20);
    assert!(
        held.saturating_sub(idle) < 2 * budget,
        "RSS grew by {} MiB for a {} MiB budget (idle {} MiB)",
        held.saturating_sub(idle) >> 20,
        budget >> 20,
        idle >> 20
    );
    upstream.mock.release();
    let mut statuses = Vec::new();
    for s in sends {
        statuses.push(s.await.unwrap_or(0));
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 8, "{statuses:?}");
    // A refused upload is answered 429 before its body is read; a client still writing it may
    // see the connection close first (0 here) instead of reading that answer.
    assert_eq!(statuses.iter().filter(|s| **s == 429 || **s == 0).count(), 12, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_are_told_apart_on_serving_workers() {
    let upstream = mock(MockConfig::default()).await;
    let serve = ServeOptions {
        header_read_timeout: Duration::from_secs(1),
        drain_delay: Duration::ZERO,
        workers: 2,
        ..ServeOptions::default()
    };
    let proxy = serving(&upstream.url(), Options::default(), serve).await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let body = load::chat_body(1).to_string();
    // HTTP/2 with prior knowledge (no TLS), then HTTP/1.1.
    for (client, version) in [
        (reqwest::Client::builder().http2_prior_knowledge().build(), http::Version::HTTP_2),
        (reqwest::Client::builder().http1_only().build(), http::Version::HTTP_11),
    ] {
        let client = client.unwrap();
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!((resp.version(), resp.status().as_u16()), (version, 200));
    }
    // An HTTP/1.1 request whose first byte arrives alone (a `P` could still open the HTTP/2
    // preface): the pause only splits the bytes into two segments.
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = conn.set_nodelay(true);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(&request.as_bytes()[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(&request.as_bytes()[1..]).await.unwrap();
    let answer = read_until_closed(&mut conn, Duration::from_secs(20)).await.unwrap_or_default();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // A connection that never says anything is closed after the header read timeout.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    assert!(read_until_closed(&mut silent, Duration::from_secs(20)).await.is_some());
    assert!(start.elapsed() < Duration::from_secs(15), "closed only after {:?}", start.elapsed());
    assert_eq!(upstream.mock.seen().len(), 3);
}

/// An HTTP/2 upstream that allows two streams per connection, and a proxy told to put at most
/// two on one: six streams at once all run at once, over HTTP/2 and three connections or more
/// (hyper's pool alone keeps one connection per host and queues the other four inside it), and
/// the next six reuse those connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstreams_get_another_connection_past_the_stream_cap_not_a_queue() {
    let upstream = mock(MockConfig {
        http2_max_streams: Some(2),
        chunk_delay: Duration::from_millis(300),
        completion_tokens: 4,
        ..MockConfig::default()
    })
    .await;
    let fields = ", protocol: http2, maxStreamsPerConnection: 2";
    let manifest = manifest_with(&upstream.url(), fields, "{requestsPerMinute: 6000}", "");
    let proxy = TestProxy::start(&manifest, None).await;
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    let url = proxy.url("/chat/completions");
    let round = || async {
        let streams = futures_util::future::join_all((0..6).map(|_| stream(&url, &body))).await;
        for s in streams {
            assert_eq!(s.status, 200, "{}", s.text);
            assert!(!s.broke && s.text.contains("[DONE]"), "{}", s.text);
        }
    };
    round().await;
    let stats = upstream.mock.stats();
    assert_eq!(stats.http2_requests, 6, "the upstream was spoken to in HTTP/2");
    assert_eq!(stats.max_inflight, 6, "all six streams ran at once, none queued behind the cap");
    assert!(
        stats.connections >= 3,
        "six streams at two per connection took {} connections",
        stats.connections
    );
    round().await;
    let again = upstream.mock.stats();
    assert_eq!(again.http2_requests, 12);
    assert_eq!(again.connections, stats.connections, "the second round reused the connections");
}

/// What an HTTP/2 client without TLS opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame: its 9-byte header, then `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A HEADERS frame (END_STREAM, END_HEADERS) for `GET path`, every field a literal without
/// indexing (short names and values only).
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", "x")] {
        block.push(0);
        for s in [name, value] {
            block.push(u8::try_from(s.len()).unwrap());
            block.extend_from_slice(s.as_bytes());
        }
    }
    h2_frame(1, 0x5, stream, &block)
}

/// Eight HTTP/2 connections that send the preface (half of them a SETTINGS frame too) and
/// nothing else must not hold `--max-connections 8` for good: each is told to go away once the
/// header read timeout passes with no request, and the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_that_never_ask_are_closed_and_free_their_slots() {
    let upstream = mock(MockConfig::default()).await;
    let serve = ServeOptions {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(2),
        drain_delay: Duration::ZERO,
        ..ServeOptions::default()
    };
    let proxy = serving(&upstream.url(), Options::default(), serve).await;
    let start = Instant::now();
    let mut silent = Vec::new();
    for i in 0..8 {
        let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
        conn.write_all(H2_PREFACE).await.unwrap();
        if i % 2 == 1 {
            conn.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
        }
        silent.push(conn);
    }
    // The cap is full: this one waits in the backlog until a silent connection is closed.
    let url = proxy.url("/models");
    let next = tokio::spawn(async move {
        let client = reqwest::Client::builder().http2_prior_knowledge().build().ok()?;
        Some(client.get(&url).send().await.ok()?.status().as_u16())
    });
    for (i, conn) in silent.iter_mut().enumerate() {
        let closed = read_until_closed(conn, Duration::from_secs(30)).await;
        assert!(closed.is_some(), "silent HTTP/2 connection {i} stayed open past 30 s");
    }
    // The timeout is 2 s: a generous bound for a loaded machine.
    assert!(start.elapsed() < Duration::from_secs(20), "closed only after {:?}", start.elapsed());
    let status = tokio::time::timeout(Duration::from_secs(20), next).await;
    let status = status.expect("the next client was not served").ok().flatten();
    assert_eq!(status, Some(200));
}

/// HTTP/2 gets HTTP/1.1's bounds: an idle connection (its one request answered, pings
/// answered) is told to go away after the header read timeout; a peer that stops answering
/// pings while its stream waits is dropped; headers are capped at 8 KiB in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_bounded_like_http1() {
    let upstream = mock(MockConfig::default()).await;
    let serve = ServeOptions {
        header_read_timeout: Duration::from_secs(2),
        drain_delay: Duration::ZERO,
        ..ServeOptions::default()
    };
    let proxy = serving(&upstream.url(), Options::default(), serve).await;

    // Idle after one answer: the h2 client answers pings and keeps its handle, so only the
    // server's idle timeout can end the connection.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/v1/models", proxy.addr)).body(()).unwrap();
    let (answer, _) = send.send_request(req, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open past 30 s");
    assert!(start.elapsed() < Duration::from_secs(20), "closed only after {:?}", start.elapsed());
    drop(send);

    // A stream waits on a held upstream while its peer reads nothing, so answers no ping.
    upstream.mock.hold();
    let mut mute = TcpStream::connect(proxy.addr).await.unwrap();
    let mut opening = H2_PREFACE.to_vec();
    opening.extend(h2_frame(4, 0, 0, &[]));
    opening.extend(h2_get(1, "/v1/models"));
    // Counted before the write: the request may reach the upstream before write_all returns.
    let seen = upstream.mock.stats().requests;
    mute.write_all(&opening).await.unwrap();
    eventually("the request to reach the upstream", Duration::from_secs(10), || async {
        (upstream.mock.stats().requests > seen).then_some(())
    })
    .await;
    let start = Instant::now();
    let closed = read_until_closed(&mut mute, Duration::from_secs(30)).await;
    assert!(closed.is_some(), "a peer that answers no ping kept its connection past 30 s");
    assert!(start.elapsed() < Duration::from_secs(20), "closed only after {:?}", start.elapsed());
    upstream.mock.release();

    // Header blocks: 4 KiB pass, 12 KiB do not, in either protocol.
    let url = proxy.url("/models");
    for (client, version) in [
        (reqwest::Client::builder().http2_prior_knowledge().build(), "HTTP/2"),
        (reqwest::Client::builder().http1_only().build(), "HTTP/1.1"),
    ] {
        let client = client.unwrap();
        let get = |pad: usize| client.get(&url).header("x-pad", "a".repeat(pad)).send();
        let small = get(4 << 10).await.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(small, 200, "{version}: 4 KiB of headers");
        let seen = upstream.mock.stats().requests;
        let large = get(12 << 10).await.map(|r| r.status().as_u16()).unwrap_or(0);
        assert!(large == 431 || large == 0, "{version}: 12 KiB of headers got {large}");
        assert_eq!(upstream.mock.stats().requests, seen, "{version}: 12 KiB of headers reached the upstream");
    }
}
