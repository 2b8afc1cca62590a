//! When a request may go upstream: the fair queue in front of the limiter, the limits
//! themselves, when to retry and how often retries may be spent.

pub(crate) mod budget;
pub mod limiter;
pub mod queue;
pub mod retry;
pub mod shared;
