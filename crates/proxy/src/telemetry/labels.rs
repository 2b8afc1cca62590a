//! Closed label sets shared by metrics, records and logs. Each is an enum, so a label can only
//! take a value the metrics were initialised with (no typo makes a new series).

/// How a request ended; a metric label and a log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The upstream answered 2xx (after retries, if any).
    Ok,
    /// The upstream refused the request as the client's fault (4xx other than 408/429).
    ClientError,
    /// The upstream failed: 5xx or 429 after the last retry, unreachable, timed out, or a
    /// stream that broke off.
    UpstreamError,
    /// The proxy's queue was full.
    QueueFull,
    /// The request could not be admitted before `queue.maxWait`.
    QueueTimeout,
    /// The proxy refused the request itself (bad JSON, too large, unknown path).
    BadRequest,
    /// The client went away before the response was complete.
    ClientClosed,
    /// Answered from the cache.
    CacheHit,
    /// Answered with the response of an identical request that was in flight.
    Coalesced,
    /// No client key, or an unknown one.
    Unauthorized,
    /// The LlmQuota grant the proxy draws on was withdrawn: nothing is admitted until it is back.
    QuotaWithdrawn,
}

impl Outcome {
    /// Every outcome, for initialising metric series.
    pub(crate) const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::UpstreamError,
        Outcome::QueueFull,
        Outcome::QueueTimeout,
        Outcome::BadRequest,
        Outcome::ClientClosed,
        Outcome::CacheHit,
        Outcome::Coalesced,
        Outcome::Unauthorized,
        Outcome::QuotaWithdrawn,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::QueueFull => "queue_full",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::ClientClosed => "client_closed",
            Outcome::CacheHit => "cache_hit",
            Outcome::Coalesced => "coalesced",
            Outcome::Unauthorized => "unauthorized",
            Outcome::QuotaWithdrawn => "quota_withdrawn",
        }
    }

    /// The outcome of a final upstream status.
    pub(crate) fn for_status(status: u16) -> Self {
        match status {
            200..=399 => Outcome::Ok,
            408 | 429 | 500.. => Outcome::UpstreamError,
            _ => Outcome::ClientError,
        }
    }
}

/// What the cache did for a cacheable request; the `x-llmproxy-cache` header and a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from a stored response.
    Hit,
    /// Sent upstream; the answer is stored if it succeeds.
    Miss,
    /// The client asked for a fresh answer (`Cache-Control: no-cache` / `no-store`).
    Bypass,
    /// Answered with the response of an identical request that was in flight.
    Coalesced,
}

impl CacheResult {
    /// The results counted in `llmproxy_cache_requests_total` (coalesced ones have their own).
    pub(crate) const COUNTED: [CacheResult; 3] = [CacheResult::Hit, CacheResult::Miss, CacheResult::Bypass];

    /// The label and header value.
    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Bypass => "bypass",
            CacheResult::Coalesced => "coalesced",
        }
    }
}

/// What a policy reload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The new policy is in force.
    Applied,
    /// Identical to the one in force; nothing changed.
    Unchanged,
    /// Refused (invalid); the last good policy keeps serving.
    Rejected,
}

impl Reload {
    /// Every result, for initialising metric series.
    pub const ALL: [Reload; 3] = [Reload::Applied, Reload::Unchanged, Reload::Rejected];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reload::Applied => "applied",
            Reload::Unchanged => "unchanged",
            Reload::Rejected => "rejected",
        }
    }
}

/// Which tokens a token counter counts: the units the providers limit apart, so that a
/// dashboard can set each against its own limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Input tokens as the upstream reported them (OpenAI's prompt tokens; Anthropic's
    /// uncached input).
    Input,
    /// Output tokens as the upstream reported them.
    Output,
    /// Input tokens written to the provider's prompt cache (Anthropic counts them as input).
    CacheWrite,
    /// Input tokens read from the provider's prompt cache (Anthropic does not count them
    /// toward input tokens per minute on current models).
    CacheRead,
    /// Tokens charged to the limiter before sending.
    Reserved,
}

impl TokenKind {
    /// Every kind, for initialising metric series.
    pub const ALL: [TokenKind; 5] = [
        TokenKind::Input,
        TokenKind::Output,
        TokenKind::CacheWrite,
        TokenKind::CacheRead,
        TokenKind::Reserved,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            TokenKind::Input => "input",
            TokenKind::Output => "output",
            TokenKind::CacheWrite => "cache_write",
            TokenKind::CacheRead => "cache_read",
            TokenKind::Reserved => "reserved",
        }
    }
}
