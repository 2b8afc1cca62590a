//! What every reconcile shares: the client, the event recorder, the metrics, the settings,
//! and the failure counts behind the back-off.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use llmproxy_api::LlmProxy;

use crate::children::Settings;
use crate::metrics::Metrics;

/// The field manager of everything the operator applies.
pub(crate) const MANAGER: &str = "llmproxy-operator";

/// What every reconcile shares.
pub(crate) struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// How children are built.
    pub settings: Settings,
    /// Consecutive failures per object, for exponential back-off.
    pub(crate) failures: Mutex<HashMap<ObjectRef<DeserializeGuard<LlmProxy>>, u32>>,
}

impl Context {
    /// A context for one operator process.
    pub(crate) fn new(client: Client, recorder: Recorder, metrics: Metrics, settings: Settings) -> Self {
        Self { client, recorder, metrics, settings, failures: Mutex::default() }
    }
}

/// Every lock of the operator goes through here: std's Mutex, poisoning recovered (the
/// workspace's choice, stated beside `await_holding_lock` in Cargo.toml).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
