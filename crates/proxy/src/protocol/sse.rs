//! Server-sent events on the way through: find the `usage` of a stream without holding it back,
//! and, when the proxy itself asked for `stream_options.include_usage`, remove the usage-only
//! event the client did not ask for. Memory is bounded whatever the upstream sends: a line or
//! an event longer than `MAX_HELD` is passed on without being held (and without being looked
//! into), and every byte is scanned once.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde_json::Value;

use crate::protocol::anthropic::StreamUsage;
use crate::protocol::tokens::{Usage, usage_of};

/// The most bytes of one unfinished line (scan mode) or event (strip mode) held back.
pub(crate) const MAX_HELD: usize = 1 << 20;

/// Watches an SSE body chunk by chunk.
#[derive(Default)]
pub(crate) struct SseTap {
    /// Drop the final `choices: []` usage event (the proxy injected `include_usage`).
    strip_usage_event: bool,
    /// Bytes of an unfinished line (scan mode) or event (strip mode).
    pending: BytesMut,
    /// How far into `pending` the search for an event's end has got (strip mode).
    searched: usize,
    /// The current line (scan mode) or event (strip mode) outgrew `MAX_HELD`: pass it on
    /// unread until it ends.
    oversized: bool,
    usage: Option<Usage>,
    /// Whether `data: [DONE]` was seen: the stream ended cleanly.
    done: bool,
    /// An Anthropic stream: its usage comes from `message_start` and `message_delta` events.
    anthropic: Option<StreamUsage>,
}

fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data:")?;
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    Some(rest.strip_suffix(b"\r").unwrap_or(rest))
}

/// The parsed event data, when it may carry usage.
fn usage_candidate(payload: &[u8]) -> Option<Value> {
    let has_usage = memmem::find(payload, b"\"usage\"").is_some();
    let null_usage = memmem::find(payload, b"\"usage\":null").is_some();
    if !has_usage || null_usage {
        return None;
    }
    serde_json::from_slice(payload).ok()
}

impl SseTap {
    /// A tap; `strip_usage_event` when the proxy added `include_usage` on the client's behalf.
    pub(crate) fn new(strip_usage_event: bool) -> Self {
        Self { strip_usage_event, ..Self::default() }
    }

    /// A tap of an Anthropic stream (nothing is stripped from it).
    pub(crate) fn anthropic() -> Self {
        Self { anthropic: Some(StreamUsage::default()), ..Self::default() }
    }

