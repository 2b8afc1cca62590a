//! Serving the API port: our own accept loop, so that every connection is bounded. Headers
//! must arrive within a time (slowloris), a response the client stops reading is cut after a
//! time (it cannot hold a concurrency slot forever), connections are capped, and shutdown is
//! the Kubernetes way: not ready at once, still accepting for a drain delay while endpoints
//! catch up, then no new connections while queued and in-flight requests finish.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::routes;
use crate::state::Proxy;

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
    /// request never crosses threads (work stealing between two cores cost a fifth of the
    /// throughput and most of the p99). Zero: serve on the caller's runtime.
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
) -> anyhow::Result<()> {
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_router = routes::admin(&proxy);
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, admin_router)
            .with_graceful_shutdown(async move {
                let _ = admin_stopped.await;
            })
            .await
    });

    let mut h1 = http1::Builder::new();
    // hyper's smallest read buffer: a waiting request holds its connection's buffer, and 8 KiB
    // is what nginx allows a header block by default.
    h1.timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout).max_buf_size(8192);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    let acceptor = Acceptor {
        h1,
        h2,
        service: TowerToHyperService::new(routes::api(&proxy)),
        slots: Arc::new(Semaphore::new(options.max_connections.max(1))),
        write_timeout: options.write_timeout,
        first_bytes_timeout: options.header_read_timeout,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Each accept loop reports here when it has stopped and its connections have finished.
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut loops = 0;
    if options.workers == 0 {
        let (acceptor, stopped, done_tx) = (acceptor.clone(), stopped.clone(), done_tx.clone());
        tokio::spawn(async move {
            let _ = done_tx.send(acceptor.run(api, stopped).await);
        });
        loops = 1;
    } else {
        // Every worker accepts from the same listening socket: whichever is free takes the
        // next connection, and keeps it.
        let shared = api.into_std()?;
        for i in 0..options.workers {
            let listener = shared.try_clone()?;
            let (acceptor, stopped, proxy) = (acceptor.clone(), stopped.clone(), Arc::clone(&proxy));
            let done_tx = done_tx.clone();
            std::thread::Builder::new().name(format!("llmproxy-worker-{i}")).spawn(move || {
                let run = || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(async {
                        crate::pool::use_worker_pool(proxy.pool());
                        acceptor.run(TcpListener::from_std(listener)?, stopped).await
                    })
                };
                // A worker that panicked drops `done_tx` unsent: the receiver sees it too.
                let _ = done_tx.send(run().map_err(|e| e.context(format!("serving worker {i}"))));
            })?;
            loops += 1;
        }
    }
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
                Some(Ok(())) => anyhow::anyhow!("a serving worker stopped on its own"),
                None => anyhow::anyhow!("a serving worker died"),
            });
        }
    }
    let _ = stop.send(true);
    for _ in 0..loops {
        done.recv().await.unwrap_or_else(|| Err(anyhow::anyhow!("a serving worker died")))?;
    }
    let _ = admin_stop.send(());
    admin_task.await??;
    Ok(())
}

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
    ) -> anyhow::Result<()> {
        let graceful = GracefulShutdown::new();
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        tokio::pin!(stop);
        loop {
            let slot = tokio::select! {
                () = &mut stop => break,
                slot = Arc::clone(&self.slots).acquire_owned() => slot?,
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
            let _ = stream.set_nodelay(true);
            // Each protocol's connection is a task of its own size: one task that could hold
            // either would carry an HTTP/2 connection's 1.5 KiB for every HTTP/1.1 one (600 B).
            let (h1, h2, service) = (self.h1.clone(), self.h2.clone(), self.service.clone());
            let (watcher, write_timeout, limit) =
                (graceful.watcher(), self.write_timeout, self.first_bytes_timeout);
            tokio::spawn(async move {
                let Some(h2_client) = speaks_h2(&stream, limit).await else { return };
                let io = TokioIo::new(WriteTimeout::new(stream, write_timeout));
                if h2_client {
                    spawn_holding(watcher.watch(h2.serve_connection(io, service)), slot);
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // The peer connects and never reads.
        let _peer = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
        let (stream, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
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
        let err = result.unwrap_or_else(|_| panic!("the write never gave up"));
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
