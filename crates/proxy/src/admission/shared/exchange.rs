//! One round trip with a store's Redis: the grant script, the connection, and what they answer.

use std::time::Duration;

use llmproxy_api::policy::QuotaPolicy;

use super::store::Identity;
use crate::admission::limiter::lease::LeaseKey;

/// A heartbeat older than this no longer counts a member.
const MEMBER_TTL: Duration = Duration::from_secs(5);
/// The most one exchange with Redis may take before the replica goes on alone.
pub(super) const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a replica on its own tries Redis again.
pub(super) const RETRY_REDIS: Duration = Duration::from_secs(1);

/// The grant script; see the docs of `admission::shared`. Per bucket, six arguments: rate per second, burst,
/// units asked, units given back, a mode (`g` grant, `d` dry: empty it) and this member's
/// demand per second. Then the member set, this member, the member TTL in seconds, and, for an
/// LlmQuota's buckets, the quota, the consumer, and the weight and guaranteed percent it
/// declares (used only where no operator wrote the owner's shares). Returns the grants, then
/// the number of live members, then how many malformed entries it met, then this consumer's
/// share of the quota with every consumer busy (1 for an LlmProxy's own buckets).
///
/// An LlmQuota's buckets are the consumers' own: each consumer writes only keys under
/// `llmproxy:q:QUOTA:f:CONSUMER:` (and its member set there), so a per-consumer Redis user (see
/// `llmproxy_api::redis_acl`) can be held to them, and reads the others' demand. The quota's
/// rate is divided among the consumers by max-min fairness over their demands: each gets its
/// guarantee, then the rest is filled by weight up to what each asks, and what nobody asks goes
/// to those who ask more, so an idle consumer's part is used and a busy one never gets less
/// than its fair share, whatever another writes about itself. A bucket refills at the rate it
/// was allotted when last written, so a consumer returning from idle starts empty.
///
/// A malformed entry (a key of another type, a field that is not a finite number in range, a
/// record that does not parse) is removed where the caller may write it, else skipped, and
/// counted, never an error: one bad entry must not fail the call, and with it every consumer's
/// sharing.
pub(super) const SCRIPT: &str = include_str!("script.lua");

/// One bucket unit's line in an exchange with Redis.
#[derive(Clone)]
pub(super) struct Line {
    pub(super) key: LeaseKey,
    pub(super) unit: usize,
    pub(super) redis_key: String,
    pub(super) per_sec: f64,
    pub(super) burst: f64,
    pub(super) ask: f64,
    pub(super) give: f64,
    pub(super) mode: &'static str,
    /// This replica's demand per second (what it used, or more when requests wait).
    pub(super) demand: f64,
}

/// Where and as whom a store's Redis is reached.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Login {
    pub(super) url: String,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
}

/// A connection to a store's Redis and what it was opened with.
pub(super) struct Conn {
    pub(super) login: Login,
    pub(super) manager: redis::aio::ConnectionManager,
}

/// Opens a connection to `login`, bounded by `REDIS_TIMEOUT` so an unreachable Redis sends the
/// replica on alone rather than stalling its lessee.
pub(super) async fn connect(login: &Login) -> redis::RedisResult<redis::aio::ConnectionManager> {
    use redis::IntoConnectionInfo;
    let mut info = login.url.as_str().into_connection_info()?;
    if let Some(pw) = &login.password {
        let mut settings = info.redis_settings().clone().set_password(pw);
        if let Some(user) = &login.username {
            settings = settings.set_username(user);
        }
        info = info.set_redis_settings(settings);
    }
    let client = redis::Client::open(info)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(1);
    tokio::time::timeout(REDIS_TIMEOUT * 2, redis::aio::ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))?
}

/// What one exchange with Redis answered.
#[derive(Debug, PartialEq)]
pub(super) struct Answer {
    /// Units granted per line.
    pub(super) grants: Vec<f64>,
    /// Live members of the member set.
    pub(super) members: u32,
    /// This consumer's part of an LlmQuota with every consumer busy (1 for an LlmProxy's own).
    pub(super) fair: f64,
}