    /// Usage reported so far (the last usage event wins).
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.anthropic.map_or(self.usage, |a| a.usage)
    }

    /// Whether the stream ended cleanly: `data: [DONE]`, or Anthropic's `message_stop`.
    pub(crate) fn done(&self) -> bool {
        self.anthropic.map_or(self.done, |a| a.done)
    }

    /// Look at one line; returns false when the line's event should be dropped.
    fn line(&mut self, line: &[u8]) -> bool {
        let Some(payload) = data_payload(line) else { return true };
        if let Some(a) = &mut self.anthropic {
            a.event(payload);
            return true;
        }
        if payload == b"[DONE]" {
            self.done = true;
            return true;
        }
        let Some(value) = usage_candidate(payload) else { return true };
        if let Some(u) = usage_of(&value) {
            self.usage = Some(u);
        }
        let usage_only = value.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
        !(self.strip_usage_event && usage_only)
    }

    /// Look at every line of an event (each may carry usage); false if it is to be dropped.
    fn keep_event(&mut self, event: &[u8]) -> bool {
        let mut keep = true;
        for line in event.split(|b| *b == b'\n') {
            keep &= self.line(line);
        }
        keep
    }

    /// Feed a chunk from the upstream; returns what to send to the client now.
    pub(crate) fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.strip_usage_event { self.feed_events(&chunk) } else { self.scan_lines(chunk) }
    }

    /// Scan mode: pass the chunk through untouched, look at its complete lines.
    fn scan_lines(&mut self, chunk: Bytes) -> Bytes {
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &chunk) {
            if std::mem::take(&mut self.oversized) {
                // The end of a line too long to look into.
            } else if self.pending.is_empty() {
                self.line(&chunk[start..nl]);
            } else {
                self.pending.extend_from_slice(&chunk[start..nl]);
                let line = self.pending.split().freeze();
                self.line(&line);
            }
            start = nl + 1;
        }
        let rest = &chunk[start..];
        if !self.oversized && self.pending.len() + rest.len() <= MAX_HELD {
            self.pending.extend_from_slice(rest);
        } else {
            self.oversized = true;
            self.pending = BytesMut::new();
        }
        chunk
    }

    /// Strip mode: forward whole events, minus the injected usage event.
    fn feed_events(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        let mut chunk = chunk;
        if self.oversized {
            // Pass the oversized event on until its end, then go on as usual.
            let tail = [self.pending.as_ref(), chunk].concat();
            match event_end(&tail, 0) {
                Some(end) => {
                    let from_chunk = end.saturating_sub(self.pending.len());
                    out.extend_from_slice(&chunk[..from_chunk]);
                    chunk = &chunk[from_chunk..];
                    self.oversized = false;
                    self.pending = BytesMut::new();
                }
                None => {
                    out.extend_from_slice(chunk);
                    // Keep the last bytes: the blank line may straddle two chunks.
                    let keep = tail.len().min(3);
                    self.pending = BytesMut::from(&tail[tail.len() - keep..]);
                    return out.freeze();
                }
            }
        }
        self.pending.extend_from_slice(chunk);
        while let Some(end) = event_end(&self.pending, self.searched) {
            let event = self.pending.split_to(end).freeze();
            self.searched = 0;
            if self.keep_event(&event) {
                out.extend_from_slice(&event);
            }
        }
        // Resume the next search where this one stopped (less what a split blank line needs).
        self.searched = self.pending.len().saturating_sub(3);
        if self.pending.len() > MAX_HELD {
            out.extend_from_slice(&self.pending);
            let keep = self.pending.len().min(3);
            self.pending = BytesMut::from(&self.pending[self.pending.len() - keep..]);
            self.searched = 0;
            self.oversized = true;
        }
        out.freeze()
    }

    /// The end of the body: whatever is still held back.
    pub(crate) fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if std::mem::take(&mut self.oversized) {
            // Passed on already (strip mode keeps only a few bytes of it; they went out too).
            return Bytes::new();
        }
        if !self.strip_usage_event {
            self.line(&rest);
            return Bytes::new();
        }
        if self.keep_event(&rest) { rest } else { Bytes::new() }
    }
}

