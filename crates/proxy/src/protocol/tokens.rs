//! Token arithmetic: what a request is charged before it is sent (the provider's own estimator,
//! so that both sides count alike), and what it did cost according to the upstream's `usage`.

use serde_json::Value;

use crate::protocol::body::Inspected;

/// Tokens reserved for a request before it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Estimate {
    /// Prompt tokens, from the request text.
    pub prompt: u64,
    /// Completion tokens: the request's maximum, or the policy's default.
    pub completion: u64,
}

impl Estimate {
    /// Prompt and completion together: what the limiter charges.
    pub(crate) fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Tokens the upstream reported using.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `prompt_tokens` / `input_tokens` (at Anthropic, the input after the last cache breakpoint).
    pub prompt: u64,
    /// `completion_tokens` / `output_tokens`.
    pub completion: u64,
    /// Input written to the provider's prompt cache (Anthropic's `cache_creation_input_tokens`).
    pub cache_write: u64,
    /// Input read from the provider's prompt cache (Anthropic's `cache_read_input_tokens`),
    /// which does not count toward its input tokens per minute.
    pub cache_read: u64,
}

impl Usage {
    /// What counts against input tokens per minute: cache reads excluded, as Anthropic counts.
    pub fn input(self) -> u64 {
        self.prompt.saturating_add(self.cache_write)
    }

    /// What counts against tokens per minute.
    pub fn total(self) -> u64 {
        self.input().saturating_add(self.completion)
    }
}

/// What a request is charged before it is sent, the way the provider's limiter counts it: the
/// prompt estimate (characters / 4 over the prompt fields' text, one token per number of
/// pre-tokenised input) plus the completion budget (`max_completion_tokens`, `max_tokens` or
/// `max_output_tokens`, else `default_max_tokens`, times `n`). Endpoints that generate nothing
/// (embeddings, moderations) have no completion budget; counting tokens costs none. Arithmetic saturates: an absurd budget
/// becomes an absurd charge, which the limits then refuse.
pub(crate) fn estimate(path: &str, body: &Inspected, default_max_tokens: u32) -> Estimate {
    // Anthropic's token counting is free: it draws on no token limit.
    if path.ends_with("/messages/count_tokens") {
        return Estimate::default();
    }
    let generates = !(path.ends_with("/embeddings") || path.ends_with("/moderations"));
    let completion = if generates {
        let max = body
            .max_completion_tokens
            .or(body.max_tokens)
            .or(body.max_output_tokens)
            .unwrap_or(u64::from(default_max_tokens));
        max.saturating_mul(body.n.unwrap_or(1).max(1))
    } else {
        0
    };
    Estimate { prompt: body.text.tokens(), completion }
}

fn uint(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// The `usage` of a response body or stream event: chat/completions/embeddings put it at the top
/// level, the Responses API under `response`.
pub(crate) fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object()).or_else(|| v.get("response")?.get("usage"))?;
    let prompt = uint(u, "prompt_tokens").or_else(|| uint(u, "input_tokens"));
    let completion = uint(u, "completion_tokens").or_else(|| uint(u, "output_tokens"));
    combine(prompt, completion, uint(u, "total_tokens"))
}

/// The `usage` of a whole JSON answer (top level, or in `response` for the Responses API), as
/// [`usage_of`] reads it, without building the answer's tree: every other field is skipped.
pub(crate) fn usage_in_body(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Top {
        #[serde(default)]
        usage: Lenient<Fields>,
        #[serde(default)]
        response: Lenient<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(default)]
        usage: Lenient<Fields>,
    }
    #[derive(serde::Deserialize)]
    struct Fields {
        #[serde(default)]
        prompt_tokens: Lenient<u64>,
        #[serde(default)]
        input_tokens: Lenient<u64>,
        #[serde(default)]
        completion_tokens: Lenient<u64>,
        #[serde(default)]
        output_tokens: Lenient<u64>,
        #[serde(default)]
        total_tokens: Lenient<u64>,
    }
    let top: Top = serde_json::from_slice(body).ok()?;
    let f = top.usage.0.or_else(|| top.response.0?.usage.0)?;
    let prompt = f.prompt_tokens.0.or(f.input_tokens.0);
    let completion = f.completion_tokens.0.or(f.output_tokens.0);
    combine(prompt, completion, f.total_tokens.0)
}

