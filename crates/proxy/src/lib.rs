//! llmproxy's data plane: an OpenAI-compatible HTTP proxy that admits requests under the
//! upstream's RPM/TPM/concurrency limits, queues bursts, retries transient failures with
//! back-off, streams responses through, and reloads its policy without a restart.
//!
//! The tree follows the request: `server` accepts it, `request` runs its pipeline, `admission`
//! decides when it may go, `cache` may answer it, `upstream` sends it, and `protocol` knows the
//! OpenAI wire format on the way. `source` feeds the policy in; `telemetry` reports out.

#![warn(unreachable_pub)]

mod admission;
mod cache;
mod error;
mod protocol;
mod proxy;
mod request;
mod server;
pub mod source;
mod telemetry;
mod upstream;

pub use admission::queue::Admission;
pub use admission::shared::Identity;
pub use cache::flight::Flights;
pub use error::Error;
pub use proxy::{Options, Proxy};
pub use request::auth::clients::ClientKeys;
pub use server::serve::{ServeOptions, default_workers, serve};
pub use telemetry::labels::Reload;
pub use telemetry::metrics::{Metrics, Registry};
pub use upstream::ApiKey;
