//! A lean HTTP/1.1 client for plain `http://` upstreams (model servers and gateways in the
//! cluster). hyper's pooled client gives every connection a task of its own, a request channel
//! whose first block holds 32 requests (8 KiB), an 8 KiB header buffer and a read buffer, and
//! hands each answer from that task to the request's through two more channels. This client
//! has none of them: the request's own task writes the request, reads the head, and the
//! response body reads the socket as the client's connection asks for the next chunk. An open
//! stream waiting for its next event holds its socket and a few hundred bytes, no buffer; a
//! finished answer puts its connection back for the next request to the same upstream.
//!
//! Everything an upstream sends is bounded: the head (64 KiB, 100 headers), a chunk-size line
//! and the trailers; a malformed answer is an error, never a hang or a panic. TLS and HTTP/2
//! upstreams stay on hyper (`pool`).
//!
//! Here: the exchange on one connection (write the request, read the head). The bytes are
//! turned into a head and body pieces by `decoder`, which does no I/O; `body` reads the rest
//! of the answer as it is polled; `idle` keeps finished connections for the next request.

mod body;
mod decoder;
mod idle;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Method;
use http::header;
use http::uri::Authority;
use http_body_util::Full;
use hyper::body::Body as _;
use tokio::net::TcpStream;

pub use body::Body;
use decoder::{Framing, Head, MAX_HEAD};
pub use idle::Idle;

/// Read this much at a time. An answer streams through chunk by chunk; a buffer is held only
/// while bytes are in it.
const READ_BUF: usize = 4096;

/// Why a request got no answer.
#[derive(Debug)]
pub struct Error {
    /// No connection could be made: the upstream never saw the request.
    connect: bool,
    message: String,
}

impl Error {
    fn connect(message: String) -> Self {
        Self { connect: true, message }
    }

    fn other(message: impl Into<String>) -> Self {
        Self { connect: false, message: message.into() }
    }

