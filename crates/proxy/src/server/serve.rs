//! Serving the API port: our own accept loop, so that every connection is bounded. Headers
//! must arrive within a time (slowloris), a response the client stops reading is cut after a
//! time (it cannot hold a concurrency slot forever), connections are capped, and shutdown is
//! the Kubernetes way: not ready at once, still accepting for a drain delay while endpoints
//! catch up, then no new connections while queued and in-flight requests finish.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::Error;
use crate::proxy::Proxy;
use crate::server::routes;

/// How the API port treats connections.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Longest wait for a request's headers (also for the next request on an idle keep-alive
    /// connection).
    pub header_read_timeout: Duration,
    /// Longest a response write may make no progress because the client stopped reading.
    pub write_timeout: Duration,
    /// Most client connections at once; beyond it new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// After SIGTERM: keep accepting this long (reporting not ready) before closing the
    /// listener, while Service endpoints drop this pod. Zero: close at once.
    pub drain_delay: Duration,
    /// Serving threads, each a single-threaded runtime with its own upstream connections, so a
    /// request never crosses threads (work stealing between cores costs throughput and the
    /// tail; docs/benchmarks.md has the figures). Zero: serve on the caller's runtime.
    pub workers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            drain_delay: Duration::from_secs(5),
            workers: 0,
        }
    }
}

/// The threads the machine (or the container's CPU quota) gives this process.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Serve the API on `api` and the admin endpoints on `admin` until `shutdown` resolves; then
/// report not-ready, keep accepting for the drain delay, stop accepting, and let queued and
/// in-flight requests finish (bounded by their own deadlines and timeouts).
pub async fn serve(
    proxy: Arc<Proxy>,
    api: TcpListener,
    admin: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_router = routes::admin(&proxy);
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, admin_router)
            .with_graceful_shutdown(async move {
                let _ = admin_stopped.await;
            })
            .await
    });

    let acceptor = Acceptor::new(&proxy, &options);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Each accept loop reports here when it has stopped and its connections have finished.
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Result<(), Error>>();
    let loops = accept_loops(&proxy, &acceptor, api, &stopped, &done_tx, options.workers)?;
    drop(done_tx);

    // Shutdown: not ready at once; the listener closes after the drain delay. An accept loop
    // that ends before that has failed, and so does the proxy.
    let draining = Arc::clone(&proxy);
    let delay = options.drain_delay;
    let stop_accepting = async move {
        shutdown.await;
        draining.set_ready(false);
        tracing::info!(drain_delay = ?delay, "shutting down: not ready; still accepting while endpoints drain");
        tokio::time::sleep(delay).await;
        tracing::info!("no new connections; finishing queued and in-flight requests");
    };
    tokio::select! {
        () = stop_accepting => {}
        early = done.recv() => {
            let _ = stop.send(true);
            return Err(match early {
                Some(Err(e)) => e,
                Some(Ok(())) => Error::Stopped("a serving worker stopped on its own".to_owned()),
                None => Error::Stopped("a serving worker died".to_owned()),
            });
        }
    }
    let _ = stop.send(true);
    for _ in 0..loops {
        done.recv().await.unwrap_or_else(|| Err(Error::Stopped("a serving worker died".to_owned())))?;
    }
    let _ = admin_stop.send(());
    admin_task
        .await
        .map_err(|e| Error::Stopped(format!("the admin server: {e}")))?
        .map_err(Error::io("serving the admin port"))?;
    Ok(())
}

impl Acceptor {
    /// The HTTP/1.1 and HTTP/2 builders with the connection bounds of `options`, serving the
    /// proxy's API.
    fn new(proxy: &Arc<Proxy>, options: &ServeOptions) -> Self {
        let mut h1 = http1::Builder::new();
        // hyper's smallest read buffer: a waiting request holds its connection's buffer, and 8 KiB
        // is what nginx allows a header block by default.
        h1.timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(MAX_HEADER_BYTES as usize);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        // The bounds HTTP/1.1 has, for HTTP/2 too: the same 8 KiB of headers, and a peer that stops
        // answering pings is dropped within two header read timeouts (the wait for the preface and
        // requests, and the idle timeout, are `serve_h2`'s).
        h2.timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES)
            .keep_alive_interval(options.header_read_timeout)
            .keep_alive_timeout(options.header_read_timeout);
        Acceptor {
            h1,
            h2,
            service: TowerToHyperService::new(routes::api(proxy)),
            slots: Arc::new(Semaphore::new(options.max_connections.max(1))),
            write_timeout: options.write_timeout,
            first_bytes_timeout: options.header_read_timeout,
        }
    }
}

