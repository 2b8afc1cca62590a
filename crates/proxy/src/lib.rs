//! llmproxy's data plane: an OpenAI-compatible HTTP proxy that admits requests under the
//! upstream's RPM/TPM/concurrency limits, queues bursts, retries transient failures with
//! back-off, streams responses through, and reloads its policy without a restart.
//!
//! The tree follows the request: `server` accepts it, `request` runs its pipeline, `admission`
//! decides when it may go, `cache` may answer it, `upstream` sends it, and `protocol` knows the
//! OpenAI wire format on the way. `source` feeds the policy in; `telemetry` reports out.

pub mod admission;
pub mod cache;
pub mod h1;
pub mod protocol;
pub mod proxy;
pub mod request;
pub mod server;
pub mod source;
pub mod telemetry;
pub mod upstream;

pub use proxy::{Options, Proxy};
pub use request::auth::clients::ClientKeys;
pub use server::serve::{ServeOptions, serve};
pub use telemetry::labels::Reload;
pub use telemetry::metrics::Metrics;
pub use upstream::ApiKey;