    /// Whether no connection was made (so the request was never sent).
    pub fn is_connect(&self) -> bool {
        self.connect
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Send `req` to its `http://` upstream over an idle connection or a new one, and read the
/// answer's head; the body is read as it is polled.
pub async fn send(
    idle: &Arc<Idle>,
    connect_timeout: Duration,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<Body>, Error> {
    let (parts, body) = req.into_parts();
    let body = whole(body);
    let authority =
        parts.uri.authority().cloned().ok_or_else(|| Error::connect("no host in the URL".into()))?;
    let head = request_head(&parts, &authority, body.len());
    let mut maybe_seen = false;
    if let Some(io) = idle.take(&authority) {
        match exchange(io, &head, &body).await {
            Ok(done) => return response(idle, authority, &parts.method, done),
            // The server closed the kept-alive connection (a close that crossed the request)
            // before it had the whole request, or, for a method safe to repeat, before any
            // answer: it goes again on a new connection. A POST it may have acted on does not;
            // the retry policy decides about it.
            Err(Failed::Unanswered { written, .. }) if !written || idempotent(&parts.method) => {
                maybe_seen = written;
            }
            Err(Failed::Unanswered { error, .. } | Failed::Other(error)) => return Err(error),
        }
    }
    let io = match connect(&authority, connect_timeout).await {
        Ok(io) => io,
        // The first try may have reached the upstream: not a request that was never sent.
        Err(e) if maybe_seen => return Err(Error::other(e.message)),
        Err(e) => return Err(e),
    };
    match exchange(io, &head, &body).await {
        Ok(done) => response(idle, authority, &parts.method, done),
        Err(Failed::Unanswered { error, .. } | Failed::Other(error)) => Err(error),
    }
}

/// Methods that may be sent twice without harm (RFC 9110 9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// The bytes of a `Full` body (ready at once: it is one frame).
fn whole(mut body: Full<Bytes>) -> Bytes {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

async fn connect(to: &Authority, timeout: Duration) -> Result<TcpStream, Error> {
    let host = to.host().trim_start_matches('[').trim_end_matches(']');
    let port = to.port_u16().unwrap_or(80);
    let io = match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return Err(Error::connect(format!("tcp connect error: {e}"))),
        Err(_) => return Err(Error::connect(format!("tcp connect error: no connection within {timeout:?}"))),
    };
    io.set_nodelay(true).map_err(|e| Error::connect(format!("tcp connect error: {e}")))?;
    Ok(io)
}

/// The request line and headers: origin-form target, `Host` unless given, `Content-Length`
/// recomputed (the body is always whole here).
fn request_head(parts: &http::request::Parts, authority: &Authority, body_len: usize) -> Vec<u8> {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut size = parts.method.as_str().len() + target.len() + authority.as_str().len() + 64;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(authority.as_str().as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        // The body is whole and goes at once: no `Expect: 100-continue` handshake.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::EXPECT {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let bodyless = matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS);
    if body_len > 0 || !bodyless {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(body_len.to_string().as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

enum Failed {
    /// Not a byte came back before the connection failed; `written` if the whole request had
    /// gone out (so the upstream may have acted on it).
    Unanswered {
        error: Error,
        written: bool,
    },
    Other(Error),
}

/// A request written (perhaps not all of it) and its answer's head read.
struct Exchanged {
    head: Head,
    io: TcpStream,
    /// Bytes read past the head.
    buf: BytesMut,
    /// Whether the whole request went out before the answer came.
    complete: bool,
}

/// Write the request and read the response head; the bytes after the head stay in the buffer.
async fn exchange(io: TcpStream, head: &[u8], body: &Bytes) -> Result<Exchanged, Failed> {
    let mut buf = BytesMut::new();
    let complete = write_request(&io, head, body, &mut buf).await;
    let mut interim = 0;
    loop {
        if let Some(head) = decoder::final_head(&mut buf, &mut interim).map_err(Failed::Other)? {
            return Ok(Exchanged { head, io, buf, complete });
        }
        let answered = interim > 0 || !buf.is_empty();
        let failed = |error: Error| {
            if answered { Failed::Other(error) } else { Failed::Unanswered { error, written: complete } }
        };
        let read_failed = |e: std::io::Error| failed(Error::other(format!("reading the answer failed: {e}")));
        io.readable().await.map_err(read_failed)?;
        match read_some(&io, &mut buf) {
            Ok(0) => {
                return Err(failed(Error::other(
                    "the upstream closed the connection before a complete answer",
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(read_failed(e)),
        }
    }
}

/// Read what the socket has into `buf`, growing it by a read's worth when it is nearly full.
fn read_some(io: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_BUF / 4 {
        buf.reserve(READ_BUF);
    }
    io.try_read_buf(buf)
}

/// Write the request, watching for an answer meanwhile: an upstream may refuse an upload
/// before it has read it (a 413) and close; that answer is the one to relay. Interim answers
/// (a `100 Continue`) do not stop the upload. True when the whole request went out; false when
/// a final answer (its start in `buf`) or a failure came first, which the read that follows
/// reports.
async fn write_request(io: &TcpStream, head: &[u8], body: &[u8], buf: &mut BytesMut) -> bool {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() || !body.is_empty() {
        // Most requests go out in one write, without waiting for anything.
        match io.try_write_vectored(&[IoSlice::new(head), IoSlice::new(body)]) {
            Ok(n) if n > 0 => {
                let from_head = n.min(head.len());
                head = &head[from_head..];
                body = &body[n - from_head..];
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // A server that answered and closed resets the rest of the upload; its answer may
            // be in the socket still, for the read to find.
            Ok(_) | Err(_) => return false,
        }
        tokio::select! {
            biased;
            ready = io.readable() => {
                if ready.is_err() {
                    return false;
                }
                match read_some(io, buf) {
                    Ok(n) if n > 0 && decoder::only_interim(buf) && buf.len() <= MAX_HEAD => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(_) | Err(_) => return false,
                }
            }
            ready = io.writable() => {
                if ready.is_err() {
                    return false;
                }
            }
        }
    }
    true
}

/// The answer whose head was read, its body to be read from its connection.
fn response(
    idle: &Arc<Idle>,
    authority: Authority,
    method: &Method,
    done: Exchanged,
) -> Result<http::Response<Body>, Error> {
    let Exchanged { head, io, buf, complete } = done;
    let (framing, reuse) = decoder::framing(method, &head)?;
    let Head { status, version, mut headers } = head;
    if matches!(framing, Framing::Chunked(_) | Framing::Close) {
        // Beside chunked (a smuggling attempt: chunked wins, RFC 9112 6.3) or beside another
        // transfer coding (the body ends at the close), a length is not what the client gets.
        headers.remove(header::CONTENT_LENGTH);
    }
    // After an answer that came before the whole request, the connection is out of step.
    let body = Body::new(io, buf, framing, reuse && complete, idle, authority);
    let mut out = http::Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = version;
    *out.headers_mut() = headers;
    Ok(out)
}
