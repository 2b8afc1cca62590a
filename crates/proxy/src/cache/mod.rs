//! The exact-match response cache: successful answers to identical requests, kept for the
//! policy's TTL within an entry and a byte budget (moka, weighed by size).

pub(crate) mod flight;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use llmproxy_api::policy::CachePolicy;
use sha2::{Digest, Sha256};

use crate::protocol::tokens::Usage;

/// SHA-256 of what identifies a request.
pub(crate) type Key = [u8; 32];

/// A stored answer.
#[derive(Debug)]
pub struct CachedResponse {
    /// HTTP status (2xx).
    pub status: u16,
    /// The upstream's `Content-Type`.
    pub content_type: Option<HeaderValue>,
    /// The whole body: JSON, or the complete SSE stream including the usage event.
    pub body: Bytes,
    /// Whether `body` is an SSE stream.
    pub stream: bool,
    /// What the answer cost, to count tokens saved by hits.
    pub usage: Option<Usage>,
    /// When it was stored.
    pub created: Instant,
}

/// Endpoints whose answers depend only on the request body, without side effects.
pub(crate) fn cacheable_path(rest: &str) -> bool {
    matches!(rest, "/chat/completions" | "/completions" | "/embeddings" | "/moderations" | "/messages")
}

/// The cache key of a request to `upstream` + `path_and_query` with the forwarded headers that
/// change the answer (`headers`, see `upstream::answer_headers`) and whose body has the
/// canonical digest `body` (see `body::inspect`); `client`: the client whose own entries these
/// are (`cache.scope: client`), `None` when every client shares them.
pub(crate) fn key(
    client: Option<&str>,
    upstream: &str,
    method: &str,
    path_and_query: &str,
    headers: &str,
    body: &[u8; 32],
) -> Key {
    let mut h = Sha256::new();
    // Tagged, so that no client name can spell the shared scope.
    match client {
        None => h.update([0]),
        Some(name) => {
            h.update([1]);
            h.update(name.as_bytes());
            h.update([0]);
        }
    }
    for part in [upstream, method, path_and_query, headers] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(body);
    h.finalize().into()
}

