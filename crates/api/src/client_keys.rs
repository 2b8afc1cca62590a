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

/// A table of client keys read as far as it is valid: one bad entry never keeps the others,
/// or the removal of a client, from taking effect.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The valid entries, in force.
    pub keys: ClientKeys,
    /// Why each other entry is not in force, naming its client or line (never a key).
    pub refused: Vec<String>,
}

/// The digest of one entry's key, or why the entry cannot be used.
fn entry(name: &str, value: &str) -> Result<[u8; 32], String> {
    check_name(name)?;
    let value = value.trim();
    match value.strip_prefix("sha256:") {
        Some(hex) => parse_hex(hex).ok_or_else(|| format!("client {name:?}: sha256: needs 64 hex digits")),
        None if value.is_empty() => Err(format!("client {name:?}: the key is empty")),
        None => Ok(digest(value)),
    }
}

impl ClientKeys {
    /// Build from `(client name, key)` pairs, where a key may be given as `sha256:<64 hex>`.
    /// Any bad entry is an error naming the client (never the key): the operator's check.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (name, value) in pairs {
            let d = entry(name, value)?;
            if let Some((_, other)) = entries.iter().find(|(existing, _)| constant_time_eq(existing, &d)) {
                return Err(format!("client {name:?}: the same key as client {other:?}"));
            }
            entries.push((d, Arc::from(name)));
        }
        Ok(Self { entries })
    }

    /// As [`Self::from_pairs`], keeping the valid entries and reporting the others: what the
    /// proxy loads. A key two clients share, or a name given twice, admits neither of them.
    pub fn load_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Loaded {
        let mut refused = Vec::new();
        let mut entries: Vec<([u8; 32], Arc<str>)> = Vec::new();
        for (name, value) in pairs {
            match entry(name, value) {
                Ok(d) => entries.push((d, Arc::from(name))),
                Err(e) => refused.push(e),
            }
        }
        let mut keep = vec![true; entries.len()];
        for (i, (a, first)) in entries.iter().enumerate() {
            for (j, (b, second)) in entries.iter().enumerate().skip(i + 1) {
                let problem = if constant_time_eq(a, b) {
                    "the same key as client"
                } else if first == second {
                    "given twice, as is client"
                } else {
                    continue;
                };
                keep[i] = false;
                keep[j] = false;
                refused.push(format!("client {second:?}: {problem} {first:?}; neither is admitted"));
            }
        }
        let mut keep = keep.into_iter();
        entries.retain(|_| keep.next().unwrap_or(false));
        Loaded { keys: Self { entries }, refused }
    }

    /// Read a `--client-keys-file` (YAML `name: key` lines) as far as it is valid. A file that
    /// is not YAML as a whole is read line by line, so a broken line costs only itself.
    pub fn load_yaml(text: &str) -> Loaded {
        type Map = std::collections::BTreeMap<String, serde_yaml::Value>;
        let (mut pairs, mut refused) = (Vec::new(), Vec::new());
        let mut take = |name: String, value: serde_yaml::Value, refused: &mut Vec<String>| match value {
            serde_yaml::Value::String(key) => pairs.push((name, key)),
            _ => refused.push(format!("client {name:?}: the key is not a string")),
        };
        // A Value, not a map type: it refuses a name given twice instead of keeping the last.
        match serde_yaml::from_str::<serde_yaml::Value>(text) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(serde_yaml::Value::Mapping(map)) => {
                for (name, value) in map {
                    match name {
                        serde_yaml::Value::String(name) => take(name, value, &mut refused),
                        _ => refused.push("an entry whose client name is not text".to_owned()),
                    }
                }
            }
            _ => {
                for (i, line) in text.lines().enumerate() {
                    let trimmed = line.trim();
                    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
                        continue;
                    }
                    match serde_yaml::from_str::<Map>(line) {
                        Ok(map) if map.len() == 1 && !line.starts_with(char::is_whitespace) => {
                            map.into_iter().for_each(|(n, v)| take(n, v, &mut refused));
                        }
                        _ => refused.push(format!("line {}: not a `client name: key` line", i + 1)),
                    }
                }
            }
        }
        let mut loaded = Self::load_pairs(pairs.iter().map(|(n, k)| (n.as_str(), k.as_str())));
        refused.append(&mut loaded.refused);
        loaded.refused = refused;
        loaded
    }

    /// Parse a `--client-keys-file` strictly: any entry that cannot be used is an error.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let loaded = Self::load_yaml(text);
        match loaded.refused.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(loaded.keys),
        }
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
        let keys = ClientKeys::from_pairs([("chatbot", "sk-chat\n"), ("nightly", hashed.as_str())]).unwrap();
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
        let keys = ClientKeys::from_yaml("team-a: sk-1\nteam-b: sk-2\n").unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["team-a", "team-b"]);
        assert!(ClientKeys::from_yaml("- not a map").is_err());
    }

    #[test]
    fn a_table_loads_as_far_as_it_is_valid() {
        let loaded = ClientKeys::load_pairs([("a", "k1"), ("bad name", "k2"), ("b", "k3"), ("c", "k3")]);
        assert_eq!(loaded.keys.names().collect::<Vec<_>>(), ["a"], "b and c share a key: neither");
        assert_eq!(loaded.refused.len(), 2, "{:?}", loaded.refused);
        assert!(
            loaded.refused.iter().all(|r| !r.contains("k2") && !r.contains("k3")),
            "{:?}",
            loaded.refused
        );
        let loaded = ClientKeys::load_yaml("a: sk-1\nb sk-2: [\n# note\nc: sk-3\nd: 5\n");
        assert_eq!(loaded.keys.names().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(
            loaded.refused,
            ["line 2: not a `client name: key` line", "client \"d\": the key is not a string"]
        );
        let loaded = ClientKeys::load_yaml("a: sk-1\na: sk-2\nb: sk-3\n");
        assert_eq!(loaded.keys.names().collect::<Vec<_>>(), ["b"], "a name given twice admits neither");
        assert!(ClientKeys::load_yaml("").refused.is_empty());
    }
}
