//! One quota for several replicas and several LlmProxies, through a real `redis-server`:
//! `llmproxy proxy` processes with the same manifest, against an in-process mock upstream that
//! accepts everything and records when each request arrived, so any overshoot shows.

use std::time::Duration;

use futures_util::future::join_all;
use llmproxy_mock::{MockConfig, MockServer, load};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::eventually;
use crate::support::proxy_env::{ProxyProcess, get_text, metric, mock, post_json};
use crate::support::redis::RedisServer;

/// 100 requests per second, a burst of 100.
const RPM: u64 = 6000;

fn manifest(name: &str, upstream: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: {name}, namespace: team}}\nspec:\n  upstream: {{url: '{upstream}'}}\n  limits: {{requestsPerMinute: {RPM}, maxConcurrent: 1000}}\n  queue: {{maxSize: 10000, maxWait: 60s}}\n  replicas: 3\n{spec_extra}"
    )
}

fn shared(redis: &RedisServer) -> String {
    format!("  sharedState: {{redis: {{url: '{}'}}}}\n", redis.url())
}

async fn replicas(n: usize, text: &str, dir: &tempfile::TempDir) -> Vec<ProxyProcess> {
    let path = dir.path().join(format!("proxy-{}.yaml", rand_suffix()));
    std::fs::write(&path, text).unwrap();
    join_all((0..n).map(|_| ProxyProcess::start(&path, &[], &[]))).await
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn chat(i: usize) -> Value {
    json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": format!("hi {i}")}]})
}

/// `total` requests from `clients` concurrent clients, request `i` to `urls[i % len]`.
async fn load_over(urls: &[String], clients: usize, total: usize) -> Vec<Option<u16>> {
    let client = load::client();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = (0..clients).map(|_| {
        let (client, next, urls) = (client.clone(), next.clone(), urls.to_vec());
        tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return out;
                }
                out.push(load::shoot(&client, &urls[i % urls.len()], None, &chat(i)).await.status);
            }
        })
    });
    join_all(workers).await.into_iter().flat_map(Result::unwrap_or_default).collect()
}

