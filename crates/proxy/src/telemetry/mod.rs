//! What the proxy tells about itself: Prometheus metrics and the closed label sets they use.

pub(crate) mod labels;
pub(crate) mod metrics;
