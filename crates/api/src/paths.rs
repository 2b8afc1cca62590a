//! Which requests a proxy passes upstream: `spec.upstream.allowedPaths`, rules such as
//! `POST /v1/chat/completions`, `GET /v1/models/*` or (Azure OpenAI)
//! `POST /openai/deployments/*/chat/completions`, so that a proxy for chat cannot be used to
//! download files or delete fine-tunes with the organisation's key.

use std::fmt;

/// What a proxy allows when `allowedPaths` is absent: the inference endpoints and the model list.
pub const DEFAULT_ALLOWED_PATHS: &[&str] = &[
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/moderations",
    "POST /v1/responses",
    "POST /v1/images/generations",
    "POST /v1/audio/speech",
    "POST /v1/audio/transcriptions",
    "POST /v1/audio/translations",
    "GET /v1/models",
    "GET /v1/models/*",
];

/// What a proxy for Anthropic allows when `allowedPaths` is absent: the Messages API, token
/// counting and the model list.
pub const DEFAULT_ANTHROPIC_PATHS: &[&str] =
    &["POST /v1/messages", "POST /v1/messages/count_tokens", "GET /v1/models", "GET /v1/models/*"];

/// What a proxy for Azure OpenAI allows when `allowedPaths` is absent: the deployment paths the
/// SDKs' Azure clients call (chat completions, completions, embeddings) and the same under the
/// v1 API, with its model list.
pub const DEFAULT_AZURE_PATHS: &[&str] = &[
    "POST /openai/deployments/*/chat/completions",
    "POST /openai/deployments/*/completions",
    "POST /openai/deployments/*/embeddings",
    "POST /openai/v1/chat/completions",
    "POST /openai/v1/completions",
    "POST /openai/v1/embeddings",
    "POST /openai/v1/responses",
    "GET /openai/v1/models",
    "GET /openai/v1/models/*",
];

/// What a proxy for Gemini's OpenAI-compatible API allows when `allowedPaths` is absent.
pub const DEFAULT_GEMINI_PATHS: &[&str] =
    &["POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models", "GET /v1/models/*"];

/// The rules of an upstream of `provider` without `allowedPaths`.
pub fn default_allowed_paths(provider: crate::crd::Provider) -> &'static [&'static str] {
    match provider {
        crate::crd::Provider::OpenAi => DEFAULT_ALLOWED_PATHS,
        crate::crd::Provider::Anthropic => DEFAULT_ANTHROPIC_PATHS,
        crate::crd::Provider::Azure => DEFAULT_AZURE_PATHS,
        crate::crd::Provider::Gemini => DEFAULT_GEMINI_PATHS,
    }
}

/// The path roots a request may come under: `/v1/` (OpenAI, Anthropic, Gemini) and `/openai/`
/// (Azure OpenAI's deployment and v1 paths).
pub const ROOTS: &[&str] = &["v1", "openai"];

/// A path's root (one of `ROOTS`) and what follows `/ROOT/`; `None` for a path under none.
/// Rules and requests split their paths alike, so a rule's root is a request's.
pub fn split_root(path: &str) -> Option<(&'static str, &str)> {
    ROOTS
        .iter()
        .find_map(|root| Some((*root, path.strip_prefix('/')?.strip_prefix(*root)?.strip_prefix('/')?)))
}

/// One segment of a rule's path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// This exact segment.
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**` (last only): any number of segments, none included.
    Rest,
}

/// One allowed method and path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    /// `None` for `*` (any method).
    method: Option<String>,
    segments: Vec<Segment>,
    text: String,
}

impl fmt::Display for PathRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PathRule {
    /// Parse `METHOD /v1/path` or `METHOD /openai/path` (method `*` for any; path segments
    /// literal, `*` for one, `**` last for the rest).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (method, path) = text.trim().split_once(' ').ok_or_else(|| {
            format!("{text:?}: expected METHOD /v1/PATH, e.g. \"POST /v1/chat/completions\"")
        })?;
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.to_owned()),
            m => return Err(format!("{text:?}: method {m:?} must be upper case, or * for any")),
        };
        let Some((root, rest)) = split_root(path.trim()) else {
            return Err(format!("{text:?}: the path must start with /v1/ (or /openai/ for Azure OpenAI)"));
        };
        let parts: Vec<&str> = std::iter::once(root).chain(rest.split('/')).collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("{text:?}: ** may only end a path")),
                p if !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
                    && p != "."
                    && p != ".." =>
                {
                    Segment::Literal(p.to_owned())
                }
                p => return Err(format!("{text:?}: segment {p:?} is not a plain name, * or **")),
            });
        }
        Ok(Self { method, segments, text: text.trim().to_owned() })
    }

    /// The root its path starts under (`v1` or `openai`).
    pub fn root(&self) -> &str {
        match self.segments.first() {
            Some(Segment::Literal(root)) => root,
            _ => "",
        }
    }

    /// Whether `method` on the path whose segments (the root first) are `path` is allowed.
    pub fn matches(&self, method: &str, path: &[&str]) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        let mut rest = path;
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One if !rest.is_empty() => rest = &rest[1..],
                Segment::Literal(l) if rest.first() == Some(&l.as_str()) => rest = &rest[1..],
                _ => return false,
            }
        }
        rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> PathRule {
        PathRule::parse(s).unwrap()
    }

    #[test]
    fn rules_match_method_and_segments() {
        let chat = rule("POST /v1/chat/completions");
        assert!(chat.matches("POST", &["v1", "chat", "completions"]));
        assert!(!chat.matches("GET", &["v1", "chat", "completions"]));
        assert!(!chat.matches("POST", &["v1", "chat", "completions", "x"]));
        assert!(!chat.matches("POST", &["openai", "chat", "completions"]));
        let model = rule("GET /v1/models/*");
        assert!(model.matches("GET", &["v1", "models", "gpt-4o"]));
        assert!(!model.matches("GET", &["v1", "models"]));
        let any = rule("* /v1/files/**");
        assert!(any.matches("DELETE", &["v1", "files", "file-1", "content"]));
        assert!(any.matches("GET", &["v1", "files"]));
        let azure = rule("POST /openai/deployments/*/chat/completions");
        assert_eq!(azure.root(), "openai");
        assert!(azure.matches("POST", &["openai", "deployments", "gpt-4o", "chat", "completions"]));
        assert!(!azure.matches("POST", &["v1", "deployments", "gpt-4o", "chat", "completions"]));
    }

    #[test]
    fn bad_rules_say_why() {
        for (bad, why) in [
            ("/v1/chat", "expected METHOD"),
            ("post /v1/chat", "upper case"),
            ("POST /chat", "must start with /v1/"),
            ("POST /openaix/chat", "must start with /v1/"),
            ("POST /v1", "must start with /v1/"),
            ("POST /v1/../files", "not a plain name"),
            ("POST /v1/**/x", "may only end"),
            ("POST /v1/a//b", "not a plain name"),
        ] {
            let err = PathRule::parse(bad).err().unwrap_or_default();
            assert!(err.contains(why), "{bad}: {err}");
        }
        for text in DEFAULT_ALLOWED_PATHS.iter().chain(DEFAULT_AZURE_PATHS).chain(DEFAULT_GEMINI_PATHS) {
            assert!(PathRule::parse(text).is_ok(), "{text}");
        }
    }
}
