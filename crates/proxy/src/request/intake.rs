//! Intake: read the client's request within its bounds, check it, work out what it will be
//! charged, and prepare what is sent upstream and what identifies it in the cache.

use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header, request};
use llmproxy_api::Policy;
use llmproxy_api::policy::UpstreamPolicy;

use super::auth::Client;
use crate::admission::limiter::Ask;
use crate::admission::queue::BytesLease;
use crate::cache::{self, Key};
use crate::protocol::body::{self, Inspected};
use crate::proxy::Proxy;
use crate::request::error::{ApiError, Refusal};
use crate::telemetry::labels::Outcome;
use crate::{protocol::tokens, upstream};

/// The request as it will be sent upstream, every attempt alike (each attempt's endpoint
/// supplies the base URL and the key).
pub(crate) struct Outgoing {
    pub(crate) method: http::Method,
    /// Path after `/v1` (the whole path for Azure's `/openai/...`) and query, appended to the
    /// endpoint's URL.
    pub(crate) rest: String,
    /// Forwarded headers; account headers only where some endpoint allows them (each attempt
    /// drops those its endpoint does not).
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The proxy added `stream_options.include_usage`, so it removes the usage event again.
    pub(crate) strip_usage_event: bool,
}

/// A request that passed intake.
pub(crate) struct Intake {
    /// What goes upstream.
    pub(crate) out: Outgoing,
    /// What it asks of the limiter.
    pub(crate) ask: Ask,
    /// The cache key, for cacheable requests.
    pub(crate) cache_key: Option<Key>,
    /// Its body's share of `queue.maxBytes`, held until the request is done with it.
    _bytes: BytesLease,
}

/// What intake learned about the request, for its record, whether or not it passed.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    /// Whether its log line is written (sampling); `None` when it was refused before that was
    /// decided.
    pub(crate) logged: Option<bool>,
    /// Who asked: the client its key identifies, else the configured client header, else the
    /// body's `user`.
    pub(crate) client: Option<String>,
    /// The body's `model`.
    pub(crate) model: Option<String>,
    /// Whether the client asked for a stream.
    pub(crate) stream: bool,
    /// What it is charged at admission.
    pub(crate) estimate: tokens::Estimate,
    /// SHA-256 prefix of the prompt, for a logged request.
    pub(crate) prompt_hash: Option<String>,
}

/// A refusal for a request the client got wrong.
fn bad(err: ApiError) -> Refusal {
    Refusal::new(err, Outcome::BadRequest)
}

/// Read the body within the size limit, the time limit and the queue's memory budget.
async fn read_body(
    body: Body,
    declared: Option<usize>,
    limit: usize,
    proxy: &Proxy,
    policy: &Policy,
) -> Result<(Bytes, BytesLease), Refusal> {
    let too_large = |what: String| {
        let msg = format!("request body exceeds {what}");
        bad(ApiError::invalid(StatusCode::PAYLOAD_TOO_LARGE, msg, Some("request_too_large")))
    };
    let budget = proxy.admission().byte_budget();
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(format!("the proxy's limit of {limit} bytes")));
    }
    if declared.is_some_and(|n| n as u64 > budget) {
        return Err(too_large(format!("the queue's memory budget of {budget} bytes (queue.maxBytes)")));
    }
    let full = |r: crate::admission::queue::Rejection| {
        Refusal::new(ApiError::throttled(&r, policy.queue.max_wait), Outcome::QueueFull)
    };
    let mut lease = proxy.admission().reserve_bytes(declared.unwrap_or(0) as u64).map_err(full)?;
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    let mut stream = body.into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| bad(bad_request("could not read the request body")))?;
            let total = buf.len() + chunk.len();
            if total > limit {
                return Err(too_large(format!("the proxy's limit of {limit} bytes")));
            }
            let held = declared.unwrap_or(0).max(buf.len());
            if total > held {
                lease.grow((total - held) as u64).map_err(full)?;
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    let timeout = proxy.options().body_read_timeout;
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok((buf.freeze(), lease)),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => {
            let msg = format!("the request body did not arrive within {timeout:?}");
            Err(bad(ApiError::invalid(StatusCode::REQUEST_TIMEOUT, msg, Some("request_timeout"))))
        }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::invalid(StatusCode::BAD_REQUEST, message, None)
}

