//! The answer's bytes to its head and body, with no socket: the connection feeds whatever it
//! read into a buffer, and these functions take exactly the answer's bytes out of it, or say
//! that more are needed, or that the answer is broken. Kept apart from the I/O so that every
//! way bytes can arrive (any split, any garbage) is tested without a server.
//!
//! The framing is as strict as hyper's: chunk-size lines, chunk ends and trailers end in CRLF
//! only (a bare LF or CR is how responses are smuggled past one parser and not another), a
//! Content-Length that is invalid or conflicts with itself, or a Transfer-Encoding in an
//! HTTP/1.0 answer, is a broken answer (RFC 9112 6.1, 6.3: a proxy answers 502), and every
//! buffer an upstream can fill is bounded.

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::Error;

/// The largest response head (status line and headers), as nginx's `large_client_header_buffers`.
pub(super) const MAX_HEAD: usize = 64 << 10;
/// The most headers in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (with extensions), and all trailers together.
pub(super) const MAX_CHUNK_LINE: usize = 4096;
pub(super) const MAX_TRAILERS: usize = 16 << 10;
/// Interim (1xx) answers skipped before the final one, at most.
pub(super) const MAX_INTERIM: usize = 16;

/// The parts of a response head, owned.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
}

/// How the body's end is known, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
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
pub(super) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of them read so far.
    Trailers(usize),
}

/// The final answer's head at the start of `buf`, taken out of it, with the interim (1xx)
/// answers before it skipped and counted in `interim`: `Ok(None)` while more is needed.
pub(super) fn final_head(buf: &mut BytesMut, interim: &mut usize) -> Result<Option<Head>, Error> {
    // Informational answers (100 Continue, 103 Early Hints) are skipped, a few at most.
    while let Some((parsed, len)) = parse_head(buf)? {
        // However the bytes arrived (a large head may come in one read), the bound is the same.
        if len > MAX_HEAD {
            return Err(too_large());
        }
        buf.advance(len);
        if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::other("the upstream switched protocols unasked"));
        }
        if !parsed.status.is_informational() {
            return Ok(Some(parsed));
        }
        *interim += 1;
        if *interim > MAX_INTERIM {
            return Err(Error::other("the upstream sent too many interim answers"));
        }
    }
    if buf.len() > MAX_HEAD {
        return Err(too_large());
    }
    Ok(None)
}

fn too_large() -> Error {
    Error::other("the upstream's answer head is larger than 64 KiB")
}

/// Whether `buf` holds nothing but interim (1xx) answers so far, the last perhaps unfinished.
pub(super) fn only_interim(buf: &[u8]) -> bool {
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

/// The body's framing (RFC 9112 6.3) for an answer to `method`, and whether the connection may
/// carry another request after it (its framing and `Connection` allow it).
pub(super) fn framing(method: &Method, head: &Head) -> Result<(Framing, bool), Error> {
    let Head { status, version, headers } = head;
    let keep = keeps_alive(*version, headers);
    if method == Method::HEAD
        || status.is_informational()
        || *status == StatusCode::NO_CONTENT
        || *status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Done, keep));
    }
    let codings: Vec<&[u8]> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    if *version == Version::HTTP_10 && headers.contains_key(header::TRANSFER_ENCODING) {
        // HTTP/1.0 has no transfer codings: faulty framing (RFC 9112 6.1), refused as hyper does.
        return Err(Error::other("the upstream's HTTP/1.0 answer has a transfer-encoding"));
    }
    if codings.last().is_some_and(|last| last.eq_ignore_ascii_case(b"chunked")) {
        // Beside chunked, a Content-Length is a smuggling attempt: chunked wins (RFC 9112 6.3)
        // and the connection is not trusted with another request.
        let both = headers.contains_key(header::CONTENT_LENGTH);
        return Ok((Framing::Chunked(Chunk::Size), keep && !both));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Another coding last, or none named (an empty field): the body ends when the
        // connection does (RFC 9112 6.3), whatever a Content-Length says.
        return Ok((Framing::Close, false));
    }
    match content_length(headers)? {
        Some(0) => Ok((Framing::Done, keep)),
        Some(n) => Ok((Framing::Length(n), keep)),
        None => Ok((Framing::Close, false)),
    }
}

