//! Standalone mode's policy source: the LlmProxy manifest file (and the API key file), polled
//! for changes. Polling the content rather than watching inotify events also catches the
//! symlink swaps of mounted ConfigMaps and Secrets, and costs a small read four times a second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::labels::Reload;
use crate::state::Proxy;
use crate::upstream::ApiKey;

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

/// Watches the manifest (and optionally a key file) and applies changes to a running proxy.
pub struct FileWatcher {
    proxy: Arc<Proxy>,
    manifest: PathBuf,
    key_file: Option<PathBuf>,
    last_manifest: Option<Vec<u8>>,
    last_key: Option<Vec<u8>>,
}

impl FileWatcher {
    /// A watcher; `check` compares against what was read at start-up.
    pub fn new(proxy: Arc<Proxy>, manifest: PathBuf, key_file: Option<PathBuf>) -> Self {
        let last_manifest = std::fs::read(&manifest).ok();
        let last_key = key_file.as_ref().and_then(|p| std::fs::read(p).ok());
        Self { proxy, manifest, key_file, last_manifest, last_key }
    }

    /// A watcher that has seen nothing yet, so its first `check` applies whatever the files
    /// hold now (after a restart, a change made while it was down is not missed).
    pub fn fresh(proxy: Arc<Proxy>, manifest: PathBuf, key_file: Option<PathBuf>) -> Self {
        Self { proxy, manifest, key_file, last_manifest: None, last_key: None }
    }

    /// Look once: apply a changed, valid manifest; refuse an invalid one with a log line
    /// naming the error (the last good policy keeps serving); pick up a rotated key.
    pub fn check(&mut self) {
        if let Ok(bytes) = std::fs::read(&self.manifest)
            && self.last_manifest.as_ref() != Some(&bytes)
        {
            self.last_manifest = Some(bytes);
            match load_policy(&self.manifest) {
                Ok((_, policy)) => {
                    if self.proxy.apply_policy(policy) == Reload::Applied {
                        tracing::info!(file = %self.manifest.display(), "policy reloaded");
                    }
                }
                Err(e) => {
                    self.proxy.reject_policy();
                    tracing::error!(error = %e, "policy refused; the last good policy keeps serving");
                }
            }
        }
        let Some(key_file) = &self.key_file else { return };
        if let Ok(bytes) = std::fs::read(key_file)
            && self.last_key.as_ref() != Some(&bytes)
        {
            self.last_key = Some(bytes);
            match load_key(key_file) {
                Ok(key) => {
                    self.proxy.set_api_key(key);
                    tracing::info!(file = %key_file.display(), "upstream API key reloaded");
                }
                Err(e) => tracing::error!(error = %e, "API key file unreadable; keeping the old key"),
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
