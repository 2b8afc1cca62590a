//! The cache's place on the request path: answer from the cache, join an identical request in
//! flight, or go upstream and fill the cache.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::cache::{self, CachedResponse};
use crate::flight::{self, Followed, Join};
use crate::forward::Pending;
use crate::record::Outcome;
use crate::relay::Fill;
use crate::server::Proxy;
use crate::sse::SseTap;
use llmproxy_api::Policy;

pub(crate) enum Lookup {
    /// Served from the cache or a coalesced flight.
    Answered(Response),
    /// Go upstream and fill the cache.
    Fill(Fill),
    /// Go upstream, cache nothing.
    Skip,
}

/// `(no-cache, no-store)` from the client's `Cache-Control`.
fn cache_control(headers: &HeaderMap) -> (bool, bool) {
    let directives: Vec<String> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    (directives.iter().any(|d| d == "no-cache"), directives.iter().any(|d| d == "no-store"))
}

/// Look the request up in the cache, or join an identical request in flight.
pub(crate) async fn lookup(
    proxy: &Arc<Proxy>,
    policy: &Policy,
    pending: &mut Pending,
    key: cache::Key,
    headers: &HeaderMap,
    wants_usage: bool,
) -> Lookup {
    if !proxy.cache.enabled() {
        return Lookup::Skip;
    }
    let metrics = proxy.metrics();
    let limit = proxy.cache.max_entry_bytes();
    let (no_cache, no_store) = cache_control(headers);
    if no_cache || no_store {
        pending.record().cache = Some("bypass");
        metrics.cache_requests.with_label_values(&["bypass"]).inc();
        return if no_store { Lookup::Skip } else { Lookup::Fill(Fill::new(key, None, limit)) };
    }
    loop {
        if let Some(answer) = proxy.cache.get(&key) {
            metrics.cache_requests.with_label_values(&["hit"]).inc();
            return Lookup::Answered(replay(pending, &answer, "hit", wants_usage));
        }
        match proxy.flights.join(key) {
            Join::Leader(leader) => {
                pending.record().cache = Some("miss");
                metrics.cache_requests.with_label_values(&["miss"]).inc();
                return Lookup::Fill(Fill::new(key, Some(leader), limit));
            }
            Join::Follower(rx) => {
                // Wait as long as the leader may legitimately take before its first byte (queue,
                // attempts and back-offs), then as long as it keeps making progress.
                let attempts = policy.retry.max_attempts;
                let first =
                    policy.queue.max_wait + (policy.upstream.timeout + policy.retry.max_backoff) * attempts;
                let deadline = pending.record().started + first;
                match flight::follow(rx, deadline, policy.upstream.timeout).await {
                    Followed::Answer(answer) => {
                        metrics.coalesced.inc();
                        return Lookup::Answered(replay(pending, &answer, "coalesced", wants_usage));
                    }
                    // The leader failed: look again, and lead the next attempt if nobody else does.
                    Followed::Failed => {}
                    // The leader is stuck: go alone (its own deadline then decides).
                    Followed::Stalled => {
                        pending.record().cache = Some("miss");
                        metrics.cache_requests.with_label_values(&["miss"]).inc();
                        return Lookup::Fill(Fill::new(key, None, limit));
                    }
                }
            }
        }
    }
}

/// Answer from a stored response; a stream is replayed as SSE, without the usage event unless
/// the client asked for it.
fn replay(pending: &mut Pending, answer: &CachedResponse, how: &'static str, wants_usage: bool) -> Response {
    let rec = pending.record();
    rec.status = answer.status;
    rec.outcome = if how == "hit" { Outcome::CacheHit } else { Outcome::Coalesced };
    rec.cache = Some(how);
    rec.saved_tokens = answer.usage.map(|u| u.total());
    let body = if answer.stream && !wants_usage {
        let mut tap = SseTap::new(true);
        let mut out = tap.feed(answer.body.clone()).to_vec();
        out.extend_from_slice(&tap.finish());
        Bytes::from(out)
    } else {
        answer.body.clone()
    };
    pending.finish();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    if let Some(ct) = &answer.content_type {
        h.insert(header::CONTENT_TYPE, ct.clone());
    }
    h.insert("x-llmproxy-cache", HeaderValue::from_static(how));
    h.insert(header::AGE, HeaderValue::from(answer.created.elapsed().as_secs()));
    resp
}
