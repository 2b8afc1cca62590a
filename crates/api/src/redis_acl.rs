//! Each LlmQuota consumer's own Redis identity: an ACL user that may write only its own keys
//! (its part of the quota, `llmproxy:q:QUOTA:f:CONSUMER:*`, and its LlmProxy's own buckets
//! where they share the quota's Redis) and read the quota's others, so one tenant holding its
//! credential cannot rewrite another's entries or the shares the quota's owner set. Redis 7
//! checks every command a script runs against the caller's ACL, so the rules, not the script,
//! are the boundary. Pure, for the operator and tests.

/// The ACL user name of consumer `consumer` (`NAMESPACE/NAME`) of quota `quota`.
pub fn consumer_user(quota: &str, consumer: &str) -> String {
    format!("llmproxy:{quota}:{consumer}")
}

/// The prefix of the keys only consumer `consumer` of quota `quota` may write.
pub fn consumer_prefix(quota: &str, consumer: &str) -> String {
    format!("llmproxy:q:{quota}:f:{consumer}:")
}

/// The prefix of every ACL user of quota `quota`'s consumers.
pub fn users_prefix(quota: &str) -> String {
    format!("llmproxy:{quota}:")
}

/// The Secret (in the operator's namespace) holding the password of consumer `namespace/name`
/// of quota `quota`: a DNS name however long the names, distinct per consumer.
pub fn consumer_secret(quota: &str, namespace: &str, name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{quota}\n{namespace}/{name}"));
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let mut quota = quota.to_owned();
    quota.truncate(200);
    format!("llmproxy-quota-{}-{short}", quota.trim_end_matches(['-', '.']))
}

/// A Redis error as it may be logged or reported: Redis errors may echo what AUTH was given, so
/// any that mentions authentication says only that.
pub fn redacted(error: &str) -> String {
    if error.to_ascii_lowercase().contains("auth") {
        "authentication failed".into()
    } else {
        error.to_owned()
    }
}

/// The key of a consumer's Secret that holds its password.
pub const PASSWORD_KEY: &str = "password";

/// The key holding the shares the quota's owner set (written by the operator only).
pub fn shares_key(quota: &str) -> String {
    format!("llmproxy:q:{quota}:shares")
}

/// The commands the grant script and the client need (Redis 7.0 knows no `CLIENT SETINFO`;
/// the client ignores its refusal), and nothing else (no `KEYS`, no
/// `FLUSHALL`, no `CONFIG`, no `ACL`, no `FUNCTION`).
const COMMANDS: &[&str] = &[
    "+eval",
    "+evalsha",
    "+script|load",
    "+script|exists",
    "+ping",
    "+select",
    "+time",
    "+type",
    "+del",
    "+hmget",
    "+hget",
    "+hset",
    "+hgetall",
    "+hdel",
    "+pexpire",
    "+zadd",
    "+zremrangebyscore",
    "+zcard",
];

/// Escape a Redis glob's special characters, so a name can only ever match itself.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The arguments of `ACL SETUSER <user> ...` for consumer `consumer` of quota `quota`, whose
/// password's SHA-256 is `password_sha256` (hex; Redis keeps only the digest): every earlier
/// rule reset, then writes to its own keys and reads of the quota's.
pub fn consumer_rules(quota: &str, consumer: &str, password_sha256: &str) -> Vec<String> {
    let mut rules: Vec<String> = ["reset", "on", "resetchannels"].map(str::to_owned).to_vec();
    rules.push(format!("#{password_sha256}"));
    rules.push("-@all".into());
    rules.extend(COMMANDS.iter().map(|c| (*c).to_owned()));
    rules.push(format!("~{}*", literal(&consumer_prefix(quota, consumer))));
    // The consumer's LlmProxy's own buckets and replicas, where it has no Redis of its own.
    rules.push(format!("~{}*", literal(&format!("llmproxy:p:{consumer}:"))));
    rules.push(format!("~{}", literal(&format!("llmproxy:members:{consumer}"))));
    rules.push(format!("%R~{}*", literal(&format!("llmproxy:q:{quota}:"))));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_writes_only_its_own_keys_and_runs_no_admin_command() {
        let rules = consumer_rules("org", "team-a/p", "ab12");
        assert_eq!(&rules[..5], ["reset", "on", "resetchannels", "#ab12", "-@all"]);
        assert!(rules.contains(&"~llmproxy:q:org:f:team-a/p:*".to_owned()), "{rules:?}");
        assert!(rules.contains(&"%R~llmproxy:q:org:*".to_owned()), "{rules:?}");
        assert!(!rules.iter().any(|r| r.contains("@all") && r.starts_with('+')), "{rules:?}");
        assert!(!rules.iter().any(|r| r.contains("acl") || r.contains("function") || r.contains("flush")));
        assert_eq!(literal("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert!(consumer_user("org", "team-a/p").starts_with(&users_prefix("org")));
        let long = consumer_secret(&"q".repeat(253), "team-a", "p");
        assert!(long.len() <= 253 && long != consumer_secret(&"q".repeat(253), "team-a", "p2"), "{long}");
    }
}
