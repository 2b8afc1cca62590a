//! Naive clients: fire requests with no retry of their own and record what came back. The demo
//! and the benchmark drive the mock and the proxy with these.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::time::Instant;

/// An HTTP client for load: pooled generously, rustls with the ring provider (the one the
/// whole workspace uses; installing it twice is harmless).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().pool_max_idle_per_host(4096).build().unwrap_or_default()
}

/// One request's result.
#[derive(Clone, Copy, Debug)]
pub struct Shot {
    /// HTTP status, `None` for a transport error.
    pub status: Option<u16>,
    /// Send to last byte of the body.
    pub latency: Duration,
    /// Answered by llmproxy without an upstream call (`x-llmproxy-cache: hit` or `coalesced`).
    pub from_cache: bool,
}

/// A batch of results.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// 2xx answers.
    pub ok: usize,
    /// 429 answers.
    pub rate_limited: usize,
    /// Anything else, transport errors included.
    pub other: usize,
    /// First send to last answer.
    pub wall: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// The percentile `p` (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

impl Summary {
    /// Summarise shots fired over `wall`.
    pub fn of(shots: &[Shot], wall: Duration) -> Self {
        let mut lat: Vec<Duration> = shots.iter().map(|s| s.latency).collect();
        lat.sort();
        Self {
            ok: shots.iter().filter(|s| s.status.is_some_and(|c| (200..300).contains(&c))).count(),
            rate_limited: shots.iter().filter(|s| s.status == Some(429)).count(),
            other: shots
                .iter()
                .filter(|s| !s.status.is_some_and(|c| (200..300).contains(&c) || c == 429))
                .count(),
            wall,
            p50: percentile(&lat, 50.0),
            p99: percentile(&lat, 99.0),
        }
    }
}

/// A small chat request; `i` varies the prompt so nothing is served from a cache.
pub fn chat_body(i: usize) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 16,
           "messages": [{"role": "user", "content": format!("Say hello to user number {i}.")}]})
}

/// Send one request and read the whole answer.
pub async fn shoot(client: &reqwest::Client, url: &str, key: Option<&str>, body: &Value) -> Shot {
    let start = Instant::now();
    let mut req = client.post(url).header("content-type", "application/json").body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let (status, from_cache) = match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let cache = resp.headers().get("x-llmproxy-cache").and_then(|v| v.to_str().ok());
            let from_cache = matches!(cache, Some("hit" | "coalesced"));
            (resp.bytes().await.ok().map(|_| status), from_cache)
        }
        Err(_) => (None, false),
    };
    Shot { status, latency: start.elapsed(), from_cache }
}

/// `n` clients at once, each sending one request.
pub async fn burst(client: &reqwest::Client, url: &str, key: Option<&str>, n: usize) -> Summary {
    let start = Instant::now();
    let shots = join_all((0..n).map(|i| {
        let body = chat_body(i);
        async move { shoot(client, url, key, &body).await }
    }))
    .await;
    Summary::of(&shots, start.elapsed())
}

/// `clients` naive clients share `total` requests, each sending its next as soon as the last
/// one answered; request `i`'s body is `body(i)`.
pub async fn clients(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    total: usize,
    body: impl Fn(usize) -> Value + Send + Sync + 'static,
) -> (Vec<Shot>, Duration) {
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = std::sync::Arc::new(body);
    let workers = (0..clients).map(|_| {
        let (client, url, next, body) = (client.clone(), url.to_owned(), next.clone(), body.clone());
        tokio::spawn(async move {
            let mut shots = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return shots;
                }
                shots.push(shoot(&client, &url, None, &body(i)).await);
            }
        })
    });
    let shots = join_all(workers).await.into_iter().filter_map(Result::ok).flatten().collect();
    (shots, start.elapsed())
}

/// Requests at a fixed `rate` per second for `duration`, each on its own task (open loop, so a
/// slow answer does not slow the schedule).
pub async fn constant_rate(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    duration: Duration,
) -> (Vec<Shot>, Duration) {
    constant_rate_with(client, url, rate, duration, chat_body).await
}

/// As [`constant_rate`], with request `i`'s body from `body(i)`.
pub async fn constant_rate_with(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    duration: Duration,
    body: fn(usize) -> Value,
) -> (Vec<Shot>, Duration) {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::new();
    let mut next = start;
    let mut i = 0;
    while next < start + duration {
        tokio::time::sleep_until(next).await;
        let (client, url, body) = (client.clone(), url.to_owned(), body(i));
        // Each request on its own task at its scheduled time, whatever the earlier ones are
        // doing (open loop): a stall in the server under test delays no later send, so its
        // cost shows in the latencies instead of hiding in a slower schedule (no coordinated
        // omission to correct for). Timed from the send: tokio's timer wakes the schedule up
        // to a millisecond late, which would otherwise land on every path alike.
        tasks.push(tokio::spawn(async move { shoot(&client, &url, None, &body).await }));
        next += interval;
        i += 1;
    }
    let shots = join_all(tasks).await.into_iter().filter_map(Result::ok).collect();
    (shots, start.elapsed())
}

/// `concurrency` clients sending back to back for `duration` (closed loop): the most a server
/// sustains. Returns every result.
pub async fn saturate(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> (Vec<Shot>, Duration) {
    let start = Instant::now();
    let end = start + duration;
    let workers = (0..concurrency).map(|w| {
        let (client, url) = (client.clone(), url.to_owned());
        tokio::spawn(async move {
            let mut shots = Vec::new();
            let mut i = w * 1_000_000;
            while Instant::now() < end {
                shots.push(shoot(&client, &url, None, &chat_body(i)).await);
                i += 1;
            }
            shots
        })
    });
    let shots = join_all(workers).await.into_iter().filter_map(Result::ok).flatten().collect();
    (shots, start.elapsed())
}

/// Resident memory of process `pid` in bytes (from /proc; 0 where unreadable), for the memory
/// figures of tests and the benchmark.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
