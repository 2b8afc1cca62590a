//! The limiter's vocabulary: which limit held a request, what a request asks, and what an
//! earlier waiter holds. Its own module so that the buckets and endpoints below the limiter
//! speak it without importing the limiter itself.

use std::fmt;
use std::sync::Arc;

/// Which limit held a request back; named in 429 messages and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `limits.requestsPerMinute` / `burst`.
    Requests,
    /// `limits.tokensPerMinute`.
    Tokens,
    /// `limits.maxConcurrent`.
    Concurrency,
    /// The upstream asked to wait (429 with Retry-After) for what the request needs.
    UpstreamPause,
    /// `queue.maxSize`.
    QueueSize,
    /// `queue.maxBytes`.
    QueueBytes,
    /// The client's own `requestsPerMinute`.
    ClientRequests,
    /// The client's own `tokensPerMinute`.
    ClientTokens,
    /// An endpoint's own requests per minute (configured or reported by its headers).
    UpstreamRequests,
    /// An endpoint's own tokens per minute.
    UpstreamTokens,
    /// A model's requests per minute (`limits.models`, or an endpoint's for that model).
    ModelRequests,
    /// A model's tokens per minute.
    ModelTokens,
    /// Every endpoint that serves the request is out after failures.
    UpstreamUnavailable,
    /// The organisation-wide LlmQuota's requests per minute.
    QuotaRequests,
    /// The organisation-wide LlmQuota's tokens per minute.
    QuotaTokens,
    /// `limits.inputTokensPerMinute`.
    InputTokens,
    /// `limits.outputTokensPerMinute`.
    OutputTokens,
    /// An endpoint's own input tokens per minute (configured or reported by its headers).
    UpstreamInputTokens,
    /// An endpoint's own output tokens per minute.
    UpstreamOutputTokens,
    /// A model's input tokens per minute.
    ModelInputTokens,
    /// A model's output tokens per minute.
    ModelOutputTokens,
    /// `limits.requestsPerDay`.
    RequestsPerDay,
    /// An endpoint's own requests per day.
    UpstreamRequestsPerDay,
    /// A model's requests per day.
    ModelRequestsPerDay,
    /// Every endpoint that serves the request reported its quota spent for longer than a
    /// queue waits (out of credit, a spend limit, a daily quota).
    UpstreamExhausted,
}

impl Limit {
    /// Every limit, for initialising metric series.
    pub const ALL: [Limit; 25] = [
        Limit::Requests,
        Limit::Tokens,
        Limit::Concurrency,
        Limit::UpstreamPause,
        Limit::QueueSize,
        Limit::QueueBytes,
        Limit::ClientRequests,
        Limit::ClientTokens,
        Limit::UpstreamRequests,
        Limit::UpstreamTokens,
        Limit::ModelRequests,
        Limit::ModelTokens,
        Limit::UpstreamUnavailable,
        Limit::QuotaRequests,
        Limit::QuotaTokens,
        Limit::InputTokens,
        Limit::OutputTokens,
        Limit::UpstreamInputTokens,
        Limit::UpstreamOutputTokens,
        Limit::ModelInputTokens,
        Limit::ModelOutputTokens,
        Limit::RequestsPerDay,
        Limit::UpstreamRequestsPerDay,
        Limit::ModelRequestsPerDay,
        Limit::UpstreamExhausted,
    ];

    /// A low-cardinality label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests_per_minute",
            Limit::Tokens => "tokens_per_minute",
            Limit::Concurrency => "max_concurrent",
            Limit::UpstreamPause => "upstream_retry_after",
            Limit::QueueSize => "queue_size",
            Limit::QueueBytes => "queue_bytes",
            Limit::ClientRequests => "client_requests_per_minute",
            Limit::ClientTokens => "client_tokens_per_minute",
            Limit::UpstreamRequests => "upstream_requests_per_minute",
            Limit::UpstreamTokens => "upstream_tokens_per_minute",
            Limit::ModelRequests => "model_requests_per_minute",
            Limit::ModelTokens => "model_tokens_per_minute",
            Limit::UpstreamUnavailable => "upstream_unavailable",
            Limit::QuotaRequests => "quota_requests_per_minute",
            Limit::QuotaTokens => "quota_tokens_per_minute",
            Limit::InputTokens => "input_tokens_per_minute",
            Limit::OutputTokens => "output_tokens_per_minute",
            Limit::UpstreamInputTokens => "upstream_input_tokens_per_minute",
            Limit::UpstreamOutputTokens => "upstream_output_tokens_per_minute",
            Limit::ModelInputTokens => "model_input_tokens_per_minute",
            Limit::ModelOutputTokens => "model_output_tokens_per_minute",
            Limit::RequestsPerDay => "requests_per_day",
            Limit::UpstreamRequestsPerDay => "upstream_requests_per_day",
            Limit::ModelRequestsPerDay => "model_requests_per_day",
            Limit::UpstreamExhausted => "upstream_quota_exhausted",
        }
    }
}

