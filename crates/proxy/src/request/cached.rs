//! The cache's place on the request path: answer from the cache, join an identical request in
//! flight, or go upstream and fill the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use llmproxy_api::Policy;

use crate::cache::flight::{self, Followed, Join, Leader};
use crate::cache::{CachedResponse, Key, ResponseCache};
use crate::protocol::sse::SseTap;
use crate::proxy::Proxy;
use crate::request::error::{ApiError, Refusal};
use crate::telemetry::labels::{CacheResult, Outcome};
use crate::telemetry::metrics::Metrics;

/// What the cache did for a request.
pub(crate) enum Cached {
    /// Served from the cache or a coalesced flight.
    Answered(Served),
    /// Go upstream and fill the cache.
    Fill(Fill),
    /// Go upstream, cache nothing.
    Skip,
    /// No room to wait for an identical request's answer.
    Refused(Refusal),
}

/// An answer from the cache or a coalesced flight, and what the record says of it.
pub(crate) struct Served {
    pub(crate) response: Response,
    pub(crate) status: u16,
    pub(crate) outcome: Outcome,
    /// Tokens it did not spend upstream.
    pub(crate) saved_tokens: Option<u64>,
}

/// What to do with a complete, successful answer: store it under `key` and hand it to the
/// requests waiting on `leader`.
pub(crate) struct Fill {
    cache: Arc<ResponseCache>,
    key: Key,
    /// `None` when the client asked for a fresh answer (`no-cache`): stored, nobody waits.
    leader: Option<Leader>,
    /// The raw upstream body, kept for the cache (within what one entry may hold).
    raw: BytesMut,
    /// The answer outgrew what one entry may hold.
    too_big: bool,
    limit: usize,
    /// When the followers were last told of progress.
    signalled: Instant,
}

impl Fill {
    fn new(cache: &Arc<ResponseCache>, key: Key, leader: Option<Leader>) -> Self {
        Self {
            limit: cache.max_entry_bytes(),
            cache: Arc::clone(cache),
            key,
            leader,
            raw: BytesMut::new(),
            too_big: false,
            signalled: Instant::now(),
        }
    }

    /// A chunk arrived: tell the followers, at most four times a second.
    pub(crate) fn progress(&mut self) {
        if let Some(leader) = &self.leader
            && self.signalled.elapsed() >= Duration::from_millis(250)
        {
            leader.progress();
            self.signalled = Instant::now();
        }
    }

    /// Keep a chunk of the body for the cache (bounded by what one entry may hold).
    pub(crate) fn keep(&mut self, chunk: &[u8]) {
        if !self.too_big && self.raw.len() + chunk.len() <= self.limit {
            self.raw.extend_from_slice(chunk);
        } else {
            self.too_big = true;
            self.raw = BytesMut::new();
        }
    }

    /// The kept stream, unless it outgrew the bound.
    pub(crate) fn raw(&mut self) -> Option<Bytes> {
        (!self.too_big).then(|| std::mem::take(&mut self.raw).freeze())
    }

    /// Store the answer and hand it to every follower.
    pub(crate) fn complete(self, answer: Arc<CachedResponse>) {
        self.cache.insert(self.key, Arc::clone(&answer));
        if let Some(leader) = self.leader {
            leader.complete(answer);
        }
    }
}

/// `(no-cache, no-store)` from the client's `Cache-Control`.
fn cache_control(headers: &HeaderMap) -> (bool, bool) {
    let mut flags = (false, false);
    for directive in headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        flags.0 |= directive.eq_ignore_ascii_case("no-cache");
        flags.1 |= directive.eq_ignore_ascii_case("no-store");
    }
    flags
}

/// Count what the cache did; it goes into the record too.
fn mark(metrics: &Metrics, result: CacheResult) -> Option<CacheResult> {
    metrics.cache(result);
    Some(result)
}

/// Look the request up in the cache, or join an identical request in flight (of a request
/// that arrived at `started`). Returns what the cache did, if anything, beside what to do.
pub(crate) async fn lookup(
    proxy: &Proxy,
    policy: &Policy,
    started: tokio::time::Instant,
    key: Key,
    headers: &HeaderMap,
    wants_usage: bool,
) -> (Option<CacheResult>, Cached) {
    let cache = proxy.cache();
    if !cache.enabled() {
        return (None, Cached::Skip);
    }
    let metrics = proxy.metrics();
    let (no_cache, no_store) = cache_control(headers);
    if no_cache || no_store {
        let how = mark(metrics, CacheResult::Bypass);
        return (how, if no_store { Cached::Skip } else { Cached::Fill(Fill::new(cache, key, None)) });
    }
    loop {
        if let Some(answer) = cache.get(&key) {
            let how = mark(metrics, CacheResult::Hit);
            return (how, Cached::Answered(replay(&answer, CacheResult::Hit, wants_usage)));
        }
        match proxy.flights().join(key) {
            Join::Leader(leader) => {
                let how = mark(metrics, CacheResult::Miss);
                return (how, Cached::Fill(Fill::new(cache, key, Some(leader))));
            }
            Join::Follower(rx) => {
                // A follower waits like a queued request and counts against the queue bound.
                let _held = match proxy.admission().hold(policy.queue.max_size) {
                    Ok(held) => held,
                    Err(r) => {
                        let err = ApiError::throttled(&r, policy.queue.max_wait);
                        return (None, Cached::Refused(Refusal::new(err, Outcome::QueueFull)));
                    }
                };
                // Wait as long as the leader may legitimately take before its first byte (queue,
                // attempts and back-offs), then as long as it keeps making progress.
                let attempts = policy.retry.max_attempts;
                let first = (policy.longest_timeout() + policy.retry.max_backoff)
                    .checked_mul(attempts)
                    .and_then(|d| d.checked_add(policy.queue.max_wait))
                    .unwrap_or(Duration::MAX);
                let deadline = started.checked_add(first).unwrap_or_else(far_future);
                match flight::follow(rx, deadline, policy.longest_timeout()).await {
                    Followed::Answer(answer) => {
                        let how = mark(metrics, CacheResult::Coalesced);
                        return (how, Cached::Answered(replay(&answer, CacheResult::Coalesced, wants_usage)));
                    }
                    // The leader failed: look again, and lead the next attempt if nobody else does.
                    Followed::Failed => {}
                    // The leader is stuck: go alone (its own deadline then decides).
                    Followed::Stalled => {
                        let how = mark(metrics, CacheResult::Miss);
                        return (how, Cached::Fill(Fill::new(cache, key, None)));
                    }
                }
            }
        }
    }
}

/// A year from now: "never" for deadlines that overflow.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Answer from a stored response; a stream is replayed as SSE, without the usage event unless
/// the client asked for it.
fn replay(answer: &CachedResponse, how: CacheResult, wants_usage: bool) -> Served {
    let body = if answer.stream && !wants_usage {
        let mut tap = SseTap::new(true);
        let mut out = tap.feed(answer.body.clone()).to_vec();
        out.extend_from_slice(&tap.finish());
        Bytes::from(out)
    } else {
        answer.body.clone()
    };
    let outcome = if how == CacheResult::Hit { Outcome::CacheHit } else { Outcome::Coalesced };
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Some(ct) = &answer.content_type {
        h.insert(header::CONTENT_TYPE, ct.clone());
    }
    h.insert("x-llmproxy-cache", HeaderValue::from_static(how.label()));
    h.insert(header::AGE, HeaderValue::from(answer.created.elapsed().as_secs()));
    Served { response: resp, status: status.as_u16(), outcome, saved_tokens: answer.usage.map(|u| u.total()) }
}
