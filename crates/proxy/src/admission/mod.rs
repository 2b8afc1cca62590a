//! When a request may go upstream: the fair queue in front of the limiter, the limits
//! themselves, when to retry and how often retries may be spent.

pub(crate) mod budget;
pub(crate) mod limiter;
pub(crate) mod queue;
pub(crate) mod retry;
pub(crate) mod shared;
