//! The decoder against every way bytes can arrive: valid answers cut at random points decode
//! to the same head and body however they are cut, and random or mangled bytes end in an error
//! or a valid answer, never a panic, a loop or an unbounded buffer.

use bytes::BytesMut;
use http::Method;
use proptest::prelude::*;

use super::decoder::{self, Chunk, Framing, MAX_HEAD};

/// What the client makes of an answer: its status and headers, its body, and whether its
/// connection would carry the next request; then the bytes it never took.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    reused: bool,
    left: Vec<u8>,
}

/// Read one answer out of `pieces` as `exchange` and `Body` do, reads being the pieces (the
/// connection closes after the last one): `final_head` until it has the head, `framing`, then
/// `Framing::decode` until the body ends, `Framing::closed` at the close. Bytes past the answer
/// count as unread, and a connection is reused only when none are left (`Body` puts it back
/// only with an empty buffer, and `Idle::take` drops one with bytes waiting in the socket).
///
/// Panics if the decoder holds more than `MAX_HEAD` bytes while asking for more, makes no
/// progress, or hands out an empty piece.
fn run(pieces: &[Vec<u8>]) -> Result<Decoded, String> {
    let total: usize = pieces.iter().map(Vec::len).sum();
    // Every step takes a piece in or a byte out, or ends the answer.
    let mut steps = total + pieces.len() + 2;
    let mut step = || {
        steps = steps.checked_sub(1).unwrap_or_else(|| panic!("the decoder made no progress"));
    };
    let mut pieces = pieces.iter();
    let mut buf = BytesMut::new();
    let mut interim = 0;
    let head = loop {
        step();
        if let Some(head) = decoder::final_head(&mut buf, &mut interim).map_err(|e| e.to_string())? {
            break head;
        }
        assert!(buf.len() <= MAX_HEAD, "{} bytes held for a head", buf.len());
        buf.extend_from_slice(pieces.next().ok_or("closed in the head")?);
    };
    let (mut framing, mut reuse) = decoder::framing(&Method::POST, &head).map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    loop {
        step();
        match framing.decode(&mut buf).map_err(|e| e.to_string())? {
            Some(data) => {
                assert!(!data.is_empty(), "an empty piece of body");
                body.extend_from_slice(&data);
            }
            None if framing == Framing::Done => break,
            None => {
                assert!(buf.len() <= MAX_HEAD, "{} bytes held in a body", buf.len());
                match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => {
                        reuse = false;
                        framing.closed().map_err(|e| e.to_string())?;
                        break;
                    }
                }
            }
        }
    }
    let mut left = buf.to_vec();
    pieces.for_each(|p| left.extend_from_slice(p));
    let headers = head.headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
    Ok(Decoded { status: head.status.as_u16(), headers, body, reused: reuse && left.is_empty(), left })
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

/// How a generated answer's body ends.
#[derive(Debug, Clone)]
enum Kind {
    Length,
    /// Chunked: the body cut at these points, an extension on each chunk or not, trailers.
    Chunked(Vec<usize>, bool, Vec<(String, String)>),
    /// Neither length nor chunked: the body runs to the close (HTTP/1.0, or `connection: close`).
    Close(bool),
}

/// A valid answer: its bytes, and the status, headers and body it carries.
#[derive(Debug, Clone)]
struct Answer {
    bytes: Vec<u8>,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Whether the body runs to the close (so whatever follows is body too).
    to_close: bool,
}