/// The most requests the upstream accepted in any window, beyond what `per_sec` allows over
/// it plus `burst`: positive means overshoot. Arrivals measured by the mock.
fn worst_excess(upstream: &MockServer, per_sec: f64, burst: f64) -> f64 {
    let mut at: Vec<Instant> =
        upstream.mock.seen().iter().filter(|s| s.status == 200).map(|s| s.at).collect();
    at.sort();
    let mut worst = f64::MIN;
    for (i, start) in at.iter().enumerate() {
        for (j, end) in at.iter().enumerate().skip(i) {
            let allowed = burst + per_sec * end.duration_since(*start).as_secs_f64();
            worst = worst.max((j - i + 1) as f64 - allowed);
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_quota_exactly_and_use_it() {
    let redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let pods = replicas(3, &manifest("shared", &upstream.url(), &shared(&redis)), &dir).await;
    let urls: Vec<String> = pods.iter().map(|p| p.url("/chat/completions")).collect();
    let start = Instant::now();
    let statuses = load_over(&urls, 90, 900).await;
    let wall = start.elapsed();
    assert!(statuses.iter().all(|s| *s == Some(200)), "every request succeeds: {statuses:?}");
    // Buckets start empty: 900 at 100/s take 9 s at least; the pods together never exceed the
    // rate over any window (2 % and a few requests of slack for clock and lease edges).
    let excess = worst_excess(&upstream, 100.0 * 1.02, 100.0);
    assert!(excess <= 3.0, "the replicas together went {excess} requests over the quota");
    assert!(wall >= Duration::from_millis(8_500), "faster than the quota allows: {wall:?}");
    assert!(wall <= Duration::from_millis(9_000 * 5 / 4 + 1_000), "the quota was not used: {wall:?}");
    for p in &pods {
        let m = get_text(&format!("http://{}/metrics", p.admin)).await;
        assert_eq!(metric(&m, "llmproxy_quota_mode{mode=\"shared\"}"), 1.0, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinned_to_one_pod_gets_the_whole_quota() {
    let redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let pods = replicas(3, &manifest("pinned", &upstream.url(), &shared(&redis)), &dir).await;
    // Everything through the first pod, the others idle: a static share would allow it a
    // third (300 in 9 s); shared, it gets all 100/s.
    let start = Instant::now();
    let statuses = load_over(&[pods[0].url("/chat/completions")], 50, 300).await;
    let wall = start.elapsed();
    assert!(statuses.iter().all(|s| *s == Some(200)));
    assert!(wall <= Duration::from_millis(3_000 * 3 / 2 + 500), "{wall:?}: not the whole quota");
    let excess = worst_excess(&upstream, 100.0 * 1.02, 100.0);
    assert!(excess <= 3.0, "{excess} over the quota");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_each_pod_keeps_a_share_and_sharing_returns_without_a_burst() {
    let mut redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let pods = replicas(3, &manifest("outage", &upstream.url(), &shared(&redis)), &dir).await;
    let urls: Vec<String> = pods.iter().map(|p| p.url("/chat/completions")).collect();
    let admins: Vec<String> = pods.iter().map(|p| format!("http://{}/metrics", p.admin)).collect();
    let mode_of = |admins: Vec<String>, mode: &'static str| async move {
        for a in &admins {
            let m = get_text(a).await;
            if metric(&m, &format!("llmproxy_quota_mode{{mode=\"{mode}\"}}")) != 1.0 {
                return None;
            }
        }
        Some(())
    };
    // Every pod has beaten its heart into Redis (the member count for the outage).
    eventually("all pods shared", Duration::from_secs(10), || mode_of(admins.clone(), "shared")).await;
    eventually("every pod counted in Redis", Duration::from_secs(10), || {
        let admins = admins.clone();
        async move {
            for a in &admins {
                if metric(&get_text(a).await, "llmproxy_quota_members") != 3.0 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let load = tokio::spawn({
        let urls = urls.clone();
        async move { load_over(&urls, 60, 1_500).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.kill();
    let down_at = Instant::now();
    eventually("every pod on its own", Duration::from_secs(10), || mode_of(admins.clone(), "local")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().await;
    let up_at = Instant::now();
    eventually("sharing again", Duration::from_secs(15), || mode_of(admins.clone(), "shared")).await;
    let statuses = load.await.unwrap_or_default();
    assert!(statuses.iter().all(|s| *s == Some(200)), "no client saw an error: {statuses:?}");
    // While Redis was out, each pod had a third: together at most the rate.
    let during = upstream
        .mock
        .seen()
        .iter()
        .filter(|s| s.status == 200 && s.at > down_at + Duration::from_millis(600) && s.at < up_at)
        .count() as f64;
    let span = up_at.duration_since(down_at + Duration::from_millis(600)).as_secs_f64();
    assert!(during <= 100.0 * span + 40.0, "{during} requests in {span:.1} s without Redis");
    // Through both switches, no window saw more than the quota allows.
    let excess = worst_excess(&upstream, 100.0 * 1.02, 100.0);
    assert!(excess <= 5.0, "{excess} over the quota across the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_llmproxies_drawing_on_one_llmquota_stay_within_it_together() {
    let redis = RedisServer::start(Some("s3cret-pass")).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("redis-auth")).unwrap();
    std::fs::write(secrets.join("redis-auth").join("password"), "s3cret-pass").unwrap();
    // Each team may use the whole org quota on its own (its own limit is the quota's); the org
    // has 100/s for both.
    let quota = format!(
        "---\napiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {{name: org}}\nspec:\n  requestsPerMinute: {RPM}\n  sharedState: {{redis: {{url: '{}', passwordSecretRef: {{name: redis-auth}}}}}}\n",
        redis.url()
    );
    let mut procs = Vec::new();
    for team in ["team-a", "team-b"] {
        let text = format!("{}{quota}", manifest(team, &upstream.url(), "  quotaRef: {name: org}\n"));
        let path = dir.path().join(format!("{team}.yaml"));
        std::fs::write(&path, text).unwrap();
        let secrets = secrets.display().to_string();
        procs.push(ProxyProcess::start(&path, &["--secrets-dir", &secrets], &[]).await);
    }
    let urls: Vec<String> = procs.iter().map(|p| p.url("/chat/completions")).collect();
    let start = Instant::now();
    let statuses = load_over(&urls, 60, 600).await;
    let wall = start.elapsed();
    assert!(statuses.iter().all(|s| *s == Some(200)));
    let excess = worst_excess(&upstream, 100.0 * 1.02, 100.0);
    assert!(excess <= 3.0, "the two LlmProxies together went {excess} over the org quota");
    assert!(wall >= Duration::from_millis(5_500), "{wall:?}: faster than the org quota");
    for p in &procs {
        let logs = p.logs();
        assert!(!logs.contains("s3cret-pass"), "the Redis password leaked into the logs");
        let m = get_text(&format!("http://{}/metrics", p.admin)).await;
        assert_eq!(metric(&m, "llmproxy_quota_mode{mode=\"shared\"}"), 1.0, "{m}\n{logs}");
    }
}

/// team-a and team-b, each one proxy process drawing on `quota` with its `quotaRef`, flood
/// 400 requests each at once; what each got and when each finished.
async fn two_teams_flood(
    redis: &RedisServer,
    dir: &tempfile::TempDir,
    upstream: &MockServer,
    quota: &str,
    references: [&str; 2],
) -> ((Vec<Option<u16>>, Duration), (Vec<Option<u16>>, Duration)) {
    let mut procs = Vec::new();
    for (team, reference) in ["team-a", "team-b"].into_iter().zip(references) {
        let text =
            format!("{}{quota}", manifest(team, &upstream.url(), &format!("  quotaRef: {reference}\n")));
        let path = dir.path().join(format!("{team}.yaml"));
        std::fs::write(&path, text).unwrap();
        procs.push(ProxyProcess::start(&path, &[], &[]).await);
    }
    let (a, b) = (procs[0].url("/chat/completions"), procs[1].url("/chat/completions"));
    // Both known to the quota before the race starts: a consumer that takes part in its first
    // round late (a busy machine) would otherwise run alone for that long.
    for url in [&a, &b] {
        let (status, _, body) = post_json(url, &load::chat_body(1)).await;
        assert_eq!(status, 200, "{body}");
    }
    eventually("both teams to be the quota's consumers", Duration::from_secs(30), || async {
        (keys(redis, "llmproxy:q:org:f:*:share").await.len() == 2).then_some(())
    })
    .await;
    let start = Instant::now();
    let timed = |urls: Vec<String>| async move {
        let statuses = load_over(&urls, 40, 400).await;
        (statuses, start.elapsed())
    };
    tokio::join!(timed(vec![a]), timed(vec![b]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_contention_a_guarantee_and_weights_hold() {
    let redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let quota = format!(
        "---\napiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {{name: org}}\nspec:\n  requestsPerMinute: {RPM}\n  sharedState: {{redis: {{url: '{}'}}}}\n  consumers: [{{namespace: team, name: team-a, guaranteed: 70}}]\n",
        redis.url()
    );
    // The owner guarantees team-a 70 % of the org's 100/s, and the rest is split by weight
    // (1:1): 85/s for it, 15/s for team-b while both are busy. Both flood.
    let ((ra, a_wall), (rb, b_wall)) =
        two_teams_flood(&redis, &dir, &upstream, &quota, ["{name: org}", "{name: org}"]).await;
    assert!(ra.iter().chain(&rb).all(|s| *s == Some(200)), "nobody is refused, nobody starves");
    // First come, first served would give each half (400 in 8 s); at 85/s team-a's 400 take
    // about 4.7 s. team-b finishes after, on what team-a leaves.
    assert!(a_wall <= Duration::from_millis(6_500), "team-a's guarantee did not hold: {a_wall:?}");
    assert!(b_wall > a_wall, "team-b {b_wall:?}, team-a {a_wall:?}");
    let excess = worst_excess(&upstream, 100.0 * 1.02, 100.0);
    assert!(excess <= 3.0, "{excess} over the org quota");
}

/// How Redis fails in an outage test.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// SIGKILL, never started again.
    Killed,
    /// SIGKILL, then started again empty three seconds later.
    Restarted,
    /// SIGSTOP (connections hang instead of failing), then SIGCONT three seconds later.
    Paused,
}

impl Outage {
    fn begin(self, redis: &mut RedisServer) {
        match self {
            Outage::Killed | Outage::Restarted => redis.kill(),
            Outage::Paused => redis.pause(),
        }
    }

    async fn end(self, redis: &mut RedisServer) {
        match self {
            Outage::Killed => {}
            Outage::Restarted => redis.restart().await,
            Outage::Paused => redis.resume(),
        }
    }
}

/// 20 requests per second, as the upstream allows.
const OUTAGE_RPM: u64 = 1200;

/// 300 requests over `pods` against an upstream allowing 20/s, Redis failing as `outage` 3 s
/// in: every request is answered 200 at about the rate (each pod admits its share while Redis
/// is out), and the upstream refuses almost none (no burst at either switch). Each pod counts
/// `members` in its member set (its LlmProxy's replicas).
async fn through_an_outage(
    outage: Outage,
    members: f64,
    pods: &[ProxyProcess],
    redis: &mut RedisServer,
    upstream: &MockServer,
) {
    let urls: Vec<String> = pods.iter().map(|p| p.url("/chat/completions")).collect();
    let admins: Vec<String> = pods.iter().map(|p| format!("http://{}/metrics", p.admin)).collect();
    let all_in = |admins: Vec<String>, mode: &'static str, members: f64| async move {
        for a in &admins {
            let m = get_text(a).await;
            if metric(&m, &format!("llmproxy_quota_mode{{mode=\"{mode}\"}}")) != 1.0
                || (members > 0.0 && metric(&m, "llmproxy_quota_members") != members)
            {
                return None;
            }
        }
        Some(())
    };
    eventually("every pod shared and counted", Duration::from_secs(10), || {
        all_in(admins.clone(), "shared", members)
    })
    .await;
    let start = Instant::now();
    let load = tokio::spawn({
        let urls = urls.clone();
        async move { load_over(&urls, 60, 300).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    outage.begin(redis);
    let began = Instant::now();
    eventually("every pod on its own", Duration::from_secs(10), || all_in(admins.clone(), "local", 0.0))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    outage.end(redis).await;
    let ended = Instant::now();
    let statuses = load.await.unwrap_or_default();
    let wall = start.elapsed();
    let failed: std::collections::BTreeSet<_> = statuses.iter().filter(|s| **s != Some(200)).collect();
    let ok = statuses.iter().filter(|s| **s == Some(200)).count();
    assert_eq!(ok, 300, "{outage:?}: {ok} of 300 answered 200, the others {failed:?}");
    let refused = upstream.mock.stats().rate_limited;
    // When the upstream refused, beside when the outage began and ended: a refusal just after
    // either switch is a burst the switch let through.
    let secs = |at: Instant| format!("{:.2}", at.duration_since(start).as_secs_f64());
    let refusals: Vec<String> =
        upstream.mock.seen().iter().filter(|s| s.status == 429).map(|s| secs(s.at)).collect();
    eprintln!("{outage:?} from {} s to {} s; refused at {refusals:?} s", secs(began), secs(ended));
    eprintln!("{outage:?}: 300 requests answered 200 in {wall:?}, {refused} upstream 429s");
    assert!(refused <= 6, "{outage:?}: the upstream refused {refused} of 300 (more than 2 %)");
    // The return itself brings no burst: replicas back first must not draw the whole rate from
    // Redis while others still admit alone (that let 2-3 requests past the limit at once).
    if !matches!(outage, Outage::Killed) {
        let after = upstream
            .mock
            .seen()
            .iter()
            .filter(|s| s.status == 429 && s.at >= ended && s.at < ended + Duration::from_secs(2))
            .count();
        assert!(after <= 1, "{outage:?}: {after} refused within 2 s of Redis returning: {refusals:?}");
    }
    // 300 at 20/s take 15 s at best (the buckets start empty); the outage may cost a little.
    assert!(wall <= Duration::from_millis(15_000 * 3 / 2 + 3_000), "{outage:?}: 300 requests took {wall:?}");
    if !matches!(outage, Outage::Killed) {
        eventually("sharing again", Duration::from_secs(15), || all_in(admins.clone(), "shared", 0.0)).await;
    }
}

async fn three_replicas_through(outage: Outage) {
    let mut redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig { requests_per_minute: Some(OUTAGE_RPM), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: outage, namespace: team}}\nspec:\n  upstream: {{url: '{}'}}\n  limits: {{requestsPerMinute: {OUTAGE_RPM}, maxConcurrent: 1000}}\n  queue: {{maxSize: 10000, maxWait: 30s}}\n  replicas: 3\n{}",
        upstream.url(),
        shared(&redis)
    );
    let pods = replicas(3, &text, &dir).await;
    through_an_outage(outage, 3.0, &pods, &mut redis, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_for_good_each_replica_admits_its_share() {
    three_replicas_through(Outage::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_each_replica_admits_its_share_then_shares_again() {
    three_replicas_through(Outage::Restarted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_each_replica_admits_its_share_then_shares_again() {
    three_replicas_through(Outage::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llmquota_redis_killed_each_consumer_admits_its_share() {
    let mut redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig { requests_per_minute: Some(OUTAGE_RPM), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let quota = format!(
        "---\napiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {{name: org}}\nspec:\n  requestsPerMinute: {OUTAGE_RPM}\n  sharedState: {{redis: {{url: '{}'}}}}\n",
        redis.url()
    );
    let mut procs = Vec::new();
    for team in ["team-a", "team-b"] {
        let text = format!(
            "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: {team}, namespace: {team}}}\nspec:\n  upstream: {{url: '{}'}}\n  limits: {{requestsPerMinute: {OUTAGE_RPM}, maxConcurrent: 1000}}\n  queue: {{maxSize: 10000, maxWait: 30s}}\n  quotaRef: {{name: org}}\n{quota}",
            upstream.url()
        );
        let path = dir.path().join(format!("{team}.yaml"));
        std::fs::write(&path, text).unwrap();
        procs.push(ProxyProcess::start(&path, &[], &[]).await);
    }
    // Each consumer's pods are counted among its own; alone, each admits its part of the quota.
    through_an_outage(Outage::Killed, 1.0, &procs, &mut redis, &upstream).await;
}

/// The keys of `redis` that match `pattern`.
async fn keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg(pattern).query_async(&mut c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llmquota_buckets_live_in_its_own_redis_whatever_the_llmproxy_shares_through() {
    let org = RedisServer::start(None).await;
    let tenant = RedisServer::start(None).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // The org grants 10/s; the tenant's LlmProxy allows itself 100/s and shares its own
    // buckets through a Redis of its own.
    let quota = format!(
        "---\napiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {{name: org}}\nspec:\n  requestsPerMinute: 600\n  sharedState: {{redis: {{url: '{}'}}}}\n",
        org.url()
    );
    let text = format!(
        "{}  quotaRef: {{name: org}}\n{quota}",
        manifest("tenant", &upstream.url(), &shared(&tenant)).replace("replicas: 3", "replicas: 1")
    );
    let path = dir.path().join("tenant.yaml");
    std::fs::write(&path, text).unwrap();
    let proxy = ProxyProcess::start(&path, &[], &[]).await;
    let start = Instant::now();
    let statuses = load_over(&[proxy.url("/chat/completions")], 20, 60).await;
    let wall = start.elapsed();
    assert!(statuses.iter().all(|s| *s == Some(200)), "{statuses:?}");
    // 60 at the org's 10/s, from an empty bucket: about 6 s.
    assert!(wall >= Duration::from_millis(5_000), "60 requests in {wall:?}: the org quota did not hold");
    let excess = worst_excess(&upstream, 10.0 * 1.02, 10.0);
    assert!(excess <= 2.0, "{excess} over the org quota");
    let in_org = keys(&org, "llmproxy:q:org:*").await;
    assert!(!in_org.is_empty(), "the org's Redis holds none of its quota's buckets");
    let in_tenant = keys(&tenant, "llmproxy:q:*").await;
    assert!(in_tenant.is_empty(), "the quota's buckets went to the tenant's Redis: {in_tenant:?}");
    assert!(!keys(&tenant, "llmproxy:p:team/tenant:*").await.is_empty(), "its own buckets stay in its Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_consumer_cannot_starve_another_the_shares_are_the_owners() {
    let redis = RedisServer::start(None).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // The owner lists nobody: every allowed consumer has the default weight and no guarantee.
    let quota = format!(
        "---\napiVersion: llmproxy.io/v1alpha1\nkind: LlmQuota\nmetadata: {{name: org}}\nspec:\n  requestsPerMinute: {RPM}\n  sharedState: {{redis: {{url: '{}'}}}}\n",
        redis.url()
    );
    // team-a claims the whole quota for itself; team-b asks for nothing.
    let ((ra, a_wall), (rb, b_wall)) = two_teams_flood(
        &redis,
        &dir,
        &upstream,
        &quota,
        ["{name: org, weight: 1000, guaranteed: 100}", "{name: org}"],
    )
    .await;
    assert!(ra.iter().chain(&rb).all(|s| *s == Some(200)), "nobody is refused");
    // Equal shares: both floods of 400 end together, near 8 s at 100/s. Had team-a's claim
    // held, it would have had the whole quota (done in about 4 s) and team-b nothing until then.
    let (a_ms, b_ms) = (a_wall.as_millis() as f64, b_wall.as_millis() as f64);
    assert!(a_ms >= 0.8 * b_ms, "team-a took more than its share: team-a {a_wall:?}, team-b {b_wall:?}");
    assert!(b_ms >= 0.8 * a_ms, "team-b took more than its share: team-a {a_wall:?}, team-b {b_wall:?}");
    let excess = worst_excess(&upstream, 100.0 * 1.02, 100.0);
    assert!(excess <= 3.0, "{excess} over the org quota");
}

/// A connection as `user` (an ACL user) with `password`.
async fn redis_as(redis: &RedisServer, user: &str, password: &str) -> redis::aio::MultiplexedConnection {
    use redis::IntoConnectionInfo;
    let info = redis.url().into_connection_info().unwrap();
    let settings = info.redis_settings().clone().set_username(user).set_password(password);
    let client = redis::Client::open(info.set_redis_settings(settings)).unwrap();
    client.get_multiplexed_async_connection().await.unwrap_or_else(|e| panic!("{user}: {e}"))
}

async fn run(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_redis_identity_cannot_write_another_consumers_entries_or_the_shares() {
    use llmproxy_api::redis_acl::{consumer_prefix, consumer_rules, consumer_user, shares_key};
    use sha2::Digest;
    let redis = RedisServer::start(Some("admin-pass")).await;
    let mut admin = redis_as(&redis, "default", "admin-pass").await;
    for (consumer, password) in [("team-a/p", "pass-a"), ("team-b/p", "pass-b")] {
        let digest: String = sha2::Sha256::digest(password).iter().map(|b| format!("{b:02x}")).collect();
        let user = consumer_user("org", consumer);
        let mut args = vec!["ACL", "SETUSER", user.as_str()];
        let rules = consumer_rules("org", consumer, &digest);
        args.extend(rules.iter().map(String::as_str));
        run(&mut admin, &args).await.unwrap();
    }
    let (shares, b_key) = (shares_key("org"), format!("{}total:r", consumer_prefix("org", "team-b/p")));
    run(&mut admin, &["HSET", &shares, "team-a/p", "1,0", "team-b/p", "1,0"]).await.unwrap();
    run(&mut admin, &["HSET", &b_key, "l", "50", "t", "1"]).await.unwrap();

    // team-a, with the credential its proxy holds.
    let mut a = redis_as(&redis, &consumer_user("org", "team-a/p"), "pass-a").await;
    let a_key = format!("{}total:r", consumer_prefix("org", "team-a/p"));
    assert!(run(&mut a, &["HSET", &a_key, "l", "1"]).await.is_ok(), "its own entry");
    assert!(run(&mut a, &["HGETALL", &shares]).await.is_ok(), "the shares are readable");
    let script_writing_b = format!("return redis.call('HSET', '{b_key}', 'l', '-1e9')");
    let attempts: [&[&str]; 9] = [
        &["HSET", &b_key, "l", "-1000000000"],
        &["DEL", &b_key],
        &["HSET", &shares, "team-a/p", "1000,100"],
        &["HSET", "llmproxy:q:org:total:r", "l", "1000000"],
        &["EVAL", &script_writing_b, "0"],
        &["FLUSHALL"],
        &["CONFIG", "SET", "requirepass", ""],
        &["ACL", "SETUSER", "default", "on", "nopass"],
        &["FUNCTION", "FLUSH"],
    ];
    for args in attempts {
        let r = run(&mut a, args).await;
        assert!(
            r.as_ref().is_err_and(|e| ["NOPERM", "permission", "can't access"]
                .iter()
                .any(|m| e.to_string().contains(m))),
            "{args:?}: {r:?}"
        );
    }
    // team-b's entry and the owner's shares are as they were.
    let b: Vec<String> =
        redis::cmd("HMGET").arg(&b_key).arg("l").query_async(&mut admin).await.unwrap_or_default();
    assert_eq!(b, ["50"]);
    let s: Vec<String> =
        redis::cmd("HMGET").arg(&shares).arg("team-a/p").query_async(&mut admin).await.unwrap_or_default();
    assert_eq!(s, ["1,0"]);
    // A wrong password is no way in.
    use redis::IntoConnectionInfo;
    let info = redis.url().into_connection_info().unwrap();
    let settings =
        info.redis_settings().clone().set_username(consumer_user("org", "team-b/p")).set_password("pass-a");
    let client = redis::Client::open(info.set_redis_settings(settings)).unwrap();
    assert!(client.get_multiplexed_async_connection().await.is_err(), "team-a's password is not team-b's");
}
