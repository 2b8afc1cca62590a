//! `cargo bench --bench proxy`: what the proxy hop costs and how well it uses a quota, measured
//! in one run against baselines from the same run (the mock called directly, and nginx as a
//! plain reverse proxy when it is installed). Every server is a separate process on loopback.
//!
//! (a) added latency p50/p99/p99.9 at a fixed 1,000 req/s (open loop: each request sent on its
//!     own schedule), limits on but not binding and request records at 100 %, as ratios to
//!     nginx's; (a2) a cache hit against the plain nginx hop;
//! (b) the most requests per second each path sustains (64 clients back to back), as ratios to
//!     direct and to nginx; `LLMPROXY_BENCH_BASELINE=/path/to/llmproxy` adds another build's
//!     proxy to (a) and (b), an A/B in the same run;
//! (c) an overload burst of 10x the configured rate: client 429s, upstream 429s, achieved rate;
//! (d) a mixed workload, half of it repeated prompts, through the cache: upstream calls saved,
//!     latency of hits vs misses;
//! (e) a burst bound by tokens per minute (300 requests with `max_tokens: 100` from 50 naive
//!     clients) against an upstream that counts tokens as requested or as used, with the proxy
//!     counting the same way or not: client and upstream 429s, achieved / configured tokens per
//!     second, wall time vs the least the quota allows.
//! (f) memory idle and with 10,000 requests queued; (g) a quiet client's latency under a flood;
//! (h) three upstreams of unequal quota: blind round robin vs quota-aware balancing, quotas
//!     configured or learned from headers, and one upstream failing half way;
//! (i) one quota across 1, 3 and 6 replicas, a static share each vs shared through Redis, and
//!     the latency the shared limiter adds;
//! (j) 5,000 streaming responses open at once: errors, and resident memory per open stream.

// A benchmark harness, not runtime code: a failed setup step should stop the run with its error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use llmproxy_mock::load::{self, Shot, Summary};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx, stopped with SIGTERM: its master takes the workers down with it (killed outright, it
/// leaves them running).
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        for _ in 0..100 {
            if self.0.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap()
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(try_spawn(cmd).unwrap_or_else(|| panic!("could not start {cmd:?}")))
}

/// Start `cmd` with no terminal attached; `None` when it cannot be started (not installed).
fn try_spawn(cmd: &mut Command) -> Option<Child> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}

/// The bench's LlmProxy for one upstream, its spec ending with `spec_tail` (indented YAML).
fn manifest(upstream: SocketAddr, spec_tail: &str) -> String {
    manifest_with(upstream, "", spec_tail)
}

/// As [`manifest`], with `upstream_fields` (`, field: value` pairs) after the upstream's URL.
fn manifest_with(upstream: SocketAddr, upstream_fields: &str, spec_tail: &str) -> String {
    format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: bench}}\nspec:\n  upstream: {{url: 'http://{upstream}/v1'{upstream_fields}}}\n{spec_tail}"
    )
}

async fn wait_http(url: &str) {
    for _ in 0..300 {
        if load::client().get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered");
}

fn llmproxy() -> &'static str {
    env!("CARGO_BIN_EXE_llmproxy")
}

async fn start_mock(extra: &[&str]) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let p =
        spawn(Command::new(llmproxy()).args(["mock-upstream", "--listen", &addr.to_string()]).args(extra));
    wait_http(&format!("http://{addr}/mock/stats")).await;
    (p, addr)
}