/// A short, stable fingerprint of the prompt for request records (never the text itself).
pub(crate) fn prompt_hash(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Entry lifetime: the policy's TTL from when the entry was stored (also across rebuilds).
struct Ttl(Duration);

impl moka::Expiry<Key, Arc<CachedResponse>> for Ttl {
    fn expire_after_create(&self, _: &Key, v: &Arc<CachedResponse>, _: Instant) -> Option<Duration> {
        Some(self.0.saturating_sub(v.created.elapsed()))
    }
}

struct Inner {
    policy: CachePolicy,
    entries: moka::sync::Cache<Key, Arc<CachedResponse>>,
}

/// Overhead counted per entry beyond its body (key, headers, bookkeeping).
const ENTRY_OVERHEAD: u64 = 256;

impl Inner {
    fn new(policy: &CachePolicy) -> Self {
        let floor = policy.max_bytes / policy.max_entries.max(1);
        let entries = moka::sync::Cache::builder()
            .max_capacity(policy.max_bytes)
            .weigher(move |_: &Key, v: &Arc<CachedResponse>| {
                let size = v.body.len() as u64 + ENTRY_OVERHEAD;
                u32::try_from(size.max(floor)).unwrap_or(u32::MAX)
            })
            .expire_after(Ttl(policy.ttl))
            .build();
        Self { policy: policy.clone(), entries }
    }
}

/// The cache of one proxy; off when the policy has no cache.
pub(crate) struct ResponseCache {
    inner: ArcSwapOption<Inner>,
}

impl ResponseCache {
    /// A cache for `policy` (`None`: off).
    pub(crate) fn new(policy: Option<&CachePolicy>) -> Self {
        Self { inner: ArcSwapOption::new(policy.map(|p| Arc::new(Inner::new(p)))) }
    }

    /// Apply a reloaded policy: off empties the cache; a new TTL or bound rebuilds it and
    /// carries the live entries over (each keeps its own age).
    pub(crate) fn reconfigure(&self, policy: Option<&CachePolicy>) {
        let current = self.inner.load_full();
        match (current, policy) {
            (Some(cur), Some(p)) if cur.policy == *p => {}
            (Some(cur), Some(p)) => {
                let next = Inner::new(p);
                for (k, v) in &cur.entries {
                    next.entries.insert(*k, v);
                }
                self.inner.store(Some(Arc::new(next)));
                cur.entries.invalidate_all();
            }
            (None, Some(p)) => self.inner.store(Some(Arc::new(Inner::new(p)))),
            (Some(cur), None) => {
                self.inner.store(None);
                cur.entries.invalidate_all();
            }
            (None, None) => {}
        }
    }

    /// Whether caching is on.
    pub(crate) fn enabled(&self) -> bool {
        self.inner.load().is_some()
    }

    /// A live entry.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<CachedResponse>> {
        self.inner.load().as_ref()?.entries.get(key)
    }

    /// Store an answer (ignored when caching is off or the body alone exceeds the budget).
    pub(crate) fn insert(&self, key: Key, value: Arc<CachedResponse>) {
        if let Some(inner) = self.inner.load().as_ref()
            && (value.body.len() as u64) < inner.policy.max_bytes
        {
            inner.entries.insert(key, value);
        }
    }

    /// The most body bytes one entry may hold: an eighth of the budget, so one answer never
    /// crowds out the rest (and a fill in progress holds at most that much).
    pub(crate) fn max_entry_bytes(&self) -> usize {
        self.inner
            .load()
            .as_ref()
            .map_or(0, |i| usize::try_from(i.policy.max_bytes / 8).unwrap_or(usize::MAX))
    }

    /// Entries and weighed bytes held now (after pending evictions are applied).
    pub(crate) fn usage(&self) -> (u64, u64) {
        match self.inner.load().as_ref() {
            Some(inner) => {
                inner.entries.run_pending_tasks();
                (inner.entries.entry_count(), inner.entries.weighted_size())
            }
            None => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &'static str) -> Arc<CachedResponse> {
        Arc::new(CachedResponse {
            status: 200,
            content_type: None,
            body: Bytes::from_static(body.as_bytes()),
            stream: false,
            usage: None,
            created: Instant::now(),
        })
    }

    fn policy(ttl_ms: u64, max_entries: u64, max_bytes: u64) -> CachePolicy {
        CachePolicy { ttl: Duration::from_millis(ttl_ms), max_entries, max_bytes, scope: None }
    }

    #[test]
    fn the_key_covers_upstream_method_path_and_body() {
        let k = |up: &str, path: &str, body: u8| key(None, up, "POST", path, "", &[body; 32]);
        let base = k("https://api.openai.com/v1", "/chat/completions", 1);
        assert_eq!(base, k("https://api.openai.com/v1", "/chat/completions", 1));
        assert_ne!(base, k("https://other/v1", "/chat/completions", 1));
        assert_ne!(base, k("https://api.openai.com/v1", "/completions", 1));
        assert_ne!(base, k("https://api.openai.com/v1", "/chat/completions", 2));
        let beta =
            key(None, "https://api.openai.com/v1", "POST", "/chat/completions", "openai-beta:x\n", &[1; 32]);
        assert_ne!(base, beta, "a header that changes the answer changes the key");
        let of = |c| key(c, "https://api.openai.com/v1", "POST", "/chat/completions", "", &[1; 32]);
        assert_ne!(of(Some("alice")), of(Some("bob")), "each client has its own entries");
        assert_ne!(of(Some("alice")), base, "a client's entries are not the shared ones");
        assert_ne!(of(Some("")), base);
        assert_eq!(prompt_hash(&[0xab; 32]), "abababababababab");
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = ResponseCache::new(Some(&policy(50, 10, 1 << 20)));
        cache.insert([1; 32], entry("a"));
        assert!(cache.get(&[1; 32]).is_some());
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.get(&[1; 32]).is_some() {
            assert!(Instant::now() < deadline, "entry outlived its TTL");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn both_bounds_hold() {
        // 10 entries at most, 10 KiB at most: 1 KiB per entry as a floor.
        let cache = ResponseCache::new(Some(&policy(60_000, 10, 10 << 10)));
        for i in 0..100u8 {
            cache.insert([i; 32], entry("small"));
        }
        let (entries, bytes) = cache.usage();
        assert!(entries <= 10, "{entries} entries");
        assert!(bytes <= 10 << 10, "{bytes} bytes");
    }

    #[test]
    fn reload_keeps_entries_or_drops_them_when_turned_off() {
        let cache = ResponseCache::new(Some(&policy(60_000, 10, 1 << 20)));
        cache.insert([7; 32], entry("kept"));
        cache.reconfigure(Some(&policy(120_000, 20, 1 << 20)));
        assert!(cache.get(&[7; 32]).is_some(), "a new TTL keeps live entries");
        cache.reconfigure(None);
        assert!(!cache.enabled());
        assert!(cache.get(&[7; 32]).is_none());
        cache.reconfigure(Some(&policy(60_000, 10, 1 << 20)));
        assert!(cache.get(&[7; 32]).is_none(), "off emptied it");
    }
}
