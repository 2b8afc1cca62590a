//! Standalone mode's policy source: the LlmProxy manifest file (and the key files, and the
//! Secrets under `--secrets-dir`, laid out as Kubernetes mounts them: `DIR/<secret>/<key>`),
//! polled for changes. Polling the content rather than watching inotify events also catches the
//! symlink swaps of mounted ConfigMaps and Secrets, and costs a small read four times a second.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::proxy::Proxy;
use crate::telemetry::labels::Reload;
use crate::upstream::ApiKey;
use llmproxy_api::ClientKeys;

/// Whether a policy asks for client keys.
pub fn needs_client_keys(policy: &llmproxy_api::Policy) -> bool {
    policy.clients.as_ref().is_some_and(|c| c.keys_secret.is_some())
}

/// Why `policy` cannot run standalone with these sources of keys, if it cannot: client keys
/// need a file or the secrets dir; the endpoints of `spec.upstreams` take their keys only from
/// their own Secret references (never one key for all of them).
pub fn standalone_gaps(policy: &llmproxy_api::Policy, files: &Files) -> Option<String> {
    if needs_client_keys(policy) && files.client_keys.is_none() && files.secrets_dir.is_none() {
        return Some(
            "spec.clients.keysSecretRef asks for client keys; standalone they come from --client-keys-file \
             PATH (YAML `client name: key` lines) or --secrets-dir DIR"
                .to_owned(),
        );
    }
    let several = policy.upstreams.len() > 1;
    if several && files.secrets_dir.is_none() {
        let named: Vec<&str> = policy
            .upstreams
            .iter()
            .filter(|u| u.api_key_secret_ref.is_some())
            .map(|u| u.name.as_str())
            .collect();
        if !named.is_empty() {
            return Some(format!(
                "upstreams {named:?} name apiKeySecretRef; standalone their keys come from --secrets-dir DIR \
                 (DIR/<secret name>/<key>, as Kubernetes mounts Secrets)"
            ));
        }
    }
    None
}

/// How often the files are read.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Read and check a manifest file.
pub fn load_policy(path: &Path) -> Result<(llmproxy_api::LlmProxy, llmproxy_api::Policy), Error> {
    llmproxy_api::from_yaml(&read(path)?)
        .map_err(|e| Error::Manifest { path: path.to_owned(), message: e.to_string() })
}

/// Read an API key file.
pub fn load_key(path: &Path) -> Result<Option<ApiKey>, Error> {
    Ok(ApiKey::new(&read(path)?))
}

/// Read a client keys file (YAML `name: key` lines) as far as it is valid: the valid entries
/// are in force, each invalid one is logged (by client or line, never its key) and admits no one.
pub fn load_client_keys(path: &Path) -> Result<ClientKeys, Error> {
    Ok(report_refused(ClientKeys::load_yaml(&read(path)?), &path.display().to_string()))
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })
}

/// Log the entries of a client keys table that are not in force; the valid ones are returned.
pub(crate) fn report_refused(loaded: llmproxy_api::client_keys::Loaded, source: &str) -> ClientKeys {
    for why in &loaded.refused {
        tracing::error!(source = %source, error = %why, "client keys entry refused; the other entries are in force");
    }
    loaded.keys
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
    /// Secrets as Kubernetes mounts them (`DIR/<secret name>/<key>`): the endpoints' keys, and
    /// the client keys Secret when no keys file is given.
    pub secrets_dir: Option<PathBuf>,
}

