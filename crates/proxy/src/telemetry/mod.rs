//! What the proxy tells about itself: Prometheus metrics and the closed label sets they use.

pub mod labels;
pub mod metrics;
