//! Server-sent events on the way through: find the `usage` of a stream without holding it back,
//! and, when the proxy itself asked for `stream_options.include_usage`, remove the usage-only
//! event the client did not ask for.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde_json::Value;

use crate::tokens::{Usage, usage_of};

/// Watches an SSE body chunk by chunk.
#[derive(Default)]
pub struct SseTap {
    /// Drop the final `choices: []` usage event (the proxy injected `include_usage`).
    strip_usage_event: bool,
    /// Bytes of an unfinished line (scan mode) or event (strip mode).
    pending: BytesMut,
    usage: Option<Usage>,
    /// Whether `data: [DONE]` was seen: the stream ended cleanly.
    done: bool,
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
    pub fn new(strip_usage_event: bool) -> Self {
        Self { strip_usage_event, ..Self::default() }
    }

    /// Usage reported so far (the last usage event wins).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the stream ended with `data: [DONE]`.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Look at one line; returns false when the line's event should be dropped.
    fn line(&mut self, line: &[u8]) -> bool {
        let Some(payload) = data_payload(line) else { return true };
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
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.strip_usage_event { self.feed_events(&chunk) } else { self.scan_lines(chunk) }
    }

    /// Scan mode: pass the chunk through untouched, look at its complete lines.
    fn scan_lines(&mut self, chunk: Bytes) -> Bytes {
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &chunk) {
            if self.pending.is_empty() {
                self.line(&chunk[start..nl]);
            } else {
                self.pending.extend_from_slice(&chunk[start..nl]);
                let line = self.pending.split().freeze();
                self.line(&line);
            }
            start = nl + 1;
        }
        self.pending.extend_from_slice(&chunk[start..]);
        chunk
    }

    /// Strip mode: forward whole events, minus the injected usage event.
    fn feed_events(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end).freeze();
            if self.keep_event(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// The end of the body: whatever is still held back.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if !self.strip_usage_event {
            self.line(&rest);
            return Bytes::new();
        }
        if self.keep_event(&rest) { rest } else { Bytes::new() }
    }
}

/// Index just past the blank line that ends the first complete event.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(tap.usage(), Some(Usage { prompt: 9, completion: 2 }), "chunks of {size}");
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
            assert_eq!(tap.usage(), Some(Usage { prompt: 9, completion: 2 }));
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
