//! Token arithmetic: what a request is charged before it is sent (the provider's own estimator,
//! so that both sides count alike), and what it did cost according to the upstream's `usage`.

use serde_json::Value;

use crate::body::Inspected;

/// Tokens reserved for a request before it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt tokens, from the request text.
    pub prompt: u64,
    /// Completion tokens: the request's maximum, or the policy's default.
    pub completion: u64,
}

impl Estimate {
    /// Prompt and completion together: what the limiter charges.
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Tokens the upstream reported using.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `prompt_tokens` / `input_tokens`.
    pub prompt: u64,
    /// `completion_tokens` / `output_tokens`.
    pub completion: u64,
}

impl Usage {
    /// What counts against tokens per minute.
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What a request is charged before it is sent, the way the provider's limiter counts it: the
/// prompt estimate (characters / 4 over the prompt fields' text, one token per number of
/// pre-tokenised input) plus the completion budget (`max_completion_tokens`, `max_tokens` or
/// `max_output_tokens`, else `default_max_tokens`, times `n`). Endpoints that generate nothing
/// (embeddings, moderations) have no completion budget. Arithmetic saturates: an absurd budget
/// becomes an absurd charge, which the limits then refuse.
pub fn estimate(path: &str, body: &Inspected, default_max_tokens: u32) -> Estimate {
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
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object()).or_else(|| v.get("response")?.get("usage"))?;
    let prompt = uint(u, "prompt_tokens").or_else(|| uint(u, "input_tokens"));
    let completion = uint(u, "completion_tokens").or_else(|| uint(u, "output_tokens"));
    let total = uint(u, "total_tokens");
    match (prompt, completion, total) {
        (Some(p), Some(c), _) => Some(Usage { prompt: p, completion: c }),
        (Some(p), None, t) => Some(Usage { prompt: p, completion: t.unwrap_or(p).saturating_sub(p) }),
        (None, _, Some(t)) => Some(Usage { prompt: t, completion: 0 }),
        _ => None,
    }
}

/// The `usage` object in the tail of a JSON body too large to keep whole: the last `"usage"` key
/// (OpenAI writes it near the end) and the object after it.
pub fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
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
        crate::body::inspect(v.to_string().as_bytes(), false).unwrap_or_else(|e| panic!("{e}"))
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
        assert_eq!(usage_in_tail(tail), Some(Usage { prompt: 3, completion: 4 }));
        assert_eq!(usage_in_tail(br#"text \"usage\": {\"prompt_tokens\": 9}"#), None);
        assert_eq!(usage_in_tail(b"garbage"), None);
    }

    #[test]
    fn usage_from_each_api_shape() {
        let chat = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
        assert_eq!(usage_of(&chat), Some(Usage { prompt: 10, completion: 5 }));
        let embeddings = json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}});
        assert_eq!(usage_of(&embeddings), Some(Usage { prompt: 8, completion: 0 }));
        let responses = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}});
        assert_eq!(usage_of(&responses), Some(Usage { prompt: 3, completion: 4 }));
        assert_eq!(usage_of(&json!({"usage": null})), None);
    }
}