/// Watches the manifest (and optionally the key files) and applies changes to a running proxy.
pub struct FileWatcher {
    proxy: Arc<Proxy>,
    files: Files,
    last_manifest: Option<Vec<u8>>,
    last_key: Option<Vec<u8>>,
    last_client_keys: Option<Vec<u8>>,
    /// What each Secret file held when last read, by (secret, key).
    last_secrets: HashMap<(String, String), Option<Vec<u8>>>,
    /// The client keys Secret's directory, as last read (file name and content, sorted).
    last_keys_dir: Option<Vec<(String, Vec<u8>)>>,
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
        let mut watcher = Self {
            last_manifest: std::fs::read(&files.manifest).ok(),
            last_key: read(&files.upstream_key),
            last_client_keys: read(&files.client_keys),
            last_secrets: HashMap::new(),
            last_keys_dir: None,
            proxy,
            files,
        };
        // The Secrets are read at once: nothing goes upstream before its key is there.
        watcher.check_secrets();
        watcher
    }

    /// A watcher that has seen nothing yet, so its first `check` applies whatever the files
    /// hold now (after a restart, a change made while it was down is not missed).
    pub fn fresh(proxy: Arc<Proxy>, files: Files) -> Self {
        Self {
            proxy,
            files,
            last_manifest: None,
            last_key: None,
            last_client_keys: None,
            last_secrets: HashMap::new(),
            last_keys_dir: None,
        }
    }

    /// Look once: apply a changed, valid manifest; refuse an invalid one with a log line
    /// naming the error (the last good policy keeps serving); pick up a rotated key.
    pub fn check(&mut self) {
        if changed(&self.files.manifest, &mut self.last_manifest) {
            match load_policy(&self.files.manifest) {
                Ok((_, policy)) if let Some(gap) = standalone_gaps(&policy, &self.files) => {
                    self.proxy.reject_policy();
                    tracing::error!(error = %gap, "policy refused; the last good policy keeps serving");
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
        if let Some(keys_file) = self.files.client_keys.clone() {
            self.check_client_keys(&keys_file);
        }
        self.check_secrets();
    }

    /// Apply a changed client keys file as far as it is valid; a deleted one revokes every key.
    fn check_client_keys(&mut self, keys_file: &Path) {
        match std::fs::read(keys_file) {
            Ok(bytes) if self.last_client_keys.as_ref() != Some(&bytes) => {
                let loaded = ClientKeys::load_yaml(&String::from_utf8_lossy(&bytes));
                let keys = report_refused(loaded, &keys_file.display().to_string());
                let names = keys.names().count();
                self.proxy.set_client_keys(Some(keys));
                tracing::info!(file = %keys_file.display(), clients = names, "client keys reloaded");
                self.last_client_keys = Some(bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.last_client_keys.is_some() => {
                self.proxy.set_client_keys(Some(ClientKeys::default()));
                tracing::error!(file = %keys_file.display(), "client keys file removed; every client key is revoked");
                self.last_client_keys = None;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "client keys file unreadable; keeping the previous keys"),
        }
    }

    /// Read the Secrets the policy in force names from `--secrets-dir`, applying what changed.
    fn check_secrets(&mut self) {
        let Some(dir) = self.files.secrets_dir.clone() else { return };
        let policy = self.proxy.policy();
        // Each (secret, key) with what it holds, for the log lines.
        let mut wanted: Vec<((String, String), &str)> = Vec::new();
        let mut want = |id: (String, String), what| {
            if !wanted.iter().any(|(w, _)| *w == id) {
                wanted.push((id, what));
            }
        };
        for u in &policy.upstreams {
            if let Some(r) = &u.api_key_secret_ref {
                want((r.name.clone(), r.key.clone()), "upstream API key");
            }
        }
        // The Redis passwords of shared state and of the LlmQuota.
        let redis = policy.shared.iter().chain(policy.quota.as_ref().map(|q| &q.redis));
        for r in redis.filter_map(|s| s.password.as_ref()) {
            want((r.name.clone(), r.key.clone()), "Redis password");
        }
        self.last_secrets.retain(|id, _| wanted.iter().any(|(w, _)| w == id));
        for ((secret, key), what) in wanted {
            let bytes = std::fs::read(dir.join(&secret).join(&key)).ok();
            let last = self.last_secrets.entry((secret.clone(), key.clone())).or_insert(None);
            if *last == bytes && bytes.is_some() {
                continue;
            }
            match bytes.as_deref().map(String::from_utf8_lossy).and_then(|t| ApiKey::new(&t)) {
                Some(value) => {
                    self.proxy.set_secret_key(&secret, &key, Some(value));
                    tracing::info!(secret = %secret, key = %key, "{what} loaded");
                }
                None if last.is_some() || bytes.is_some() => {
                    tracing::error!(secret = %secret, key = %key, dir = %dir.display(), "{what} file missing or empty; keeping the previous one");
                }
                None => {}
            }
            *last = bytes;
        }
        if self.files.client_keys.is_none()
            && let Some(name) = policy.clients.as_ref().and_then(|c| c.keys_secret.clone())
        {
            self.check_keys_dir(&dir.join(&name));
        }
    }

    /// Client keys from a mounted Secret's directory: one file per client (hidden entries, such
    /// as the `..data` links of a Kubernetes mount, are skipped).
    fn check_keys_dir(&mut self, dir: &Path) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // The Secret is gone: so are its keys.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.last_keys_dir.take().is_some() {
                    self.proxy.set_client_keys(Some(ClientKeys::default()));
                    tracing::error!(dir = %dir.display(), "client keys Secret removed; every client key is revoked");
                }
                return;
            }
            Err(_) => return,
        };
        let mut files: Vec<(String, Vec<u8>)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                (!name.starts_with('.') && path.is_file()).then(|| Some((name, std::fs::read(path).ok()?)))?
            })
            .collect();
        files.sort();
        if self.last_keys_dir.as_ref() == Some(&files) {
            return;
        }
        let pairs: Vec<(&str, String)> =
            files.iter().map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v).into_owned())).collect();
        let loaded = ClientKeys::load_pairs(pairs.iter().map(|(n, v)| (*n, v.as_str())));
        let keys = report_refused(loaded, &dir.display().to_string());
        let names = keys.names().count();
        self.proxy.set_client_keys(Some(keys));
        tracing::info!(dir = %dir.display(), clients = names, "client keys loaded");
        self.last_keys_dir = Some(files);
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