/// The Content-Length, if any: equal values repeated (`5, 5`) are one; an invalid or
/// conflicting one is an error, as in hyper (RFC 9112 6.3: unrecoverable, and a proxy answers
/// 502 rather than guess where the answer ends).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
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
                _ => return Err(Error::other("the upstream's answer has an invalid content-length")),
            }
        }
    }
    Ok(length)
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told `keep-alive`.
pub(super) fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let says = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    if version == Version::HTTP_11 { !says("close") } else { says("keep-alive") }
}

impl Framing {
    /// The next piece of the body out of `buf` (the state moves on as bytes are taken):
    /// `Ok(None)` when more must be read. Exactly the answer's bytes are taken, never one of
    /// whatever follows it.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        loop {
            match *self {
                Self::Done => return Ok(None),
                Self::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = take_len(left, buf.len());
                    let left = left - n as u64;
                    *self = if left == 0 { Self::Done } else { Self::Length(left) };
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Self::Close => return Ok((!buf.is_empty()).then(|| buf.split().freeze())),
                Self::Chunked(state) => match state {
                    Chunk::Size => {
                        let Some(line) = line(buf, MAX_CHUNK_LINE)? else { return Ok(None) };
                        let size = chunk_size(&line)?;
                        *self = Self::Chunked(if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) });
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let n = take_len(left, buf.len());
                        let left = left - n as u64;
                        *self = Self::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        match buf.first() {
                            None => return Ok(None),
                            Some(b'\r') if buf.len() < 2 => return Ok(None),
                            Some(b'\r') if buf[1] == b'\n' => buf.advance(2),
                            Some(_) => {
                                return Err(Error::other("the upstream's chunk is longer than its size"));
                            }
                        }
                        *self = Self::Chunked(Chunk::Size);
                    }
                    Chunk::Trailers(seen) => {
                        // Room for the final empty line even when the trailers used it all.
                        let Some(line) = line(buf, MAX_TRAILERS.saturating_sub(seen).max(2))? else {
                            return Ok(None);
                        };
                        *self = if line.is_empty() {
                            Self::Done
                        } else {
                            Self::Chunked(Chunk::Trailers(seen + line.len() + 2))
                        };
                    }
                },
            }
        }
    }

    /// The connection ended (everything it sent already decoded): the end of a close-delimited
    /// body, and an error for any other body not read to its end.
    pub(super) fn closed(&mut self) -> Result<(), Error> {
        match *self {
            Self::Close | Self::Done => {
                *self = Self::Done;
                Ok(())
            }
            Self::Length(_) | Self::Chunked(_) => {
                *self = Self::Done;
                Err(Error::other("the upstream closed the connection before the end of the answer"))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode a whole chunked body out of `bytes`.
    fn chunked_body(bytes: &[u8]) -> Result<Vec<u8>, Error> {
        let (mut framing, mut buf, mut out) =
            (Framing::Chunked(Chunk::Size), BytesMut::from(bytes), Vec::new());
        while let Some(data) = framing.decode(&mut buf)? {
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
            b"5\r\nhello\r\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
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

    fn head(version: Version, status: u16, pairs: &[(&'static str, &'static str)]) -> Head {
        let headers =
            pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect();
        Head { status: StatusCode::from_u16(status).unwrap_or_default(), version, headers }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let post = |pairs: &[(&'static str, &'static str)]| {
            framing(&Method::POST, &head(Version::HTTP_11, 200, pairs)).map_err(|e| e.to_string())
        };
        assert_eq!(post(&[("content-length", "5")]), Ok((Framing::Length(5), true)));
        assert_eq!(post(&[("content-length", "5, 5")]), Ok((Framing::Length(5), true)));
        assert_eq!(post(&[("content-length", "0")]), Ok((Framing::Done, true)));
        assert_eq!(
            post(&[("transfer-encoding", "gzip, chunked"), ("content-length", "5")]),
            Ok((Framing::Chunked(Chunk::Size), false))
        );
        assert_eq!(post(&[("transfer-encoding", "gzip")]), Ok((Framing::Close, false)));
        assert_eq!(post(&[("transfer-encoding", ""), ("content-length", "5")]), Ok((Framing::Close, false)));
        assert_eq!(
            post(&[("transfer-encoding", " , "), ("content-length", "5")]),
            Ok((Framing::Close, false))
        );
        assert_eq!(post(&[]), Ok((Framing::Close, false)));
        assert_eq!(
            post(&[("content-length", "5"), ("connection", "close")]),
            Ok((Framing::Length(5), false))
        );
        assert_eq!(
            framing(&Method::HEAD, &head(Version::HTTP_11, 200, &[("content-length", "5")])).ok(),
            Some((Framing::Done, true))
        );
        assert_eq!(
            framing(&Method::POST, &head(Version::HTTP_11, 204, &[])).ok(),
            Some((Framing::Done, true))
        );
        assert!(!keeps_alive(
            Version::HTTP_11,
            &head(Version::HTTP_11, 200, &[("connection", "Keep-Alive, close")]).headers
        ));
        assert!(keeps_alive(
            Version::HTTP_10,
            &head(Version::HTTP_10, 200, &[("connection", "keep-alive")]).headers
        ));
        assert!(!keeps_alive(Version::HTTP_10, &HeaderMap::new()));
        assert_eq!(chunk_size(b"1a;name=value").ok(), Some(26));
        assert!(chunk_size(b"").is_err() && chunk_size(b"-1").is_err() && chunk_size(b"x").is_err());
        assert_eq!(chunk_size(b"00000000000000000001a").ok(), Some(26), "leading zeros are not an overflow");
    }

    #[test]
    fn an_invalid_or_conflicting_content_length_is_a_broken_answer() {
        // RFC 9112 6.3: neither read to the close nor trusted; hyper refuses these answers too.
        for bad in ["5, 6", "-1", "+5", "5 5", "", "0x5", "99999999999999999999"] {
            let pairs = [("content-length", bad)];
            let got = framing(&Method::POST, &head(Version::HTTP_11, 200, &pairs));
            assert!(
                got.as_ref().is_err_and(|e| e.to_string().contains("invalid content-length")),
                "{bad:?}: {got:?}"
            );
        }
        let two = HeaderMap::from_iter([
            (header::CONTENT_LENGTH, HeaderValue::from_static("5")),
            (header::CONTENT_LENGTH, HeaderValue::from_static("6")),
        ]);
        let got =
            framing(&Method::POST, &Head { status: StatusCode::OK, version: Version::HTTP_11, headers: two });
        assert!(got.is_err(), "{got:?}");
    }

    #[test]
    fn transfer_encoding_in_an_http_1_0_answer_is_a_broken_answer() {
        for coding in ["chunked", "gzip", ""] {
            let pairs = [("transfer-encoding", coding), ("connection", "keep-alive")];
            let got = framing(&Method::POST, &head(Version::HTTP_10, 200, &pairs));
            assert!(got.as_ref().is_err_and(|e| e.to_string().contains("HTTP/1.0")), "{coding:?}: {got:?}");
        }
        let kept = framing(
            &Method::POST,
            &head(Version::HTTP_10, 200, &[("content-length", "1"), ("connection", "keep-alive")]),
        );
        assert_eq!(kept.ok(), Some((Framing::Length(1), true)));
    }

    #[test]
    fn a_body_cut_short_by_the_close_is_an_error_and_a_close_delimited_one_ends() {
        for mut cut in
            [Framing::Length(3), Framing::Chunked(Chunk::Size), Framing::Chunked(Chunk::Trailers(0))]
        {
            assert!(cut.closed().is_err_and(|e| e.to_string().contains("before the end")));
            assert_eq!(cut, Framing::Done);
        }
        let mut close = Framing::Close;
        assert!(close.closed().is_ok());
        assert_eq!(close, Framing::Done);
    }

    #[test]
    fn interim_answers_are_skipped_a_few_at_most_and_a_protocol_switch_is_refused() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nrest"[..]);
        let mut interim = 0;
        let got = final_head(&mut buf, &mut interim).map_err(|e| e.to_string());
        assert!(matches!(got, Ok(Some(Head { status: StatusCode::OK, .. }))), "{got:?}");
        assert_eq!((interim, &buf[..]), (2, &b"rest"[..]));
        let many = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM + 1);
        let got = final_head(&mut BytesMut::from(&many[..]), &mut 0);
        assert!(got.is_err_and(|e| e.to_string().contains("too many interim")));
        let switch = final_head(&mut BytesMut::from(&b"HTTP/1.1 101 Switching\r\n\r\n"[..]), &mut 0);
        assert!(switch.is_err_and(|e| e.to_string().contains("switched protocols")));
        assert!(
            final_head(&mut BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]), &mut 0).is_ok_and(|h| h.is_none())
        );
        assert!(only_interim(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 1"));
        assert!(!only_interim(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"));
    }
}
