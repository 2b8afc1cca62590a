//! Idle connections to plain `http://` upstreams, kept for the next request to the same one:
//! most recently used first, a bounded number per upstream, closed after a while unused or
//! when the server closed them meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::net::TcpStream;

/// Idle connections kept per upstream; past this, a finished connection is closed.
const MAX_IDLE_PER_HOST: usize = 1024;
/// How long an idle connection is kept (servers close theirs after 5 s to a few minutes; a
/// reused connection the server closed meanwhile is noticed, and the request sent again).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections by upstream (`host:port`), most recently used last.
#[derive(Default)]
pub struct Idle {
    conns: Mutex<HashMap<Authority, Vec<IdleConn>>>,
    /// Whether a task closes the connections that stay idle too long.
    reaping: AtomicBool,
}

struct IdleConn {
    io: TcpStream,
    since: Instant,
}

impl Idle {
    fn lock(&self) -> MutexGuard<'_, HashMap<Authority, Vec<IdleConn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection to `to` that is still open.
    pub(super) fn take(&self, to: &Authority) -> Option<TcpStream> {
        let mut conns = self.lock();
        let list = conns.get_mut(to)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() >= IDLE_TIMEOUT {
                // The rest are older still.
                list.clear();
                break;
            }
            if is_open(&conn.io) {
                return Some(conn.io);
            }
        }
        None
    }

    /// Keep `io` for the next request to `to` (closed instead past the per-upstream bound).
    pub(super) fn put(self: &Arc<Self>, to: Authority, io: TcpStream) {
        if !self.reaping.load(Ordering::Relaxed) && reap(Arc::downgrade(self)) {
            self.reaping.store(true, Ordering::Relaxed);
        }
        let mut conns = self.lock();
        let list = conns.entry(to).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(IdleConn { io, since: Instant::now() });
        }
    }

    /// Close connections idle past the timeout.
    fn expire(&self) {
        let mut conns = self.lock();
        for list in conns.values_mut() {
            list.retain(|conn| conn.since.elapsed() < IDLE_TIMEOUT);
        }
        conns.retain(|_, list| !list.is_empty());
    }

    /// Idle connections to `to` (for tests).
    #[cfg(test)]
    pub(super) fn count(&self, to: &Authority) -> usize {
        self.lock().get(to).map_or(0, Vec::len)
    }
}

/// Close idle connections past their time, every few seconds, for as long as the pool lives;
/// `false` outside a runtime (nothing started).
fn reap(idle: Weak<Idle>) -> bool {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return false };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(IDLE_TIMEOUT / 6);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(idle) = idle.upgrade() else { return };
            idle.expire();
        }
    });
    true
}

/// Whether an idle connection can take a request: the server has neither closed it nor sent
/// anything unasked.
fn is_open(io: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
