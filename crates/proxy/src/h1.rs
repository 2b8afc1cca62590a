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

use std::collections::HashMap;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, StatusCode, Version};
use http_body_util::Full;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::net::TcpStream;

/// Read this much at a time. An answer streams through chunk by chunk; a buffer is held only
/// while bytes are in it.
const READ_BUF: usize = 4096;
/// The largest response head (status line and headers), as nginx's `large_client_header_buffers`.
const MAX_HEAD: usize = 64 << 10;
/// The most headers in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (with extensions), and all trailers together.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 << 10;
/// Idle connections kept per upstream; past this, a finished connection is closed.
const MAX_IDLE_PER_HOST: usize = 1024;
/// How long an idle connection is kept (servers close theirs after 5 s to a few minutes; a
/// reused connection the server closed meanwhile is noticed, and the request sent again).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Interim (1xx) answers skipped before the final one, at most.
const MAX_INTERIM: usize = 16;

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

/// Idle connections by upstream (`host:port`), most recently used last.
#[derive(Default)]
pub struct Idle {
    conns: Mutex<HashMap<Authority, Vec<IdleConn>>>,
    /// Whether a task closes the connections that stay idle too long.
    reaping: std::sync::atomic::AtomicBool,
}

struct IdleConn {
    io: TcpStream,
    since: Instant,
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Authority, Vec<IdleConn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection to `to` that is still open.
    fn take(&self, to: &Authority) -> Option<TcpStream> {
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

    fn put(self: &Arc<Self>, to: Authority, io: TcpStream) {
        if !self.reaping.load(std::sync::atomic::Ordering::Relaxed) && reap(Arc::downgrade(self)) {
            self.reaping.store(true, std::sync::atomic::Ordering::Relaxed);
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
    fn count(&self, to: &Authority) -> usize {
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
            Ok(done) => return Ok(response(idle, authority, &parts.method, done)),
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
        Ok(done) => Ok(response(idle, authority, &parts.method, done)),
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

/// The parts of a response head, owned.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Write the request and read the response head; the bytes after the head stay in the buffer.
async fn exchange(io: TcpStream, head: &[u8], body: &Bytes) -> Result<Exchanged, Failed> {
    let mut buf = BytesMut::new();
    let complete = write_request(&io, head, body, &mut buf).await;
    let mut interim = 0;
    loop {
        // Informational answers (100 Continue, 103 Early Hints) are skipped, a few at most.
        while let Some((parsed, len)) = parse_head(&buf).map_err(Failed::Other)? {
            buf.advance(len);
            if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Failed::Other(Error::other("the upstream switched protocols unasked")));
            }
            if !parsed.status.is_informational() {
                return Ok(Exchanged { head: parsed, io, buf, complete });
            }
            interim += 1;
            if interim > MAX_INTERIM {
                return Err(Failed::Other(Error::other("the upstream sent too many interim answers")));
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(Failed::Other(Error::other("the upstream's answer head is larger than 64 KiB")));
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
                    Ok(n) if n > 0 && only_interim(buf) && buf.len() <= MAX_HEAD => {}
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

/// Whether `buf` holds nothing but interim (1xx) answers so far, the last perhaps unfinished.
fn only_interim(buf: &[u8]) -> bool {
    let mut rest = buf;
    while !rest.is_empty() {
        // `HTTP/1.1 1xx`: the status is known from the twelfth byte.
        if rest.len() < 12 {
            return true;
        }
        if !rest.starts_with(b"HTTP/1.") || rest[9] != b'1' {
            return false;
        }
        match parse_head(rest) {
            Ok(None) => return true,
            Ok(Some((head, len))) if head.status != StatusCode::SWITCHING_PROTOCOLS => rest = &rest[len..],
            Ok(Some(_)) | Err(_) => return false,
        }
    }
    true
}

/// A complete head at the start of `buf` and its length, `None` if more is needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::other(format!("the upstream's answer head is invalid: {e}"))),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Error::other("the upstream's answer has no valid status"))?;
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes());
        let value = HeaderValue::from_bytes(h.value);
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => return Err(Error::other("the upstream's answer has an invalid header")),
        }
    }
    Ok(Some((Head { status, version, headers }, len)))
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`, in this state.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    /// All of it read.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of them read so far.
    Trailers(usize),
}

fn response(
    idle: &Arc<Idle>,
    authority: Authority,
    method: &Method,
    done: Exchanged,
) -> http::Response<Body> {
    let Exchanged { head, io, buf, complete } = done;
    let Head { status, version, mut headers } = head;
    let (framing, mut reuse) = framing(method, status, &headers);
    // After an answer that came before the whole request, the connection is out of step.
    reuse = reuse && complete && keeps_alive(version, &headers);
    if matches!(framing, Framing::Chunked(_) | Framing::Close) {
        // Beside chunked (a smuggling attempt: chunked wins, RFC 9112 6.3) or invalid, a length
        // is not what the client gets.
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut body = Body { io: Some(io), buf, framing, reuse, idle: Arc::clone(idle), authority };
    body.finish_if_done();
    let mut out = http::Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = version;
    *out.headers_mut() = headers;
    out
}

/// The body's framing (RFC 9112 6.3), and whether the connection may carry another request
/// after it.
fn framing(method: &Method, status: StatusCode, headers: &HeaderMap) -> (Framing, bool) {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return (Framing::Done, true);
    }
    let codings: Vec<&[u8]> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    if codings.last().is_some_and(|last| last.eq_ignore_ascii_case(b"chunked")) {
        let both = headers.contains_key(header::CONTENT_LENGTH);
        return (Framing::Chunked(Chunk::Size), !both);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Another coding last, or none named (an empty field): the body ends when the
        // connection does (RFC 9112 6.3), whatever a Content-Length says.
        return (Framing::Close, false);
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let digits = part.trim_ascii();
            let n = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
                .flatten();
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                // Invalid or conflicting lengths: read to the close, and do not reuse.
                _ => return (Framing::Close, false),
            }
        }
    }
    match length {
        Some(0) => (Framing::Done, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    }
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told `keep-alive`.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let says = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    if version == Version::HTTP_11 { !says("close") } else { says("keep-alive") }
}

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

    /// The next piece of the body out of what is buffered: `Ok(None)` when more must be read.
    fn decode(&mut self) -> Result<Option<Bytes>, Error> {
        decode(&mut self.framing, &mut self.buf)
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
}

/// The next piece of a body framed by `framing` out of `buf` (its state moves on as bytes are
/// taken): `Ok(None)` when more must be read. Exactly the answer's bytes are taken, never one
/// of whatever follows it; lines end in CRLF only, as hyper's decoder wants.
fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    loop {
        match *framing {
            Framing::Done => return Ok(None),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = take_len(left, buf.len());
                let left = left - n as u64;
                *framing = if left == 0 { Framing::Done } else { Framing::Length(left) };
                return Ok(Some(buf.split_to(n).freeze()));
            }
            Framing::Close => return Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Framing::Chunked(state) => match state {
                Chunk::Size => {
                    let Some(line) = line(buf, MAX_CHUNK_LINE)? else { return Ok(None) };
                    let size = chunk_size(&line)?;
                    *framing =
                        Framing::Chunked(if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) });
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = take_len(left, buf.len());
                    let left = left - n as u64;
                    *framing = Framing::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Chunk::DataEnd => {
                    match buf.first() {
                        None => return Ok(None),
                        Some(b'\r') if buf.len() < 2 => return Ok(None),
                        Some(b'\r') if buf[1] == b'\n' => buf.advance(2),
                        Some(_) => return Err(Error::other("the upstream's chunk is longer than its size")),
                    }
                    *framing = Framing::Chunked(Chunk::Size);
                }
                Chunk::Trailers(seen) => {
                    // Room for the final empty line even when the trailers used it all.
                    let Some(line) = line(buf, MAX_TRAILERS.saturating_sub(seen).max(2))? else {
                        return Ok(None);
                    };
                    *framing = if line.is_empty() {
                        Framing::Done
                    } else {
                        Framing::Chunked(Chunk::Trailers(seen + line.len() + 2))
                    };
                }
            },
        }
    }
}

/// The next line of `buf` (without its CRLF), if a whole one is buffered; an error if more
/// than `max` bytes come without one, or if a CR or LF stands alone (a bare LF is a line end to
/// some parsers and not to others: the way responses are smuggled).
fn line(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, Error> {
    let invalid = || Error::other("the upstream's chunked framing is invalid");
    match memchr::memchr(b'\n', buf) {
        Some(end) if end > max => Err(invalid()),
        Some(end) => {
            if end == 0 || buf[end - 1] != b'\r' || memchr::memchr(b'\r', &buf[..end - 1]).is_some() {
                return Err(invalid());
            }
            let mut line = buf.split_to(end + 1).freeze();
            line.truncate(end - 1);
            Ok(Some(line))
        }
        // A CR not followed by LF is an error as soon as the byte after it is in.
        None if buf.len() > max
            || buf.len() > 1 && memchr::memchr(b'\r', &buf[..buf.len() - 1]).is_some() =>
        {
            Err(invalid())
        }
        None => Ok(None),
    }
}

/// `left` bytes still due, `have` buffered: how many to hand out now.
fn take_len(left: u64, have: usize) -> usize {
    usize::try_from(left).map_or(have, |left| left.min(have))
}

/// A chunk-size line's size: hex digits, then optional extensions after `;`.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let invalid = || Error::other("the upstream's chunked framing is invalid");
    // Whitespace only between the size and its extensions (BWS), as hyper's decoder allows.
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = &digits[..digits.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(0, |i| i + 1)];
    if digits.is_empty() {
        return Err(invalid());
    }
    let mut size: u64 = 0;
    for &d in digits {
        let v = char::from(d).to_digit(16).ok_or_else(invalid)?;
        size = size.checked_mul(16).and_then(|s| s.checked_add(u64::from(v))).ok_or_else(invalid)?;
    }
    Ok(size)
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
            match this.decode() {
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
                Ok(false) if this.framing == Framing::Close => {
                    this.framing = Framing::Done;
                    this.reuse = false;
                }
                Ok(false) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::other(
                        "the upstream closed the connection before the end of the answer",
                    ))));
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

impl Body {
    /// A broken answer: the connection is closed and the body ends.
    fn fail(&mut self) {
        self.io = None;
        self.buf = BytesMut::new();
        self.framing = Framing::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    struct Server {
        to: Authority,
        /// Connections accepted, and closed by the server.
        conns: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
    }

    /// A server that answers each connection's requests with `answers` (an empty one: read the
    /// request and close without answering), written in pieces `split` bytes long.
    async fn server(answers: Vec<&'static [u8]>, split: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counted, closing) = (Arc::clone(&conns), Arc::clone(&closed));
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let (answers, closing) = (answers.clone(), Arc::clone(&closing));
                tokio::spawn(async move {
                    answer_all(sock, &answers, split).await;
                    closing.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        let to = Authority::try_from(addr.to_string().as_str()).unwrap();
        Server { to, conns, closed }
    }

    async fn answer_all(mut sock: tokio::net::TcpStream, answers: &[&'static [u8]], split: usize) {
        for answer in answers {
            let mut req = Vec::new();
            let mut b = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            for piece in answer.chunks(split.max(1)) {
                if sock.write_all(piece).await.is_err() {
                    return;
                }
                let _ = sock.flush().await;
                tokio::task::yield_now().await;
            }
            if answer.is_empty() {
                return;
            }
        }
    }

    fn request(to: &Authority, path: &str) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(Bytes::from_static(b"{\"a\":1}")));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = format!("http://{to}{path}").parse().unwrap();
        req
    }

    async fn body_of(resp: http::Response<Body>) -> Result<Vec<u8>, Error> {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ntrailer: x\r\n\r\n";
    const LENGTH: &[u8] =
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world";

    #[tokio::test]
    async fn chunked_and_sized_answers_read_whole_in_any_pieces_and_reuse_the_connection() {
        for split in [1, 3, 7, 1000] {
            let Server { to, conns, .. } = server(vec![CHUNKED, LENGTH, CHUNKED], split).await;
            let idle = Arc::new(Idle::default());
            for want in [&b"hello, world"[..], b"hello world", b"hello, world"] {
                let resp = send(&idle, Duration::from_secs(5), request(&to, "/v1/x")).await;
                let resp = resp.unwrap();
                assert_eq!(resp.status(), 200);
                assert!(resp.headers().get("trailer").is_none());
                assert_eq!(body_of(resp).await.unwrap(), want, "split {split}");
            }
            assert_eq!(conns.load(Ordering::Relaxed), 1, "one connection for all three");
            assert_eq!(idle.count(&to), 1);
        }
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced_unseen() {
        // One answer per connection, then the server closes it.
        let Server { to, conns, closed } = server(vec![LENGTH], 5).await;
        let idle = Arc::new(Idle::default());
        for i in 0..3 {
            let resp = send(&idle, Duration::from_secs(5), request(&to, "/")).await;
            let body = body_of(resp.unwrap()).await;
            assert_eq!(body.unwrap(), b"hello world");
            assert_eq!(idle.count(&to), 1, "kept: the answer allowed it");
            until(|| closed.load(Ordering::Relaxed) > i).await;
        }
        assert_eq!(conns.load(Ordering::Relaxed), 3);
    }

    /// Wait (a few seconds at most) for `done`.
    async fn until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_post_the_server_may_have_read_is_not_sent_again_but_a_get_is() {
        // The first request is answered and the connection kept; the second is read, and the
        // connection closed without an answer (the server crashed, or closed it as it came).
        for (method, resent) in [(Method::POST, false), (Method::GET, true)] {
            let Server { to, conns, .. } = server(vec![LENGTH, b""], 1000).await;
            let idle = Arc::new(Idle::default());
            let first = send(&idle, Duration::from_secs(5), request(&to, "/")).await;
            assert!(body_of(first.unwrap()).await.is_ok());
            let mut again = request(&to, "/");
            *again.method_mut() = method.clone();
            let second = send(&idle, Duration::from_secs(5), again).await;
            match second {
                Ok(resp) => {
                    assert!(resent, "{method}: answered");
                    assert_eq!(body_of(resp).await.unwrap(), b"hello world");
                    assert_eq!(conns.load(Ordering::Relaxed), 2, "{method}: sent again on a new connection");
                }
                Err(e) => {
                    assert!(!resent && !e.is_connect(), "{method}: {e}");
                    assert_eq!(conns.load(Ordering::Relaxed), 1, "{method}: not sent again");
                }
            }
        }
    }

    #[tokio::test]
    async fn an_upload_goes_on_past_a_100_continue() {
        // The server says `100 Continue` at once, reads the whole body, then answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        const SIZE: usize = 8 << 20;
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let _ = sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            let mut got = Vec::new();
            let mut b = vec![0u8; 64 << 10];
            // The head and the body: more than the body alone.
            while got.len() < SIZE {
                match sock.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&b[..n]),
                }
            }
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        });
        let to = Authority::try_from(addr.to_string().as_str()).unwrap();
        let mut req = request(&to, "/");
        *req.body_mut() = Full::new(Bytes::from(vec![b'x'; SIZE]));
        req.headers_mut().insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let resp = send(&Arc::new(Idle::default()), Duration::from_secs(10), req).await;
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body_of(resp).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn broken_answers_are_errors_not_hangs() {
        let cases: [(&'static [u8], &str); 6] = [
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "chunked framing"),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
                "chunked framing",
            ),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n", "longer than its size"),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "before the end"),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "head is invalid"),
            (b"garbage\r\n\r\n", "head is invalid"),
        ];
        for (answer, want) in cases {
            let Server { to, .. } = server(vec![answer], 1000).await;
            let idle = Arc::new(Idle::default());
            let err = match send(&idle, Duration::from_secs(5), request(&to, "/")).await {
                Ok(resp) => body_of(resp).await.err(),
                Err(e) => Some(e),
            };
            let err = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(answer));
            assert_eq!(idle.count(&to), 0, "a broken connection is not reused");
        }
        // A head that never ends is cut off at 64 KiB.
        let huge: &'static [u8] = Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\n"[..],
                &b"x-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(2000),
            ]
            .concat()
            .into_boxed_slice(),
        );
        let Server { to, .. } = server(vec![huge], 8192).await;
        let err = send(&Arc::new(Idle::default()), Duration::from_secs(5), request(&to, "/")).await.err();
        assert!(err.is_some_and(
            |e| e.to_string().contains("larger than 64 KiB") || e.to_string().contains("invalid")
        ));
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_upload_is_read_and_relayed() {
        // The server reads the head only, refuses, and closes with the body unread.
        let refusal: &'static [u8] =
            b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbig!";
        let Server { to, .. } = server(vec![refusal], 1000).await;
        let idle = Arc::new(Idle::default());
        let mut req = request(&to, "/");
        *req.body_mut() = Full::new(Bytes::from(vec![b'x'; 8 << 20]));
        let resp = send(&idle, Duration::from_secs(5), req).await.unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(body_of(resp).await.unwrap(), b"big!");
        assert_eq!(idle.count(&to), 0);
    }

    #[tokio::test]
    async fn close_delimited_answers_end_at_the_close_and_are_not_reused() {
        let Server { to, .. } = server(vec![b"HTTP/1.0 200 OK\r\n\r\nuntil the end"], 4).await;
        // The server task ends after its one answer, which closes the socket.
        let idle = Arc::new(Idle::default());
        let resp = send(&idle, Duration::from_secs(5), request(&to, "/")).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_10);
        assert_eq!(body_of(resp).await.unwrap(), b"until the end");
        assert_eq!(idle.count(&to), 0);
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let to = Authority::try_from(addr.to_string().as_str()).unwrap();
        let err = send(&Arc::new(Idle::default()), Duration::from_secs(5), request(&to, "/")).await.err();
        assert!(err.is_some_and(|e| e.is_connect()));
    }

    #[test]
    fn request_heads_carry_host_and_a_recomputed_length() {
        let mut req = request(&Authority::from_static("up:8000"), "/v1/chat?x=1");
        req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        req.headers_mut().insert("x-a", HeaderValue::from_static("b"));
        let (parts, _) = req.into_parts();
        let head = request_head(&parts, &Authority::from_static("up:8000"), 7);
        assert_eq!(
            String::from_utf8_lossy(&head),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: up:8000\r\nx-a: b\r\ncontent-length: 7\r\n\r\n"
        );
        let mut get = http::Request::new(());
        *get.uri_mut() = "http://up/v1/models".parse().unwrap();
        let (parts, ()) = get.into_parts();
        let head = request_head(&parts, &Authority::from_static("up"), 0);
        assert_eq!(String::from_utf8_lossy(&head), "GET /v1/models HTTP/1.1\r\nhost: up\r\n\r\n");
    }

    #[tokio::test]
    async fn an_empty_transfer_encoding_reads_to_the_close_and_is_not_reused() {
        // Not chunked, so not framed by the Content-Length either (RFC 9112 6.3): what comes
        // after five bytes is still this answer's, and the connection ends with it.
        let answer: &'static [u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: \r\ncontent-length: 5\r\n\r\nhello, and more";
        let Server { to, .. } = server(vec![answer], 7).await;
        let idle = Arc::new(Idle::default());
        let resp = send(&idle, Duration::from_secs(5), request(&to, "/")).await.unwrap();
        assert!(resp.headers().get(header::CONTENT_LENGTH).is_none());
        assert_eq!(body_of(resp).await.unwrap(), b"hello, and more");
        assert_eq!(idle.count(&to), 0, "never reused");
    }

    /// Decode a whole chunked body out of `bytes`.
    fn chunked_body(bytes: &[u8]) -> Result<Vec<u8>, Error> {
        let (mut framing, mut buf, mut out) =
            (Framing::Chunked(Chunk::Size), BytesMut::from(bytes), Vec::new());
        while let Some(data) = decode(&mut framing, &mut buf)? {
            out.extend_from_slice(&data);
        }
        if framing == Framing::Done { Ok(out) } else { Err(Error::other("unfinished")) }
    }

    #[test]
    fn chunked_lines_end_in_crlf_only() {
        assert_eq!(
            chunked_body(b"5;a=b\r\nhello\r\n1 ;c\r\n!\r\n0\r\nx: y\r\n\r\n").ok(),
            Some(b"hello!".to_vec())
        );
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5\r\nhello\r\n0\r\nx: y\n\r\n",
            b"5\r;x\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx: \ry\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
        ] {
            let got = chunked_body(bad);
            assert!(
                got.as_ref()
                    .is_err_and(|e| e.to_string().contains("invalid") || e.to_string().contains("longer")),
                "{:?} decoded to {got:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&'static str, &'static str)]| -> HeaderMap {
            pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
        };
        let ok = StatusCode::OK;
        assert_eq!(framing(&Method::POST, ok, &h(&[("content-length", "5")])), (Framing::Length(5), true));
        assert_eq!(framing(&Method::POST, ok, &h(&[("content-length", "5, 5")])), (Framing::Length(5), true));
        assert_eq!(framing(&Method::POST, ok, &h(&[("content-length", "5, 6")])), (Framing::Close, false));
        assert_eq!(framing(&Method::POST, ok, &h(&[("content-length", "-1")])), (Framing::Close, false));
        assert_eq!(
            framing(
                &Method::POST,
                ok,
                &h(&[("transfer-encoding", "gzip, chunked"), ("content-length", "5")])
            ),
            (Framing::Chunked(Chunk::Size), false)
        );
        assert_eq!(framing(&Method::POST, ok, &h(&[("transfer-encoding", "gzip")])), (Framing::Close, false));
        assert_eq!(
            framing(&Method::POST, ok, &h(&[("transfer-encoding", ""), ("content-length", "5")])),
            (Framing::Close, false)
        );
        assert_eq!(
            framing(&Method::POST, ok, &h(&[("transfer-encoding", " , "), ("content-length", "5")])),
            (Framing::Close, false)
        );
        assert_eq!(framing(&Method::HEAD, ok, &h(&[("content-length", "5")])), (Framing::Done, true));
        assert_eq!(framing(&Method::POST, StatusCode::NO_CONTENT, &h(&[])), (Framing::Done, true));
        assert!(!keeps_alive(Version::HTTP_11, &h(&[("connection", "Keep-Alive, close")])));
        assert!(keeps_alive(Version::HTTP_10, &h(&[("connection", "keep-alive")])));
        assert!(!keeps_alive(Version::HTTP_10, &h(&[])));
        assert_eq!(chunk_size(b"1a;name=value").ok(), Some(26));
        assert!(chunk_size(b"").is_err() && chunk_size(b"-1").is_err() && chunk_size(b"x").is_err());
        assert_eq!(chunk_size(b"00000000000000000001a").ok(), Some(26), "leading zeros are not an overflow");
        assert_eq!(framing(&Method::POST, ok, &h(&[("content-length", "+5")])), (Framing::Close, false));
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;

        /// What the client makes of an answer: its status and headers, its body, and whether
        /// its connection would carry the next request; then the bytes it never took.
        #[derive(Debug, PartialEq, Eq)]
        struct Decoded {
            status: u16,
            headers: Vec<(String, Vec<u8>)>,
            body: Vec<u8>,
            reused: bool,
            left: Vec<u8>,
        }

        /// Read one answer out of `pieces` as `exchange` and `Body` do (the connection closes
        /// after the last piece): interim answers skipped, the head, then the body by its
        /// framing. Bytes past the answer count as unread, and a connection is reused only when
        /// none are left (`finish_if_done`, and `is_open` for those still in the socket).
        fn run(pieces: &[Vec<u8>]) -> Result<Decoded, String> {
            let mut pieces = pieces.iter();
            let mut buf = BytesMut::new();
            let mut interim = 0;
            let head = loop {
                if let Some((head, len)) = parse_head(&buf).map_err(|e| e.to_string())? {
                    buf.advance(len);
                    if !head.status.is_informational() {
                        break head;
                    }
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err("too many interim answers".into());
                    }
                    continue;
                }
                if buf.len() > MAX_HEAD {
                    return Err("head too large".into());
                }
                buf.extend_from_slice(pieces.next().ok_or("closed in the head")?);
            };
            let (mut framing, reuse) = framing(&Method::POST, head.status, &head.headers);
            let mut reuse = reuse && keeps_alive(head.version, &head.headers);
            let mut body = Vec::new();
            loop {
                match decode(&mut framing, &mut buf).map_err(|e| e.to_string())? {
                    Some(data) => body.extend_from_slice(&data),
                    None if framing == Framing::Done => break,
                    None => match pieces.next() {
                        Some(piece) => buf.extend_from_slice(piece),
                        None if framing == Framing::Close => {
                            reuse = false;
                            break;
                        }
                        None => return Err("closed in the body".into()),
                    },
                }
            }
            let mut left = buf.to_vec();
            pieces.for_each(|p| left.extend_from_slice(p));
            let headers = head.headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
            Ok(Decoded {
                status: head.status.as_u16(),
                headers,
                body,
                reused: reuse && left.is_empty(),
                left,
            })
        }

        /// Cut `bytes` at `cuts` (positions, any order).
        fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            at.sort_unstable();
            at.push(bytes.len());
            let mut start = 0;
            at.into_iter()
                .map(|end| {
                    let piece = bytes[start..end].to_vec();
                    start = end;
                    piece
                })
                .collect()
        }

        /// A valid answer: its bytes, and the status, headers and body it carries.
        #[derive(Debug, Clone)]
        struct Answer {
            bytes: Vec<u8>,
            status: u16,
            headers: Vec<(String, Vec<u8>)>,
            body: Vec<u8>,
        }

        fn answers() -> impl Strategy<Value = Answer> {
            (
                prop::sample::select(vec![200u16, 201, 400, 404, 429, 500, 503]),
                any::<bool>(),
                prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,24}"), 0..4),
                prop::collection::vec(any::<u8>(), 0..200),
                // None: Content-Length; else chunked, with these chunk cuts, an extension on
                // each chunk or not, and trailers.
                prop::option::of((
                    prop::collection::vec(any::<usize>(), 0..6),
                    any::<bool>(),
                    prop::collection::vec(("t-[a-z]{1,6}", "[a-z0-9]{0,12}"), 0..3),
                )),
            )
                .prop_map(|(status, interim, extra, body, chunked)| {
                    let mut bytes = Vec::new();
                    if interim {
                        bytes.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    bytes.extend_from_slice(format!("HTTP/1.1 {status} X\r\n").as_bytes());
                    let mut headers: Vec<(String, Vec<u8>)> =
                        extra.into_iter().map(|(k, v)| (k, v.trim().as_bytes().to_vec())).collect();
                    match &chunked {
                        None => headers.push(("content-length".into(), body.len().to_string().into_bytes())),
                        Some(_) => headers.push(("transfer-encoding".into(), b"chunked".to_vec())),
                    }
                    for (k, v) in &headers {
                        bytes.extend_from_slice(format!("{k}: ").as_bytes());
                        bytes.extend_from_slice(v);
                        bytes.extend_from_slice(b"\r\n");
                    }
                    bytes.extend_from_slice(b"\r\n");
                    match chunked {
                        None => bytes.extend_from_slice(&body),
                        Some((cuts, ext, trailers)) => {
                            for chunk in split(&body, &cuts).into_iter().filter(|c| !c.is_empty()) {
                                let ext = if ext { " ;a=\"b;c\"" } else { "" };
                                bytes.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
                                bytes.extend_from_slice(&chunk);
                                bytes.extend_from_slice(b"\r\n");
                            }
                            bytes.extend_from_slice(b"0\r\n");
                            for (k, v) in trailers {
                                bytes.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                            }
                            bytes.extend_from_slice(b"\r\n");
                        }
                    }
                    Answer { bytes, status, headers, body }
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_split_of_a_valid_answer_decodes_to_its_head_and_body_and_takes_nothing_more(
                answer in answers(),
                next in prop::collection::vec(any::<u8>(), 0..64),
                cuts in prop::collection::vec(any::<usize>(), 0..12),
            ) {
                let mut input = answer.bytes.clone();
                input.extend_from_slice(&next);
                let got = run(&split(&input, &cuts)).map_err(TestCaseError::fail)?;
                prop_assert_eq!(got.status, answer.status);
                prop_assert_eq!(&got.headers, &answer.headers);
                prop_assert_eq!(&got.body, &answer.body);
                // What follows the answer is never read as part of it, and a connection with
                // bytes nobody asked for is not reused.
                prop_assert_eq!(&got.left, &next);
                prop_assert_eq!(got.reused, next.is_empty());
            }

            #[test]
            fn two_answers_in_a_row_come_apart_at_the_right_byte(
                first in answers(),
                second in answers(),
                cuts in prop::collection::vec(any::<usize>(), 0..12),
            ) {
                let mut input = first.bytes.clone();
                input.extend_from_slice(&second.bytes);
                let got = run(&split(&input, &cuts)).map_err(TestCaseError::fail)?;
                prop_assert_eq!(&got.body, &first.body);
                prop_assert_eq!(&got.left, &second.bytes);
                prop_assert!(!got.reused);
            }

            #[test]
            fn garbage_never_panics_hangs_or_leaves_a_reusable_connection_with_bytes_in_it(
                head in prop::sample::select(vec![
                    &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                    b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: \r\ncontent-length: 3\r\n\r\n",
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"",
                ]),
                bytes in prop::collection::vec(
                    prop::sample::select(b"0123456789abcdefxz;= \t\r\n:".to_vec()), 0..256),
                cuts in prop::collection::vec(any::<usize>(), 0..12),
            ) {
                let mut input = head.to_vec();
                input.extend_from_slice(&bytes);
                let whole = run(std::slice::from_ref(&input));
                let pieces = run(&split(&input, &cuts));
                // The same answer, however the bytes arrive.
                prop_assert_eq!(pieces.is_ok(), whole.is_ok());
                if let (Ok(whole), Ok(pieces)) = (&whole, &pieces) {
                    prop_assert_eq!(whole, pieces);
                    prop_assert!(!pieces.reused || pieces.left.is_empty());
                    // Where the answer ended was decided by its own bytes: they alone decode
                    // to the same answer, with nothing left.
                    let taken = &input[..input.len() - pieces.left.len()];
                    let alone = run(&[taken.to_vec()]).map_err(TestCaseError::fail)?;
                    prop_assert_eq!(&alone.body, &pieces.body);
                    prop_assert!(alone.left.is_empty());
                }
            }
        }
    }
}
