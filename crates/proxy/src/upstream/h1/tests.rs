//! The client against real sockets: a loopback server that answers in pieces, closes, refuses.

use super::*;
use http::Version;
use http::header::HeaderValue;
use http_body_util::BodyExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

struct Server {
    to: Authority,
    /// Connections accepted, and closed by the server.
    conns: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

/// A server that answers each connection's requests with `answers` (an empty one: read the
/// request and close without answering), written in pieces `split` bytes long.
async fn server(answers: Vec<&'static [u8]>, split: usize) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (conns, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, closing) = (Arc::clone(&conns), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let (answers, closing) = (answers.clone(), Arc::clone(&closing));
            tokio::spawn(async move {
                answer_all(sock, &answers, split).await;
                closing.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    let to = Authority::try_from(addr.to_string().as_str()).unwrap_or_else(|e| panic!("{e}"));
    Server { to, conns, closed }
}

async fn answer_all(mut sock: tokio::net::TcpStream, answers: &[&'static [u8]], split: usize) {
    for answer in answers {
        let mut req = Vec::new();
        let mut b = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&b[..n]),
            }
        }
        for piece in answer.chunks(split.max(1)) {
            if sock.write_all(piece).await.is_err() {
                return;
            }
            let _ = sock.flush().await;
            tokio::task::yield_now().await;
        }
        if answer.is_empty() {
            return;
        }
    }
}

fn request(to: &Authority, path: &str) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::new(Full::new(Bytes::from_static(b"{\"a\":1}")));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("http://{to}{path}").parse().unwrap_or_else(|e| panic!("{e}"));
    req
}

async fn body_of(resp: http::Response<Body>) -> Result<Vec<u8>, Error> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ntrailer: x\r\n\r\n";
const LENGTH: &[u8] =
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world";

#[tokio::test]
async fn chunked_and_sized_answers_read_whole_in_any_pieces_and_reuse_the_connection() {
    for split in [1, 3, 7, 1000] {
        let Server { to, conns, .. } = server(vec![CHUNKED, LENGTH, CHUNKED], split).await;
        let idle = Arc::new(Idle::default());
        for want in [&b"hello, world"[..], b"hello world", b"hello, world"] {
            let resp = send(&idle, Duration::from_secs(5), request(&to, "/v1/x")).await;
            let resp = resp.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.status(), 200);
            assert!(resp.headers().get("trailer").is_none());
            assert_eq!(body_of(resp).await.unwrap_or_else(|e| panic!("{e}")), want, "split {split}");
        }
        assert_eq!(conns.load(Ordering::Relaxed), 1, "one connection for all three");
        assert_eq!(idle.count(&to), 1);
    }
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_replaced_unseen() {
    // One answer per connection, then the server closes it.
    let Server { to, conns, closed } = server(vec![LENGTH], 5).await;
    let idle = Arc::new(Idle::default());
    for i in 0..3 {
        let resp = send(&idle, Duration::from_secs(5), request(&to, "/")).await;
        let body = body_of(resp.unwrap_or_else(|e| panic!("{e}"))).await;
        assert_eq!(body.unwrap_or_else(|e| panic!("{e}")), b"hello world");
        assert_eq!(idle.count(&to), 1, "kept: the answer allowed it");
        until(|| closed.load(Ordering::Relaxed) > i).await;
    }
    assert_eq!(conns.load(Ordering::Relaxed), 3);
}

/// Wait (a few seconds at most) for `done`.
async fn until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_post_the_server_may_have_read_is_not_sent_again_but_a_get_is() {
    // The first request is answered and the connection kept; the second is read, and the
    // connection closed without an answer (the server crashed, or closed it as it came).
    for (method, resent) in [(Method::POST, false), (Method::GET, true)] {
        let Server { to, conns, .. } = server(vec![LENGTH, b""], 1000).await;
        let idle = Arc::new(Idle::default());
        let first = send(&idle, Duration::from_secs(5), request(&to, "/")).await;
        assert!(body_of(first.unwrap_or_else(|e| panic!("{e}"))).await.is_ok());
        let mut again = request(&to, "/");
        *again.method_mut() = method.clone();
        let second = send(&idle, Duration::from_secs(5), again).await;
        match second {
            Ok(resp) => {
                assert!(resent, "{method}: answered");
                assert_eq!(body_of(resp).await.unwrap_or_else(|e| panic!("{e}")), b"hello world");
                assert_eq!(conns.load(Ordering::Relaxed), 2, "{method}: sent again on a new connection");
            }
            Err(e) => {
                assert!(!resent && !e.is_connect(), "{method}: {e}");
                assert_eq!(conns.load(Ordering::Relaxed), 1, "{method}: not sent again");
            }
        }
    }
}

