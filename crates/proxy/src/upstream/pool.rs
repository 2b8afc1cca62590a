//! Connections to the upstreams. hyper's pooled client keeps one HTTP/2 connection per host, and
//! a request past the server's stream limit waits inside it, unseen and unbounded (hyper reads
//! RFC 9113 9.1 as "do not open a second connection", hyperium/hyper#2197). A proxy in front of
//! an organisation cannot: a batch of 1,000 streams to an API that allows 100 per connection
//! would run 100 at a time, and the rest would time out waiting for headers. So the pool holds
//! lanes, each a hyper client of its own (its own connections): an HTTP/2 upstream's request
//! takes the first lane with fewer than `maxStreamsPerConnection` of its requests in flight, and
//! past that a new lane, a new connection. HTTP/1.1 over TLS stays in the first lane, where
//! hyper already opens a connection per request in flight; plain `http://` HTTP/1.1 (model
//! servers in the cluster) goes through the lean client of `h1`, without hyper's per-connection
//! task, channels and buffers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use llmproxy_api::Protocol;

use crate::upstream::h1;
use crate::upstream::{Body, Request, Response, SendError};

/// One lane's client: hyper's pool over rustls.
type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// The read buffer of an upstream HTTP/1 connection over TLS. An answer streams through it
/// chunk by chunk, so it need not grow: 4 KiB per open stream instead of hyper's adaptive
/// 8 KiB-and-up.
const UPSTREAM_READ_BUF: usize = 4096;

/// Lanes of one protocol at most (256 x 100 streams by default); past that, the least busy
/// lane takes the request and the server's own limit queues it.
const MAX_LANES: usize = 256;

/// The upstream connections of one serving thread (or of the whole process, without workers).
pub(crate) struct Pool {
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    /// By protocol: `auto`, `http1`, `http2`.
    kinds: [Mutex<Kind>; 3],
    /// Idle plain-HTTP/1.1 connections.
    h1: Arc<h1::Idle>,
}

#[derive(Default)]
struct Kind {
    lanes: Vec<Lane>,
    /// Origins that answered in HTTP/1.x under `auto`: one request per connection anyway.
    http1: HashSet<String>,
}

struct Lane {
    client: Client,
    /// Requests in flight, per origin (`scheme://host:port`).
    open: HashMap<String, Arc<AtomicUsize>>,
}

/// A request's place on an HTTP/2 connection, held in the response's extensions until the
/// answer is done with (the relay takes it out and keeps it to the end of the body).
#[derive(Clone)]
pub(crate) struct Slot(#[allow(dead_code)] Arc<Taken>);

struct Taken(Arc<AtomicUsize>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// A pool with no connections yet: `TCP_NODELAY`, no overall timeout (streams may run long;
    /// the proxy times the wait for headers and each gap between chunks itself), no redirects
    /// followed (hyper's client has none).
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        // kube and this client both use rustls; pick the ring provider once for the process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self { tls: tls_config(), connect_timeout, kinds: Default::default(), h1: Arc::default() }
    }

    /// Another pool with this one's settings and roots (read from disk once per process), and
    /// connections of its own.
    fn sibling(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            kinds: Default::default(),
            h1: Arc::default(),
        }
    }

    /// Send `req` over a connection that speaks `protocol`, at most `max_streams` to a
    /// connection where it multiplexes.
    pub(crate) async fn send(
        &self,
        protocol: Protocol,
        max_streams: u32,
        req: Request,
    ) -> Result<Response, SendError> {
        if req.uri().scheme_str() != Some("https") && protocol != Protocol::Http2 {
            let resp = h1::send(&self.h1, self.connect_timeout, req).await.map_err(SendError::H1)?;
            return Ok(resp.map(|b| Body::H1(Box::new(b))));
        }
        let (client, counted) = self.pick(protocol, max_streams, req.uri());
        let mut resp = client.request(req).await.map_err(SendError::Hyper)?.map(Body::Hyper);
        if let Some((slot, origin)) = counted {
            if protocol == Protocol::Auto && resp.version() < http::Version::HTTP_2 {
                self.kind(protocol).http1.insert(origin);
            }
            resp.extensions_mut().insert(slot);
        }
        Ok(resp)
    }

    fn kind(&self, protocol: Protocol) -> MutexGuard<'_, Kind> {
        let i = match protocol {
            Protocol::Auto => 0,
            Protocol::Http1 => 1,
            Protocol::Http2 => 2,
        };
        self.kinds[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lane for a request to `uri`; where it multiplexes, also its slot and its origin.
    fn pick(
        &self,
        protocol: Protocol,
        max_streams: u32,
        uri: &http::Uri,
    ) -> (Client, Option<(Slot, String)>) {
        let mut kind = self.kind(protocol);
        if kind.lanes.is_empty() {
            kind.lanes.push(Lane { client: self.client(protocol), open: HashMap::new() });
        }
        // TLS under `auto` may negotiate HTTP/2 until an answer says otherwise; HTTP/1.1 takes
        // the first lane, uncounted (and without an origin string). Plain http:// in HTTP/1.1
        // does not come here (`send` gives it to `h1`), but would take that lane too.
        let tls = uri.scheme_str() == Some("https");
        let origin = match protocol {
            Protocol::Http2 => origin(uri),
            Protocol::Auto if tls => origin(uri),
            Protocol::Auto | Protocol::Http1 => return (kind.lanes[0].client.clone(), None),
        };
        if kind.http1.contains(&origin) {
            return (kind.lanes[0].client.clone(), None);
        }
        let origin = origin.as_str();
        let cap = usize::try_from(max_streams.max(1)).unwrap_or(usize::MAX);
        let load = |lane: &Lane| lane.open.get(origin).map_or(0, |n| n.load(Ordering::Relaxed));
        let i = match kind.lanes.iter().position(|lane| load(lane) < cap) {
            Some(i) => i,
            None if kind.lanes.len() < MAX_LANES => {
                let client = self.client(protocol);
                kind.lanes.push(Lane { client, open: HashMap::new() });
                kind.lanes.len() - 1
            }
            None => (0..kind.lanes.len()).min_by_key(|&i| load(&kind.lanes[i])).unwrap_or(0),
        };
        let lane = &mut kind.lanes[i];
        let open = match lane.open.get(origin) {
            Some(n) => Arc::clone(n),
            None => Arc::clone(lane.open.entry(origin.to_owned()).or_default()),
        };
        open.fetch_add(1, Ordering::Relaxed);
        (lane.client.clone(), Some((Slot(Arc::new(Taken(open))), origin.to_owned())))
    }

    /// A new lane's client: its own pool, hence its own connections.
    fn client(&self, protocol: Protocol) -> Client {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(self.tls.clone()).https_or_http();
        let connector = match protocol {
            Protocol::Auto => tls.enable_all_versions().wrap_connector(http),
            Protocol::Http1 => tls.enable_http1().wrap_connector(http),
            Protocol::Http2 => tls.enable_http2().wrap_connector(http),
        };
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .http1_read_buf_exact_size(UPSTREAM_READ_BUF)
            .http2_only(protocol == Protocol::Http2)
            .build(connector)
    }
}

