//! llmproxy's data plane: an OpenAI-compatible HTTP proxy that admits requests under the
//! upstream's RPM/TPM/concurrency limits, queues bursts, retries transient failures with
//! back-off, streams responses through, and reloads its policy without a restart.

pub mod body;
mod budget;
pub mod cache;
pub mod clients;
pub mod cluster;
pub mod consent;
pub mod error;
pub mod flight;
#[path = "upstream/h1/mod.rs"]
pub mod h1;
pub mod labels;
pub mod limiter;
pub mod metrics;
pub mod pool;
pub mod queue;
pub mod quota;
pub mod reload;
pub mod request;
pub mod retry;
pub mod routes;
pub mod serve;
pub mod shared;
pub mod sse;
pub mod state;
pub mod supervise;
pub mod tokens;
pub mod upstream;

pub use labels::Reload;
pub use metrics::Metrics;
pub use serve::{ServeOptions, serve};
pub use state::{Options, Proxy};
pub use upstream::ApiKey;