/// Index just past the blank line that ends the first complete event, searching from `from`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    let lf = memmem::find(&buf[from..], b"\n\n").map(|i| from + i + 2);
    let crlf = memmem::find(&buf[from..], b"\r\n\r\n").map(|i| from + i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anthropic_stream_passes_untouched_and_its_usage_is_read() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        for size in [1, 7, 64, stream.len()] {
            let mut tap = SseTap::anthropic();
            let mut out = Vec::new();
            for piece in stream.as_bytes().chunks(size) {
                out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
            }
            out.extend_from_slice(&tap.finish());
            assert_eq!(out, stream.as_bytes(), "chunks of {size}");
            let u = tap.usage().unwrap_or_default();
            assert_eq!((u.prompt, u.completion), (25, 15), "chunks of {size}");
            assert!(tap.done());
        }
    }

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );

    /// Feed the stream cut into pieces of `size` bytes, return what the client receives.
    fn run(tap: &mut SseTap, size: usize) -> String {
        let mut out = Vec::new();
        for piece in STREAM.as_bytes().chunks(size) {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&tap.finish());
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn scan_mode_passes_everything_and_finds_usage_across_chunk_boundaries() {
        for size in [1, 7, 64, 4096] {
            let mut tap = SseTap::new(false);
            assert_eq!(run(&mut tap, size), STREAM, "chunks of {size}");
            assert_eq!(
                tap.usage(),
                Some(Usage { prompt: 9, completion: 2, ..Usage::default() }),
                "chunks of {size}"
            );
            assert!(tap.done());
        }
    }

    #[test]
    fn strip_mode_drops_only_the_usage_event() {
        for size in [1, 5, 100, 4096] {
            let mut tap = SseTap::new(true);
            let out = run(&mut tap, size);
            assert!(!out.contains("prompt_tokens"), "chunks of {size}: {out}");
            assert!(out.contains("Hel") && out.contains("lo") && out.ends_with("data: [DONE]\n\n"), "{out}");
            assert_eq!(tap.usage(), Some(Usage { prompt: 9, completion: 2, ..Usage::default() }));
        }
    }

    #[test]
    fn a_line_or_event_that_never_ends_is_passed_on_not_held() {
        for strip in [false, true] {
            let mut tap = SseTap::new(strip);
            let mut sent = 0usize;
            let piece = Bytes::from(vec![b'x'; 64 << 10]);
            tap.feed(Bytes::from_static(b"data: "));
            for _ in 0..64 {
                sent += tap.feed(piece.clone()).len();
                assert!(tap.pending.len() <= MAX_HELD, "held {} bytes", tap.pending.len());
            }
            assert!(sent >= 63 * (64 << 10) - MAX_HELD, "strip={strip}: only {sent} bytes went on");
            // The stream goes on normally afterwards.
            let rest = tap.feed(Bytes::from_static(b"\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"));
            let _ = rest;
            let _ = tap.finish();
            assert!(tap.done(), "strip={strip}");
            assert_eq!(
                tap.usage(),
                Some(Usage { prompt: 1, completion: 2, ..Usage::default() }),
                "strip={strip}"
            );
        }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;

        /// Cut `bytes` at `cuts` (positions, any order) into chunks.
        fn chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            at.sort_unstable();
            at.push(bytes.len());
            let mut start = 0;
            at.into_iter()
                .map(|end| {
                    let piece = Bytes::copy_from_slice(&bytes[start..end]);
                    start = end;
                    piece
                })
                .collect()
        }

        fn events() -> impl Strategy<Value = Vec<String>> {
            let event = prop_oneof![
                "[a-z ]{0,20}".prop_map(|t| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}],\"usage\":null}}\n\n")),
                (0u64..1000, 0u64..1000).prop_map(|(p, c)| format!(
                    "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}\n\n"
                )),
                Just(": keep-alive\n\n".to_owned()),
                Just("event: ping\r\ndata: x\r\n\r\n".to_owned()),
            ];
            prop::collection::vec(event, 0..12).prop_map(|mut e| {
                e.push("data: [DONE]\n\n".to_owned());
                e
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn scan_mode_passes_every_byte_through(
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<usize>(), 0..16),
            ) {
                let mut tap = SseTap::new(false);
                let mut out = Vec::new();
                for piece in chunked(&bytes, &cuts) {
                    out.extend_from_slice(&tap.feed(piece));
                    prop_assert!(tap.pending.len() <= MAX_HELD);
                }
                out.extend_from_slice(&tap.finish());
                prop_assert_eq!(out, bytes);
            }

            #[test]
            fn strip_mode_removes_the_usage_events_and_nothing_else(
                events in events(),
                cuts in prop::collection::vec(any::<usize>(), 0..16),
            ) {
                let stream = events.concat().into_bytes();
                let mut tap = SseTap::new(true);
                let mut out = Vec::new();
                for piece in chunked(&stream, &cuts) {
                    out.extend_from_slice(&tap.feed(piece));
                }
                out.extend_from_slice(&tap.finish());
                let expected: String =
                    events.iter().filter(|e| !e.contains("\"choices\":[],")).map(String::as_str).collect();
                prop_assert_eq!(String::from_utf8_lossy(&out).into_owned(), expected);
                prop_assert!(tap.done());
            }

            #[test]
            fn garbage_never_panics_either_way(
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<usize>(), 0..16),
            ) {
                let mut tap = SseTap::new(true);
                for piece in chunked(&bytes, &cuts) {
                    let _ = tap.feed(piece);
                }
                let _ = tap.finish();
            }
        }
    }

    #[test]
    fn an_interrupted_stream_is_not_done() {
        let mut tap = SseTap::new(false);
        tap.feed(Bytes::from_static(b"data: {\"choices\":[]}\n\ndata: {\"choi"));
        tap.finish();
        assert!(!tap.done());
        assert_eq!(tap.usage(), None);
    }
}