impl Limit {
    /// A token limit: its debt shrinks as requests in flight settle against their usage, so a
    /// wait for it past the deadline may still end in time.
    pub(crate) fn is_token_debt(self) -> bool {
        matches!(
            self,
            Limit::Tokens
                | Limit::InputTokens
                | Limit::OutputTokens
                | Limit::ClientTokens
                | Limit::UpstreamTokens
                | Limit::UpstreamInputTokens
                | Limit::UpstreamOutputTokens
                | Limit::ModelTokens
                | Limit::ModelInputTokens
                | Limit::ModelOutputTokens
        )
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Requests => "the requests-per-minute limit",
            Limit::Tokens => "the tokens-per-minute limit",
            Limit::Concurrency => "the max-concurrent-requests limit",
            Limit::UpstreamPause => "the upstream's Retry-After",
            Limit::QueueSize => "the queue size limit",
            Limit::QueueBytes => "the queue's memory budget (queue.maxBytes)",
            Limit::ClientRequests => "this client's requests-per-minute cap",
            Limit::ClientTokens => "this client's tokens-per-minute cap",
            Limit::UpstreamRequests => "the upstream endpoint's requests-per-minute limit",
            Limit::UpstreamTokens => "the upstream endpoint's tokens-per-minute limit",
            Limit::ModelRequests => "this model's requests-per-minute limit",
            Limit::ModelTokens => "this model's tokens-per-minute limit",
            Limit::UpstreamUnavailable => "the upstream endpoints being unavailable after failures",
            Limit::QuotaRequests => "the organisation quota's requests-per-minute limit (LlmQuota)",
            Limit::QuotaTokens => "the organisation quota's tokens-per-minute limit (LlmQuota)",
            Limit::InputTokens => "the input-tokens-per-minute limit",
            Limit::OutputTokens => "the output-tokens-per-minute limit",
            Limit::UpstreamInputTokens => "the upstream endpoint's input-tokens-per-minute limit",
            Limit::UpstreamOutputTokens => "the upstream endpoint's output-tokens-per-minute limit",
            Limit::ModelInputTokens => "this model's input-tokens-per-minute limit",
            Limit::ModelOutputTokens => "this model's output-tokens-per-minute limit",
            Limit::RequestsPerDay => "the requests-per-day limit (the day resets at midnight US Pacific)",
            Limit::UpstreamRequestsPerDay => {
                "the upstream endpoint's requests-per-day limit (the day resets at midnight US Pacific)"
            }
            Limit::ModelRequestsPerDay => {
                "this model's requests-per-day limit (the day resets at midnight US Pacific)"
            }
            Limit::UpstreamExhausted => {
                "the upstream's own quota being spent (its credit, a spend limit or a daily quota; see \
                 status.upstreams[].exhausted)"
            }
        })
    }
}

/// What one request costs a quota's token buckets: all its tokens, and apart its input and
/// its output (as Anthropic limits them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cost {
    pub(crate) tokens: u64,
    pub(crate) input: u64,
    pub(crate) output: u64,
}

/// What one request asks of the limiter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// Tokens charged at admission.
    pub tokens: u64,
    /// Of those, input tokens charged to input-tokens-per-minute limits (the prompt estimate).
    pub input: u64,
    /// Of those, output tokens charged to output-tokens-per-minute limits (the completion
    /// budget: `max_tokens`).
    pub output: u64,
    /// The model it is for; pauses, model limits and which endpoints serve it go by model.
    pub model: Option<Arc<str>>,
    /// The client it is from (`None`: no client identified); client caps apply per client.
    pub client: Option<Arc<str>>,
    /// The endpoints that may take it (their allowed paths admit it); `None`: any.
    pub endpoints: Option<Arc<[Arc<str>]>>,
    /// An endpoint to pass over while another can take it (it just failed this request).
    pub avoid: Option<Arc<str>>,
}

impl Ask {
    /// An ask for `tokens` with no model and no client.
    pub fn tokens(tokens: u64) -> Self {
        Self { tokens, ..Self::default() }
    }

    /// What it costs the token buckets.
    pub(crate) fn cost(&self) -> Cost {
        Cost { tokens: self.tokens, input: self.input, output: self.output }
    }
}

/// Capacity an earlier waiter is waiting for: a later request in the same look at the line
/// must not take it first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// A whole endpoint (its own quota, pause or health holds the waiter).
    Endpoint(usize),
    /// One model at an endpoint.
    EndpointModel(usize, Arc<str>),
}