/// One call of the script. `quota` is the LlmQuota whose buckets `lines` are, `None` for the
/// LlmProxy's own.
pub(super) async fn exchange(
    script: &redis::Script,
    conn: &mut redis::aio::ConnectionManager,
    lines: &[Line],
    member_key: &str,
    identity: &Identity,
    quota: Option<&QuotaPolicy>,
    metrics: &crate::telemetry::metrics::Metrics,
) -> redis::RedisResult<Answer> {
    let mut call = script.prepare_invoke();
    for l in lines {
        call.key(&l.redis_key);
    }
    for l in lines {
        call.arg(l.per_sec).arg(l.burst).arg(l.ask).arg(l.give).arg(l.mode).arg(l.demand);
    }
    call.arg(member_key).arg(&identity.member).arg(MEMBER_TTL.as_secs());
    call.arg(quota.map_or("", |q| q.name.as_str()))
        .arg(&identity.proxy)
        .arg(quota.map_or(1, |q| q.weight))
        .arg(quota.map_or(0, |q| q.guaranteed));
    let out: Vec<String> = call.invoke_async(conn).await?;
    let at = |i: usize| out.get(i).and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite());
    let grants = (0..lines.len()).map(|i| at(i).unwrap_or(0.0)).collect();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let members = at(lines.len()).map_or(1, |m| m.clamp(1.0, 100_000.0) as u32);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let malformed = at(lines.len() + 1).map_or(0, |m| m.clamp(0.0, 1e9) as u64);
    let fair = at(lines.len() + 2).map_or(0.0, |f| f.clamp(0.0, 1.0));
    if malformed > 0 {
        metrics.quota_malformed_entries.inc_by(malformed);
        tracing::warn!(malformed, "skipped malformed entries in the shared store (someone wrote them)");
    }
    Ok(Answer { grants, members, fair })
}

#[cfg(test)]
mod tests {
    use llmproxy_api::policy::SharedPolicy;
    use tokio::time::Instant;

    use super::*;
    use crate::admission::shared::store::Store;

    fn identity() -> Identity {
        Identity { proxy: "ns/p".into(), member: "m".into(), replicas: 1 }
    }

    /// A real `redis-server` on a free port, killed on drop.
    struct Redis(std::process::Child, String);

    impl Redis {
        async fn start() -> Self {
            Self::start_with(&[]).await
        }

        async fn start_with(extra: &[&str]) -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(extra)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("starting redis-server (install Debian's redis-server)");
            let r = Redis(child, format!("redis://127.0.0.1:{port}/0"));
            let deadline = Instant::now() + Duration::from_secs(20);
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn line(key: LeaseKey, redis_key: &str, ask: f64, demand: f64) -> Line {
        let (per_sec, burst, give, mode) = (100.0, 100.0, 0.0, "g");
        Line { key, unit: 0, redis_key: redis_key.into(), per_sec, burst, ask, give, mode, demand }
    }

    fn org(url: &str, weight: u32, guaranteed: u32) -> QuotaPolicy {
        QuotaPolicy {
            name: "org".into(),
            requests_per_minute: 6000,
            tokens_per_minute: None,
            models: std::collections::BTreeMap::new(),
            redis: SharedPolicy { url: url.into(), password: None, password_namespace: None, username: None },
            weight,
            guaranteed,
        }
    }

    async fn send(c: &mut redis::aio::ConnectionManager, args: &[&str]) {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let _: redis::Value = cmd.query_async(c).await.unwrap();
    }

    /// One exchange of consumer `team/p` (`ns/p` is the other) on the org's total bucket.
    async fn draw(
        c: &mut redis::aio::ConnectionManager,
        consumer: &str,
        quota: &QuotaPolicy,
        ask: f64,
        demand: f64,
    ) -> (f64, f64, Answer) {
        let id = Identity { proxy: consumer.into(), member: format!("{consumer}-0"), replicas: 1 };
        let key = format!("llmproxy:q:org:f:{consumer}:total:r");
        let lines = [line(LeaseKey::Quota, &key, ask, demand)];
        let metrics = crate::telemetry::metrics::Metrics::new(prometheus::Registry::new()).unwrap();
        let members = Store::Quota.member_key(&id, Some(quota));
        let answer = exchange(&redis::Script::new(SCRIPT), c, &lines, &members, &id, Some(quota), &metrics)
            .await
            .unwrap();
        let rate: Vec<String> = redis::cmd("HMGET").arg(&key).arg("r").query_async(c).await.unwrap();
        (answer.grants[0], rate[0].parse().unwrap(), answer)
    }