/// Start the accept loops on `api`: one task on this runtime (`workers == 0`), or one thread
/// with its own runtime per worker, all accepting from the same socket. Each reports on
/// `done` when it has stopped; returns how many there are.
fn accept_loops(
    proxy: &Arc<Proxy>,
    acceptor: &Acceptor,
    api: TcpListener,
    stopped: &tokio::sync::watch::Receiver<bool>,
    done: &tokio::sync::mpsc::UnboundedSender<Result<(), Error>>,
    workers: usize,
) -> Result<usize, Error> {
    let mut loops = 0;
    if workers == 0 {
        let (acceptor, stopped, done_tx) = (acceptor.clone(), stopped.clone(), done.clone());
        tokio::spawn(async move {
            let _ = done_tx.send(acceptor.run(api, stopped).await);
        });
        loops = 1;
    } else {
        // Every worker accepts from the same listening socket: whichever is free takes the
        // next connection, and keeps it.
        let shared = api.into_std().map_err(Error::io("taking the API listener for the workers"))?;
        for i in 0..workers {
            let listener = shared.try_clone().map_err(Error::io("sharing the API listener"))?;
            let (acceptor, stopped, proxy) = (acceptor.clone(), stopped.clone(), Arc::clone(proxy));
            let done_tx = done.clone();
            std::thread::Builder::new()
                .name(format!("llmproxy-worker-{i}"))
                .spawn(move || {
                    let run = || -> Result<(), Error> {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(Error::io(format!("starting serving worker {i}")))?;
                        rt.block_on(async {
                            crate::upstream::pool::use_worker_pool(proxy.pool());
                            let listener = TcpListener::from_std(listener)
                                .map_err(Error::io(format!("serving worker {i}'s listener")))?;
                            acceptor.run(listener, stopped).await
                        })
                    };
                    // A worker that panicked drops `done_tx` unsent: the receiver sees it too.
                    let _ = done_tx.send(run());
                })
                .map_err(Error::io(format!("starting serving worker {i}")))?;
            loops += 1;
        }
    }
    Ok(loops)
}

/// The largest request head, in either protocol (HTTP/2 counts 32 bytes more for each header).
const MAX_HEADER_BYTES: u32 = 8192;

/// What each accept loop needs: the connection settings, the service, the connection cap.
#[derive(Clone)]
struct Acceptor {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    service: TowerToHyperService<axum::Router>,
    slots: Arc<Semaphore>,
    write_timeout: Duration,
    /// Longest wait for the bytes that tell HTTP/1.1 from HTTP/2.
    first_bytes_timeout: Duration,
}

/// Run a connection as a task of its own, holding its place under `--max-connections` until it
/// ends.
fn spawn_holding<C>(conn: C, slot: tokio::sync::OwnedSemaphorePermit)
where
    C: Future + Send + 'static,
{
    tokio::spawn(async move {
        let _ = conn.await;
        drop(slot);
    });
}

