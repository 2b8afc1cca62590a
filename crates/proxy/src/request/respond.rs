//! The answer on its way to the client: the upstream body passed on chunk by chunk as it
//! arrives, watched for `usage`, and closed out (token settlement, cache fill, record) when it
//! ends or the client goes away.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};

use http::{HeaderValue, header};
use llmproxy_api::Provider;

use super::cached::Fill;
use super::record::RecordGuard;
use crate::admission::queue::Permit;
use crate::cache::CachedResponse;
use crate::protocol::provider;
use crate::protocol::sse::SseTap;
use crate::protocol::tokens::{Usage, usage_in_tail};
use crate::request::error::Refusal;
use crate::telemetry::labels::Outcome;
use crate::upstream;
use crate::upstream::pool::Slot;

/// Bodies up to this size are read whole for their `usage`; of larger ones only the tail is kept.
const WHOLE_BODY: usize = 1 << 20;
/// How much of the end of a larger body is kept to find its `usage`.
const BODY_TAIL: usize = 64 << 10;

/// How the attempts ended.
pub(crate) enum Answer {
    /// The upstream's response, to relay; its reservation is settled when the body ends.
    Upstream {
        /// Status and headers received, body not yet read.
        response: upstream::Response,
        /// The admission it was sent under (boxed: the variant is large enough already).
        permit: Box<Permit>,
        /// The longest gap allowed between two chunks.
        idle_timeout: Duration,
        /// Remove the usage event the proxy asked for on the client's behalf.
        strip_usage_event: bool,
    },
    /// An upstream answer already read whole (a 429): relayed as it came.
    Buffered {
        /// The upstream's status.
        status: http::StatusCode,
        /// The upstream's headers.
        headers: http::HeaderMap,
        /// The upstream's body.
        body: Bytes,
    },
    /// The proxy answers itself.
    Refused(Refusal),
}

