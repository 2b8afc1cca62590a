//! An Anthropic prompt as the mock measures it: its input tokens (characters / 4 over tools,
//! system and message text) and the prefixes its `cache_control` breakpoints mark, which the
//! mock's prompt cache remembers by digest.

use serde_json::Value;

use crate::gate::fnv_bytes;
use crate::{Mock, lock};

/// A prompt's size and its cacheable prefixes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Prompt {
    /// Input tokens of the whole prompt.
    pub(crate) tokens: u64,
    /// Each breakpoint's prefix: its tokens and its digest (model included: caches are per
    /// model), shortest first.
    breakpoints: Vec<(u64, u64)>,
}

/// What the prompt cache made of a prompt's input tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cached {
    /// Written to the cache (the part up to the last breakpoint not read from it).
    pub(crate) creation: u64,
    /// Read from the cache (the longest prefix seen before).
    pub(crate) read: u64,
}

/// The text of a block: a `text` block's text, any other block's JSON without its
/// `cache_control`; and whether it carries `cache_control`.
fn block(v: &Value) -> (String, bool) {
    let marked = v.get("cache_control").is_some_and(|c| !c.is_null());
    if let Some(s) = v.as_str() {
        return (s.to_owned(), false);
    }
    if v.get("type").and_then(Value::as_str) == Some("text")
        && let Some(t) = v.get("text").and_then(Value::as_str)
    {
        return (t.to_owned(), marked);
    }
    let mut bare = v.clone();
    if let Some(map) = bare.as_object_mut() {
        map.remove("cache_control");
    }
    (bare.to_string(), marked)
}

/// A string or an array of blocks, as blocks.
fn blocks(v: &Value) -> Vec<(String, bool)> {
    match v {
        Value::Array(items) => items.iter().map(block).collect(),
        Value::Null => Vec::new(),
        other => vec![block(other)],
    }
}

impl Prompt {
    /// Measure a `/v1/messages` (or `count_tokens`) request, in cache order: tools, system,
    /// messages.
    pub(crate) fn of(req: &Value) -> Self {
        let mut segments = blocks(req.get("tools").unwrap_or(&Value::Null));
        segments.extend(blocks(req.get("system").unwrap_or(&Value::Null)));
        let messages = req.get("messages").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        for m in messages {
            segments.extend(blocks(m.get("content").unwrap_or(&Value::Null)));
        }
        let model = req.get("model").and_then(Value::as_str).unwrap_or_default();
        let mut digest = fnv_bytes(0xcbf2_9ce4_8422_2325, model.as_bytes());
        let mut chars = 0u64;
        let mut breakpoints = Vec::new();
        for (text, marked) in &segments {
            chars += text.chars().count() as u64;
            digest = fnv_bytes(fnv_bytes(digest, &[0xff]), text.as_bytes());
            if *marked {
                breakpoints.push((chars.div_ceil(4), digest));
            }
        }
        Self { tokens: chars.div_ceil(4), breakpoints }
    }

    /// How the cache would serve this prompt now: the longest prefix seen before is read, the
    /// rest up to the last breakpoint written.
    pub(crate) fn lookup(&self, mock: &Mock) -> Cached {
        let Some(&(last, _)) = self.breakpoints.last() else { return Cached::default() };
        let cache = lock(&mock.prompt_cache);
        let read = self.breakpoints.iter().rev().find(|(_, d)| cache.contains(d)).map_or(0, |(t, _)| *t);
        Cached { creation: last - read, read }
    }

    /// Write this prompt's prefixes to the cache.
    pub(crate) fn remember(&self, mock: &Mock) {
        lock(&mock.prompt_cache).extend(self.breakpoints.iter().map(|(_, d)| *d));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn counts_system_messages_and_tools() {
        // 8 (system) + 4 + 4 (text blocks) + 16 (string content) = 32 characters.
        let req = json!({"model": "m", "system": "12345678",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "text", "text": "efgh"}]},
                         {"role": "assistant", "content": "0123456789abcdef"}]});
        assert_eq!(Prompt::of(&req).tokens, 8);
        let system_blocks = json!({"system": [{"type": "text", "text": "12345678"}], "messages": []});
        assert_eq!(Prompt::of(&system_blocks).tokens, 2);
        let tool = json!({"name": "t", "input_schema": {}});
        let with_tool = json!({"tools": [tool], "messages": []});
        assert_eq!(Prompt::of(&with_tool).tokens, (tool.to_string().len() as u64).div_ceil(4));
    }

    #[test]
    fn cache_control_does_not_change_the_count() {
        let plain = json!({"system": [{"type": "text", "text": "a long system prompt"}], "messages": [{"content": "hi"}]});
        let mut marked = plain.clone();
        marked["system"][0]["cache_control"] = json!({"type": "ephemeral"});
        let (p, m) = (Prompt::of(&plain), Prompt::of(&marked));
        assert_eq!(p.tokens, m.tokens);
        assert!(p.breakpoints.is_empty());
        assert_eq!(m.breakpoints.len(), 1);
        assert_eq!(m.breakpoints[0].0, 5); // "a long system prompt": 20 characters
    }
}
