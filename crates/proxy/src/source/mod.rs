//! Where the policy comes from: the manifest file (standalone), the Kubernetes API (cluster),
//! and the supervisor that keeps either running.

pub mod cluster;
pub(crate) mod consent;
pub mod file;
pub mod supervise;
