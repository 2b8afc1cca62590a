//! The custom resources: `LlmProxy`, `LlmQuota`, and what both use. Field docs become the CRD
//! schema's descriptions; `llmproxy crd` prints the YAML generated from these types.

mod common;
mod defaults;
mod llmproxy;
mod llmquota;

pub use common::*;
pub use llmproxy::*;
pub use llmquota::*;