/// Read and check the request; returns what it learned about the request either way.
pub(crate) async fn read(
    proxy: &Proxy,
    policy: &Policy,
    client: &Client,
    parts: request::Parts,
    body: Body,
) -> (Facts, Result<Intake, Refusal>) {
    let mut facts = Facts::default();
    let intake = read_into(proxy, policy, client, parts, body, &mut facts).await;
    (facts, intake)
}

async fn read_into(
    proxy: &Proxy,
    policy: &Policy,
    client: &Client,
    parts: request::Parts,
    body: Body,
    facts: &mut Facts,
) -> Result<Intake, Refusal> {
    // The path first: nothing of a request that may not pass is read or queued.
    let allowing = allowing(policy, &parts)?;

    let options = proxy.options();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let (body, lease) = read_body(body, declared, options.max_request_bytes, proxy, policy).await?;

    let route = Route::of(parts.uri.path());
    let rest = route.operation;
    let logged = options.record_percent >= 100 || fastrand::u8(0..100) < options.record_percent;
    facts.logged = Some(logged);
    let cacheable =
        parts.method == http::Method::POST && cache::cacheable_path(rest) && proxy.cache().enabled();
    let inspected = if is_json(&parts.headers, &body) {
        let digest = cacheable || logged;
        Some(body::inspect(&body, digest).map_err(|e| bad(bad_request(e.to_string())))?)
    } else {
        None
    };
    facts.client = who(client, options.client_id_header.as_ref(), &parts.headers, inspected.as_ref());

    let mut ask = Ask::default();
    let mut strip_usage_event = false;
    let mut body = body;
    if let Some(i) = &inspected {
        ask = charge(policy, rest, i, route.deployment.as_deref(), logged, facts)?;
        // Not for Azure: API versions before 2024-09 refuse `stream_options`, and Azure counts
        // what a request asked for, not what it used.
        if i.stream
            && (rest == "/chat/completions" || rest == "/completions")
            && !i.include_usage
            && !route.azure
        {
            strip_usage_event = true;
            body = ask_for_usage(&body, i).map_err(bad)?;
        }
    }
    let eligible = eligible(policy, &allowing, &mut ask)?;
    let query = if route.azure {
        crate::protocol::azure::query(parts.uri.query()).map_err(|e| bad(bad_request(e)))?
    } else {
        parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default()
    };
    ask.client = client.name.clone();
    let account: Vec<String> =
        eligible.iter().flat_map(|u| u.allowed_client_headers.iter().cloned()).collect();
    let headers = upstream::request_headers(&parts.headers, &account);
    let rest = format!("{}{query}", route.forward);
    let digest = inspected.as_ref().and_then(|i| i.key_digest.as_ref()).filter(|_| cacheable);
    let cache_key = digest.map(|d| cache_key(policy, client, &parts.method, &rest, &headers, d));
    Ok(Intake {
        out: Outgoing { method: parts.method, rest, headers, body, strip_usage_event },
        ask,
        cache_key,
        _bytes: lease,
    })
}

/// What a request's path says: the operation as OpenAI names it after `/v1` (what it is
/// charged, counted and cached as), the path sent after the endpoint's URL, and the model it
/// names (an Azure deployment).
struct Route<'a> {
    operation: &'a str,
    forward: &'a str,
    deployment: Option<String>,
    azure: bool,
}

impl<'a> Route<'a> {
    fn of(path: &'a str) -> Self {
        match crate::protocol::azure::route(path) {
            Some(r) => Self {
                operation: r.operation,
                forward: path,
                deployment: r
                    .deployment
                    .and_then(|d| String::from_utf8(super::path::percent_decode(d)?).ok()),
                azure: true,
            },
            None => {
                let rest = path.strip_prefix("/v1").unwrap_or_default();
                Self { operation: rest, forward: rest, deployment: None, azure: false }
            }
        }
    }
}

