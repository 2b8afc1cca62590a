//! The response body on its way to the client: passed on chunk by chunk as the upstream sends it,
//! watched for `usage`, and closed out (token settlement, metrics, log line) when it ends or the
//! client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::cache::{CachedResponse, Key};
use crate::flight::Leader;
use crate::queue::Permit;
use crate::record::{Outcome, RequestRecord};
use crate::server::Proxy;
use crate::sse::SseTap;
use crate::tokens::{Usage, usage_of};

/// Bodies up to this size are kept to read their `usage`; larger ones pass through unread.
const MAX_TAPPED_BODY: usize = 16 << 20;

/// How the body is watched.
pub(crate) enum Tap {
    /// `text/event-stream`: scanned line by line.
    Sse(SseTap),
    /// Anything else: kept (up to a bound) and parsed as JSON at the end.
    Body { buf: BytesMut, overflow: bool },
}

impl Tap {
    pub(crate) fn body() -> Self {
        Tap::Body { buf: BytesMut::new(), overflow: false }
    }

    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Tap::Sse(sse) => sse.feed(chunk),
            Tap::Body { buf, overflow } => {
                if !*overflow && buf.len() + chunk.len() <= MAX_TAPPED_BODY {
                    buf.extend_from_slice(&chunk);
                } else {
                    *overflow = true;
                    buf.clear();
                }
                chunk
            }
        }
    }

    fn finish(&mut self) -> Bytes {
        match self {
            Tap::Sse(sse) => sse.finish(),
            Tap::Body { .. } => Bytes::new(),
        }
    }

    fn usage(&self) -> Option<Usage> {
        match self {
            Tap::Sse(sse) => sse.usage(),
            Tap::Body { buf, overflow: false } => {
                serde_json::from_slice::<serde_json::Value>(buf).ok().as_ref().and_then(usage_of)
            }
            Tap::Body { .. } => None,
        }
    }
}

type Upstream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// What to do with a complete, successful answer: store it under `key` and hand it to the
/// requests waiting on `leader`.
pub(crate) struct Fill {
    pub(crate) key: Key,
    /// `None` when the client asked for a fresh answer (`no-cache`): stored, nobody waits.
    pub(crate) leader: Option<Leader>,
    /// The raw upstream stream, kept for the cache (SSE only; JSON bodies are kept by the tap).
    raw: BytesMut,
    /// The answer outgrew what one entry may hold.
    too_big: bool,
    limit: usize,
    /// When the followers were last told of progress.
    signalled: std::time::Instant,
}

impl Fill {
    pub(crate) fn new(key: Key, leader: Option<Leader>, limit: usize) -> Self {
        Self {
            key,
            leader,
            raw: BytesMut::new(),
            too_big: false,
            limit,
            signalled: std::time::Instant::now(),
        }
    }

    /// A chunk arrived: tell the followers, at most four times a second.
    fn progress(&mut self) {
        if let Some(leader) = &self.leader
            && self.signalled.elapsed() >= std::time::Duration::from_millis(250)
        {
            leader.progress();
            self.signalled = std::time::Instant::now();
        }
    }

    fn keep(&mut self, chunk: &[u8]) {
        if !self.too_big && self.raw.len() + chunk.len() <= self.limit {
            self.raw.extend_from_slice(chunk);
        } else {
            self.too_big = true;
            self.raw.clear();
        }
    }
}

/// The state of one relayed body.
pub(crate) struct Relay {
    upstream: Upstream,
    tap: Tap,
    idle_timeout: Duration,
    permit: Option<Permit>,
    record: RequestRecord,
    proxy: Arc<Proxy>,
    ended: bool,
    /// Body bytes the upstream announced (`Content-Length`), and bytes relayed so far: a server
    /// stops polling a body once it has sent the announced length, so the end is noticed here.
    expected: Option<u64>,
    relayed: u64,
    fill: Option<Fill>,
    content_type: Option<http::HeaderValue>,
}

impl Relay {
    pub(crate) fn new(
        response: reqwest::Response,
        tap: Tap,
        idle_timeout: Duration,
        permit: Permit,
        record: RequestRecord,
        proxy: Arc<Proxy>,
        fill: Option<Fill>,
    ) -> Self {
        Self {
            expected: response.content_length(),
            relayed: 0,
            content_type: response.headers().get(http::header::CONTENT_TYPE).cloned(),
            fill,
            upstream: Box::pin(response.bytes_stream()),
            tap,
            idle_timeout,
            permit: Some(permit),
            record,
            proxy,
            ended: false,
        }
    }

    /// Close out the request: settle tokens, count it, log it. Runs once.
    fn end(&mut self, outcome: Option<Outcome>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if let Some(o) = outcome {
            self.record.outcome = o;
        }
        self.record.usage = self.tap.usage();
        let refused = !(200..300).contains(&self.record.status);
        if let Some(permit) = self.permit.as_mut() {
            match self.record.usage {
                Some(usage) => permit.settle(usage.total()),
                // An error answer without usage generated nothing.
                None if refused => permit.settle(0),
                None => {}
            }
        }
        self.permit = None;
        self.store();
        self.record.finish(self.proxy.metrics());
    }

    /// A complete 2xx answer goes into the cache and to the waiting followers; anything else
    /// drops the leader guard, which tells them to try for themselves.
    fn store(&mut self) {
        let Some(fill) = self.fill.take() else { return };
        let success = self.record.outcome == Outcome::Ok && (200..300).contains(&self.record.status);
        let (body, stream) = match &mut self.tap {
            Tap::Sse(sse) if sse.done() && !fill.too_big => (fill.raw.freeze(), true),
            Tap::Body { buf, overflow: false } => (std::mem::take(buf).freeze(), false),
            _ => return,
        };
        if !success {
            return;
        }
        let answer = Arc::new(CachedResponse {
            status: self.record.status,
            content_type: self.content_type.clone(),
            body,
            stream,
            usage: self.record.usage,
            created: std::time::Instant::now(),
        });
        self.proxy.cache.insert(fill.key, Arc::clone(&answer));
        if let Some(leader) = fill.leader {
            leader.complete(answer);
        }
    }

    /// The client-facing body.
    pub(crate) fn into_body(self) -> Body {
        Body::from_stream(futures_util::stream::unfold(self, |mut relay| async move {
            if relay.ended {
                return None;
            }
            match tokio::time::timeout(relay.idle_timeout, relay.upstream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    relay.relayed += chunk.len() as u64;
                    if let Some(fill) = relay.fill.as_mut() {
                        fill.progress();
                        if matches!(relay.tap, Tap::Sse(_)) {
                            fill.keep(&chunk);
                        }
                    }
                    let mut out = relay.tap.feed(chunk);
                    if relay.expected.is_some_and(|n| relay.relayed >= n) {
                        let rest = relay.tap.finish();
                        if !rest.is_empty() {
                            out = [out, rest].concat().into();
                        }
                        relay.end(None);
                    }
                    Some((Ok(out), relay))
                }
                Ok(None) => {
                    let rest = relay.tap.finish();
                    relay.end(None);
                    (!rest.is_empty()).then_some((Ok(rest), relay))
                }
                Ok(Some(Err(e))) => {
                    relay.end(Some(Outcome::UpstreamError));
                    Some((Err(std::io::Error::other(format!("upstream body failed: {e}"))), relay))
                }
                Err(_) => {
                    relay.end(Some(Outcome::UpstreamError));
                    let msg = format!("upstream sent nothing for {:?}", relay.idle_timeout);
                    Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg)), relay))
                }
            }
        }))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server is shutting down).
        self.end(Some(Outcome::ClientClosed));
    }
}
