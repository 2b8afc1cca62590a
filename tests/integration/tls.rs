//! The `https://` lane, the one every hosted provider is reached on: hyper + rustls, HTTP/2 by
//! ALPN or HTTP/1.1. A local TLS listener with a certificate from a CA made for the test stands
//! in front of the mock upstream; the proxy is the real binary, trusting that CA through
//! `SSL_CERT_FILE`. The proxy is told only the TLS address, and the lean HTTP/1.1 client speaks
//! plain TCP only, so every answer here came over a TLS handshake the listener saw.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmproxy_mock::MockConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

use crate::support::proxy_env::{ProxyProcess, manifest_with, metric, mock, post_json, stream};

/// A certificate authority made for one test.
struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}")).pem();
        Self { params, key, pem }
    }

    /// A certificate for `127.0.0.1` signed by this CA, and its key.
    fn issue(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap_or_else(|e| panic!("{e}"));
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap_or_else(|e| panic!("{e}"));
        (cert.der().clone(), PrivatePkcs8KeyDer::from(key.serialize_der()).into())
    }

    /// Its certificate as a PEM file in `dir`, for `SSL_CERT_FILE`.
    fn write(&self, dir: &Path) -> String {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).unwrap_or_else(|e| panic!("{e}"));
        path.display().to_string()
    }
}

/// A TLS listener that forwards each connection, once its handshake is done, to a plain one.
struct TlsFront {
    addr: SocketAddr,
    /// Handshakes completed, with the protocol ALPN chose for each (`-` for none).
    alpn: Arc<Mutex<Vec<String>>>,
    /// Handshakes the client broke off (it did not trust the certificate).
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    /// Serve `ca`'s certificate for 127.0.0.1, offering `alpn`, in front of `backend`.
    async fn start(ca: &Ca, alpn: &[&[u8]], backend: SocketAddr) -> Self {
        let (cert, key) = ca.issue();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
            .unwrap_or_else(|e| panic!("{e}"));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (alpn, refused) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
        let (seen, broken) = (Arc::clone(&alpn), Arc::clone(&refused));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, broken) = (acceptor.clone(), Arc::clone(&seen), Arc::clone(&broken));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        broken.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let chosen =
                        tls.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(chosen.unwrap_or_else(|| "-".into()));
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { addr, alpn, refused, task }
    }

    /// `https://127.0.0.1:port/v1`.
    fn url(&self) -> String {
        format!("https://{}/v1", self.addr)
    }

    fn alpn(&self) -> Vec<String> {
        self.alpn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 5, "stream": stream,
        "messages": [{"role": "user", "content": "Hello over TLS"}]})
}

/// The proxy binary in front of `upstream` (spoken to in `protocol`), trusting the CA in
/// `ca_file`.
async fn proxy(dir: &Path, upstream: &str, protocol: &str, ca_file: &str) -> ProxyProcess {
    let file = dir.join("llmproxy.yaml");
    let spec = "  retry: {maxAttempts: 2, initialBackoff: 50ms, maxBackoff: 100ms}\n";
    let fields = format!(", protocol: {protocol}");
    std::fs::write(&file, manifest_with(upstream, &fields, "{requestsPerMinute: 6000}", spec))
        .unwrap_or_else(|e| panic!("{e}"));
    ProxyProcess::start(&file, &[], &[("SSL_CERT_FILE", ca_file)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_and_streams_reach_a_tls_upstream_through_hyper_and_rustls() {
    let ca = Ca::new("llmproxy test CA");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ca_file = ca.write(dir.path());
    // `auto` offers HTTP/2 by ALPN and takes it; `http1` is hyper's HTTP/1.1 over TLS, which
    // offers no ALPN (`-`) and so gets TLS's default, HTTP/1.1. The lean client never serves
    // https://.
    for (protocol, offered, want) in
        [("auto", &[&b"h2"[..], b"http/1.1"][..], "h2"), ("http1", &[&b"h2"[..], b"http/1.1"][..], "-")]
    {
        let upstream = mock(MockConfig { completion_tokens: 5, ..MockConfig::default() }).await;
        let front = TlsFront::start(&ca, offered, upstream.addr).await;
        let proxy = proxy(dir.path(), &front.url(), protocol, &ca_file).await;

        let (status, _, body) = post_json(&proxy.url("/chat/completions"), &chat(false)).await;
        assert_eq!(status, 200, "{protocol}: {body}\n{}", proxy.logs());
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["object"], "chat.completion", "{body}");
        assert_eq!(v["model"], "gpt-4o-mini", "{body}");
        assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{body}");

        let got = stream(&proxy.url("/chat/completions"), &chat(true)).await;
        assert_eq!(got.status, 200, "{protocol}: {}", got.text);
        let content_type = got.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        assert!(!got.broke, "{protocol}: the stream broke: {}", got.text);
        assert!(got.text.contains("chat.completion.chunk"), "{}", got.text);
        assert!(got.text.ends_with("data: [DONE]\n\n"), "{}", got.text);

        // Both answers came through the TLS listener, in the protocol ALPN chose.
        let stats = upstream.mock.stats();
        assert_eq!(stats.ok, 2, "{protocol}: {stats:?}");
        let alpn = front.alpn();
        assert!(!alpn.is_empty() && alpn.iter().all(|p| p == want), "{protocol}: ALPN {alpn:?}, want {want}");
        let over_h2 = if want == "h2" { 2 } else { 0 };
        assert_eq!(stats.http2_requests, over_h2, "{protocol}: {stats:?}");
        let m = get_metrics(&proxy).await;
        assert_eq!(metric(&m, "llmproxy_upstream_responses_total{status=\"200\"}"), 2.0, "{m}");
        assert_eq!(metric(&m, "llmproxy_upstream_responses_total{status=\"connect_error\"}"), 0.0, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_whose_certificate_is_not_trusted_is_a_502_in_openais_shape() {
    let (trusted, other) = (Ca::new("the CA the proxy trusts"), Ca::new("a CA it does not"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ca_file = trusted.write(dir.path());
    let upstream = mock(MockConfig::default()).await;
    let front = TlsFront::start(&other, &[b"h2", b"http/1.1"], upstream.addr).await;
    let proxy = proxy(dir.path(), &front.url(), "auto", &ca_file).await;

    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        post_json(&proxy.url("/chat/completions"), &chat(false)),
    )
    .await;
    let (status, _, body) = answer.unwrap_or_else(|_| panic!("no answer within 60 s: a hang"));
    assert_eq!(status, 502, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let err = &v["error"];
    assert!(err["type"].is_string() && err.get("code").is_some() && err.get("param").is_some(), "{body}");
    let message = err["message"].as_str().unwrap_or_default();
    assert!(message.contains("certificate"), "the error says what is wrong: {message}");
    assert!(front.refused.load(Ordering::Relaxed) >= 1, "the proxy broke off the handshake");
    assert!(front.alpn().is_empty(), "no handshake completed: {:?}", front.alpn());
    assert_eq!(upstream.mock.stats().requests, 0, "nothing reached the upstream");
}

async fn get_metrics(proxy: &ProxyProcess) -> String {
    crate::support::proxy_env::get_text(&format!("http://{}/metrics", proxy.admin)).await
}