/// Who asked: the client its key identifies; without one, the configured header, else the
/// body's user.
fn who(
    client: &Client,
    client_id_header: Option<&http::HeaderName>,
    headers: &HeaderMap,
    inspected: Option<&Inspected>,
) -> Option<String> {
    client.name.as_deref().map(str::to_owned).or_else(|| {
        client_id_header
            .and_then(|h| headers.get(h)?.to_str().ok())
            .or_else(|| inspected?.user.as_deref())
            .map(|c| c.chars().take(128).collect())
    })
}

/// What the request is charged at admission, the way the provider counts it; refused when it
/// could never fit `limits.maxRequestTokens`.
fn charge(
    policy: &Policy,
    rest: &str,
    i: &Inspected,
    deployment: Option<&str>,
    logged: bool,
    facts: &mut Facts,
) -> Result<Ask, Refusal> {
    // An Azure deployment is the model, whatever the body names.
    facts.model = deployment.map(str::to_owned).or_else(|| i.model.clone());
    facts.stream = i.stream;
    // Anthropic requires `max_tokens` on a message (and charges it against output tokens per
    // minute until the answer says what was used): refuse its absence as Anthropic would,
    // rather than charge a guess.
    if rest == "/messages" && i.max_tokens.is_none() {
        return Err(bad(bad_request("max_tokens: Field required")));
    }
    facts.estimate = tokens::estimate(rest, i, policy.limits.default_max_tokens);
    if logged {
        facts.prompt_hash = i.prompt_digest.as_ref().map(cache::prompt_hash);
    }
    let estimate = facts.estimate;
    let ask = Ask {
        tokens: estimate.total(),
        input: estimate.prompt,
        output: estimate.completion,
        model: facts.model.as_deref().map(Arc::from),
        ..Ask::default()
    };
    let l = &policy.limits;
    let over = |max: Option<u64>, units: u64| max.filter(|max| units > *max);
    if let Some(max) = over(l.max_request_tokens, ask.tokens) {
        return Err(bad(never_fits(estimate, "tokens-per-minute", max)));
    }
    if let Some(max) = over(l.max_request_input_tokens, ask.input) {
        return Err(bad(never_fits(estimate, "input-tokens-per-minute", max)));
    }
    if let Some(max) = over(l.max_request_output_tokens, ask.output) {
        return Err(bad(never_fits(estimate, "output-tokens-per-minute", max)));
    }
    Ok(ask)
}

/// The endpoints that may take it: they serve its model and allow its path. Named in `ask`
/// when they are not all of them.
fn eligible<'p>(
    policy: &Policy,
    allowing: &[&'p UpstreamPolicy],
    ask: &mut Ask,
) -> Result<Vec<&'p UpstreamPolicy>, Refusal> {
    let eligible: Vec<&UpstreamPolicy> =
        allowing.iter().copied().filter(|u| u.serves(ask.model.as_deref())).collect();
    if eligible.is_empty() {
        return Err(bad(model_not_served(ask.model.as_deref().unwrap_or_default())));
    }
    if eligible.len() < policy.upstreams.len() {
        ask.endpoints = Some(eligible.iter().map(|u| Arc::from(u.name.as_str())).collect());
    }
    Ok(eligible)
}

/// The endpoints whose allowed paths let this request through; a path none allows is refused
/// as the first endpoint's rules say.
fn allowing<'p>(policy: &'p Policy, parts: &request::Parts) -> Result<Vec<&'p UpstreamPolicy>, Refusal> {
    let raw_path = parts.uri.path();
    let segments = super::path::segments(raw_path).map_err(bad)?;
    let allowing: Vec<&UpstreamPolicy> = policy
        .upstreams
        .iter()
        .filter(|u| super::path::allowed(&u.allowed_paths, &parts.method, raw_path, &segments).is_ok())
        .collect();
    if allowing.is_empty() {
        let rules = policy.upstreams.first().map_or(&[][..], |u| &u.allowed_paths[..]);
        super::path::allowed(rules, &parts.method, raw_path, &segments).map_err(bad)?;
    }
    Ok(allowing)
}

