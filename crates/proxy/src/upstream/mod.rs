//! Upstream requests and answers, and which headers cross the proxy in each direction (the
//! connections themselves are `pool`'s).

// Its items stay `pub` inside a private module: the client's API, for pool.rs and the benches.
#[allow(unreachable_pub)]
pub(crate) mod h1;
pub(crate) mod pool;

use std::fmt;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use llmproxy_api::policy::UpstreamPolicy;

use crate::protocol::provider;

/// The upstream API key. Never printed: `Debug` and `Display` show a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wrap a key, trimming the newline that files and Secrets often carry.
    pub fn new(key: &str) -> Option<Self> {
        let key = key.trim();
        (!key.is_empty()).then(|| Self(Arc::from(key)))
    }

    /// The key itself, only for building the Authorization header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// An upstream answer: status and headers read, the body still to come.
pub(crate) type Response = http::Response<Body>;

/// An upstream request as it is sent.
pub(crate) type Request = http::Request<http_body_util::Full<bytes::Bytes>>;

/// An upstream answer's body: from hyper (TLS, HTTP/2) or from the lean HTTP/1.1 client.
#[derive(Debug)]
pub(crate) enum Body {
    /// Read by hyper's connection task.
    Hyper(hyper::body::Incoming),
    /// Read from its connection as it is polled (boxed: it holds the connection itself).
    H1(Box<crate::upstream::h1::Body>),
}

