//! A request body read once, without building a JSON tree: the few fields the proxy needs, the
//! prompt's size by the provider's estimator, and (when asked) a canonical digest for the cache
//! key. Memory stays near the size of the body itself, whatever its shape: strings are looked
//! at where they lie, objects and arrays are reduced to 32-byte digests as they close.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize as _, Deserializer as _};
use sha2::{Digest, Sha256};

/// Fields whose text is sent to the model and counts as prompt.
pub(crate) const PROMPT_FIELDS: &[&str] =
    &["messages", "prompt", "input", "instructions", "system", "tools", "functions"];

/// Fields that do not change the answer: who asked (`user` and its successors) and
/// `stream_options` (the cache holds the usage event and strips it on replay).
const NOT_IN_KEY: &[&str] = &["user", "safety_identifier", "prompt_cache_key", "stream_options"];

/// Top-level fields whose values the proxy reads.
const READ_FIELDS: &[&str] =
    &["model", "user", "stream", "max_completion_tokens", "max_tokens", "max_output_tokens", "n"];

/// Fields whose text identifies the prompt in request records.
const PROMPT_HASH_FIELDS: &[&str] = &["messages", "prompt", "input", "instructions"];

/// The prompt's size as the provider estimates it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Text {
    /// Characters (Unicode scalar values) of every string.
    pub chars: u64,
    /// Numbers (pre-tokenised input: one token each).
    pub numbers: u64,
    /// Images and documents (Anthropic's `image` and `document` blocks), charged a flat
    /// [`MEDIA_TOKENS`] each rather than by the length of their base64 data.
    pub media: u64,
}

/// What one image or document block is charged at admission: Anthropic's largest image
/// (about 1.15 megapixels at 750 pixels per token) costs about 1,600 tokens; the answer's usage
/// settles the difference.
pub(crate) const MEDIA_TOKENS: u64 = 1600;

impl Text {
    fn add(&mut self, other: Text) {
        self.chars = self.chars.saturating_add(other.chars);
        self.numbers = self.numbers.saturating_add(other.numbers);
        self.media = self.media.saturating_add(other.media);
    }

    /// Tokens by the documented rule: characters / 4 (rounded up), plus one per number, plus
    /// a flat charge per image or document.
    pub(crate) fn tokens(self) -> u64 {
        self.chars
            .div_ceil(4)
            .saturating_add(self.numbers)
            .saturating_add(self.media.saturating_mul(MEDIA_TOKENS))
    }
}

/// What the proxy reads from a JSON request body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Inspected {
    /// `model`.
    pub model: Option<String>,
    /// `stream`.
    pub stream: bool,
    /// Whether the body has a top-level `stream_options`.
    pub has_stream_options: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_completion_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `max_output_tokens` (Responses API).
    pub max_output_tokens: Option<u64>,
    /// `n`.
    pub n: Option<u64>,
    /// `user`.
    pub user: Option<String>,
    /// The text of the prompt fields.
    pub text: Text,
    /// Digest of the body with key order, whitespace and `NOT_IN_KEY` fields ignored.
    pub key_digest: Option<[u8; 32]>,
    /// Digest of the prompt fields only, for request records.
    pub prompt_digest: Option<[u8; 32]>,
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Not JSON, or a top-level value that is not an object.
    #[error("{0}")]
    Invalid(String),
}

/// Read `body` (which must be one JSON object). `digest`: also compute the canonical digests.
pub(crate) fn inspect(body: &[u8], digest: bool) -> Result<Inspected, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let inspected = de
        .deserialize_map(Top { digest })
        .map_err(|e| BodyError::Invalid(format!("invalid JSON body: {e}")))?;
    de.end().map_err(|e| BodyError::Invalid(format!("invalid JSON body: {e}")))?;
    Ok(inspected)
}

/// A value's contribution to its parent's digest: small scalars as their bytes, anything else
/// as its own digest.
#[derive(Clone, Debug)]
enum Enc {
    Bytes(Vec<u8>),
    Digest([u8; 32]),
}

