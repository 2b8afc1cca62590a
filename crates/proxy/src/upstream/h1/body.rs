//! An answer's body, read off its connection only as the relay asks for the next chunk: an
//! open stream waiting for its next event holds its socket and no buffer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use hyper::body::{Frame, SizeHint};
use tokio::net::TcpStream;

use super::decoder::Framing;
use super::{Error, Idle, read_some};

/// An answer's body, read from its connection as it is polled. Dropped before its end, it
/// closes the connection; read to its end, it puts the connection back for reuse.
pub struct Body {
    io: Option<TcpStream>,
    /// Bytes read and not yet handed out (empty and unallocated between reads).
    buf: BytesMut,
    framing: Framing,
    reuse: bool,
    idle: Arc<Idle>,
    authority: Authority,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").field("framing", &self.framing).finish_non_exhaustive()
    }
}

impl Body {
    /// The body of an answer whose head came on `io`, `buf` holding what was read past it.
    pub(super) fn new(
        io: TcpStream,
        buf: BytesMut,
        framing: Framing,
        reuse: bool,
        idle: &Arc<Idle>,
        authority: Authority,
    ) -> Self {
        let mut body = Self { io: Some(io), buf, framing, reuse, idle: Arc::clone(idle), authority };
        body.finish_if_done();
        body
    }

    /// Once the body is read whole, the connection goes back to the pool (or is closed).
    fn finish_if_done(&mut self) {
        if self.framing != Framing::Done {
            return;
        }
        let Some(io) = self.io.take() else { return };
        // Bytes past the answer were never asked for: the connection cannot be trusted.
        if self.reuse && self.buf.is_empty() {
            self.idle.put(self.authority.clone(), io);
        }
        self.buf = BytesMut::new();
    }

    /// Read more from the connection: `Ok(false)` at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        let Some(io) = self.io.as_ref() else { return Poll::Ready(Ok(false)) };
        loop {
            // Wait without a buffer: an idle stream holds none.
            ready!(io.poll_read_ready(cx))
                .map_err(|e| Error::other(format!("reading the answer failed: {e}")))?;
            match read_some(io, &mut self.buf) {
                Ok(n) => return Poll::Ready(Ok(n > 0)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(Error::other(format!("reading the answer failed: {e}")))),
            }
        }
    }

    /// A broken answer: the connection is closed and the body ends.
    fn fail(&mut self) {
        self.io = None;
        self.buf = BytesMut::new();
        self.framing = Framing::Done;
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            match this.framing.decode(&mut this.buf) {
                Ok(Some(data)) => {
                    this.finish_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.framing == Framing::Done => {
                    this.finish_if_done();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            // More is needed: drop an emptied buffer first, so that the bytes handed out keep
            // the old one alive only as long as they live.
            if this.buf.is_empty() {
                this.buf = BytesMut::new();
            }
            match ready!(this.poll_read(cx)) {
                Ok(true) => {}
                Ok(false) => {
                    // A close-delimited body ends here, and its connection with it.
                    this.reuse = false;
                    if let Err(e) = this.framing.closed() {
                        this.fail();
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