async fn mock_stats(addr: SocketAddr) -> serde_json::Value {
    let resp = load::client().get(format!("http://{addr}/mock/stats")).send().await;
    match resp {
        Ok(r) => serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

async fn start_proxy(
    dir: &Path,
    upstream: SocketAddr,
    limits: &str,
    queue: &str,
) -> (Proc, SocketAddr, SocketAddr) {
    start_proxy_with(dir, upstream, &format!("  limits: {limits}\n  queue: {queue}\n"), &[]).await
}

/// A proxy whose spec ends with `spec_tail` (indented YAML), with extra arguments.
async fn start_proxy_with(
    dir: &Path,
    upstream: SocketAddr,
    spec_tail: &str,
    args: &[&str],
) -> (Proc, SocketAddr, SocketAddr) {
    let file = dir.join(format!("proxy-{}.yaml", upstream.port()));
    run_proxy(&file, &manifest(upstream, spec_tail), args).await
}

/// `llmproxy proxy --config FILE` (written with `manifest`) on free ports with extra `args`,
/// ready; its API and admin addresses.
async fn run_proxy(file: &Path, manifest: &str, args: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    // LLMPROXY_BENCH_PROXY=/path/to/an/older/llmproxy: A/B another build's proxy against the
    // same mock, load and baselines.
    let bin = std::env::var("LLMPROXY_BENCH_PROXY").unwrap_or_else(|_| llmproxy().to_owned());
    run_proxy_bin(&bin, file, manifest, args).await
}

/// As [`run_proxy`], with the proxy binary `bin`.
async fn run_proxy_bin(
    bin: &str,
    file: &Path,
    manifest: &str,
    args: &[&str],
) -> (Proc, SocketAddr, SocketAddr) {
    std::fs::write(file, manifest).unwrap();
    let (addr, admin) = (free_addr(), free_addr());
    let p = spawn(
        Command::new(bin)
            .arg("proxy")
            .arg("--config")
            .arg(file)
            .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string()])
            .args(args),
    );
    wait_http(&format!("http://{admin}/readyz")).await;
    (p, addr, admin)
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

async fn start_nginx(dir: &Path, upstream: SocketAddr) -> Option<(Nginx, SocketAddr)> {
    let bin = nginx_binary()?;
    let addr = free_addr();
    let d = dir.display();
    let conf = format!(
        "worker_processes 2; daemon off; pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream mock {{ server {upstream}; keepalive 256; }}
  server {{
    listen {addr};
    location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}
  }}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let p = Nginx(try_spawn(Command::new(bin).arg("-p").arg(dir).arg("-c").arg(&path))?);
    wait_http(&format!("http://{addr}/v1/models")).await;
    Some((p, addr))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p99 and p99.9 of the 200s, and how many shots were not 200.
fn latency(shots: &[Shot]) -> ([Duration; 3], usize) {
    let mut lat: Vec<Duration> = shots.iter().filter(|s| s.status == Some(200)).map(|s| s.latency).collect();
    lat.sort();
    let p = |q| load::percentile(&lat, q);
    ([p(50.0), p(99.0), p(99.9)], shots.len() - lat.len())
}

/// A second llmproxy build to measure beside this one in the hop table (an A/B in one run).
fn baseline_build() -> Option<String> {
    std::env::var("LLMPROXY_BENCH_BASELINE").ok().filter(|p| Path::new(p).is_file())
}

#[allow(clippy::print_stdout, clippy::cast_precision_loss, clippy::too_many_lines)]
async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let client = load::client();
    let (_mock, mock_addr) = start_mock(&[]).await;
    // Limits on but not binding; request records at 100 % (the default), as an auditing user
    // runs them.
    let on = "{requestsPerMinute: 100000000, tokensPerMinute: 10000000000, maxConcurrent: 100000}";
    let queue = "{maxSize: 100000, maxWait: 60s}";
    let plain = format!("  limits: {on}\n  queue: {queue}\n");
    let (_proxy, proxy_addr, _) = start_proxy(dir.path(), mock_addr, on, queue).await;
    let nginx = start_nginx(dir.path(), mock_addr).await;
    let mut targets = vec![("direct".to_owned(), mock_addr)];
    if let Some((_, addr)) = &nginx {
        targets.push(("nginx".to_owned(), *addr));
    }
    targets.push(("llmproxy".to_owned(), proxy_addr));
    let mut _baseline = None;
    if let Some(bin) = baseline_build() {
        let file = dir.path().join("baseline.yaml");
        let (p, addr, _) = run_proxy_bin(&bin, &file, &manifest(mock_addr, &plain), &[]).await;
        _baseline = Some(p);
        targets.push(("llmproxy (baseline build)".to_owned(), addr));
    }
    let url = |addr: &SocketAddr| format!("http://{addr}/v1/chat/completions");

    // Warm up connection pools.
    for (_, addr) in &targets {
        let _ = load::constant_rate(&client, &url(addr), 200.0, Duration::from_millis(500)).await;
    }

    println!("## (a) latency at 1,000 req/s for 8 s (open loop: every request sent on its own schedule)\n");
    println!(
        "| path | p50 ms | p99 ms | p99.9 ms | errors | added p50 ms | added p99 ms | added p99.9 ms | added p50 / nginx's | added p99 / nginx's |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut base = None;
    let mut nginx_added = None;
    let mut nginx_total = None;
    for (name, addr) in &targets {
        let (shots, _) = load::constant_rate(&client, &url(addr), 1000.0, Duration::from_secs(8)).await;
        let (p, errors) = latency(&shots);
        let b = *base.get_or_insert(p);
        let added = [0, 1, 2].map(|i| ms(p[i]) - ms(b[i]));
        if name == "nginx" {
            nginx_added = Some(added);
            nginx_total = Some(p);
        }
        let ratio = |i: usize| match nginx_added {
            // Only where nginx adds anything measurable: on a busy machine its added tail can
            // come out below zero, and a ratio to that says nothing.
            Some(n) if name != "direct" && n[i] >= 0.005 => format!("{:.2}", added[i] / n[i]),
            _ => "-".to_owned(),
        };
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {errors} | {:.3} | {:.3} | {:.3} | {} | {} |",
            ms(p[0]),
            ms(p[1]),
            ms(p[2]),
            added[0],
            added[1],
            added[2],
            ratio(0),
            ratio(1),
        );
    }
    println!("\nGoal: added p50 <= 2x nginx's; added p99 <= 0.4 ms and <= 3x nginx's.");

    println!("\n## (b) most requests per second, 64 clients back to back for 5 s\n");
    println!("| path | req/s | ratio to direct | ratio to nginx | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut direct_rps = None;
    let mut nginx_rps = None;
    for (name, addr) in &targets {
        let (shots, wall) = load::saturate(&client, &url(addr), 64, Duration::from_secs(5)).await;
        let s = Summary::of(&shots, wall);
        let rps = s.ok as f64 / wall.as_secs_f64();
        let base = *direct_rps.get_or_insert(rps);
        if name == "nginx" {
            nginx_rps = Some(rps);
        }
        let to_nginx =
            nginx_rps.filter(|_| name != "direct").map_or("-".to_owned(), |n| format!("{:.2}", rps / n));
        println!(
            "| {name} | {rps:.0} | {:.2} | {to_nginx} | {:.3} | {:.3} |",
            rps / base,
            ms(s.p50),
            ms(s.p99)
        );
    }
    println!("\nGoal: llmproxy >= 0.7x nginx's requests per second.");

    println!("\n## (a2) a cache hit vs the plain nginx hop, 1,000 req/s for 5 s\n");
    let cached = manifest(mock_addr, &format!("{plain}  cache: {{ttl: 10m}}\n"));
    let (_cp, cp_addr, _) = run_proxy(&dir.path().join("cached.yaml"), &cached, &[]).await;
    let same = |_| load::chat_body(7);
    let _ = load::constant_rate_with(&client, &url(&cp_addr), 200.0, Duration::from_millis(500), same).await;
    let (shots, _) =
        load::constant_rate_with(&client, &url(&cp_addr), 1000.0, Duration::from_secs(5), same).await;
    let hits = shots.iter().filter(|s| s.from_cache).count();
    let (hit, errors) = latency(&shots);
    println!("| path | p50 ms | p99 ms | p99.9 ms | errors | hits |");
    println!("|---|---|---|---|---|---|");
    if let Some(n) = nginx_total {
        println!("| nginx hop (from (a)) | {:.3} | {:.3} | {:.3} | 0 | - |", ms(n[0]), ms(n[1]), ms(n[2]));
    }
    println!(
        "| llmproxy cache hit | {:.3} | {:.3} | {:.3} | {errors} | {hits} of {} |",
        ms(hit[0]),
        ms(hit[1]),
        ms(hit[2]),
        shots.len()
    );
    if let Some(n) = nginx_total {
        println!(
            "\nCache hit / nginx hop: p50 {:.2}, p99 {:.2} (goal: <= 1).",
            ms(hit[0]) / ms(n[0]),
            ms(hit[1]) / ms(n[1])
        );
    }

    println!("\n## (c) overload: 1,000 req/s for 1 s against a 6,000 RPM (100/s) quota\n");
    let (_limited, limited_addr) = start_mock(&["--rpm", "6000"]).await;
    let (_lp, lp_addr, _) = start_proxy(
        dir.path(),
        limited_addr,
        "{requestsPerMinute: 6000}",
        "{maxSize: 100000, maxWait: 120s}",
    )
    .await;
    let stats = |addr: SocketAddr| async move { mock_stats(addr).await["rate_limited"].as_u64() };
    println!("| path | requests | ok | client 429s | upstream 429s | wall s | achieved / configured rate |");
    println!("|---|---|---|---|---|---|---|");
    for (name, addr) in [("direct", limited_addr), ("llmproxy", lp_addr)] {
        tokio::time::sleep(Duration::from_secs(2)).await; // let the quota refill between rounds
        let before = stats(limited_addr).await.unwrap_or(0);
        let (shots, wall) = load::constant_rate(&client, &url(&addr), 1000.0, Duration::from_secs(1)).await;
        let s = Summary::of(&shots, wall);
        let upstream_429 = stats(limited_addr).await.unwrap_or(0) - before;
        // The first second's burst (100) is free; the rest is paced at 100/s.
        let achieved = (s.ok.saturating_sub(100)) as f64 / (wall.as_secs_f64() - 0.0).max(1e-9);
        println!(
            "| {name} | {} | {} | {} | {upstream_429} | {:.2} | {:.3} |",
            shots.len(),
            s.ok,
            s.rate_limited,
            wall.as_secs_f64(),
            achieved / 100.0
        );
    }
}

/// Even requests repeat one of 25 prompts; odd ones are unique.
fn half_repeated(i: usize) -> serde_json::Value {
    if i.is_multiple_of(2) { load::chat_body(1_000_000 + (i / 2) % 25) } else { load::chat_body(i) }
}

#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn cache_workload(dir: &Path) {
    println!(
        "\n## (d) 1,000 requests at 200 req/s, half of them repeating 25 prompts; upstream answers in 100 ms\n"
    );
    let (_slow, slow_addr) = start_mock(&["--latency-ms", "100"]).await;
    let manifest_queue = "{maxSize: 100000, maxWait: 60s}\n  cache: {ttl: 5m}";
    let (_cp, cp_addr, _) =
        start_proxy(dir, slow_addr, "{requestsPerMinute: 100000000, maxConcurrent: 100000}", manifest_queue)
            .await;
    let client = load::client();
    let (shots, _) = load::constant_rate_with(
        &client,
        &format!("http://{cp_addr}/v1/chat/completions"),
        200.0,
        Duration::from_secs(5),
        half_repeated,
    )
    .await;
    let text = client.get(format!("http://{slow_addr}/mock/stats")).send().await.ok();
    let upstream: u64 = match text {
        Some(r) => serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap_or_default())
            .ok()
            .and_then(|v| v["requests"].as_u64())
            .unwrap_or(0),
        None => 0,
    };
    let (hits, misses): (Vec<Shot>, Vec<Shot>) = shots.iter().partition(|s| s.from_cache);
    let ([h50, h99, _], _) = latency(&hits);
    let ([m50, m99, _], _) = latency(&misses);
    println!("| requests | upstream calls | saved | hit p50 ms | hit p99 ms | miss p50 ms | miss p99 ms |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {upstream} | {:.1} % | {:.3} | {:.3} | {:.3} | {:.3} |",
        shots.len(),
        100.0 * (1.0 - upstream as f64 / shots.len().max(1) as f64),
        ms(h50),
        ms(h99),
        ms(m50),
        ms(m99)
    );
}

