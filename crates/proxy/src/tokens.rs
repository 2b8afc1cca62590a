//! Token arithmetic: what a request may cost before it is sent, and what it did cost according
//! to the upstream's `usage`. The estimate is deliberately simple (about 4 bytes of text per
//! token, OpenAI's own rule of thumb) because the reservation is settled against real usage.

use serde_json::Value;

/// Tokens reserved for a request before it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt tokens, from the request text.
    pub prompt: u64,
    /// Completion tokens: the request's maximum, or the policy's default.
    pub completion: u64,
}

impl Estimate {
    /// Prompt and completion together: what the limiter reserves.
    pub fn total(self) -> u64 {
        self.prompt + self.completion
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
        self.prompt + self.completion
    }
}

/// Fields whose text is sent to the model and counts as prompt.
const PROMPT_FIELDS: &[&str] =
    &["messages", "prompt", "input", "instructions", "system", "tools", "functions"];

/// Fixed overhead per chat message (role and separators), as OpenAI's cookbook counts it.
const PER_MESSAGE: u64 = 4;

fn text_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => (s.len() as u64).div_ceil(4),
        // Pre-tokenised input: one number is one token.
        Value::Number(_) => 1,
        Value::Array(items) => items.iter().map(text_tokens).sum(),
        Value::Object(map) => map.values().map(text_tokens).sum(),
        Value::Bool(_) | Value::Null => 0,
    }
}

fn uint(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// Estimate a request's tokens from its JSON body. Endpoints that generate nothing
/// (embeddings, moderations) reserve no completion tokens.
pub fn estimate(path: &str, body: &Value, default_max_tokens: u32) -> Estimate {
    let mut prompt: u64 = PROMPT_FIELDS.iter().filter_map(|f| body.get(*f)).map(text_tokens).sum();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        prompt += PER_MESSAGE * messages.len() as u64 + 3;
    }
    let generates = !(path.ends_with("/embeddings") || path.ends_with("/moderations"));
    let completion = if generates {
        let max = uint(body, "max_completion_tokens")
            .or_else(|| uint(body, "max_tokens"))
            .or_else(|| uint(body, "max_output_tokens"))
            .unwrap_or(u64::from(default_max_tokens));
        max * uint(body, "n").unwrap_or(1).max(1)
    } else {
        0
    };
    Estimate { prompt, completion }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn chat_estimate_counts_text_messages_and_max_tokens() {
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "12345678"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}]}
        ], "max_tokens": 50});
        // strings: "system"(2) + "12345678"(2) + "user"(1) + "text"(1) + "abcd"(1) = 7; 2 messages: 8 + 3.
        assert_eq!(estimate("/chat/completions", &body, 1024), Estimate { prompt: 18, completion: 50 });
    }

    #[test]
    fn completion_falls_back_to_the_default_and_multiplies_by_n() {
        let body = json!({"prompt": "hi", "n": 3});
        assert_eq!(estimate("/completions", &body, 100).completion, 300);
        let body = json!({"input": "hi", "max_completion_tokens": 7, "max_tokens": 99});
        assert_eq!(estimate("/responses", &body, 100).completion, 7, "the newer field wins");
    }

    #[test]
    fn embeddings_reserve_no_completion() {
        let body = json!({"model": "text-embedding-3-small", "input": ["aaaa", "bbbbbbbb"]});
        assert_eq!(estimate("/embeddings", &body, 1024), Estimate { prompt: 3, completion: 0 });
        let tokens = json!({"input": [[1, 2, 3]]});
        assert_eq!(estimate("/embeddings", &tokens, 1024).prompt, 3);
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
