//! Client keys: who is asking. Held only as SHA-256 digests and compared in constant time, so
//! neither the proxy's memory nor its logs hold a usable key; the operator checks a client
//! keys Secret with the same code the proxy loads it with.

use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The client keys in force: digest -> client name.
#[derive(Clone, Default)]
pub struct ClientKeys {
    entries: Vec<([u8; 32], Arc<str>)>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only; never a digest.
        f.debug_list().entries(self.entries.iter().map(|(_, n)| n)).finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// `a == b` in time independent of where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ClientKeys {
    /// Build from `(client name, key)` pairs, where a key may be given as `sha256:<64 hex>`.
    /// Errors name the client (never the key).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (name, value) in pairs {
            check_name(name)?;
            let value = value.trim();
            let d = match value.strip_prefix("sha256:") {
                Some(hex) => {
                    parse_hex(hex).ok_or_else(|| format!("client {name:?}: sha256: needs 64 hex digits"))?
                }
                None if value.is_empty() => return Err(format!("client {name:?}: the key is empty")),
                None => digest(value),
            };
            if let Some((_, other)) = entries.iter().find(|(existing, _)| constant_time_eq(existing, &d)) {
                return Err(format!("client {name:?}: the same key as client {other:?}"));
            }
            entries.push((d, Arc::from(name)));
        }
        Ok(Self { entries })
    }

    /// Parse a `--client-keys-file`: YAML `name: key` lines.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let map: std::collections::BTreeMap<String, String> =
            serde_yaml::from_str(text).map_err(|e| format!("not a YAML map of client name to key: {e}"))?;
        Self::from_pairs(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The client whose key this is. Every entry is compared, in constant time each.
    pub fn identify(&self, key: &str) -> Option<Arc<str>> {
        let d = digest(key);
        let mut found = None;
        for (entry, name) in &self.entries {
            if constant_time_eq(entry, &d) {
                found = Some(name);
            }
        }
        found.cloned()
    }

    /// The client names, for metrics and status.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(_, n)| n.as_ref())
    }
}

/// Client names become metric labels and match `spec.clients.overrides`: the characters a
/// Secret's data keys allow, at most 63 of them.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("client name {name:?}: use 1 to 63 of a-z, A-Z, 0-9, '-', '_', '.'"))
    }
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_identify_their_client_plain_or_hashed() {
        let hashed =
            format!("sha256:{}", digest("sk-batch").iter().map(|b| format!("{b:02x}")).collect::<String>());
        let keys = ClientKeys::from_pairs([("chatbot", "sk-chat\n"), ("nightly", hashed.as_str())])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.identify("sk-chat").as_deref(), Some("chatbot"));
        assert_eq!(keys.identify("sk-batch").as_deref(), Some("nightly"));
        assert_eq!(keys.identify("sk-other"), None);
        assert!(!format!("{keys:?}").contains("sk-"), "Debug shows names only");
    }

    #[test]
    fn bad_tables_name_the_client_not_the_key() {
        let err = ClientKeys::from_pairs([("a", "sha256:zz")]).err().unwrap_or_default();
        assert!(err.contains("client \"a\"") && !err.contains("zz"), "{err}");
        let err = ClientKeys::from_pairs([("a", "k"), ("b", "k")]).err().unwrap_or_default();
        assert!(err.contains("client \"b\": the same key as client \"a\""), "{err}");
        let err = ClientKeys::from_pairs([("team a", "k")]).err().unwrap_or_default();
        assert!(err.contains("client name \"team a\""), "{err}");
        let keys = ClientKeys::from_yaml("team-a: sk-1\nteam-b: sk-2\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.names().collect::<Vec<_>>(), ["team-a", "team-b"]);
        assert!(ClientKeys::from_yaml("- not a map").is_err());
    }
}
