//! The OpenAI wire format as the proxy reads it on the way through: request bodies, token
//! counts, server-sent events and the upstream's rate-limit headers.

pub mod body;
pub mod ratelimit_headers;
pub mod sse;
pub mod tokens;
