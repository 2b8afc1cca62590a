//! Proxies for tests: in-process (fast, inspectable) or as the real `llmproxy` binary (signals,
//! logs, hot reload, same PID), both in front of the in-process mock upstream.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use llmproxy_mock::{MockConfig, MockServer};
use llmproxy_proxy::{ApiKey, Metrics, Options, Proxy};

use super::eventually;

/// An LlmProxy manifest for `upstream`, with `spec_extra` (YAML lines, two-space indented under
/// `spec:`) appended.
pub fn manifest(upstream: &str, limits: &str, spec_extra: &str) -> String {
    manifest_with(upstream, "", limits, spec_extra)
}

/// As [`manifest`], with `upstream_fields` (`, field: value` pairs) after the upstream's URL.
pub fn manifest_with(upstream: &str, upstream_fields: &str, limits: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: test}}\nspec:\n  upstream: {{url: '{upstream}'{upstream_fields}}}\n  limits: {limits}\n{spec_extra}"
    )
}

/// Start a mock upstream on loopback.
pub async fn mock(config: MockConfig) -> MockServer {
    MockServer::start_local(config).await.expect("mock upstream")
}

/// A proxy running in this process.
pub struct TestProxy {
    /// Shared state, for reloads and inspection.
    pub proxy: Arc<Proxy>,
    /// API address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), llmproxy_proxy::Error>>>,
}

impl TestProxy {
    /// Serve `manifest` with `key` as the upstream key.
    pub async fn start(manifest: &str, key: Option<&str>) -> Self {
        Self::start_with(manifest, key, Options::default()).await
    }

    /// As `start`, with process options.
    pub async fn start_with(manifest: &str, key: Option<&str>, options: Options) -> Self {
        let serve = llmproxy_proxy::ServeOptions { drain_delay: Duration::ZERO, ..Default::default() };
        Self::start_serving(manifest, key, options, serve).await
    }

    /// As `start`, with process and connection options.
    pub async fn start_serving(
        manifest: &str,
        key: Option<&str>,
        options: Options,
        serve: llmproxy_proxy::ServeOptions,
    ) -> Self {
        let (_, policy) = llmproxy_api::from_yaml(manifest).unwrap_or_else(|e| panic!("test manifest: {e}"));
        let metrics = Metrics::new(Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let proxy = Proxy::new(policy, metrics, options);
        proxy.set_api_key(key.and_then(ApiKey::new));
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (api.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(llmproxy_proxy::serve(Arc::clone(&proxy), api, admin, serve, async move {
            let _ = stopped.await;
        }));
        Self { proxy, addr, admin: admin_addr, stop: Some(stop), task: Some(task) }
    }

    /// `http://addr/v1` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/v1{path}", self.addr)
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        get_text(&format!("http://{}/metrics", self.admin)).await
    }

    /// Stop serving and wait for in-flight requests.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// GET a URL's body as text ("" on any error).
pub async fn get_text(url: &str) -> String {
    match llmproxy_mock::load::client().get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Send a JSON POST; the response, body unread.
async fn send_json(url: &str, body: &serde_json::Value) -> reqwest::Response {
    llmproxy_mock::load::client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// POST JSON; returns status, headers and body text.
pub async fn post_json(url: &str, body: &serde_json::Value) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = send_json(url, body).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap_or_default())
}

/// A streamed answer as the client saw it.
pub struct Streamed {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Every byte received, as text.
    pub text: String,
    /// Whether the body ended in an error rather than cleanly.
    pub broke: bool,
    /// When the first chunk arrived.
    pub first_chunk_at: Option<tokio::time::Instant>,
}

/// POST `body` and read the answer chunk by chunk.
pub async fn stream(url: &str, body: &serde_json::Value) -> Streamed {
    use futures_util::StreamExt;
    let resp = send_json(url, body).await;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let mut chunks = resp.bytes_stream();
    let (mut bytes, mut broke, mut first_chunk_at) = (Vec::new(), false, None);
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(c) => {
                first_chunk_at.get_or_insert_with(tokio::time::Instant::now);
                bytes.extend_from_slice(&c);
            }
            Err(_) => broke = true,
        }
    }
    Streamed { status, headers, text: String::from_utf8_lossy(&bytes).into_owned(), broke, first_chunk_at }
}