    #[tokio::test]
    async fn an_llmquota_is_divided_by_demand_guarantee_first_then_by_weight() {
        let redis = Redis::start().await;
        let mut c = connect(&Login { url: redis.1.clone(), username: None, password: None }).await.unwrap();
        send(&mut c, &["HSET", "llmproxy:q:org:shares", "a/p", "1,30", "b/p", "1,0", "c/p", "2,0"]).await;
        let q = org(&redis.1, 1, 0);
        // Only a asks: it may use the whole quota.
        let (_, rate, answer) = draw(&mut c, "a/p", &q, 1.0, 40.0).await;
        assert!((rate - 100.0).abs() < 1e-6, "{rate}");
        // Its part with everyone busy: 30 % guaranteed, then a quarter of the other 70 %.
        assert!((answer.fair - (0.3 + 0.7 / 4.0)).abs() < 1e-9, "{}", answer.fair);
        // b asks a little, c a lot: b gets what it asks (with room to grow), a its guarantee
        // and its weight's part beside c.
        draw(&mut c, "b/p", &q, 1.0, 8.0).await;
        draw(&mut c, "c/p", &q, 1.0, 500.0).await;
        let (_, b, _) = draw(&mut c, "b/p", &q, 1.0, 8.0).await;
        assert!((b - 10.0).abs() < 1e-6, "b {b}");
        let (_, a, _) = draw(&mut c, "a/p", &q, 1.0, 500.0).await;
        let (_, cc, _) = draw(&mut c, "c/p", &q, 1.0, 500.0).await;
        // 90 left after b: a 30 + (60 / 3), c 2 * 20.
        assert!((a - 50.0).abs() < 1e-6 && (cc - 40.0).abs() < 1e-6, "a {a}, c {cc}");
        assert!((a + b + cc - 100.0).abs() < 1e-6);
        // Whatever c writes about itself, a keeps its part.
        send(&mut c, &["HSET", "llmproxy:q:org:f:c/p:total:r:d", "x", "1e300,9e9", "y", "1e12,9e9"]).await;
        let (_, a, _) = draw(&mut c, "a/p", &q, 1.0, 500.0).await;
        assert!(a >= 50.0 - 1e-6, "a {a}");
        // A consumer the owner did not list gets nothing, whatever it declares.
        let (granted, rate, answer) = draw(&mut c, "z/p", &org(&redis.1, 1000, 100), 5.0, 500.0).await;
        assert_eq!((granted, rate, answer.fair), (0.0, 0.0, 0.0));
    }

