//! Standalone mode's policy source: the LlmProxy manifest file (and the API key file), polled
//! for changes. Polling the content rather than watching inotify events also catches the
//! symlink swaps of mounted ConfigMaps and Secrets, and costs a small read four times a second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clients::ClientKeys;
use crate::labels::Reload;
use crate::state::Proxy;
use crate::upstream::ApiKey;

/// Whether a policy asks for client keys.
pub fn needs_client_keys(policy: &llmproxy_api::Policy) -> bool {
    policy.clients.as_ref().is_some_and(|c| c.keys_secret.is_some())
}

/// How often the files are read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Read and check a manifest file.
pub fn load_policy(path: &Path) -> anyhow::Result<(llmproxy_api::LlmProxy, llmproxy_api::Policy)> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    llmproxy_api::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Read an API key file.
pub fn load_key(path: &Path) -> anyhow::Result<Option<ApiKey>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    Ok(ApiKey::new(&text))
}

/// Read a client keys file (YAML `name: key` lines).
pub fn load_client_keys(path: &Path) -> anyhow::Result<ClientKeys> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    ClientKeys::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The files a standalone proxy follows.
#[derive(Clone, Debug)]
pub struct Files {
    /// The LlmProxy manifest.
    pub manifest: PathBuf,
    /// The upstream API key, if given as a file.
    pub upstream_key: Option<PathBuf>,
    /// The client keys, if any.
    pub client_keys: Option<PathBuf>,
}

/// Watches the manifest (and optionally the key files) and applies changes to a running proxy.
pub struct FileWatcher {
    proxy: Arc<Proxy>,
    files: Files,
    last_manifest: Option<Vec<u8>>,
    last_key: Option<Vec<u8>>,
    last_client_keys: Option<Vec<u8>>,
}

/// Whether `path` holds other bytes than `last` (which then remembers them). An unreadable file
/// is no change: what was loaded keeps serving.
fn changed(path: &Path, last: &mut Option<Vec<u8>>) -> bool {
    match std::fs::read(path) {
        Ok(bytes) if last.as_ref() != Some(&bytes) => {
            *last = Some(bytes);
            true
        }
        _ => false,
    }
}

impl FileWatcher {
    /// A watcher; `check` compares against what was read at start-up.
    pub fn new(proxy: Arc<Proxy>, files: Files) -> Self {
        let read = |p: &Option<PathBuf>| p.as_ref().and_then(|p| std::fs::read(p).ok());
        Self {
            last_manifest: std::fs::read(&files.manifest).ok(),
            last_key: read(&files.upstream_key),
            last_client_keys: read(&files.client_keys),
            proxy,
            files,
        }
    }

    /// A watcher that has seen nothing yet, so its first `check` applies whatever the files
    /// hold now (after a restart, a change made while it was down is not missed).
    pub fn fresh(proxy: Arc<Proxy>, files: Files) -> Self {
        Self { proxy, files, last_manifest: None, last_key: None, last_client_keys: None }
    }

    /// Look once: apply a changed, valid manifest; refuse an invalid one with a log line
    /// naming the error (the last good policy keeps serving); pick up a rotated key.
    pub fn check(&mut self) {
        if changed(&self.files.manifest, &mut self.last_manifest) {
            match load_policy(&self.files.manifest) {
                Ok((_, policy)) if needs_client_keys(&policy) && self.files.client_keys.is_none() => {
                    self.proxy.reject_policy();
                    tracing::error!(
                        "policy refused: spec.clients.keysSecretRef asks for client keys, and standalone they come \
                         from --client-keys-file, which was not given; the last good policy keeps serving"
                    );
                }
                Ok((_, policy)) => {
                    if self.proxy.apply_policy(policy) == Reload::Applied {
                        tracing::info!(file = %self.files.manifest.display(), "policy reloaded");
                    }
                }
                Err(e) => {
                    self.proxy.reject_policy();
                    tracing::error!(error = %e, "policy refused; the last good policy keeps serving");
                }
            }
        }
        if let Some(key_file) = &self.files.upstream_key
            && changed(key_file, &mut self.last_key)
        {
            match load_key(key_file) {
                Ok(key) => {
                    self.proxy.set_api_key(key);
                    tracing::info!(file = %key_file.display(), "upstream API key reloaded");
                }
                Err(e) => tracing::error!(error = %e, "API key file unreadable; keeping the old key"),
            }
        }
        if let Some(keys_file) = &self.files.client_keys
            && changed(keys_file, &mut self.last_client_keys)
        {
            match load_client_keys(keys_file) {
                Ok(keys) => {
                    let names = keys.names().count();
                    self.proxy.set_client_keys(Some(keys));
                    tracing::info!(file = %keys_file.display(), clients = names, "client keys reloaded");
                }
                Err(e) => tracing::error!(error = %e, "client keys file refused; keeping the previous keys"),
            }
        }
    }

    /// Poll until the task is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check();
        }
    }
}