/// What a client speaking HTTP/2 without TLS (prior knowledge) opens its connection with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the connection opens with the HTTP/2 preface, from its first bytes (peeked, not
/// read: hyper reads them). An HTTP/1.1 request line differs by its second byte at the latest.
/// `None`: nothing that tells arrived in time, or the connection failed.
async fn speaks_h2(stream: &TcpStream, limit: Duration) -> Option<bool> {
    let tell = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 || buf[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            // A prefix of the preface so far: the rest is in flight.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(limit, tell).await.ok().flatten()
}

impl Acceptor {
    /// Accept and serve connections until `stopped` turns true; then let them finish.
    async fn run(
        self,
        api: TcpListener,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let graceful = GracefulShutdown::new();
        // HTTP/2 connections watch for the stop themselves (they also close when idle).
        let h2_stop = stopped.clone();
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        tokio::pin!(stop);
        loop {
            let slot = tokio::select! {
                () = &mut stop => break,
                slot = Arc::clone(&self.slots).acquire_owned() => slot.map_err(|_| Error::Stopped("the connection slots closed".to_owned()))?,
            };
            let (stream, _) = tokio::select! {
                () = &mut stop => break,
                accepted = api.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let accepted = tokio::time::Instant::now();
            let _ = stream.set_nodelay(true);
            // Each protocol's connection is a task of its own size: one task that could hold
            // either would carry an HTTP/2 connection's 1.5 KiB for every HTTP/1.1 one (600 B).
            let (h1, h2, service) = (self.h1.clone(), self.h2.clone(), self.service.clone());
            let (watcher, write_timeout, limit) =
                (graceful.watcher(), self.write_timeout, self.first_bytes_timeout);
            let stopped = h2_stop.clone();
            tokio::spawn(async move {
                let Some(h2_client) = speaks_h2(&stream, limit).await else { return };
                let io = TokioIo::new(WriteTimeout::new(stream, write_timeout));
                if h2_client {
                    let streams = Arc::new(Streams::new(accepted));
                    let service = counting(service, Arc::clone(&streams));
                    let conn = h2.serve_connection(io, service);
                    spawn_holding(serve_h2(conn, streams, limit, stopped, watcher), slot);
                } else {
                    spawn_holding(watcher.watch(h1.serve_connection(io, service)), slot);
                }
            });
        }
        drop(api);
        graceful.shutdown().await;
        Ok(())
    }
}

/// The streams open on one HTTP/2 connection and when that number last changed: hyper's
/// HTTP/2 server has no header read or idle timeout of its own, so `serve_h2` keeps them.
struct Streams {
    open: AtomicUsize,
    /// Milliseconds from `since` to the last stream opened or closed.
    changed: AtomicU64,
    since: Instant,
}

impl Streams {
    fn new(since: Instant) -> Self {
        Self { open: AtomicUsize::new(0), changed: AtomicU64::new(0), since }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.changed.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no stream has been open for `limit` (from the accept, for the first).
    async fn idle_for(&self, limit: Duration) {
        loop {
            if self.open.load(Ordering::Acquire) > 0 {
                // A stream that closes meanwhile sets `changed` later than this sleep's start:
                // the check after it still waits the whole `limit` from that close.
                tokio::time::sleep(limit).await;
                continue;
            }
            let at = self.since + Duration::from_millis(self.changed.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= at && self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

/// One open stream: counted from its request's headers until its response is sent or dropped.
struct OpenStream(Arc<Streams>);

impl OpenStream {
    fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        streams.touch();
        Self(Arc::clone(streams))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted as open while hyper sends it.
struct Counted {
    body: axum::body::Body,
    _open: OpenStream,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// `service`, counting each request as an open stream of `streams` until its answer is done.
fn counting(
    service: TowerToHyperService<axum::Router>,
    streams: Arc<Streams>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<Counted>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<Counted>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req| {
        let open = OpenStream::new(&streams);
        let answer = hyper::service::Service::call(&service, req);
        async move { answer.await.map(|resp| resp.map(|body| Counted { body, _open: open })) }
    })
}

/// Serve an HTTP/2 connection with the bounds HTTP/1.1 has: told to go away (GOAWAY) once no
/// stream has been open for `limit`, which also bounds the wait for the preface and the first
/// request's headers, or when the accept loop stops; its open streams finish first.
async fn serve_h2<C>(
    conn: C,
    streams: Arc<Streams>,
    limit: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    // Held: the accept loop's shutdown waits for this connection until it ends.
    _watcher: hyper_util::server::graceful::Watcher,
) where
    C: GoAway,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = streams.idle_for(limit) => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
    conn.as_mut().go_away();
    // The streams in flight finish, and the connection closes; if the peer never reads the
    // GOAWAY, `limit` after the last of them ends (or after the GOAWAY, if none was open).
    streams.touch();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = streams.idle_for(limit) => {}
    }
}

/// An HTTP/2 connection that can be told to finish (hyper's `graceful_shutdown`).
trait GoAway: Future {
    fn go_away(self: Pin<&mut Self>);
}

impl<S, B> GoAway for http2::Connection<TokioIo<WriteTimeout>, S, TokioExecutor>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn go_away(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A connection whose writes fail once they have made no progress for `timeout` (the client
/// stopped reading): the connection closes and the request behind it ends.
struct WriteTimeout {
    inner: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self { inner, timeout, stalled: None }
    }

    /// Track a pending write: start the clock on the first Pending, fail when it runs out.
    fn check<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let timeout = self.timeout;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The peer connects and never reads.
        let _peer = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = WriteTimeout::new(stream, Duration::from_millis(300));
        let chunk = vec![b'x'; 1 << 20];
        let result = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Err(e) = conn.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await;
        let err = result.expect("the write never gave up");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
