//! The request's path, checked before anything else: only plain `/v1/...` (and, for Azure
//! OpenAI, `/openai/...`) paths that the policy allows reach the upstream. A path that could
//! resolve anywhere else (`..`, `%2e%2e`, encoded slashes or backslashes, empty or
//! control-character segments) is refused outright.

use http::{Method, StatusCode};
use llmproxy_api::paths::PathRule;

use crate::request::error::ApiError;

/// Decode `%XX` escapes; `None` for a malformed escape.
pub(crate) fn percent_decode(segment: &str) -> Option<Vec<u8>> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The segments of a path as the client sent it (still percent-encoded), its root (`v1` or
/// `openai`) first, once each is known to be a plain name.
pub(crate) fn segments(raw: &str) -> Result<Vec<&str>, ApiError> {
    let refuse = |why: &str| {
        let msg = format!(
            "refused path {raw:?}: {why}; llmproxy passes only plain /v1/... (or Azure's /openai/...) paths"
        );
        ApiError::invalid(StatusCode::BAD_REQUEST, msg, Some("invalid_path"))
    };
    let Some((root, rest)) = llmproxy_api::paths::split_root(raw) else {
        return Err(refuse("it is not under /v1/"));
    };
    let mut out = vec![root];
    for segment in rest.split('/') {
        let decoded = percent_decode(segment).ok_or_else(|| refuse("a malformed % escape"))?;
        let plain = match decoded.as_slice() {
            [] => Err("an empty segment"),
            b"." | b".." => Err("a dot segment"),
            d if d.iter().any(|b| *b == b'/' || *b == b'\\') => Err("an encoded slash"),
            d if d.iter().any(|b| b.is_ascii_control()) => Err("a control character"),
            _ => Ok(()),
        };
        plain.map_err(refuse)?;
        out.push(segment);
    }
    Ok(out)
}

/// Whether the policy lets `method` on these segments through; a 403 naming the rule set if not.
pub(crate) fn allowed(
    rules: &[PathRule],
    method: &Method,
    raw: &str,
    segments: &[&str],
) -> Result<(), ApiError> {
    if rules.iter().any(|r| r.matches(method.as_str(), segments)) {
        return Ok(());
    }
    let msg = format!(
        "{method} {raw} is not allowed through this proxy (spec.upstream.allowedPaths); it allows: {}",
        rules.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    Err(ApiError {
        status: StatusCode::FORBIDDEN,
        message: msg,
        kind: "permission_error",
        code: Some("path_not_allowed"),
        retry_after: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_pass() {
        assert_eq!(segments("/v1/chat/completions").ok(), Some(vec!["v1", "chat", "completions"]));
        assert_eq!(segments("/v1/models/ft%3Agpt-4o").ok(), Some(vec!["v1", "models", "ft%3Agpt-4o"]));
        assert_eq!(
            segments("/openai/deployments/d/embeddings").ok(),
            Some(vec!["openai", "deployments", "d", "embeddings"])
        );
        for bad in [
            "/v1/../mock/stats",
            "/v1/%2e%2e/mock/stats",
            "/v1/%2E%2e/x",
            "/v1/chat/./completions",
            "/v1/a%2fb",
            "/v1/a%5Cb",
            "/v1/a\\b",
            "/v1//models",
            "/v1/models/",
            "/v1/x%00",
            "/v1/x%zz",
            "/v1/x%4",
            "/v2/models",
            "/openai/../v1/x",
            "/openai",
            "/openaix/x",
        ] {
            assert!(segments(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_allow_list_decides_by_method_and_path() {
        let rules: Vec<PathRule> = llmproxy_api::paths::DEFAULT_ALLOWED_PATHS
            .iter()
            .filter_map(|r| PathRule::parse(r).ok())
            .collect();
        assert!(
            allowed(&rules, &Method::POST, "/v1/chat/completions", &["v1", "chat", "completions"]).is_ok()
        );
        assert!(allowed(&rules, &Method::GET, "/v1/models/x", &["v1", "models", "x"]).is_ok());
        let files = allowed(&rules, &Method::GET, "/v1/files/f/content", &["v1", "files", "f", "content"]);
        assert_eq!(files.map_err(|e| e.status), Err(StatusCode::FORBIDDEN));
        let delete = allowed(&rules, &Method::DELETE, "/v1/models/ft-1", &["v1", "models", "ft-1"]);
        assert!(delete.is_err());
    }
}