impl Enc {
    fn feed(&self, h: &mut Sha256) {
        match self {
            Enc::Bytes(b) => {
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
            Enc::Digest(d) => {
                h.update(b"#");
                h.update(d);
            }
        }
    }

    fn scalar(tag: u8, bytes: &[u8]) -> Enc {
        if bytes.len() <= 64 {
            let mut v = Vec::with_capacity(bytes.len() + 1);
            v.push(tag);
            v.extend_from_slice(bytes);
            Enc::Bytes(v)
        } else {
            let mut h = Sha256::new();
            h.update([tag]);
            h.update(bytes);
            Enc::Digest(h.finalize().into())
        }
    }
}

/// A scalar value seen at the top of a walk.
#[derive(Debug, Default)]
enum Scalar {
    #[default]
    Other,
    Bool(bool),
    Count(u64),
    Str(String),
}

/// A walked value: its text (if counted), its encoding (if digesting), and the value itself
/// when it is a scalar.
struct Walked {
    text: Text,
    enc: Option<Enc>,
    scalar: Scalar,
}

/// Walks any JSON value; counts text when `count`, encodes when `digest`, keeps the value when
/// it is a scalar and `keep` (strings are copied, so only where they are wanted).
#[derive(Clone, Copy)]
struct Walk {
    count: bool,
    digest: bool,
    keep: bool,
}

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = Walked;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Walked, D::Error> {
        if !self.count && !self.digest && !self.keep {
            IgnoredAny::deserialize(d)?;
            return Ok(Walked { text: Text::default(), enc: None, scalar: Scalar::Other });
        }
        d.deserialize_any(self)
    }
}

impl Walk {
    fn scalar(self, tag: u8, bytes: &[u8], text: Text, scalar: Scalar) -> Walked {
        Walked {
            text: if self.count { text } else { Text::default() },
            enc: self.digest.then(|| Enc::scalar(tag, bytes)),
            scalar,
        }
    }

    /// The same walk one level down: strings there are never kept.
    fn inner(self) -> Self {
        Self { keep: false, ..self }
    }

