//! Shared quotas through Redis: the lessee keeps this replica's stocks of the shared buckets
//! (`limiter::lease`) topped up from Redis, ahead of need, and gives back what it holds idle.
//!
//! Every bucket lives in Redis as a token bucket updated by one Lua script, atomically and on
//! Redis' own clock: a grant takes from it what the replica asks (or what is left), a give-back
//! returns units, a 429 from the upstream empties it. One round trip serves every bucket of a
//! replica at once, and it is off the request path: admission takes from the local stock, and
//! only a replica that ran dry waits for the next grant. A bucket that does not exist yet (a
//! new quota, a Redis that lost its data) starts empty, never full.
//!
//! When Redis cannot be reached the replica goes on alone, with a share of each bucket's rate:
//! `rate / members`, the members being the replicas (and, for an LlmQuota, the consumers' pods)
//! that kept a heartbeat in Redis while it was up, or the replicas the cluster reports, which
//! ever is more; its stock starts empty. Back in shared mode, a bucket nobody touched while
//! Redis was out is emptied by the first replica to return, so the switch brings no burst.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::lease::{LeaseKey, Leases};
use crate::state::Proxy;

/// How far ahead of need a replica holds stock: this much of its recent rate.
const LEASE_WINDOW: f64 = 0.25;
/// How long a replica may hold stock nobody needs before it gives it back.
const IDLE_RETURN: Duration = Duration::from_secs(1);
/// The lessee's pace when nothing asks it to hurry.
const TICK: Duration = Duration::from_millis(25);
/// How often an idle lessee (no shared state configured) looks at the policy again.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// A heartbeat older than this no longer counts a member.
const MEMBER_TTL: Duration = Duration::from_secs(5);
/// The most one exchange with Redis may take before the replica goes on alone.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a replica on its own tries Redis again.
const RETRY_REDIS: Duration = Duration::from_secs(1);

/// The grant script; see the module docs. Per bucket, five arguments: rate per second, burst,
/// units asked, units given back, and a mode (`g` grant, `d` dry, `r` resume, `q` grant
/// within the consumer's fair share of an LlmQuota). Then the member set, this member, the
/// member TTL in seconds, and for `q` buckets the consumer, its weight and guaranteed percent.
/// Returns the grants, then the number of live members, then how many malformed entries it
/// met. A malformed entry (a key of another type, a field that is not a finite number in range,
/// a consumer record that does not parse) is removed or skipped and counted, never an error:
/// one bad entry must not fail the call, and with it every consumer's sharing.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local extra = n * 5
local members, me, ttl = ARGV[extra + 1], ARGV[extra + 2], tonumber(ARGV[extra + 3])
local consumer, weight, guaranteed = ARGV[extra + 4], tonumber(ARGV[extra + 5]), tonumber(ARGV[extra + 6])
local bad = 0
local function num(s)
  if s == nil or s == false then return nil end
  local v = tonumber(s)
  if v == nil or v ~= v or v == math.huge or v == -math.huge then return nil end
  return v