/// A failure while reading an upstream body.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// From hyper.
    Hyper(hyper::Error),
    /// From the lean HTTP/1.1 client.
    H1(crate::upstream::h1::Error),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hyper(e) => e.fmt(f),
            Self::H1(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BodyError {}

impl hyper::body::Body for Body {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(BodyError::Hyper),
            Self::H1(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(BodyError::H1),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::H1(b) => b.size_hint(),
        }
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum SendError {
    /// From hyper's client.
    Hyper(hyper_util::client::legacy::Error),
    /// From the lean HTTP/1.1 client.
    H1(crate::upstream::h1::Error),
}

impl SendError {
    /// Whether no connection was made, so the upstream never saw the request.
    pub(crate) fn is_connect(&self) -> bool {
        match self {
            Self::Hyper(e) => e.is_connect(),
            Self::H1(e) => e.is_connect(),
        }
    }
}

/// A client error with its causes, for the client's error body (it holds no URL or header, so
/// no key): `client error (Connect): tcp connect error: Connection refused (os error 111)`.
pub(crate) fn error_message(e: &SendError) -> String {
    let e: &dyn std::error::Error = match e {
        SendError::Hyper(e) => e,
        SendError::H1(e) => e,
    };
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Read `resp`'s body into `buf`, up to `max` bytes (the rest is left unread).
pub(crate) async fn read_into(resp: Response, buf: &mut bytes::BytesMut, max: usize) {
    let mut body = resp.into_body();
    while let Some(Ok(chunk)) = next_chunk(&mut body).await {
        if buf.len() + chunk.len() > max {
            return;
        }
        buf.extend_from_slice(&chunk);
    }
}

/// The next piece of an upstream body (trailers skipped); `None` at its end.
pub(crate) async fn next_chunk(body: &mut Body) -> Option<Result<bytes::Bytes, BodyError>> {
    use http_body_util::BodyExt as _;
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(chunk) = frame.into_data() {
                    return Some(Ok(chunk));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// The body's length when the upstream announced it.
pub(crate) fn content_length(resp: &Response) -> Option<u64> {
    hyper::body::Body::size_hint(resp.body()).exact()
}

/// Whether the answer's framing marks where its body ends (a length, the last chunk, HTTP/2's
/// end of stream), so that a body cut short fails instead of ending: an HTTP/1.x answer with
/// neither a length nor chunked encoding last (RFC 9112 6.3) ends when the connection closes,
/// which an upstream failing mid-answer does too.
pub(crate) fn framed_end(resp: &Response) -> bool {
    if resp.version() >= http::Version::HTTP_2 || content_length(resp).is_some() {
        return true;
    }
    let last = resp
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .rfind(|c| !c.is_empty());
    last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and headers the proxy sets itself.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName, connection: &HeaderMap) -> bool {
    if HOP_BY_HOP.contains(name) || name.as_str() == "keep-alive" || name.as_str() == "proxy-connection" {
        return true;
    }
    // Headers named in `Connection` are hop-by-hop too.
    connection
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case(name.as_str())))
}

/// Client headers that choose which account of the key pays; passed only where the policy
/// names them (`spec.upstream.allowedClientHeaders`).
pub(crate) const ACCOUNT_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Forwarded headers that change the answer, and so belong in the cache key.
const ANSWER_HEADERS: &[&str] =
    &["openai-organization", "openai-project", "openai-beta", "anthropic-version", "anthropic-beta"];

/// Client request headers to send upstream: end-to-end headers kept; hop-by-hop, `Host`,
/// `Content-Length` (recomputed), `Accept-Encoding` (the proxy reads usage from bodies), every
/// client credential, and account headers not in `allowed_account` dropped.
pub(crate) fn request_headers(client: &HeaderMap, allowed_account: &[String]) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 1);
    for (name, value) in client {
        let account =
            ACCOUNT_HEADERS.contains(&name.as_str()) && !allowed_account.iter().any(|a| a == name.as_str());
        let dropped = account
            || is_hop_by_hop(name, client)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::ACCEPT_ENCODING
            || name == header::AUTHORIZATION
            || name.as_str() == "api-key"
            || name.as_str() == "x-api-key";
        if !dropped {
            // A copy, not a slice of the connection's read buffer: a request that waits long
            // must not keep that buffer alive (hyper reuses it once nothing else holds it).
            let owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            out.append(name.clone(), owned);
        }
    }
    out
}

/// The headers for one attempt at an endpoint: the forwarded ones, less the account headers
/// that endpoint does not allow, plus its key the way its provider takes it and what else the
/// provider needs.
pub(crate) fn for_endpoint(
    mut headers: HeaderMap,
    endpoint: &UpstreamPolicy,
    key: Option<&ApiKey>,
) -> HeaderMap {
    for name in ACCOUNT_HEADERS {
        if !endpoint.allowed_client_headers.iter().any(|a| a == name) {
            headers.remove(*name);
        }
    }
    provider::complete_headers(endpoint.provider, &mut headers);
    if let Some((name, value)) =
        key.and_then(|k| provider::key_header(endpoint.provider, endpoint.key_header, k.expose()))
    {
        headers.insert(name, value);
    }
    headers
}

/// The forwarded headers that change the answer, as `name:value` lines (for the cache key).
pub(crate) fn answer_headers(forwarded: &HeaderMap) -> String {
    let mut out = String::new();
    for name in ANSWER_HEADERS {
        for v in forwarded.get_all(*name) {
            out.push_str(name);
            out.push(':');
            out.push_str(&String::from_utf8_lossy(v.as_bytes()));
            out.push('\n');
        }
    }
    out
}

/// Upstream response headers to return: everything end-to-end, `x-ratelimit-*` included.
pub(crate) fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !is_hop_by_hop(name, upstream) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoint `upstream` (YAML) makes.
    fn endpoint(upstream: &str, allowed: &[&str]) -> UpstreamPolicy {
        let yaml = format!("upstream: {upstream}\nlimits: {{requestsPerMinute: 60}}");
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
        let policy = llmproxy_api::Policy::from_spec(&spec).unwrap();
        let mut e = policy.upstreams[0].clone();
        e.allowed_client_headers = allowed.iter().map(|a| (*a).to_owned()).collect();
        e
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn client_credentials_are_replaced_and_hop_by_hop_dropped() {
        let client = map(&[
            ("authorization", "Bearer client-key"),
            ("x-api-key", "other"),
            ("connection", "keep-alive, x-trace"),
            ("x-trace", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "proxy:8080"),
            ("content-length", "12"),
            ("accept-encoding", "gzip"),
            ("openai-organization", "org-1"),
            ("content-type", "application/json"),
        ]);
        let key = ApiKey::new("sk-upstream\n");
        let openai = endpoint("{url: 'https://x.io'}", &[]);
        let out = for_endpoint(request_headers(&client, &[]), &openai, key.as_ref());
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "authorization"], "the account header is dropped by default");
        assert_eq!(out.get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer sk-upstream"));
        assert!(request_headers(&client, &[]).get("authorization").is_none());
        let org = ["openai-organization".to_owned()];
        let allowed = request_headers(&client, &org);
        assert!(allowed.contains_key("openai-organization"), "passed where the policy allows it");
        assert_eq!(answer_headers(&allowed), "openai-organization:org-1\n");
        // An endpoint that does not allow it drops it; an Azure endpoint takes the key as api-key.
        let azure = endpoint("{url: 'https://x.io', keyHeader: api-key}", &[]);
        let azure = for_endpoint(allowed.clone(), &azure, key.as_ref());
        assert!(!azure.contains_key("openai-organization") && !azure.contains_key("authorization"));
        assert_eq!(azure.get("api-key").and_then(|v| v.to_str().ok()), Some("sk-upstream"));
        let allowing = endpoint("{url: 'https://x.io'}", &["openai-organization"]);
        assert!(for_endpoint(allowed.clone(), &allowing, None).contains_key("openai-organization"));
        // Anthropic takes the key as x-api-key, and a version when the client sent none.
        let claude = endpoint("{url: 'https://api.anthropic.com/v1', provider: anthropic}", &[]);
        let out = for_endpoint(allowed, &claude, key.as_ref());
        assert_eq!(out.get("x-api-key").and_then(|v| v.to_str().ok()), Some("sk-upstream"));
        assert!(!out.contains_key("authorization") && !out.contains_key("api-key"));
        assert_eq!(out.get("anthropic-version").and_then(|v| v.to_str().ok()), Some("2023-06-01"));
    }

    #[test]
    fn rate_limit_headers_come_back() {
        let up = map(&[("x-ratelimit-remaining-requests", "5"), ("transfer-encoding", "chunked")]);
        let out = response_headers(&up);
        assert!(out.contains_key("x-ratelimit-remaining-requests"));
        assert!(!out.contains_key("transfer-encoding"));
    }

    #[test]
    fn keys_are_never_printed() {
        let key = ApiKey::new("sk-secret");
        assert_eq!(format!("{key:?}"), "Some(ApiKey(<redacted>))");
    }
}