/// Turn the answer into the client's response; the record is finished when the body ends.
pub(crate) fn respond(answer: Answer, mut record: RecordGuard, fill: Option<Fill>) -> Response {
    let (response, permit, idle_timeout, strip_usage_event) = match answer {
        Answer::Refused(Refusal { error, outcome }) => {
            let dialect = provider::client_dialect(&record.get().path);
            record.finish(error.status.as_u16(), outcome);
            return error.response(dialect);
        }
        Answer::Buffered { status, headers, body } => {
            let rec = record.get();
            rec.status = status.as_u16();
            rec.outcome = Outcome::for_status(status.as_u16());
            let mut headers = upstream::response_headers(&headers);
            headers.remove(header::CONTENT_LENGTH);
            headers.insert("x-llmproxy-attempts", HeaderValue::from(rec.tried.attempts));
            record.complete();
            let mut out = Response::new(Body::from(body));
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            return out;
        }
        Answer::Upstream { response, permit, idle_timeout, strip_usage_event } => {
            (response, permit, idle_timeout, strip_usage_event)
        }
    };
    let status = response.status();
    let mut headers = upstream::response_headers(response.headers());
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let provider = permit.endpoint().provider;
    let tap =
        if is_sse { Tap::Sse(provider::sse_tap(provider, strip_usage_event)) } else { Tap::body(provider) };
    if is_sse {
        headers.remove(header::CONTENT_LENGTH);
    }
    let rec = record.get();
    rec.status = status.as_u16();
    rec.outcome = Outcome::for_status(status.as_u16());
    headers.insert("x-llmproxy-attempts", HeaderValue::from(rec.tried.attempts));
    if let Some(how) = rec.cache {
        headers.insert("x-llmproxy-cache", HeaderValue::from_static(how.label()));
    }
    let body = Relay::new(response, tap, idle_timeout, permit, record, fill).into_body();
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// How the body is watched.
enum Tap {
    /// `text/event-stream`: scanned line by line.
    Sse(SseTap),
    /// Anything else: kept whole up to `WHOLE_BODY`, else only its tail, and read for `usage`
    /// at the end, the way its provider writes it.
    Body { buf: BytesMut, total: usize, provider: Provider },
}

impl Tap {
    fn body(provider: Provider) -> Self {
        Tap::Body { buf: BytesMut::new(), total: 0, provider }
    }

    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Tap::Sse(sse) => sse.feed(chunk),
            Tap::Body { buf, total, .. } => {
                *total += chunk.len();
                buf.extend_from_slice(&chunk);
                if *total > WHOLE_BODY && buf.len() > 2 * BODY_TAIL {
                    let _ = buf.split_to(buf.len() - BODY_TAIL);
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
            Tap::Body { buf, total, provider } if *total <= WHOLE_BODY => {
                provider::usage_in_body(*provider, buf)
            }
            Tap::Body { buf, .. } => usage_in_tail(buf),
        }
    }
}

/// The state of one relayed body.
struct Relay {
    upstream: upstream::Body,
    tap: Tap,
    idle_timeout: Duration,
    permit: Option<Box<Permit>>,
    record: Option<RecordGuard>,
    /// Body bytes the upstream announced (`Content-Length`), and bytes relayed so far: a server
    /// stops polling a body once it has sent the announced length, so the end is noticed here.
    expected: Option<u64>,
    relayed: u64,
    /// The framing marks the body's end; else only the connection's close did, as it does for
    /// an answer cut short.
    framed: bool,
    fill: Option<Fill>,
    content_type: Option<HeaderValue>,
    /// Its place on a shared HTTP/2 connection, until the body is done with.
    _slot: Option<Slot>,
}

impl Relay {
    fn new(
        mut response: upstream::Response,
        tap: Tap,
        idle_timeout: Duration,
        permit: Box<Permit>,
        record: RecordGuard,
        fill: Option<Fill>,
    ) -> Self {
        Self {
            expected: upstream::content_length(&response),
            relayed: 0,
            framed: upstream::framed_end(&response),
            content_type: response.headers().get(header::CONTENT_TYPE).cloned(),
            _slot: response.extensions_mut().remove::<Slot>(),
            fill,
            upstream: response.into_body(),
            tap,
            idle_timeout,
            permit: Some(permit),
            record: Some(record),
        }
    }

    fn ended(&self) -> bool {
        self.record.is_none()
    }

    /// Close out the request: settle tokens, fill the cache, finish the record. Runs once.
    fn end(&mut self, outcome: Option<Outcome>) {
        let Some(mut record) = self.record.take() else { return };
        let usage = self.tap.usage();
        let rec = record.get();
        if let Some(o) = outcome {
            rec.outcome = o;
        }
        rec.usage = usage;
        if let Some(permit) = self.permit.take() {
            // Without usage (an error answer, a stream cut short, a client gone) the charge
            // made at admission stands: never more.
            permit.settle(usage);
        }
        let (status, outcome) = (rec.status, rec.outcome);
        if outcome == Outcome::Ok && (200..300).contains(&status) {
            self.store(status, usage);
        }
        record.finish(status, outcome);
    }

    /// A complete 2xx answer goes into the cache and to the waiting followers; anything else
    /// drops the fill, whose leader guard tells the followers to try for themselves.
    fn store(&mut self, status: u16, usage: Option<Usage>) {
        let Some(mut fill) = self.fill.take() else { return };
        let stream = match &self.tap {
            // A stream is complete only with its `[DONE]`.
            Tap::Sse(sse) if !sse.done() => return,
            Tap::Sse(_) => true,
            Tap::Body { .. } => false,
        };
        let Some(body) = fill.raw() else { return };
        // Ended by the connection's close alone, a body may have been cut anywhere: only one
        // that parses whole as JSON is known to be complete.
        if !stream && !self.framed && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return;
        }
        let answer = Arc::new(CachedResponse {
            status,
            content_type: self.content_type.clone(),
            body,
            stream,
            usage,
            created: std::time::Instant::now(),
        });
        fill.complete(answer);
    }

    /// The client-facing body.
    fn into_body(self) -> Body {
        Body::from_stream(futures_util::stream::unfold(self, |mut relay| async move {
            if relay.ended() {
                return None;
            }
            match tokio::time::timeout(relay.idle_timeout, upstream::next_chunk(&mut relay.upstream)).await {
                Ok(Some(Ok(chunk))) => {
                    relay.relayed += chunk.len() as u64;
                    if let Some(fill) = relay.fill.as_mut() {
                        fill.progress();
                        fill.keep(&chunk);
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