end
-- A command on a key someone filled with another type: the key is dropped and counted, and
-- the command runs again on a fresh one.
local function call(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then
    bad = bad + 1
    redis.call('DEL', key)
    r = redis.call(cmd, key, ...)
  end
  return r
end
call('ZADD', members, now, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - ttl)
redis.call('PEXPIRE', members, math.ceil(ttl * 2000))
local out = {}
local function fill(key, rate, burst)
  local v = call('HMGET', key, 'l', 't')
  local level, ts = num(v[1]), num(v[2])
  if level == nil or ts == nil then
    if v[1] or v[2] then bad = bad + 1 end
    return 0, now, true
  end
  level = math.max(-burst, math.min(burst, level))
  return math.min(burst, level + math.max(0, now - ts) * rate), ts, false
end
for i = 1, n do
  local key = KEYS[i]
  local b = (i - 1) * 5
  local rate, burst = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local ask, give, mode = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5]
  local level, ts, new = fill(key, rate, burst)
  if mode == 'r' and not new and now - ts > 1 then level = math.min(level, 0) end
  level = math.min(burst, level + give)
  if mode == 'd' then level = math.min(level, 0) end
  local grant = 0
  if ask > 0 and level > 0 then grant = math.min(ask, level) end
  if mode == 'q' and grant > 0 then
    -- Under contention (less than half the burst left), a consumer draws only within its
    -- fair share: its guarantee plus its weight's part of what is not guaranteed.
    local cons = key .. ':c'
    call('HSET', cons, consumer, weight .. ',' .. guaranteed .. ',' .. now)
    redis.call('PEXPIRE', cons, math.ceil(ttl * 2000))
    local sumw, sumg = 0, 0
    local all = redis.call('HGETALL', cons)
    for j = 1, #all, 2 do
      local w, g, seen = string.match(all[j + 1], '^([^,]+),([^,]+),([^,]+)$')
      w, g, seen = num(w), num(g), num(seen)
      if w == nil or g == nil or seen == nil or w < 1 or w > 1000 or g < 0 or g > 100 then
        bad = bad + 1
        redis.call('HDEL', cons, all[j])
      elseif now - seen <= ttl then
        sumw = sumw + w
        sumg = sumg + g
      else
        redis.call('HDEL', cons, all[j])
      end
    end
    local share = guaranteed / 100 + (weight / math.max(sumw, 1)) * math.max(0, 1 - sumg / 100)
    local fkey = key .. ':f:' .. consumer
    local fburst = math.max(burst * share, 1)
    local fair = fill(fkey, rate * share, fburst)
    if level < burst / 2 then grant = math.max(0, math.min(grant, fair)) end
    redis.call('HSET', fkey, 'l', tostring(math.max(fair - grant, -fburst)), 't', tostring(now))
    redis.call('PEXPIRE', fkey, math.ceil((burst / rate + 60) * 1000))
  end
  level = level - grant
  redis.call('HSET', key, 'l', tostring(level), 't', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst / rate + 60) * 1000))
  out[i] = tostring(grant)
end
out[n + 1] = redis.call('ZCARD', members)
out[n + 2] = bad
return out
";

/// Whether this replica shares its buckets through Redis right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through Redis.
    Shared,
    /// Alone, with a share of each rate (Redis cannot be reached).
    Local,
}

impl Mode {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Local => "local",
        }
    }
}

/// Who this replica is in the shared store.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The LlmProxy's buckets' name: `NAMESPACE/NAME`.
    pub proxy: String,
    /// This replica (pod name, or host and port standalone).
    pub member: String,
    /// Replicas the cluster reports, a floor for the member count without Redis.
    pub replicas: u32,
}

/// What the lessee tells the rest of the proxy (status, metrics).
#[derive(Debug, Default)]
pub struct SharedState {
    mode: std::sync::Mutex<Option<Mode>>,
    members: std::sync::atomic::AtomicU32,
}

