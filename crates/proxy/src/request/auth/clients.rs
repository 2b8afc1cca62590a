//! Who is asking: the key a client presents, the way its SDK sends it: `Authorization: Bearer`
//! (OpenAI SDKs), `api-key` (Azure SDKs) or `x-api-key`. The table of keys is
//! [`llmproxy_api::ClientKeys`], shared with the operator, which checks the Secret.

use http::{HeaderMap, header};

pub use llmproxy_api::ClientKeys;

/// The key a client presented, from whichever header its SDK uses.
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    bearer
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_any_sdks_header() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer sk-chat".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("sk-chat"));
        let mut h = HeaderMap::new();
        h.insert("api-key", "sk-azure".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("sk-azure"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", " sk-x ".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("sk-x"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("sk-x"), "not a bearer token: the other headers count");
    }
}