    #[tokio::test]
    async fn as_its_own_redis_user_a_consumer_draws_writing_only_its_own_entries() {
        use llmproxy_api::redis_acl::{consumer_rules, consumer_user, shares_key};
        let redis = Redis::start_with(&["--requirepass", "admin"]).await;
        let login = |user: Option<String>, password: &str| Login {
            url: redis.1.clone(),
            username: user,
            password: Some(password.into()),
        };
        let mut admin = connect(&login(None, "admin")).await.unwrap();
        for (consumer, password) in [("a/p", "pass-a"), ("b/p", "pass-b")] {
            let digest: String =
                <sha2::Sha256 as sha2::Digest>::digest(password).iter().map(|b| format!("{b:02x}")).collect();
            let mut args = vec!["ACL".to_owned(), "SETUSER".to_owned(), consumer_user("org", consumer)];
            args.extend(consumer_rules("org", consumer, &digest));
            send(&mut admin, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        }
        send(&mut admin, &["HSET", &shares_key("org"), "a/p", "1,0", "b/p", "1,0"]).await;
        let q = org(&redis.1, 1, 0);
        let mut a = connect(&login(Some(consumer_user("org", "a/p")), "pass-a")).await.unwrap();
        let mut b = connect(&login(Some(consumer_user("org", "b/p")), "pass-b")).await.unwrap();
        // Both busy: each draws half the quota, through the script, as itself.
        draw(&mut a, "a/p", &q, 1.0, 500.0).await;
        let (_, b_rate, _) = draw(&mut b, "b/p", &q, 1.0, 500.0).await;
        let (_, a_rate, answer) = draw(&mut a, "a/p", &q, 1.0, 500.0).await;
        assert!((a_rate - 50.0).abs() < 1e-6 && (b_rate - 50.0).abs() < 1e-6, "a {a_rate}, b {b_rate}");
        assert!((answer.fair - 0.5).abs() < 1e-9);
        // As a, pretending to be b in the script's arguments: refused by Redis, not by trust.
        let id = Identity { proxy: "b/p".into(), member: "x".into(), replicas: 1 };
        let lines = [line(LeaseKey::Quota, "llmproxy:q:org:f:b/p:total:r", 1.0, 500.0)];
        let metrics = crate::telemetry::metrics::Metrics::new(prometheus::Registry::new()).unwrap();
        let members = Store::Quota.member_key(&id, Some(&q));
        let forged =
            exchange(&redis::Script::new(SCRIPT), &mut a, &lines, &members, &id, Some(&q), &metrics).await;
        assert!(forged.is_err_and(|e| e.to_string().to_ascii_lowercase().contains("noperm")));
    }

    #[tokio::test]
    async fn without_an_operator_consumers_declare_their_shares_and_a_new_bucket_starts_empty() {
        let redis = Redis::start().await;
        let mut c = connect(&Login { url: redis.1.clone(), username: None, password: None }).await.unwrap();
        let (granted, rate, answer) = draw(&mut c, "a/p", &org(&redis.1, 3, 0), 5.0, 50.0).await;
        assert_eq!((granted, answer.fair), (0.0, 1.0), "a new bucket starts empty");
        assert!((rate - 100.0).abs() < 1e-6, "alone, it may use the whole quota: {rate}");
        let (_, _, answer) = draw(&mut c, "b/p", &org(&redis.1, 1, 0), 5.0, 50.0).await;
        assert!((answer.fair - 0.25).abs() < 1e-9, "{}", answer.fair);
    }

    #[tokio::test]
    async fn malformed_entries_are_skipped_and_counted_never_failing_the_call() {
        let redis = Redis::start().await;
        let mut c = connect(&Login { url: redis.1.clone(), username: None, password: None }).await.unwrap();
        let quota = org(&redis.1, 1, 0);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let stocked = now.to_string();
        // What a tenant could plant: keys of another type, shares and demand records that do
        // not parse or are out of range; beside them a bucket of its own with stock.
        let plant: [&[&str]; 5] = [
            &["SET", "llmproxy:q:org:f:ns/p:members", "garbage"],
            &["HSET", "llmproxy:q:org:shares", "ns/p", "1,0", "o/p", "1,0", "junk", "x", "huge", "1e309,0"],
            &["SET", "llmproxy:q:org:f:o/p:total:r:d", "garbage"],
            &["HSET", "llmproxy:q:org:f:ns/p:total:r:d", "old", "x,y"],
            &["HSET", "llmproxy:q:org:f:ns/p:total:r", "l", "80", "t", &stocked, "r", "100", "b", "100"],
        ];
        for args in plant {
            send(&mut c, args).await;
        }
        let metrics = crate::telemetry::metrics::Metrics::new(prometheus::Registry::new()).unwrap();
        let script = redis::Script::new(SCRIPT);
        let id = identity();
        let key = "llmproxy:q:org:f:ns/p:total:r";
        let lines = [line(LeaseKey::Quota, key, 10.0, 20.0)];
        let members = Store::Quota.member_key(&id, Some(&quota));
        let call = exchange(&script, &mut c, &lines, &members, &id, Some(&quota), &metrics);
        let answer = call.await.unwrap_or_else(|e| panic!("one bad entry failed the call: {e}"));
        // The stock is granted (the other listed consumer asks nothing), this member counts.
        assert_eq!(answer, Answer { grants: vec![10.0], members: 1, fair: 0.5 });
        // The member set of another type, two shares, the other's demand key, its own record.
        assert_eq!(metrics.quota_malformed_entries.get(), 5);
        // What it may drop is gone; the owner's shares and another's keys are not its to fix.
        let call = exchange(&script, &mut c, &lines, &members, &id, Some(&quota), &metrics);
        call.await.unwrap();
        assert_eq!(metrics.quota_malformed_entries.get(), 5 + 3, "the shares and the other's key, skipped");
    }
}