/// The system's roots; without a CA bundle (a bare image) none: http:// upstreams still work,
/// and an https:// one fails each attempt with a certificate error that says so.
fn tls_config() -> rustls::ClientConfig {
    use hyper_rustls::ConfigBuilderExt as _;
    match rustls::ClientConfig::builder().with_native_roots() {
        Ok(builder) => builder.with_no_client_auth(),
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates found; https upstreams will fail");
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    }
}

/// `scheme://host:port` of a request: what one connection serves.
fn origin(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    format!("{scheme}://{host}:{port}")
}

thread_local! {
    /// A serving worker's own pool: an upstream connection is driven by the thread that made
    /// it, and only that thread's requests use it.
    static WORKER_POOL: std::cell::RefCell<Option<Arc<Pool>>> = const { std::cell::RefCell::new(None) };
}

/// Give this thread (a serving worker) its own upstream pool, a sibling of `shared`.
pub(crate) fn use_worker_pool(shared: &Pool) {
    WORKER_POOL.with(|p| *p.borrow_mut() = Some(Arc::new(shared.sibling())));
}

/// Send through this worker's pool, or through `shared` on a thread that has none.
pub(crate) async fn send(
    shared: &Pool,
    protocol: Protocol,
    max_streams: u32,
    req: Request,
) -> Result<Response, SendError> {
    let own = WORKER_POOL.with(|p| p.borrow().clone());
    own.as_deref().unwrap_or(shared).send(protocol, max_streams, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn origins_name_one_connection_target() {
        assert_eq!(origin(&uri("https://api.openai.com/v1/chat")), "https://api.openai.com:443");
        assert_eq!(origin(&uri("http://127.0.0.1:8000/v1")), "http://127.0.0.1:8000");
    }

    #[tokio::test]
    async fn http2_requests_spread_over_lanes_past_the_stream_cap() {
        let pool = Pool::new(Duration::from_secs(1));
        let (h2c, o) = (uri("http://mock/v1/chat"), "http://mock:80");
        let a: Vec<_> = (0..3).map(|_| pool.pick(Protocol::Http2, 2, &h2c)).collect();
        assert_eq!(pool.kind(Protocol::Http2).lanes.len(), 2, "the third request opens a second lane");
        assert!(a.iter().all(|(_, slot)| slot.is_some()));
        drop(a);
        let again = pool.pick(Protocol::Http2, 2, &h2c);
        assert_eq!(pool.kind(Protocol::Http2).lanes[0].open[o].load(Ordering::Relaxed), 1, "slots come back");
        drop(again);
        // HTTP/1.1 (by choice, or plain http:// under auto) stays in one lane, uncounted.
        for protocol in [Protocol::Http1, Protocol::Auto] {
            let many: Vec<_> = (0..5).map(|_| pool.pick(protocol, 2, &h2c)).collect();
            assert!(many.iter().all(|(_, slot)| slot.is_none()));
            assert_eq!(pool.kind(protocol).lanes.len(), 1);
        }
        // https under auto counts until an answer says HTTP/1.1.
        let tls = uri("https://api/v1/chat");
        let (_, counted) = pool.pick(Protocol::Auto, 2, &tls);
        let origin = counted.map(|(_, origin)| origin);
        assert_eq!(origin.as_deref(), Some("https://api:443"));
        pool.kind(Protocol::Auto).http1.extend(origin);
        assert!(pool.pick(Protocol::Auto, 2, &tls).1.is_none());
    }
}