/// Send `request` (a whole HTTP/1.1 request, sent byte for byte as written: no client
/// normalises its path) and read the answer until the server closes; returns status and body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The sum of a metric's samples (`name{labels} value`) whose labels include the ones given:
/// `metric(text, "llmproxy_requests_total{outcome=\"ok\"}")` counts every client's.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    let (name, wanted) = match name_and_labels.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (name_and_labels, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let have: Vec<&str> = labels.split(',').collect();
            (n == name && wanted.iter().all(|w| have.contains(w))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The real `llmproxy` binary, killed on drop; stderr (its logs) goes to a file.
pub struct ProxyProcess {
    child: Child,
    /// Where the API listens.
    pub addr: SocketAddr,
    /// Where the admin endpoints listen.
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free loopback address (the port may be taken again before use; tests accept that).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("no free port")
}

impl ProxyProcess {
    /// `llmproxy proxy --config <manifest file>` with extra args and env; waits for /readyz.
    pub async fn start(manifest_path: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let path = manifest_path.display().to_string();
        let mut all = vec!["proxy", "--config", path.as_str()];
        all.extend_from_slice(args);
        Self::start_with_args(&all, env).await
    }

    /// `llmproxy <args> --listen .. --admin-listen ..` with `env`; waits for /readyz.
    pub async fn start_with_args(args: &[&str], env: &[(&str, &str)]) -> Self {
        // A free port may be taken before the process binds it (it then exits): other ports.
        for _ in 0..5 {
            let mut p = Self::spawn(args, env);
            let ready = format!("http://{}/readyz", p.admin);
            let up = eventually("the proxy process to be ready", Duration::from_secs(30), || {
                let ready = ready.clone();
                let exited = p.child.try_wait().ok().flatten();
                let logs = p.logs();
                async move {
                    if exited.is_some() && logs.contains("Address already in use") {
                        return Some(false);
                    }
                    assert!(exited.is_none(), "llmproxy exited early: {exited:?}\n{logs}");
                    (get_text(&ready).await == "ok").then_some(true)
                }
            })
            .await;
            if up {
                return p;
            }
        }
        panic!("llmproxy found no free ports in five tries");
    }

    /// As `start_with_args`, without waiting for readiness.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy.log");
        let (addr, admin) = (free_addr(), free_addr());
        let stderr = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmproxy"));
        cmd.args(args)
            .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string()])
            .env_remove("LLMPROXY_UPSTREAM_API_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("starting llmproxy");
        Self { child, addr, admin, log, _dir: dir }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://addr/v1` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/v1{path}", self.addr)
    }

    /// Send SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM failed");
    }

    /// Wait for the process to exit (polling with a deadline); returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = &mut self.child;
        let mut status = None;
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        status.and_then(|s| s.code())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mock upstream as its own `llmproxy mock-upstream` process, to be killed and restarted
/// on the same address (what an upstream outage looks like to the proxy).
pub struct MockProcess {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    args: Vec<String>,
}

impl MockProcess {
    /// Start one on a free port with extra `mock-upstream` flags; waits until it answers.
    pub async fn start(args: &[&str]) -> Self {
        let mut m =
            Self { child: None, addr: free_addr(), args: args.iter().map(|a| (*a).to_owned()).collect() };
        m.restart().await;
        m
    }

    /// `http://addr/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Kill it at once (SIGKILL): connections are refused until it is restarted.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same address (its counters start from zero).
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .arg("mock-upstream")
            .args(["--listen", &self.addr.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the mock");
        self.child = Some(child);
        let url = format!("http://{}/mock/stats", self.addr);
        eventually("the mock process to answer", Duration::from_secs(20), || {
            let url = url.clone();
            async move { (!get_text(&url).await.is_empty()).then_some(()) }
        })
        .await;
    }

    /// Its counters (`/mock/stats`).
    pub async fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&get_text(&format!("http://{}/mock/stats", self.addr)).await).unwrap_or_default()
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