async fn metric_value(admin: SocketAddr, name: &str) -> f64 {
    let text = match load::client().get(format!("http://{admin}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return f64::NAN,
    };
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn memory_workload(dir: &Path) {
    println!("\n## (f) memory: RSS idle, and with 10,000 requests waiting in the queue\n");
    let (_mock, mock_addr) = start_mock(&[]).await;
    // One request a minute: everything after the first waits.
    let (proxy, addr, admin) =
        start_proxy(dir, mock_addr, "{requestsPerMinute: 1}", "{maxSize: 20000, maxWait: 10m}").await;
    let pid = proxy.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = load::rss_bytes(pid) as f64 / f64::from(1 << 20);
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap_or_default();
    let url = format!("http://{addr}/v1/chat/completions");
    let waiting: Vec<_> = (0..10_000)
        .map(|i| {
            let req = client
                .post(&url)
                .header("content-type", "application/json")
                .body(load::chat_body(i).to_string());
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    let mut depth = 0.0;
    for _ in 0..600 {
        depth = metric_value(admin, "llmproxy_queue_depth").await;
        if depth >= 9_999.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued = load::rss_bytes(pid) as f64 / f64::from(1 << 20);
    println!("| state | RSS MiB | goal |");
    println!("|---|---|---|");
    println!("| idle | {idle:.1} | <= 20 |");
    println!("| {depth:.0} requests queued | {queued:.1} | <= 150 |");
    drop(proxy);
    for w in waiting {
        w.abort();
    }
}

/// One streaming request read to its end: whether it came back 200 with every event and the
/// closing `[DONE]`.
async fn one_stream(client: reqwest::Client, url: String, i: usize) -> bool {
    let mut body = load::chat_body(i);
    body["stream"] = serde_json::Value::Bool(true);
    let sent =
        client.post(&url).header("content-type", "application/json").body(body.to_string()).send().await;
    let Ok(resp) = sent else { return false };
    if resp.status() != 200 {
        return false;
    }
    resp.text().await.is_ok_and(|t| t.trim_end().ends_with("data: [DONE]"))
}

#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn streams_workload(dir: &Path) {
    const STREAMS: usize = 5_000;
    println!(
        "\n## (j) {STREAMS} streaming responses open at once (the mock sends a chunk every 500 ms, 40 chunks)\n"
    );
    println!(
        "| upstream spoken to in | streams | most open at once | completed whole | errors | RSS before MiB | peak RSS MiB | KiB per open stream | goal |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // HTTP/1.1: a connection per stream on both sides. HTTP/2 (h2c here; the hosted APIs
    // negotiate it over TLS): the upstream side shares connections, 100 streams to each.
    for (protocol, upstream_extra) in [("HTTP/1.1", ""), ("HTTP/2", ", protocol: http2")] {
        let (_mock, mock_addr) = start_mock(&["--chunk-delay-ms", "500", "--completion-tokens", "40"]).await;
        let tail = "  limits: {requestsPerMinute: 100000000, maxConcurrent: 100000}\n  queue: {maxSize: 100000, maxWait: 60s}\n";
        let spec = manifest_with(mock_addr, upstream_extra, tail);
        let file = dir.join(format!("streams-{}.yaml", mock_addr.port()));
        let (proxy, addr, admin) = run_proxy(&file, &spec, &[]).await;
        let pid = proxy.0.id();
        let url = format!("http://{addr}/v1/chat/completions");
        // One stream first, so that what is measured is the streams, not the first use of the code.
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap_or_default();
        let warm = one_stream(client.clone(), url.clone(), 0).await;
        let before = load::rss_bytes(pid);
        let tasks: Vec<_> =
            (0..STREAMS).map(|i| tokio::spawn(one_stream(client.clone(), url.clone(), i + 1))).collect();
        // Watch the peak while they are all open.
        let (mut peak, mut most_open) = (before, 0.0f64);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline && !tasks.iter().all(tokio::task::JoinHandle::is_finished)
        {
            let open = metric_value(admin, "llmproxy_inflight_requests").await;
            most_open = most_open.max(open);
            peak = peak.max(load::rss_bytes(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap_or(false) {
                ok += 1;
            }
        }
        let per_stream = (peak.saturating_sub(before)) as f64 / most_open.max(1.0) / 1024.0;
        println!(
            "| {protocol} | {STREAMS} | {most_open:.0} | {ok} | {} | {:.1} | {:.1} | {per_stream:.1} | <= 16 KiB, no errors |",
            STREAMS - ok + usize::from(!warm),
            before as f64 / f64::from(1 << 20),
            peak as f64 / f64::from(1 << 20),
        );
    }
}

/// The TPM-bound burst of (e): `max_tokens: 100`, a short distinct prompt each.
fn tpm_body(i: usize) -> serde_json::Value {
    serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 100,
        "messages": [{"role": "user", "content": format!("Say hello to user number {i}.")}]})
}

#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn tpm_workload(dir: &Path) {
    println!(
        "\n## (e) TPM-bound burst: 300 requests (max_tokens 100, 16 used) from 50 clients; the proxy set to exactly the upstream's quota\n"
    );
    println!(
        "| path | upstream counts | proxy counts | quota tokens/s | ok | client 429s | upstream 429s | achieved / configured tokens/s | wall s | wall / least possible |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let client = load::client();
    // Counted as used, the burst charges a fifth as much: a fifth of the quota keeps it bound.
    for (upstream, proxy, rate) in [
        ("requested", None, 10_000u64),
        ("requested", Some("requested"), 10_000),
        ("used", Some("used"), 2_000),
        ("requested", Some("used"), 10_000),
    ] {
        let tpm = (rate * 60).to_string();
        let (_mock, mock_addr) =
            start_mock(&["--tpm", &tpm, "--rpm", "100000000", "--token-accounting", upstream]).await;
        let (_p, target) = match proxy {
            None => (None, mock_addr),
            Some(counts) => {
                let limits = format!(
                    "{{requestsPerMinute: 100000000, tokensPerMinute: {tpm}, tokenAccounting: {counts}, maxConcurrent: 64}}"
                );
                let (p, addr, _) =
                    start_proxy(dir, mock_addr, &limits, "{maxSize: 100000, maxWait: 120s}").await;
                (Some(p), addr)
            }
        };
        let (shots, wall) =
            load::clients(&client, &format!("http://{target}/v1/chat/completions"), 50, 300, tpm_body).await;
        let s = Summary::of(&shots, wall);
        let stats = mock_stats(mock_addr).await;
        let charged = stats["charged_tokens"].as_u64().unwrap_or(0);
        let upstream_429 = stats["rate_limited"].as_u64().unwrap_or(0);
        // One second's worth goes at once; the rest is paced at the rate.
        let paced = charged.saturating_sub(rate) as f64;
        let least = paced / rate as f64;
        let (achieved, vs_least) = match proxy {
            Some(_) => (
                format!("{:.3}", paced / wall.as_secs_f64() / rate as f64),
                format!("{:.3}", wall.as_secs_f64() / least.max(1e-9)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {upstream} | {} | {rate} | {} | {} | {upstream_429} | {achieved} | {:.2} | {vs_least} |",
            if proxy.is_some() { "llmproxy" } else { "direct" },
            proxy.unwrap_or("-"),
            s.ok,
            s.rate_limited,
            wall.as_secs_f64(),
        );
    }
}

fn upstreams_body(i: usize) -> serde_json::Value {
    serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 16,
        "messages": [{"role": "user", "content": format!("Hello {i}")}]})
}

/// (h) Three upstreams of unequal quota (50, 30 and 20 requests/s): 1,500 requests from 100
/// clients, sent blindly round robin to the three (what a client-side list or a quota-blind
/// balancer does), and through llmproxy with the quotas configured, learned from the upstreams'
/// headers only, and with the third upstream failing every request from half way.
#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn upstreams_workload(dir: &Path) {
    const RATES: [u64; 3] = [50, 30, 20];
    const TOTAL: usize = 1500;
    const CLIENTS: usize = 100;
    println!("\n## (h) Three upstreams, 50 / 30 / 20 requests/s: {TOTAL} requests from {CLIENTS} clients\n");
    println!(
        "| path | ok | client 429s | client errors | upstream 429s | served by a / b / c | attempts at c after it broke | wall s | wall / least possible |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let client = load::client();
    for row in [
        "direct, round robin",
        "llmproxy, quotas configured",
        "llmproxy, quotas learned",
        "llmproxy, c fails half way",
    ] {
        let mut mocks = Vec::new();
        for rate in RATES {
            mocks.push(start_mock(&["--rpm", &(rate * 60).to_string(), "--latency-ms", "0"]).await);
        }
        let addrs: Vec<SocketAddr> = mocks.iter().map(|(_, a)| *a).collect();
        let proxy = if row.starts_with("llmproxy") {
            let learned = row.contains("learned");
            let endpoints: String = ["a", "b", "c"]
                .iter()
                .zip(&addrs)
                .zip(RATES)
                .map(|((name, addr), rate)| {
                    let limits = if learned {
                        String::new()
                    } else {
                        format!(", limits: {{requestsPerMinute: {}}}", rate * 60)
                    };
                    format!("    - {{name: {name}, url: 'http://{addr}/v1'{limits}}}\n")
                })
                .collect();
            let file = dir.join("upstreams.yaml");
            let manifest = format!(
                "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: bench}}\nspec:\n  upstreams:\n{endpoints}  limits: {{requestsPerMinute: 100000000, maxConcurrent: 256}}\n  queue: {{maxSize: 100000, maxWait: 120s}}\n"
            );
            let (p, addr, _) = run_proxy(&file, &manifest, &[]).await;
            Some((p, addr))
        } else {
            None
        };
        let breaks = row.contains("fails");
        let least_full = (TOTAL as f64 - 100.0) / 100.0;
        let c = addrs[2];
        let breaker = tokio::spawn({
            let client = client.clone();
            async move {
                if !breaks {
                    return 0;
                }
                tokio::time::sleep(Duration::from_secs_f64(least_full / 2.0)).await;
                let before = mock_stats(c).await["requests"].as_u64().unwrap_or(0);
                let fault = serde_json::json!({"kind": "status", "status": 503, "count": 1_000_000});
                let _ = client
                    .post(format!("http://{c}/mock/faults"))
                    .header("content-type", "application/json")
                    .body(fault.to_string())
                    .send()
                    .await;
                before
            }
        });
        let start = std::time::Instant::now();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers = (0..CLIENTS).map(|_| {
            let (client, next, addrs) = (client.clone(), next.clone(), addrs.clone());
            let target = proxy.as_ref().map(|(_, a)| *a);
            tokio::spawn(async move {
                let mut shots = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= TOTAL {
                        return shots;
                    }
                    let to = target.unwrap_or(addrs[i % addrs.len()]);
                    shots.push(
                        load::shoot(
                            &client,
                            &format!("http://{to}/v1/chat/completions"),
                            None,
                            &upstreams_body(i),
                        )
                        .await,
                    );
                }
            })
        });
        let mut shots = Vec::new();
        for w in futures_util::future::join_all(workers).await {
            shots.extend(w.unwrap_or_default());
        }
        let wall = start.elapsed();
        let before_break = breaker.await.unwrap_or(0);
        let s = Summary::of(&shots, wall);
        let mut served = Vec::new();
        let mut upstream_429 = 0;
        let mut at_c = 0;
        for (i, addr) in addrs.iter().enumerate() {
            let stats = mock_stats(*addr).await;
            served.push(stats["ok"].as_u64().unwrap_or(0).to_string());
            upstream_429 += stats["rate_limited"].as_u64().unwrap_or(0);
            if i == 2 {
                at_c = stats["requests"].as_u64().unwrap_or(0).saturating_sub(before_break);
            }
        }
        // One second's worth of each goes at once, the rest at the sum of the rates (after the
        // break, at 80/s: the least then is half the run at 100/s and the rest at 80/s).
        let least = if breaks {
            let done_by_half = 100.0 + 100.0 * least_full / 2.0;
            least_full / 2.0 + (TOTAL as f64 - done_by_half) / 80.0
        } else {
            least_full
        };
        let vs_least =
            if proxy.is_some() { format!("{:.3}", wall.as_secs_f64() / least) } else { "-".to_owned() };
        println!(
            "| {row} | {} | {} | {} | {upstream_429} | {} | {} | {:.2} | {vs_least} |",
            s.ok,
            s.rate_limited,
            s.other,
            served.join(" / "),
            if breaks { at_c.to_string() } else { "-".to_owned() },
            wall.as_secs_f64(),
        );
    }
}

/// A `redis-server` on a free port, without persistence; `None` when it is not installed.
fn start_redis() -> Option<(Proc, SocketAddr)> {
    let addr = free_addr();
    let proc = Proc(try_spawn(Command::new("redis-server").args([
        "--port",
        &addr.port().to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]))?);
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some((proc, addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `n` proxy processes of one manifest (name `bench`), with `spec_tail`.
async fn start_replicas(
    dir: &Path,
    n: usize,
    upstream: SocketAddr,
    spec_tail: &str,
) -> Vec<(Proc, SocketAddr)> {
    let mut out = Vec::new();
    for i in 0..n {
        let file = dir.join(format!("replica-{i}.yaml"));
        let (p, addr, _) = run_proxy(&file, &manifest(upstream, spec_tail), &[]).await;
        out.push((p, addr));
    }
    out
}

/// (i) One quota (100 requests/s) across 1, 3 and 6 replicas: each pod with a static share
/// (limits / pods, what a cluster without shared state enforces) and shared through Redis.
/// The load is skewed as keep-alive pins it: 60 % to the first pod, the rest spread. Then the
/// latency the shared limiter adds when the limits do not bind.
#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn quota_workload(dir: &Path) {
    let Some((_redis, redis)) = start_redis() else {
        println!("\n## (i) shared quota: skipped (no redis-server)");
        return;
    };
    const TOTAL: usize = 1500;
    println!(
        "\n## (i) One quota of 100 requests/s across replicas: {TOTAL} requests from 100 clients, 60 % to the first pod\n"
    );
    println!(
        "| replicas | buckets | ok | client 429s | upstream rate beyond one burst / quota | wall s | wall / least possible |"
    );
    println!("|---|---|---|---|---|---|---|");
    let client = load::client();
    let mut round = 0;
    for n in [1usize, 3, 6] {
        for shared in [false, true] {
            round += 1;
            let (_mock, mock_addr) = start_mock(&[]).await;
            let rpm = if shared { 6000 } else { (6000 / n) as u64 };
            let sharing = if shared {
                format!("  sharedState: {{redis: {{url: 'redis://{redis}/{}'}}}}\n", round % 16)
            } else {
                String::new()
            };
            let tail = format!(
                "  limits: {{requestsPerMinute: {rpm}, maxConcurrent: 1000}}\n  queue: {{maxSize: 100000, maxWait: 120s}}\n{sharing}"
            );
            let pods = start_replicas(dir, n, mock_addr, &tail).await;
            let addrs: Vec<SocketAddr> = pods.iter().map(|(_, a)| *a).collect();
            let start = std::time::Instant::now();
            let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers = (0..100).map(|_| {
                let (client, next, addrs) = (client.clone(), next.clone(), addrs.clone());
                tokio::spawn(async move {
                    let mut shots = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= TOTAL {
                            return shots;
                        }
                        // 60 % to the first pod, the rest round robin over all.
                        let to = if i % 5 < 3 { addrs[0] } else { addrs[i % addrs.len()] };
                        let url = format!("http://{to}/v1/chat/completions");
                        shots.push(load::shoot(&client, &url, None, &upstreams_body(i)).await);
                    }
                })
            });
            let mut shots = Vec::new();
            for w in futures_util::future::join_all(workers).await {
                shots.extend(w.unwrap_or_default());
            }
            let wall = start.elapsed();
            let s = Summary::of(&shots, wall);
            let accepted = mock_stats(mock_addr).await["ok"].as_u64().unwrap_or(0) as f64;
            // The quota allows one second's worth at once (a bucket full after idle), the rest
            // at 100/s: the rate column leaves that burst out.
            let least = (TOTAL as f64 - 100.0) / 100.0;
            println!(
                "| {n} | {} | {} | {} | {:.3} | {:.2} | {:.3} |",
                if shared { "shared (Redis)" } else { "static share" },
                s.ok,
                s.rate_limited,
                (accepted - 100.0).max(0.0) / wall.as_secs_f64() / 100.0,
                wall.as_secs_f64(),
                wall.as_secs_f64() / least
            );
        }
    }

    // The alternative design: one atomic reservation in Redis per admission (exact, no
    // stock). Its floor is one script round trip on every request, in line with the queue.
    let script = redis::Script::new(
        "local v = redis.call('HMGET', KEYS[1], 'l', 't') local t = redis.call('TIME') \
         local now = tonumber(t[1]) + tonumber(t[2]) / 1e6 local l = tonumber(v[1]) or 0 \
         local ts = tonumber(v[2]) or now l = math.min(100, l + (now - ts) * 100) \
         local ok = 0 if l >= 1 then l = l - 1 ok = 1 end \
         redis.call('HSET', KEYS[1], 'l', l, 't', now) return ok",
    );
    if let Ok(client) = redis::Client::open(format!("redis://{redis}/14"))
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let mut rtts = Vec::new();
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            let _: Result<i64, _> = script.key("bench:per-admission").invoke_async(&mut conn).await;
            rtts.push(t.elapsed());
        }
        rtts.sort();
        println!(
            "\n| one reservation round trip per admission (the design not taken), 2,000 in a row | p50 {:.3} ms | p99 {:.3} ms |",
            ms(load::percentile(&rtts, 0.5)),
            ms(load::percentile(&rtts, 0.99))
        );
        println!("|---|---|---|");
    }

    println!(
        "\n| 1 replica, 300 req/s for 5 s, limits not binding | p50 ms | p99 ms | added p50 ms | added p99 ms |"
    );
    println!("|---|---|---|---|---|");
    let (_mock, mock_addr) = start_mock(&[]).await;
    let mut base = None;
    for shared in [false, true] {
        let sharing = if shared {
            format!("  sharedState: {{redis: {{url: 'redis://{redis}/15'}}}}\n")
        } else {
            String::new()
        };
        let tail = format!(
            "  limits: {{requestsPerMinute: 100000000, maxConcurrent: 100000}}\n  queue: {{maxSize: 100000, maxWait: 60s}}\n{sharing}"
        );
        let pods = start_replicas(dir, 1, mock_addr, &tail).await;
        let url = format!("http://{}/v1/chat/completions", pods[0].1);
        let _ = load::constant_rate(&client, &url, 200.0, Duration::from_millis(500)).await;
        let (shots, _) = load::constant_rate(&client, &url, 300.0, Duration::from_secs(5)).await;
        let ([p50, p99, _], _) = latency(&shots);
        let (b50, b99) = *base.get_or_insert((p50, p99));
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            if shared { "shared (Redis)" } else { "local" },
            ms(p50),
            ms(p99),
            ms(p50) - ms(b50),
            ms(p99) - ms(b99)
        );
    }
}

/// One quiet client's latencies while another floods the queue, at `rate` requests/s. The
/// quiet client sends on its own schedule (open loop), so every request of it meets the flood.
async fn quiet_under_flood(
    client: &reqwest::Client,
    url: &str,
    mock: SocketAddr,
    flood: usize,
    rate: u64,
) -> (Vec<Duration>, f64, Duration) {
    let flooding = {
        let (client, url) = (client.clone(), url.to_owned());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let s = load::burst(&client, &url, Some("sk-flood"), flood).await;
            let wall = start.elapsed();
            // Counted as the flood ends: what the upstream served while it lasted.
            (s, wall, mock_stats(mock).await["ok"].as_u64().unwrap_or(0))
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut quiet = Vec::new();
    for i in 0..40 {
        let (client, url) = (client.clone(), url.to_owned());
        quiet.push(tokio::spawn(async move {
            load::shoot(&client, &url, Some("sk-quiet"), &load::chat_body(1_000_000 + i)).await
        }));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (summary, wall, sent) = flooding.await.unwrap();
    assert_eq!(summary.ok, flood, "every flood request answered");
    let mut quiet: Vec<Duration> = futures_util::future::join_all(quiet)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .filter(|s| s.status == Some(200))
        .map(|s| s.latency)
        .collect();
    quiet.sort();
    // The first second's burst goes at once; the rest is paced at the rate.
    #[allow(clippy::cast_precision_loss)]
    let utilisation = sent.saturating_sub(rate) as f64 / wall.as_secs_f64() / rate as f64;
    (quiet, utilisation, wall)
}

#[allow(clippy::print_stdout)]
async fn fairness_workload(dir: &Path) {
    const RATE: u64 = 100;
    const FLOOD: usize = 1500;
    println!(
        "\n## (g) Fairness: one client floods {FLOOD} requests ({}s of quota at {RATE}/s); another sends one every 250 ms\n",
        FLOOD as u64 / RATE
    );
    println!(
        "| queueing | quiet p50 ms | quiet p99 ms | quiet p50 / alone | flood wall s | upstream utilisation |"
    );
    println!("|---|---|---|---|---|---|");
    let client = load::client();
    let rpm = (RATE * 60).to_string();
    let keys = dir.join("bench-clients.yaml");
    std::fs::write(&keys, "flood: sk-flood\nquiet: sk-quiet\n").unwrap();
    let keys_arg = keys.display().to_string();
    let common =
        format!("  limits: {{requestsPerMinute: {rpm}}}\n  queue: {{maxSize: 100000, maxWait: 120s}}\n");
    // The quiet client alone: the baseline.
    let (_mock, mock_addr) = start_mock(&["--rpm", &rpm]).await;
    let (_p, addr, _) = start_proxy_with(dir, mock_addr, &common, &[]).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let mut alone = Vec::new();
    for i in 0..20 {
        alone.push(load::shoot(&client, &url, Some("sk-quiet"), &load::chat_body(i)).await.latency);
    }
    alone.sort();
    let alone_p50 = load::percentile(&alone, 50.0);
    println!(
        "| quiet alone | {:.2} | {:.2} | 1.00 | - | - |",
        ms(alone_p50),
        ms(load::percentile(&alone, 99.0))
    );
    for (name, tail, args) in [
        ("one FIFO (no client keys)", String::new(), Vec::new()),
        (
            "fair (client keys)",
            "  clients:\n    keysSecretRef: {name: bench-keys}\n".to_owned(),
            vec!["--client-keys-file", keys_arg.as_str()],
        ),
    ] {
        let (_mock, mock_addr) = start_mock(&["--rpm", &rpm]).await;
        let (_p, addr, _) = start_proxy_with(dir, mock_addr, &format!("{common}{tail}"), &args).await;
        let url = format!("http://{addr}/v1/chat/completions");
        let (quiet, utilisation, wall) = quiet_under_flood(&client, &url, mock_addr, FLOOD, RATE).await;
        let p50 = load::percentile(&quiet, 50.0);
        println!(
            "| {name} | {:.2} | {:.2} | {:.1} | {:.2} | {utilisation:.3} |",
            ms(p50),
            ms(load::percentile(&quiet, 99.0)),
            p50.as_secs_f64() / alone_p50.as_secs_f64().max(1e-9),
            wall.as_secs_f64(),
        );
    }
}

fn message_body(i: usize) -> serde_json::Value {
    serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 500,
        "messages": [{"role": "user", "content": format!("Tell user number {i} something.")}]})
}

fn short_message(i: usize) -> serde_json::Value {
    serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": format!("Hello {i}")}]})
}

/// Anthropic's Messages API: a burst bound by output tokens per minute, and the hop.
#[allow(clippy::print_stdout, clippy::cast_precision_loss)]
async fn anthropic_workload(dir: &Path) {
    println!(
        "\n## (k) Anthropic: 200 messages (max_tokens 500, answers of 20-60 tokens) from 50 clients; the upstream grants 30,000 output tokens a minute (a bucket of 1,000), the proxy is set to exactly that\n"
    );
    println!(
        "| path | ok | client 429s | upstream 429s | output tokens | achieved / configured output tokens/s | wall s | wall / least possible |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Anthropic's API refuses a request without a version; the proxy adds one, direct clients
    // send their own.
    let _ = load::client(); // installs the TLS crypto provider a client needs
    let mut version = reqwest::header::HeaderMap::new();
    version.insert("anthropic-version", reqwest::header::HeaderValue::from_static("2023-06-01"));
    let client = reqwest::Client::builder()
        .default_headers(version)
        .pool_max_idle_per_host(4096)
        .build()
        .unwrap_or_default();
    let rate = 500.0;
    for proxied in [false, true] {
        let mock_args = ["--otpm", "30000", "--window-ms", "2000", "--answer-tokens", "20-60"];
        let (_mock, mock_addr) = start_mock(&mock_args).await;
        let (_p, target) = if proxied {
            let file = dir.join(format!("anthropic-{}.yaml", mock_addr.port()));
            let tail = "  limits: {requestsPerMinute: 100000000, models: {claude-sonnet-4-5: {outputTokensPerMinute: 30000}}}\n  queue: {maxSize: 100000, maxWait: 120s}\n";
            let (p, addr, _) =
                run_proxy(&file, &manifest_with(mock_addr, ", provider: anthropic", tail), &[]).await;
            (Some(p), addr)
        } else {
            (None, mock_addr)
        };
        let (shots, wall) =
            load::clients(&client, &format!("http://{target}/v1/messages"), 50, 200, message_body).await;
        let s = Summary::of(&shots, wall);
        let stats = mock_stats(mock_addr).await;
        let output = stats["anthropic_output_tokens"].as_u64().unwrap_or(0) as f64;
        let upstream_429 = stats["rate_limited"].as_u64().unwrap_or(0);
        // The first bucketful goes at once; the rest is paced at the rate.
        let least = (output - 1000.0).max(0.0) / rate;
        let wall_s = wall.as_secs_f64();
        let (achieved, vs_least) = if proxied {
            (format!("{:.3}", output / wall_s / rate), format!("{:.3}", wall_s / least.max(1e-9)))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "| {} | {} | {} | {upstream_429} | {output} | {achieved} | {wall_s:.2} | {vs_least} |",
            if proxied { "llmproxy" } else { "direct" },
            s.ok,
            s.rate_limited,
        );
    }

    println!("\n### /v1/messages latency at 500 req/s for 6 s (open loop), max_tokens 16\n");
    println!("| path | p50 ms | p99 ms | errors | added p50 ms | added p99 ms | added p50 / nginx's |");
    println!("|---|---|---|---|---|---|---|");
    let (_mock, mock_addr) = start_mock(&[]).await;
    let file = dir.join("anthropic-hop.yaml");
    let tail = "  limits: {requestsPerMinute: 100000000, maxConcurrent: 100000}\n  queue: {maxSize: 100000, maxWait: 60s}\n";
    let (_proxy, proxy_addr, _) =
        run_proxy(&file, &manifest_with(mock_addr, ", provider: anthropic", tail), &[]).await;
    let hop_dir = dir.join("nginx-anthropic");
    let _ = std::fs::create_dir_all(&hop_dir);
    let nginx = start_nginx(&hop_dir, mock_addr).await;
    let mut targets = vec![("direct", mock_addr)];
    if let Some((_, addr)) = &nginx {
        targets.push(("nginx", *addr));
    }
    targets.push(("llmproxy", proxy_addr));
    let url = |addr: &SocketAddr| format!("http://{addr}/v1/messages");
    for (_, addr) in &targets {
        let _ =
            load::constant_rate_with(&client, &url(addr), 200.0, Duration::from_millis(500), short_message)
                .await;
    }
    let (mut base, mut nginx_added) = (None, None);
    for (name, addr) in &targets {
        let (shots, _) =
            load::constant_rate_with(&client, &url(addr), 500.0, Duration::from_secs(6), short_message).await;
        let (p, errors) = latency(&shots);
        let b = *base.get_or_insert(p);
        let added = [0, 1].map(|i| ms(p[i]) - ms(b[i]));
        if *name == "nginx" {
            nginx_added = Some(added);
        }
        let ratio = match nginx_added {
            Some(n) if *name != "direct" && n[0] >= 0.005 => format!("{:.2}", added[0] / n[0]),
            _ => "-".to_owned(),
        };
        println!(
            "| {name} | {:.3} | {:.3} | {errors} | {:.3} | {:.3} | {ratio} |",
            ms(p[0]),
            ms(p[1]),
            added[0],
            added[1],
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // `cargo bench --bench proxy -- tpm cache`: only those sections (hop = a-c, cache = d,
    // tpm = e, memory = f, fairness = g, upstreams = h, quota = i,
    // streams = j, anthropic = k); none named: all.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        if wanted("hop") {
            run().await;
        }
        if wanted("cache") {
            cache_workload(dir.path()).await;
        }
        if wanted("tpm") {
            tpm_workload(dir.path()).await;
        }
        if wanted("memory") {
            memory_workload(dir.path()).await;
        }
        if wanted("fairness") {
            fairness_workload(dir.path()).await;
        }
        if wanted("upstreams") {
            upstreams_workload(dir.path()).await;
        }
        if wanted("quota") {
            quota_workload(dir.path()).await;
        }
        if wanted("streams") {
            streams_workload(dir.path()).await;
        }
        if wanted("anthropic") {
            anthropic_workload(dir.path()).await;
        }
    });
}