impl SharedState {
    /// The current mode; `None` without shared state.
    pub fn mode(&self) -> Option<Mode> {
        *self.mode.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_mode(&self, mode: Option<Mode>) {
        *self.mode.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = mode;
    }

    /// Live members last seen.
    pub fn members(&self) -> u32 {
        self.members.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One bucket unit's line in an exchange with Redis.
struct Line {
    key: LeaseKey,
    unit: usize,
    redis_key: String,
    per_sec: f64,
    burst: f64,
    ask: f64,
    give: f64,
    mode: &'static str,
}

/// What the lessee remembers about a stock between looks.
#[derive(Default)]
struct Seen {
    /// Recent use per second, smoothed.
    rate: [f64; 2],
}

/// Runs the lessee for `proxy` until it is dropped; follows its policy (a new Redis URL or
/// password reconnects). `identity` names the buckets.
pub async fn run(proxy: Weak<Proxy>, identity: Identity, state: Arc<SharedState>) {
    let mut conn: Option<(String, Option<String>, redis::aio::ConnectionManager)> = None;
    let mut mode = Mode::Shared;
    let mut members = identity.replicas.max(1);
    let mut seen: HashMap<LeaseKey, Seen> = HashMap::new();
    let mut last = Instant::now();
    let mut last_try = Instant::now() - RETRY_REDIS;
    let mut last_beat = Instant::now() - RETRY_REDIS;
    let script = redis::Script::new(SCRIPT);
    // Without shared state in the policy, only look for it to appear (a reload) once a second,
    // rather than waking the process 40 times a second for nothing.
    let mut idle = false;
    loop {
        let Some(strong) = proxy.upgrade() else { return };
        let wake = strong.admission().lease_wake();
        drop(strong);
        let tick = if idle { IDLE_TICK } else { TICK };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
        let Some(proxy_now) = proxy.upgrade() else { return };
        let p = proxy_now.policy();
        idle = p.shared.is_none();
        let Some(shared) = p.shared.clone() else {
            state.set_mode(None);
            conn = None;
            continue;
        };
        let pass = shared.password.as_ref().and_then(|r| proxy_now.secret_value(&r.name, &r.key));
        let replicas_now = proxy_now.replicas_hint(identity.replicas);
        let strong = Arc::clone(proxy_now.admission());
        let metrics = Arc::clone(proxy_now.metrics());
        drop(proxy_now);
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64().min(1.0);
        last = now;

        if conn.as_ref().is_none_or(|(u, pw, _)| *u != shared.url || *pw != pass) {
            conn = None;
            if mode == Mode::Shared || now.duration_since(last_try) >= RETRY_REDIS {
                last_try = now;
                match connect(&shared.url, pass.as_deref()).await {
                    Ok(c) => conn = Some((shared.url.clone(), pass.clone(), c)),
                    Err(e) => {
                        if mode == Mode::Shared {
                            tracing::warn!(error = %redacted(&e.to_string()), "cannot reach Redis; enforcing a local share of the shared limits");
                        }
                        mode = Mode::Local;
                    }
                }
            }
        }

        let lines = strong.with_leases(|l| plan(l, &mut seen, now, dt, &identity, p.quota.as_ref()));
        let Some(mut lines) = lines else {
            state.set_mode(None);
            continue;
        };

        let mut exchanged = None;
        // Shared: whenever there is something to ask or give, and a heartbeat a second;
        // alone: a try a second.
        let due = match mode {
            Mode::Shared => !lines.is_empty() || now.duration_since(last_beat) >= RETRY_REDIS,
            Mode::Local => now.duration_since(last_try) >= RETRY_REDIS,
        };
        if !due {
            continue;
        }
        if let Some((_, _, c)) = conn.as_mut() {
            if mode == Mode::Local {
                last_try = now;
                // Coming back: buckets untouched while Redis was out are emptied first.
                for l in &mut lines {
                    if l.mode == "g" {
                        l.mode = "r";
                    }
                }
            }
            let member_key = format!(
                "llmproxy:members:{}",
                p.quota.as_ref().map_or(identity.proxy.as_str(), |q| q.name.as_str())
            );
            let call = exchange(&script, c, &lines, &member_key, &identity, p.quota.as_ref(), &metrics);
            match tokio::time::timeout(REDIS_TIMEOUT, call).await {
                Ok(Ok(r)) => exchanged = Some(r),
                Ok(Err(e)) => tracing::debug!(error = %redacted(&e.to_string()), "Redis exchange failed"),
                Err(_) => tracing::debug!("Redis exchange timed out"),
            }
        }
        match exchanged {
            Some((grants, live)) => {
                if mode == Mode::Local {
                    tracing::info!("Redis is back; sharing the limits through it again");
                }
                mode = Mode::Shared;
                last_beat = now;
                members = live.clamp(1, 100_000);
                strong.with_leases(|l| {
                    for (line, granted) in lines.iter().zip(&grants) {
                        // Never more than asked, whatever the store answers.
                        let granted = if granted.is_finite() { granted.clamp(0.0, line.ask) } else { 0.0 };
                        if let Some(s) = l.stocks.get_mut(&line.key) {
                            s.have[line.unit] += granted;
                        }
                    }
                });
            }
            None => {
                if mode == Mode::Shared {
                    tracing::warn!(
                        "Redis cannot be reached; enforcing a local share of the shared limits (1/{})",
                        members.max(replicas_now.load(std::sync::atomic::Ordering::Relaxed))
                    );
                    conn = None;
                }
                mode = Mode::Local;
                let share =
                    f64::from(members.max(replicas_now.load(std::sync::atomic::Ordering::Relaxed)).max(1));
                // Alone: what was asked of Redis is handed out locally, at a share of the rate.
                strong.with_leases(|l| {
                    for line in &lines {
                        if let Some(s) = l.stocks.get_mut(&line.key) {
                            let cap = (line.burst / share).max(1.0);
                            let room = (cap - s.have[line.unit]).max(0.0);
                            s.have[line.unit] += (line.per_sec / share * dt).min(room);
                        }
                    }
                });
            }
        }
        state.set_mode(Some(mode));
        state.members.store(members, std::sync::atomic::Ordering::Relaxed);
        metrics.set_quota_mode(mode.label());
        metrics.quota_members.set(i64::from(members));
        strong.wake_dispatcher();
    }
}

fn redacted(error: &str) -> String {
    // Redis errors may echo the URL; never its credentials (there are none in a checked URL,
    // but a password set through AUTH may appear in some messages).
    if error.to_ascii_lowercase().contains("auth") {
        "authentication failed".into()
    } else {
        error.to_owned()
    }
}

async fn connect(url: &str, password: Option<&str>) -> redis::RedisResult<redis::aio::ConnectionManager> {
    use redis::IntoConnectionInfo;
    let mut info = url.into_connection_info()?;
    if let Some(pw) = password {
        let settings = info.redis_settings().clone().set_password(pw);
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

/// What to ask of and give back to each shared bucket now.
#[allow(clippy::cast_precision_loss)]
fn plan(
    leases: &mut Leases,
    seen: &mut HashMap<LeaseKey, Seen>,
    now: Instant,
    dt: f64,
    identity: &Identity,
    quota: Option<&llmproxy_api::policy::QuotaPolicy>,
) -> Vec<Line> {
    seen.retain(|k, _| leases.stocks.contains_key(k));
    let dry = std::mem::take(&mut leases.dry);
    let mut lines = Vec::new();
    for (key, stock) in &mut leases.stocks {
        let s = seen.entry(key.clone()).or_default();
        let idle = now.duration_since(stock.active) > IDLE_RETURN;
        for unit in 0..2 {
            let Some((per_minute, burst)) =
                (if unit == 0 { stock.config.requests } else { stock.config.tokens })
            else {
                continue;
            };
            // Smoothed use per second (half-life of about a quarter of a second).
            let used = std::mem::take(&mut stock.used[unit]);
            if dt > 0.0 {
                let alpha = (dt / 0.25).min(1.0);
                s.rate[unit] += alpha * (used / dt - s.rate[unit]);
            }
            let per_sec = per_minute as f64 / 60.0;
            let burst = burst as f64;
            let (ask, give) = if idle {
                // Nobody needs it here: back to the others.
                let give = stock.have[unit].max(0.0);
                stock.have[unit] -= give;
                (0.0, give)
            } else {
                let ahead = (s.rate[unit] * LEASE_WINDOW).min(burst);
                let floor = if unit == 0 { 1.0 } else { 0.0 };
                let target = ahead.max(stock.want[unit]).max(floor);
                ((target - stock.have[unit]).max(0.0), 0.0)
            };
            let is_dry = dry.contains(key);
            if ask <= 0.0 && give <= 0.0 && !is_dry {
                continue;
            }
            let mode = if is_dry {
                "d"
            } else if matches!(key, LeaseKey::Quota) && quota.is_some() {
                "q"
            } else {
                "g"
            };
            lines.push(Line {
                key: key.clone(),
                unit,
                redis_key: redis_key(key, unit, identity, quota),
                per_sec,
                burst,
                ask,
                give,
                mode,
            });
        }
    }
    lines
}

/// The Redis key of a bucket unit. An LlmProxy's are under its namespace and name; an
/// LlmQuota's under its name, shared by every consumer.
fn redis_key(
    key: &LeaseKey,
    unit: usize,
    identity: &Identity,
    quota: Option<&llmproxy_api::policy::QuotaPolicy>,
) -> String {
    let u = if unit == 0 { "r" } else { "t" };
    let q = quota.map_or("", |q| q.name.as_str());
    let p = &identity.proxy;
    match key {
        LeaseKey::Total => format!("llmproxy:p:{p}:total:{u}"),
        LeaseKey::Model(m) => format!("llmproxy:p:{p}:model:{m}:{u}"),
        LeaseKey::Client(c) => format!("llmproxy:p:{p}:client:{c}:{u}"),
        LeaseKey::Endpoint(e) => format!("llmproxy:p:{p}:endpoint:{e}:{u}"),
        LeaseKey::Quota => format!("llmproxy:q:{q}:total:{u}"),
        LeaseKey::QuotaModel(m) => format!("llmproxy:q:{q}:model:{m}:{u}"),
    }
}

async fn exchange(
    script: &redis::Script,
    conn: &mut redis::aio::ConnectionManager,
    lines: &[Line],
    member_key: &str,
    identity: &Identity,
    quota: Option<&llmproxy_api::policy::QuotaPolicy>,
    metrics: &crate::metrics::Metrics,
) -> redis::RedisResult<(Vec<f64>, u32)> {
    let mut call = script.prepare_invoke();
    for l in lines {
        call.key(&l.redis_key);
    }
    for l in lines {
        call.arg(l.per_sec).arg(l.burst).arg(l.ask).arg(l.give).arg(l.mode);
    }
    call.arg(member_key).arg(&identity.member).arg(MEMBER_TTL.as_secs());
    call.arg(&identity.proxy).arg(quota.map_or(1, |q| q.weight)).arg(quota.map_or(0, |q| q.guaranteed));
    let out: Vec<String> = call.invoke_async(conn).await?;
    let grants: Vec<f64> = out.iter().take(lines.len()).map(|g| g.parse().unwrap_or(0.0)).collect();
    let members = out.get(lines.len()).and_then(|m| m.parse().ok()).unwrap_or(1);
    let malformed: u64 = out.get(lines.len() + 1).and_then(|m| m.parse().ok()).unwrap_or(0);
    if malformed > 0 {
        metrics.quota_malformed_entries.inc_by(malformed);
        tracing::warn!(malformed, "skipped malformed entries in the shared store (someone wrote them)");
    }
    Ok((grants, members))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::RateConfig;

    fn identity() -> Identity {
        Identity { proxy: "ns/p".into(), member: "m".into(), replicas: 1 }
    }

    /// A real `redis-server` on a free port, killed on drop.
    struct Redis(std::process::Child, String);

    impl Redis {
        async fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("{e}"));
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
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting redis-server (install Debian's redis-server): {e}"));
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

    fn line(key: LeaseKey, redis_key: &str, ask: f64, mode: &'static str) -> Line {
        Line { key, unit: 0, redis_key: redis_key.into(), per_sec: 100.0, burst: 100.0, ask, give: 0.0, mode }
    }

    #[tokio::test]
    async fn malformed_entries_are_skipped_and_counted_never_failing_the_call() {
        let redis = Redis::start().await;
        let mut c = connect(&redis.1, None).await.unwrap_or_else(|e| panic!("{e}"));
        let quota = llmproxy_api::policy::QuotaPolicy {
            name: "org".into(),
            requests_per_minute: 6000,
            tokens_per_minute: None,
            models: std::collections::BTreeMap::new(),
            redis: llmproxy_api::policy::SharedPolicy {
                url: redis.1.clone(),
                password: None,
                password_namespace: None,
            },
            weight: 1,
            guaranteed: 0,
        };
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // What a tenant holding the password could plant: a bucket and the member set of
        // another type, consumer records that do not parse or are out of range; beside them a
        // quota bucket with stock, so the fair-share path reads the records.
        let plant: [&[&str]; 5] = [
            &["SET", "llmproxy:p:ns/p:total:r", "garbage"],
            &["SET", "llmproxy:members:org", "garbage"],
            &["HSET", "llmproxy:q:org:total:r:c", "junk", "nonsense", "huge", "1e309,0,1"],
            &["HSET", "llmproxy:q:org:total:r:c", "greedy", "1000000,0,99999999999"],
            &["HSET", "llmproxy:q:org:total:r", "l", "80", "t", &now.to_string()],
        ];
        for args in plant {
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            let () =
                cmd.query_async(&mut c).await.map(|_: redis::Value| ()).unwrap_or_else(|e| panic!("{e}"));
        }
        let lines = [
            line(LeaseKey::Total, "llmproxy:p:ns/p:total:r", 5.0, "g"),
            line(LeaseKey::Quota, "llmproxy:q:org:total:r", 10.0, "q"),
        ];
        let metrics =
            crate::metrics::Metrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        let script = redis::Script::new(SCRIPT);
        let id = identity();
        let call = exchange(&script, &mut c, &lines, "llmproxy:members:org", &id, Some(&quota), &metrics);
        let (grants, members) = call.await.unwrap_or_else(|e| panic!("one bad entry failed the call: {e}"));
        // The replaced bucket starts empty; the quota's stock is granted; this member counts.
        assert_eq!((grants, members), (vec![0.0, 10.0], 1));
        assert_eq!(metrics.quota_malformed_entries.get(), 5, "two keys of another type, three bad records");
        // Dropped or skipped once: the next call finds nothing malformed.
        let call = exchange(&script, &mut c, &lines, "llmproxy:members:org", &id, Some(&quota), &metrics);
        call.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(metrics.quota_malformed_entries.get(), 5);
    }

    #[test]
    fn a_stock_asks_for_what_is_wanted_and_gives_back_when_idle() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.configure(&[(LeaseKey::Total, RateConfig::per_minute(Some(6000), None))], t0);
        let mut seen = HashMap::new();
        // Nothing wanted yet: one request's worth is kept ready.
        let lines = plan(&mut l, &mut seen, t0, 0.025, &identity(), None);
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].ask, lines[0].redis_key.as_str()), (1.0, "llmproxy:p:ns/p:total:r"));
        // Busy at 100/s for a second (smoothed over about a quarter second): a quarter
        // second's worth ahead.
        let mut ask = 0.0;
        for _ in 0..40 {
            if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
                s.used[0] = 2.5;
            }
            ask = plan(&mut l, &mut seen, t0, 0.025, &identity(), None)[0].ask;
        }
        assert!((ask - 25.0).abs() < 0.5, "{ask}");
        // Idle for more than a second: what it holds goes back.
        if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
            s.have[0] = 7.0;
        }
        let lines = plan(&mut l, &mut seen, t0 + Duration::from_secs(2), 0.025, &identity(), None);
        assert_eq!((lines[0].ask, lines[0].give), (0.0, 7.0));
        assert_eq!(l.stocks[&LeaseKey::Total].have[0], 0.0);
    }
}
