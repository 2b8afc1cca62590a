//! The OpenAI wire format as the proxy reads it on the way through: request bodies, token
//! counts, server-sent events and the upstream's rate-limit headers.

pub(crate) mod anthropic;
pub(crate) mod body;
pub(crate) mod ratelimit_headers;
pub(crate) mod sse;
pub(crate) mod tokens;