/// A value of the expected shape, or `None` for any other JSON value (skipped, not an error).
pub(crate) struct Lenient<T>(pub(crate) Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, IgnoredAny, IntoDeserializer as _, MapAccess, SeqAccess};
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> de::Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                let d: de::value::U64Deserializer<E> = v.into_deserializer();
                Ok(Lenient(T::deserialize(d).ok()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let d: de::value::StrDeserializer<'_, E> = v.into_deserializer();
                Ok(Lenient(T::deserialize(d).ok()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Lenient(Some(t)))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn combine(prompt: Option<u64>, completion: Option<u64>, total: Option<u64>) -> Option<Usage> {
    match (prompt, completion, total) {
        (Some(p), Some(c), _) => Some(Usage { prompt: p, completion: c, ..Usage::default() }),
        (Some(p), None, t) => {
            Some(Usage { prompt: p, completion: t.unwrap_or(p).saturating_sub(p), ..Usage::default() })
        }
        (None, _, Some(t)) => Some(Usage { prompt: t, completion: 0, ..Usage::default() }),
        _ => None,
    }
}

/// The `usage` object in the tail of a JSON body too large to keep whole: the last `"usage"` key
/// (OpenAI writes it near the end) and the object after it.
pub(crate) fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    let mut end = tail.len();
    while let Some(at) = memchr::memmem::rfind(&tail[..end], b"\"usage\"") {
        end = at;
        if at > 0 && tail[at - 1] == b'\\' {
            continue; // inside a string: \"usage\"
        }
        let rest = &tail[at + 7..];
        let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
        let Some(rest) = rest.strip_prefix(b":") else { continue };
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
        if let Some(Ok(v)) = values.next()
            && let Some(u) = usage_of(&serde_json::json!({ "usage": v }))
        {
            return Some(u);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn inspect(v: &Value) -> Inspected {
        crate::protocol::body::inspect(v.to_string().as_bytes(), false).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn chat_estimate_is_characters_over_four_plus_max_tokens() {
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "12345678"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}]}
        ], "max_tokens": 50});
        // "system" + "12345678" + "user" + "text" + "abcd" = 26 characters: 7 tokens.
        assert_eq!(
            estimate("/chat/completions", &inspect(&body), 1024),
            Estimate { prompt: 7, completion: 50 }
        );
    }

    #[test]
    fn completion_falls_back_to_the_default_and_multiplies_by_n() {
        let body = json!({"prompt": "hi", "n": 3});
        assert_eq!(estimate("/completions", &inspect(&body), 100).completion, 300);
        let body = json!({"input": "hi", "max_completion_tokens": 7, "max_tokens": 99});
        assert_eq!(estimate("/responses", &inspect(&body), 100).completion, 7, "the newer field wins");
        let huge = json!({"prompt": "hi", "n": 128, "max_tokens": u64::MAX / 2});
        assert_eq!(estimate("/completions", &inspect(&huge), 100).total(), u64::MAX, "saturates");
    }

    #[test]
    fn embeddings_reserve_no_completion() {
        let body = json!({"model": "text-embedding-3-small", "input": ["aaaa", "bbbbbbbb"]});
        assert_eq!(estimate("/embeddings", &inspect(&body), 1024), Estimate { prompt: 3, completion: 0 });
        let tokens = json!({"input": [[1, 2, 3]]});
        assert_eq!(estimate("/embeddings", &inspect(&tokens), 1024).prompt, 3);
    }

    #[test]
    fn usage_is_found_in_the_tail_of_a_large_body() {
        let tail = br#"aaa\"usage\": 5 ...", "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "x": 1}"#;
        assert_eq!(usage_in_tail(tail), Some(Usage { prompt: 3, completion: 4, ..Usage::default() }));
        assert_eq!(usage_in_tail(br#"text \"usage\": {\"prompt_tokens\": 9}"#), None);
        assert_eq!(usage_in_tail(b"garbage"), None);
    }

    #[test]
    fn usage_from_each_api_shape() {
        let chat = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
        assert_eq!(usage_of(&chat), Some(Usage { prompt: 10, completion: 5, ..Usage::default() }));
        let embeddings = json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}});
        assert_eq!(usage_of(&embeddings), Some(Usage { prompt: 8, completion: 0, ..Usage::default() }));
        let responses = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}});
        assert_eq!(usage_of(&responses), Some(Usage { prompt: 3, completion: 4, ..Usage::default() }));
        assert_eq!(usage_of(&json!({"usage": null})), None);
    }

    #[test]
    fn the_body_reader_agrees_with_the_tree_reader() {
        let bodies = [
            json!({"id": "x", "choices": [{"message": {"content": "a \"usage\": 1"}}], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 2}}}),
            json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}}),
            json!({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}}),
            json!({"usage": null, "response": {"usage": {"input_tokens": 1, "output_tokens": 2}}}),
            json!({"usage": "n/a"}),
            json!({"usage": {"prompt_tokens": -1, "completion_tokens": 2.5, "total_tokens": 7}}),
            json!({"usage": [1, 2], "data": [[1.5, {"a": null}]]}),
            json!({"nothing": true}),
        ];
        for body in bodies {
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            assert_eq!(usage_in_body(&bytes), usage_of(&body), "{body}");
        }
        assert_eq!(usage_in_body(b"not json"), None);
        assert_eq!(usage_in_body(b"[1, 2]"), None);
    }
}
