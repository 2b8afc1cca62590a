//! The response body on its way to the client: passed on chunk by chunk as the upstream sends it,
//! watched for `usage`, and closed out (token settlement, metrics, log line) when it ends or the
//! client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

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
}

impl Relay {
    pub(crate) fn new(
        response: reqwest::Response,
        tap: Tap,
        idle_timeout: Duration,
        permit: Permit,
        record: RequestRecord,
        proxy: Arc<Proxy>,
    ) -> Self {
        Self {
            expected: response.content_length(),
            relayed: 0,
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
        if let (Some(permit), Some(usage)) = (self.permit.as_mut(), self.record.usage) {
            permit.settle(usage.total());
        }
        self.permit = None;
        self.record.finish(self.proxy.metrics());
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