/// The cache key of a cacheable request with body digest `digest`. The coalescing key is this
/// key too, so the cache's scope bounds who waits for whose answer.
fn cache_key(
    policy: &Policy,
    client: &Client,
    method: &http::Method,
    rest: &str,
    headers: &http::HeaderMap,
    digest: &[u8; 32],
) -> Key {
    let per_client = policy.cache.as_ref().is_some_and(|c| c.per_client(client.name.is_some()));
    let scope = client.name.as_deref().filter(|_| per_client);
    let upstreams: Vec<&str> = policy.upstreams.iter().map(|u| u.url.as_str()).collect();
    let answer_headers = upstream::answer_headers(headers);
    cache::key(scope, &upstreams.join(" "), method.as_str(), rest, &answer_headers, digest)
}

/// A request for a model no endpoint serves: OpenAI's own answer for an unknown model.
fn model_not_served(model: &str) -> ApiError {
    let msg = format!("the model `{model}` is not served by any upstream of this proxy");
    ApiError::invalid(StatusCode::NOT_FOUND, msg, Some("model_not_found"))
}

/// A request the provider would refuse as too large, whatever the wait: say so at once instead
/// of queueing it (or leaving a debt that holds everyone else).
fn never_fits(estimate: tokens::Estimate, limit: &str, max: u64) -> ApiError {
    let msg = format!(
        "this request would be charged {} tokens (prompt estimate {} + completion budget {}), more \
         than the whole {limit} limit of {max}; lower max_tokens (or n), or shorten the prompt",
        estimate.total(),
        estimate.prompt,
        estimate.completion
    );
    ApiError::invalid(StatusCode::BAD_REQUEST, msg, Some("request_too_large"))
}

/// The body with `stream_options.include_usage: true`, so that the stream reports its usage.
/// Without a `stream_options` the field is spliced in after the opening brace (the rest of the
/// bytes untouched); an existing one is rewritten, every other top-level value kept as raw
/// bytes (no tree of the whole body is built).
fn ask_for_usage(body: &Bytes, inspected: &Inspected) -> Result<Bytes, ApiError> {
    if !inspected.has_stream_options {
        let start = body.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(0);
        let empty = body[start + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let field: &[u8] = if empty {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        let mut out = BytesMut::with_capacity(body.len() + field.len());
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(field);
        out.extend_from_slice(&body[start + 1..]);
        return Ok(out.freeze());
    }
    let invalid = |e: serde_json::Error| bad_request(format!("invalid JSON body: {e}"));
    let top: Vec<(std::borrow::Cow<'_, str>, &serde_json::value::RawValue)> =
        serde_json::from_slice::<RawEntries<'_>>(body).map_err(invalid)?.0;
    let mut out = Vec::with_capacity(body.len() + 32);
    out.push(b'{');
    for (i, (key, value)) in top.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).map_err(invalid)?;
        out.push(b':');
        if key == "stream_options" {
            if value.get().len() > 16 << 10 {
                return Err(bad_request("stream_options is larger than 16 KiB"));
            }
            let mut opts = match serde_json::from_str::<serde_json::Value>(value.get()).map_err(invalid)? {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            };
            opts.insert("include_usage".into(), serde_json::Value::Bool(true));
            serde_json::to_writer(&mut out, &opts).map_err(invalid)?;
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// A JSON object's entries in order, each value left as its raw text.
struct RawEntries<'a>(Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for RawEntries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = RawEntries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(RawEntries(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

fn is_json(headers: &HeaderMap, body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    match headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) => ct.trim_start().to_ascii_lowercase().starts_with("application/json"),
        None => body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_added(text: &str) -> serde_json::Value {
        let body = Bytes::copy_from_slice(text.as_bytes());
        let inspected = body::inspect(&body, false).unwrap();
        let out = ask_for_usage(&body, &inspected).unwrap_or_else(|e| panic!("{}", e.message));
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    #[test]
    fn usage_is_asked_for_without_disturbing_the_body() {
        let v = usage_added(r#"  {"model": "m", "stream": true}"#);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!((v["model"].as_str(), v["stream"].as_bool()), (Some("m"), Some(true)));
        assert_eq!(usage_added("{ }")["stream_options"]["include_usage"], true);
        let v = usage_added(r#"{"stream": true, "stream_options": {"include_usage": false, "x": 1}}"#);
        assert_eq!(
            (v["stream_options"]["include_usage"].as_bool(), v["stream_options"]["x"].as_u64()),
            (Some(true), Some(1))
        );
    }
}