    fn number(self, repr: &str, scalar: Scalar) -> Walked {
        self.scalar(b'#', repr.as_bytes(), Text { numbers: 1, ..Text::default() }, scalar)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = Walked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Walked, E> {
        let kept = if self.keep { Scalar::Bool(v) } else { Scalar::Other };
        Ok(self.scalar(b'b', if v { b"t" } else { b"f" }, Text::default(), kept))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Walked, E> {
        Ok(self.number(&v.to_string(), Scalar::Other))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Walked, E> {
        let kept = if self.keep { Scalar::Count(v) } else { Scalar::Other };
        Ok(self.number(&v.to_string(), kept))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Walked, E> {
        Ok(self.number(&v.to_string(), Scalar::Other))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Walked, E> {
        let chars = if self.count { v.chars().count() as u64 } else { 0 };
        let kept = if self.keep { Scalar::Str(v.to_owned()) } else { Scalar::Other };
        Ok(self.scalar(b's', v.as_bytes(), Text { chars, ..Text::default() }, kept))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Walked, E> {
        Ok(self.scalar(b'n', b"", Text::default(), Scalar::Other))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Walked, A::Error> {
        let mut text = Text::default();
        let mut h = self.digest.then(|| {
            let mut h = Sha256::new();
            h.update(b"[");
            h
        });
        while let Some(item) = seq.next_element_seed(self.inner())? {
            text.add(item.text);
            if let (Some(h), Some(enc)) = (h.as_mut(), item.enc) {
                enc.feed(h);
            }
        }
        Ok(Walked { text, enc: h.map(|h| Enc::Digest(h.finalize().into())), scalar: Scalar::Other })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Walked, A::Error> {
        let mut text = Text::default();
        let mut entries: Vec<(String, Enc)> = Vec::new();
        let mut media = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            // A block's `type` is kept (it is short) to tell images and documents apart.
            let typed = self.count && key == "type";
            let value = map.next_value_seed(Walk { keep: typed, ..self.inner() })?;
            if let Scalar::Str(t) = &value.scalar {
                media |= typed && (t == "image" || t == "document");
            }
            text.add(value.text);
            if let Some(enc) = value.enc {
                entries.push((key.into_owned(), enc));
            }
        }
        if media {
            text = Text { media: 1, ..Text::default() };
        }
        let enc = self.digest.then(|| Enc::Digest(object_digest(&mut entries)));
        Ok(Walked { text, enc, scalar: Scalar::Other })
    }
}

/// An object's digest: its entries sorted by key, so that key order never matters.
fn object_digest(entries: &mut [(String, Enc)]) -> [u8; 32] {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update(b"{");
    for (k, enc) in entries.iter() {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        enc.feed(&mut h);
    }
    h.finalize().into()
}

/// `stream_options`: only `include_usage` is read, anything else is skipped.
struct StreamOptions;

impl<'de> DeserializeSeed<'de> for StreamOptions {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StreamOptions {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stream options")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut include_usage = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "include_usage" {
                include_usage = map.next_value::<IgnoredOr<bool>>()?.0 == Some(true);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(include_usage)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// A value of type `T`, or anything else (skipped) as `None`.
struct IgnoredOr<T>(Option<T>);

impl<'de> serde::Deserialize<'de> for IgnoredOr<bool> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let walked = d.deserialize_any(Walk { count: false, digest: false, keep: true })?;
        Ok(Self(match walked.scalar {
            Scalar::Bool(b) => Some(b),
            _ => None,
        }))
    }
}

/// The top-level object.
struct Top {
    digest: bool,
}

impl<'de> Visitor<'de> for Top {
    type Value = Inspected;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Inspected, A::Error> {
        let mut out = Inspected::default();
        let mut seen: Vec<String> = Vec::new();
        let mut key_entries: Vec<(String, Enc)> = Vec::new();
        let mut prompt_entries: Vec<(String, Enc)> = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if seen.iter().any(|k| *k == key) {
                return Err(de::Error::custom(format!("duplicate field `{key}`")));
            }
            seen.push(key.clone().into_owned());
            let in_key = self.digest && !NOT_IN_KEY.contains(&key.as_ref());
            let in_prompt_hash = self.digest && PROMPT_HASH_FIELDS.contains(&key.as_ref());
            if key == "stream_options" {
                out.has_stream_options = true;
                out.include_usage = map.next_value_seed(StreamOptions)?;
                continue;
            }
            let count = PROMPT_FIELDS.contains(&key.as_ref());
            let keep = READ_FIELDS.contains(&key.as_ref());
            let walked = map.next_value_seed(Walk { count, digest: in_key || in_prompt_hash, keep })?;
            out.text.add(walked.text);
            let number = || match walked.scalar {
                Scalar::Count(n) => Some(n),
                _ => None,
            };
            match key.as_ref() {
                "model" | "user" => {
                    let s = match &walked.scalar {
                        Scalar::Str(s) => Some(s.clone()),
                        _ => None,
                    };
                    if key == "model" {
                        out.model = s;
                    } else {
                        out.user = s;
                    }
                }
                "stream" => out.stream = matches!(walked.scalar, Scalar::Bool(true)),
                "max_completion_tokens" => out.max_completion_tokens = number(),
                "max_tokens" => out.max_tokens = number(),
                "max_output_tokens" => out.max_output_tokens = number(),
                "n" => out.n = number(),
                _ => {}
            }
            let enc = walked.enc;
            if let Some(enc) = enc {
                if in_prompt_hash {
                    prompt_entries.push((key.clone().into_owned(), enc.clone()));
                }
                if in_key {
                    key_entries.push((key.into_owned(), enc));
                }
            }
        }
        if self.digest {
            out.key_digest = Some(object_digest(&mut key_entries));
            out.prompt_digest = (!prompt_entries.is_empty()).then(|| object_digest(&mut prompt_entries));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(v: &serde_json::Value) -> Inspected {
        inspect(v.to_string().as_bytes(), true).unwrap()
    }

    #[test]
    fn reads_the_fields_the_proxy_needs() {
        let i = read(&json!({"model": "gpt-4o", "stream": true, "max_tokens": 50, "n": 2, "user": "u1",
            "stream_options": {"x": [1], "include_usage": true}, "temperature": 0}));
        assert_eq!(i.model.as_deref(), Some("gpt-4o"));
        assert!(i.stream && i.has_stream_options && i.include_usage);
        let no = read(&json!({"stream": true, "stream_options": {"include_usage": "yes"}}));
        assert!(no.has_stream_options && !no.include_usage);
        assert_eq!((i.max_tokens, i.n, i.user.as_deref()), (Some(50), Some(2), Some("u1")));
        let odd = read(&json!({"max_tokens": "9", "n": -1, "model": 5}));
        assert_eq!((odd.max_tokens, odd.n, odd.model), (None, None, None), "wrong types are not values");
    }

    #[test]
    fn text_is_characters_of_every_string_in_the_prompt_fields() {
        let i = read(&json!({"model": "m", "messages": [
            {"role": "system", "content": "12345678"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "text", "text": "ééé"}]}
        ], "metadata": {"ignored": "not prompt text"}}));
        // "system"(6) + "12345678"(8) + "user"(4) + "text"(4) + "abcd"(4) + "text"(4) + "ééé"(3) = 33.
        assert_eq!(i.text, Text { chars: 33, ..Text::default() });
        assert_eq!(i.text.tokens(), 9);
        let tokens = read(&json!({"input": [[1, 2, 3], "abcd"]}));
        assert_eq!(tokens.text.tokens(), 4);
    }

    #[test]
    fn an_image_or_document_block_is_charged_flat_whatever_its_data() {
        let data = "A".repeat(400_000);
        let i = read(&json!({"model": "claude", "max_tokens": 10, "system": "abcd", "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                {"type": "document", "source": {"type": "text", "data": "x"}},
                {"type": "text", "text": "abcd"}
            ]}
        ]}));
        // "abcd" + "user" + "text" + "abcd" = 16 characters, plus two media blocks.
        assert_eq!(i.text, Text { chars: 16, numbers: 0, media: 2 });
        assert_eq!(i.text.tokens(), 4 + 2 * MEDIA_TOKENS);
        assert_eq!(i.max_tokens, Some(10));
    }

    #[test]
    fn the_key_ignores_order_whitespace_and_who_asked() {
        let a =
            read(&json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}));
        let b = inspect(
            br#"{ "temperature":0, "messages":[{"content":"hi","role":"user"}], "model":"a", "user":"x",
                 "stream_options": {"include_usage": true} }"#,
            true,
        )
        .unwrap();
        assert_eq!(a.key_digest, b.key_digest);
        assert_eq!(a.prompt_digest, b.prompt_digest);
        for other in [
            json!({"model": "b", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}),
            json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stream": true}),
            json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 1}),
            json!({"model": "a", "messages": [{"content": "hi"}, {"role": "user"}], "temperature": 0}),
        ] {
            assert_ne!(a.key_digest, read(&other).key_digest, "{other}");
        }
        let long = "x".repeat(1000);
        assert_ne!(
            read(&json!({"input": long})).key_digest,
            read(&json!({"input": format!("{long}y")})).key_digest
        );
    }

    #[test]
    fn not_an_object_duplicates_and_garbage_are_refused() {
        for bad in
            [&b"[1, 2]"[..], b"\"x\"", b"{\"model\": ", b"{\"model\": \"a\", \"model\": \"b\"}", b"{} {}"]
        {
            assert!(inspect(bad, true).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    mod fuzz {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::super::*;

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (-1e9f64..1e9).prop_map(Value::from),
                ".{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn request() -> impl Strategy<Value = serde_json::Map<String, Value>> {
            let field = prop_oneof![
                Just("model"),
                Just("messages"),
                Just("prompt"),
                Just("input"),
                Just("max_tokens"),
                Just("max_completion_tokens"),
                Just("n"),
                Just("stream"),
                Just("stream_options"),
                Just("user"),
                Just("temperature"),
                Just("tools"),
            ];
            prop::collection::btree_map(field, json(), 0..8)
                .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        }

        /// The reference: what the same fields say when read through a JSON tree.
        fn text_of(v: &Value) -> (u64, u64) {
            match v {
                Value::String(s) => (s.chars().count() as u64, 0),
                Value::Number(_) => (0, 1),
                Value::Array(a) => a.iter().map(text_of).fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1)),
                Value::Object(o) => o.values().map(text_of).fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1)),
                _ => (0, 0),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_are_read_or_refused_never_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = inspect(&bytes, true);
            }

            #[test]
            fn a_request_reads_as_its_tree_says(req in request()) {
                let body = serde_json::to_vec(&Value::Object(req.clone())).unwrap_or_default();
                let got = inspect(&body, true).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got.model.as_deref(), req.get("model").and_then(Value::as_str));
                prop_assert_eq!(got.stream, req.get("stream").and_then(Value::as_bool) == Some(true));
                prop_assert_eq!(got.max_tokens, req.get("max_tokens").and_then(Value::as_u64));
                prop_assert_eq!(got.n, req.get("n").and_then(Value::as_u64));
                let (chars, numbers) = PROMPT_FIELDS
                    .iter()
                    .filter_map(|f| req.get(*f))
                    .map(text_of)
                    .fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1));
                prop_assert_eq!(got.text, Text { chars, numbers, media: 0 });
                // Estimating never overflows, whatever the numbers.
                let _ = crate::protocol::tokens::estimate("/chat/completions", &got, u32::MAX).total();
            }

            #[test]
            fn the_key_ignores_key_order_and_whitespace(req in request()) {
                let compact = serde_json::to_vec(&Value::Object(req.clone())).unwrap_or_default();
                let mut reversed: Vec<(String, Value)> = req.into_iter().collect();
                reversed.reverse();
                let spaced = format!(
                    "{{ {} }}",
                    reversed
                        .iter()
                        .map(|(k, v)| format!("{} :\n {}", Value::String(k.clone()), v))
                        .collect::<Vec<_>>()
                        .join(" ,\t")
                );
                let a = inspect(&compact, true).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let b = inspect(spaced.as_bytes(), true).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(a.key_digest, b.key_digest);
                prop_assert_eq!(a.prompt_digest, b.prompt_digest);
            }
        }
    }

    #[test]
    fn no_digest_unless_asked() {
        let i = inspect(br#"{"model": "m", "messages": []}"#, false).unwrap();
        assert_eq!((i.key_digest, i.prompt_digest), (None, None));
    }
}