#[tokio::test]
async fn an_upload_goes_on_past_a_100_continue() {
    // The server says `100 Continue` at once, reads the whole body, then answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    const SIZE: usize = 8 << 20;
    tokio::spawn(async move {
        let Ok((mut sock, _)) = listener.accept().await else { return };
        let _ = sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        let mut got = Vec::new();
        let mut b = vec![0u8; 64 << 10];
        // The head and the body: more than the body alone.
        while got.len() < SIZE {
            match sock.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
        let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    });
    let to = Authority::try_from(addr.to_string().as_str()).unwrap_or_else(|e| panic!("{e}"));
    let mut req = request(&to, "/");
    *req.body_mut() = Full::new(Bytes::from(vec![b'x'; SIZE]));
    req.headers_mut().insert(header::EXPECT, HeaderValue::from_static("100-continue"));
    let resp = send(&Arc::new(Idle::default()), Duration::from_secs(10), req).await;
    let resp = resp.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    assert_eq!(body_of(resp).await.unwrap_or_else(|e| panic!("{e}")), b"ok");
}

#[tokio::test]
async fn broken_answers_are_errors_not_hangs() {
    let cases: [(&'static [u8], &str); 9] = [
        (b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.0"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello", "invalid content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nhello", "invalid content-length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "chunked framing"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff\r\n", "chunked framing"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n", "longer than its size"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "before the end"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "head is invalid"),
        (b"garbage\r\n\r\n", "head is invalid"),
    ];
    for (answer, want) in cases {
        let Server { to, .. } = server(vec![answer], 1000).await;
        let idle = Arc::new(Idle::default());
        let err = match send(&idle, Duration::from_secs(5), request(&to, "/")).await {
            Ok(resp) => body_of(resp).await.err(),
            Err(e) => Some(e),
        };
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(answer));
        assert_eq!(idle.count(&to), 0, "a broken connection is not reused");
    }
    // A head that never ends is cut off at 64 KiB.
    let huge: &'static [u8] = Box::leak(
        [
            &b"HTTP/1.1 200 OK\r\n"[..],
            &b"x-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(2000),
        ]
        .concat()
        .into_boxed_slice(),
    );
    let Server { to, .. } = server(vec![huge], 8192).await;
    let err = send(&Arc::new(Idle::default()), Duration::from_secs(5), request(&to, "/")).await.err();
    assert!(err.is_some_and(
        |e| e.to_string().contains("larger than 64 KiB") || e.to_string().contains("invalid")
    ));
}

#[tokio::test]
async fn an_answer_before_the_whole_upload_is_read_and_relayed() {
    // The server reads the head only, refuses, and closes with the body unread.
    let refusal: &'static [u8] =
        b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbig!";
    let Server { to, .. } = server(vec![refusal], 1000).await;
    let idle = Arc::new(Idle::default());
    let mut req = request(&to, "/");
    *req.body_mut() = Full::new(Bytes::from(vec![b'x'; 8 << 20]));
    let resp = send(&idle, Duration::from_secs(5), req).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 413);
    assert_eq!(body_of(resp).await.unwrap_or_else(|e| panic!("{e}")), b"big!");
    assert_eq!(idle.count(&to), 0);
}

#[tokio::test]
async fn close_delimited_answers_end_at_the_close_and_are_not_reused() {
    let Server { to, .. } = server(vec![b"HTTP/1.0 200 OK\r\n\r\nuntil the end"], 4).await;
    // The server task ends after its one answer, which closes the socket.
    let idle = Arc::new(Idle::default());
    let resp = send(&idle, Duration::from_secs(5), request(&to, "/")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.version(), Version::HTTP_10);
    assert_eq!(body_of(resp).await.unwrap_or_else(|e| panic!("{e}")), b"until the end");
    assert_eq!(idle.count(&to), 0);
}

#[tokio::test]
async fn refused_connections_are_connect_errors() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop(listener);
    let to = Authority::try_from(addr.to_string().as_str()).unwrap_or_else(|e| panic!("{e}"));
    let err = send(&Arc::new(Idle::default()), Duration::from_secs(5), request(&to, "/")).await.err();
    assert!(err.is_some_and(|e| e.is_connect()));
}

#[test]
fn request_heads_carry_host_and_a_recomputed_length() {
    let mut req = request(&Authority::from_static("up:8000"), "/v1/chat?x=1");
    req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
    req.headers_mut().insert("x-a", HeaderValue::from_static("b"));
    let (parts, _) = req.into_parts();
    let head = request_head(&parts, &Authority::from_static("up:8000"), 7);
    assert_eq!(
        String::from_utf8_lossy(&head),
        "POST /v1/chat?x=1 HTTP/1.1\r\nhost: up:8000\r\nx-a: b\r\ncontent-length: 7\r\n\r\n"
    );
    let mut get = http::Request::new(());
    *get.uri_mut() = "http://up/v1/models".parse().unwrap_or_else(|e| panic!("{e}"));
    let (parts, ()) = get.into_parts();
    let head = request_head(&parts, &Authority::from_static("up"), 0);
    assert_eq!(String::from_utf8_lossy(&head), "GET /v1/models HTTP/1.1\r\nhost: up\r\n\r\n");
}

#[tokio::test]
async fn an_empty_transfer_encoding_reads_to_the_close_and_is_not_reused() {
    // Not chunked, so not framed by the Content-Length either (RFC 9112 6.3): what comes
    // after five bytes is still this answer's, and the connection ends with it.
    let answer: &'static [u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: \r\ncontent-length: 5\r\n\r\nhello, and more";
    let Server { to, .. } = server(vec![answer], 7).await;
    let idle = Arc::new(Idle::default());
    let resp = send(&idle, Duration::from_secs(5), request(&to, "/")).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(resp.headers().get(header::CONTENT_LENGTH).is_none());
    assert_eq!(body_of(resp).await.unwrap_or_else(|e| panic!("{e}")), b"hello, and more");
    assert_eq!(idle.count(&to), 0, "never reused");
}
