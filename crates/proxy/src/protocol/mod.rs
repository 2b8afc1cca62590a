//! The providers' wire formats as the proxy reads them on the way through: request bodies,
//! token counts, server-sent events, the upstream's rate-limit headers, and what differs by
//! provider (`provider`).

pub(crate) mod anthropic;
pub(crate) mod azure;
pub(crate) mod body;
pub(crate) mod gemini;
pub(crate) mod provider;
pub(crate) mod ratelimit_headers;
pub(crate) mod sse;
pub(crate) mod tokens;