fn answer(status: u16, interim: bool, extra: Vec<(String, String)>, body: Vec<u8>, kind: Kind) -> Answer {
    let mut bytes = Vec::new();
    if interim {
        bytes.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let version = if matches!(kind, Kind::Close(true)) { "1.0" } else { "1.1" };
    bytes.extend_from_slice(format!("HTTP/{version} {status} X\r\n").as_bytes());
    let mut headers: Vec<(String, Vec<u8>)> =
        extra.into_iter().map(|(k, v)| (k, v.trim().as_bytes().to_vec())).collect();
    match &kind {
        Kind::Length => headers.push(("content-length".into(), body.len().to_string().into_bytes())),
        Kind::Chunked(..) => headers.push(("transfer-encoding".into(), b"chunked".to_vec())),
        Kind::Close(true) => {}
        Kind::Close(false) => headers.push(("connection".into(), b"close".to_vec())),
    }
    for (k, v) in &headers {
        bytes.extend_from_slice(format!("{k}: ").as_bytes());
        bytes.extend_from_slice(v);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    let to_close = matches!(kind, Kind::Close(_));
    match kind {
        Kind::Length | Kind::Close(_) => bytes.extend_from_slice(&body),
        Kind::Chunked(cuts, ext, trailers) => {
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
    // A header map keeps each name's values in order, grouped at the name's first appearance.
    let mut grouped: Vec<(String, Vec<u8>)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        match grouped.iter().rposition(|(g, _)| *g == k) {
            Some(i) => grouped.insert(i + 1, (k, v)),
            None => grouped.push((k, v)),
        }
    }
    Answer { bytes, status, headers: grouped, body, to_close }
}

fn answers() -> impl Strategy<Value = Answer> {
    let kind = prop_oneof![
        Just(Kind::Length),
        (
            prop::collection::vec(any::<usize>(), 0..6),
            any::<bool>(),
            prop::collection::vec(("t-[a-z]{1,6}", "[a-z0-9]{0,12}"), 0..3),
        )
            .prop_map(|(cuts, ext, trailers)| Kind::Chunked(cuts, ext, trailers)),
        any::<bool>().prop_map(Kind::Close),
    ];
    (
        prop::sample::select(vec![200u16, 201, 400, 404, 429, 500, 503]),
        any::<bool>(),
        prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,24}"), 0..4),
        prop::collection::vec(any::<u8>(), 0..200),
        kind,
    )
        .prop_map(|(status, interim, extra, body, kind)| answer(status, interim, extra, body, kind))
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
        prop_assert_eq!(&got, &run(std::slice::from_ref(&input)).map_err(TestCaseError::fail)?);
        prop_assert_eq!(got.status, answer.status);
        prop_assert_eq!(&got.headers, &answer.headers);
        if answer.to_close {
            // What follows is the body's too, and the connection ends with it.
            let mut body = answer.body.clone();
            body.extend_from_slice(&next);
            prop_assert_eq!(&got.body, &body);
            prop_assert!(got.left.is_empty() && !got.reused);
        } else {
            prop_assert_eq!(&got.body, &answer.body);
            // What follows the answer is never read as part of it, and a connection with
            // bytes nobody asked for is not reused.
            prop_assert_eq!(&got.left, &next);
            prop_assert_eq!(got.reused, next.is_empty());
        }
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
        if first.to_close {
            let mut body = first.body.clone();
            body.extend_from_slice(&second.bytes);
            prop_assert_eq!(&got.body, &body);
        } else {
            prop_assert_eq!(&got.body, &first.body);
            prop_assert_eq!(&got.left, &second.bytes);
        }
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
        check_garbage(&input, &cuts).map_err(TestCaseError::fail)?;
    }
}

/// However `input` is cut, it decodes to the same answer or fails; a reused connection has
/// nothing left in it, and where the answer ended was decided by its own bytes: they alone
/// decode to the same answer, with nothing left.
fn check_garbage(input: &[u8], cuts: &[usize]) -> Result<(), String> {
    let whole = run(&[input.to_vec()]);
    let pieces = run(&split(input, cuts));
    match (&whole, &pieces) {
        (Err(_), Err(_)) => Ok(()),
        (Ok(whole), Ok(pieces)) => {
            if whole != pieces {
                return Err(format!("whole {whole:?} but in pieces {pieces:?}"));
            }
            if pieces.reused && !pieces.left.is_empty() {
                return Err("reused with bytes left".into());
            }
            let taken = &input[..input.len() - pieces.left.len()];
            let alone = run(&[taken.to_vec()])?;
            if alone.body != pieces.body || !alone.left.is_empty() {
                return Err(format!("its own bytes decode to {alone:?}"));
            }
            Ok(())
        }
        _ => Err(format!("whole {whole:?} but in pieces {pieces:?}")),
    }
}

/// Some bytes of `input` flipped, dropped, doubled or replaced by line ends, or the input cut
/// short: the near misses a broken or hostile upstream sends.
fn mangle(rng: &mut fastrand::Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.usize(1..4) {
        if out.is_empty() {
            break;
        }
        let at = rng.usize(..out.len());
        match rng.u8(..6) {
            0 => out[at] ^= 1 << rng.u8(..8),
            1 => {
                out.remove(at);
            }
            2 => out.insert(at, *rng.choice(b"\r\n\t ;:0f,".iter()).unwrap_or(&b'\n')),
            3 => {
                let end = (at + rng.usize(1..16)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            4 => out[at] = rng.u8(..),
            _ => out.truncate(at),
        }
    }
    out
}

#[test]
fn random_and_mangled_bytes_end_in_an_error_or_an_answer_with_bounded_memory() {
    // A fixed seed: a failure here reproduces; the iteration says which input it was.
    let mut rng = fastrand::Rng::with_seed(0x1e47_9c0d_e5ee_d5ed);
    let bodies: [&[u8]; 3] = [b"", b"hello, world", &[0u8, 13, 10, 255, 48, 13, 10, 13, 10]];
    for i in 0..20_000 {
        let input = match i % 4 {
            // Bytes of any value.
            0 => {
                let len = rng.usize(..512);
                std::iter::repeat_with(|| rng.u8(..)).take(len).collect()
            }
            // A valid head, then bytes from the framing's alphabet.
            1 => {
                let mut input = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                let alphabet = b"0123456789aAfF;= \t\r\n:x";
                for _ in 0..rng.usize(..256) {
                    input.push(alphabet[rng.usize(..alphabet.len())]);
                }
                input
            }
            // A valid answer of each kind, mangled.
            _ => {
                let body = bodies[rng.usize(..bodies.len())].to_vec();
                let kind = match rng.u8(..4) {
                    0 => Kind::Length,
                    1 => Kind::Close(rng.bool()),
                    _ => Kind::Chunked(
                        vec![rng.usize(..), rng.usize(..)],
                        rng.bool(),
                        vec![("t-a".into(), "b".into())],
                    ),
                };
                let valid = answer(200, rng.bool(), vec![("x-a".into(), "b".into())], body, kind);
                mangle(&mut rng, &valid.bytes)
            }
        };
        let n = rng.usize(..8);
        let cuts: Vec<usize> = std::iter::repeat_with(|| rng.usize(..)).take(n).collect();
        if let Err(e) = check_garbage(&input, &cuts) {
            panic!("input {i} {:?}: {e}", String::from_utf8_lossy(&input));
        }
    }
}

#[test]
fn floods_are_cut_off_at_their_bounds() {
    // A head, a chunk-size line and trailers that never end: each an error once past its
    // bound, however it arrives, with at most the bound held.
    let endless = |start: &[u8], filler: u8| {
        let mut input = start.to_vec();
        input.resize(start.len() + MAX_HEAD + 4096, filler);
        input
    };
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    let trailers = [&chunked[..], b"0\r\n"].concat();
    for (input, want) in [
        (endless(b"HTTP/1.1 200 OK\r\nx-a: ", b'a'), "larger than 64 KiB"),
        (endless(chunked, b'f'), "invalid"),
        (endless(&[&chunked[..], b"1;"].concat(), b'e'), "invalid"),
        (endless(&trailers, b't'), "invalid"),
        ([&trailers[..], &b"t: a\r\n".repeat(decoder::MAX_TRAILERS / 6 + 1), b"\r\n"].concat(), "invalid"),
    ] {
        // A head is parsed again from its start at each read: byte by byte it is slow to test.
        let smallest = if want.contains("64 KiB") { 61 } else { 1 };
        for piece in [smallest, 7.max(smallest), 4096, input.len()] {
            let pieces: Vec<Vec<u8>> = input.chunks(piece).map(<[u8]>::to_vec).collect();
            let got = run(&pieces);
            assert!(got.as_ref().is_err_and(|e| e.contains(want)), "{want}, in pieces of {piece}: {got:?}");
        }
    }
    // A whole head past the bound is refused even when it arrives in one read.
    let large =
        [&b"HTTP/1.1 200 OK\r\nx-a: "[..], &vec![b'a'; MAX_HEAD], b"\r\ncontent-length: 0\r\n\r\n"].concat();
    for piece in [4096, large.len()] {
        let pieces: Vec<Vec<u8>> = large.chunks(piece).map(<[u8]>::to_vec).collect();
        let got = run(&pieces);
        assert!(
            got.as_ref().is_err_and(|e| e.contains("larger than 64 KiB")),
            "in pieces of {piece}: {got:?}"
        );
    }
    // A huge length is read as it comes, not allocated.
    let big = b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\nabc";
    assert!(run(&[big.to_vec()]).is_err_and(|e| e.contains("before the end")));
    let mut framing = Framing::Chunked(Chunk::Size);
    let got = framing.decode(&mut BytesMut::from(&b"ffffffffffffffff\r\nab"[..]));
    assert_eq!(got.ok().flatten().as_deref(), Some(&b"ab"[..]));
}
