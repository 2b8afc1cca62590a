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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use llmproxy_api::policy::{Policy, QuotaPolicy, SharedPolicy};
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

/// Which Redis a lessee serves. The LlmProxy's own buckets live in its `sharedState` (or,
/// without one, in its LlmQuota's Redis); the LlmQuota's buckets always live in the quota's
/// Redis, over a connection of their own with the quota's credentials, whatever the LlmProxy's
/// own `sharedState` says, so a tenant's Redis never holds (or grants) the organisation's quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// The LlmProxy's buckets (its limits, models, clients, endpoints).
    Proxy,
    /// The LlmQuota's buckets.
    Quota,
}

impl Store {
    /// Both stores, each served by a lessee of its own so that one Redis failing never stalls
    /// the other.
    pub const ALL: [Store; 2] = [Store::Proxy, Store::Quota];

    fn index(self) -> usize {
        usize::from(self == Store::Quota)
    }

    /// Whether bucket `key` lives in this store.
    fn holds(self, key: &LeaseKey) -> bool {
        key.is_quota() == (self == Store::Quota)
    }

    /// This store's Redis under `policy`; `None`: nothing of it is shared.
    fn redis(self, policy: &Policy) -> Option<&SharedPolicy> {
        match self {
            Store::Proxy => policy.shared.as_ref(),
            Store::Quota => policy.quota.as_ref().map(|q| &q.redis),
        }
    }

    /// The key of its member set: the LlmProxy's replicas, or every pod of every consumer of the
    /// LlmQuota.
    fn member_key(self, identity: &Identity, quota: Option<&QuotaPolicy>) -> String {
        match (self, quota) {
            (Store::Quota, Some(q)) => format!("llmproxy:members:{}", q.name),
            _ => format!("llmproxy:members:{}", identity.proxy),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Store::Proxy => "the LlmProxy's",
            Store::Quota => "the LlmQuota's",
        }
    }
}

/// What the lessees tell the rest of the proxy (status, metrics).
#[derive(Debug, Default)]
pub struct SharedState {
    modes: std::sync::Mutex<[Option<Mode>; 2]>,
    members: [AtomicU32; 2],
}

impl SharedState {
    /// The current mode, `Local` while any store is out of reach; `None` without shared state.
    pub fn mode(&self) -> Option<Mode> {
        let modes = *self.modes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if modes.contains(&Some(Mode::Local)) {
            Some(Mode::Local)
        } else if modes.contains(&Some(Mode::Shared)) {
            Some(Mode::Shared)
        } else {
            None
        }
    }

    fn set(&self, store: Store, mode: Option<Mode>, members: u32) {
        self.modes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[store.index()] = mode;
        self.members[store.index()].store(members, Ordering::Relaxed);
    }

    /// Live members last seen: the LlmQuota's (every consumer's pods) where one is drawn from,
    /// else the LlmProxy's replicas.
    pub fn members(&self) -> u32 {
        let quota = self.members[Store::Quota.index()].load(Ordering::Relaxed);
        if quota > 0 { quota } else { self.members[Store::Proxy.index()].load(Ordering::Relaxed) }
    }

    fn report(&self, metrics: &crate::metrics::Metrics) {
        if let Some(mode) = self.mode() {
            metrics.set_quota_mode(mode.label());
            metrics.quota_members.set(i64::from(self.members()));
        }
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

/// A connection to a store's Redis and what it was opened with.
struct Conn {
    url: String,
    password: Option<String>,
    manager: redis::aio::ConnectionManager,
}

/// A background try of a Redis that was out: a connection and a heartbeat through the script,
/// then the live member count.
type Probe = tokio::task::JoinHandle<redis::RedisResult<(Conn, u32)>>;

/// The lessee of one store: keeps this replica's stocks of that store's buckets topped up.
struct Lessee {
    store: Store,
    identity: Identity,
    state: Arc<SharedState>,
    script: redis::Script,
    conn: Option<Conn>,
    mode: Mode,
    members: u32,
    seen: HashMap<LeaseKey, Seen>,
    last: Instant,
    last_try: Instant,
    last_beat: Instant,
    /// Until when grants resume (`r`) rather than take: right after an outage, a bucket
    /// untouched while Redis was out is emptied first, so the return brings no burst.
    resume_until: Option<Instant>,
    /// While out: the try of Redis in flight, off the admission path.
    probe: Option<Probe>,
}

/// What the lessee needs of the proxy for one look.
struct Look<'a> {
    url: &'a str,
    password: Option<String>,
    replicas: u32,
    admission: &'a crate::queue::Admission,
    quota: Option<&'a QuotaPolicy>,
    metrics: &'a Arc<crate::metrics::Metrics>,
}

/// Runs the lessee of `store` for `proxy` until the proxy is dropped; follows its policy (a
/// new Redis URL or password reconnects). `identity` names the buckets.
pub async fn run(proxy: Weak<Proxy>, identity: Identity, state: Arc<SharedState>, store: Store) {
    let now = Instant::now();
    let mut lessee = Lessee {
        store,
        members: identity.replicas.max(1),
        identity,
        state,
        script: redis::Script::new(SCRIPT),
        conn: None,
        mode: Mode::Shared,
        seen: HashMap::new(),
        last: now,
        last_try: now.checked_sub(RETRY_REDIS).unwrap_or(now),
        last_beat: now.checked_sub(RETRY_REDIS).unwrap_or(now),
        resume_until: None,
        probe: None,
    };
    // Without shared state in the policy, only look for it to appear (a reload) once a second,
    // rather than waking the process 40 times a second for nothing.
    let mut idle = false;
    loop {
        let Some(strong) = proxy.upgrade() else { return };
        let wake = strong.admission().lease_wake(store == Store::Quota);
        drop(strong);
        let tick = if idle { IDLE_TICK } else { TICK };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
        let Some(proxy_now) = proxy.upgrade() else { return };
        let p = proxy_now.policy();
        let Some(redis) = store.redis(&p) else {
            idle = true;
            lessee.stop();
            continue;
        };
        idle = false;
        let password = redis.password_slot().and_then(|(name, key)| proxy_now.secret_value(&name, &key));
        let replicas =
            proxy_now.replicas_hint(lessee.identity.replicas).load(std::sync::atomic::Ordering::Relaxed);
        let admission = Arc::clone(proxy_now.admission());
        let metrics = Arc::clone(proxy_now.metrics());
        drop(proxy_now);
        let look = Look {
            url: &redis.url,
            password,
            replicas,
            admission: &admission,
            quota: p.quota.as_ref(),
            metrics: &metrics,
        };
        let shared = lessee.look(look).await;
        lessee.state.set(store, shared.then_some(lessee.mode), lessee.members);
        lessee.state.report(&metrics);
        admission.wake_dispatcher();
    }
}

impl Lessee {
    /// Nothing of this store is shared (any more).
    fn stop(&mut self) {
        self.conn = None;
        if let Some(p) = self.probe.take() {
            p.abort();
        }
        self.state.set(self.store, None, 0);
    }

    /// One look: plan, then exchange with Redis or, while it is out, hand out a local share.
    /// Returns whether this store has shared buckets at all.
    async fn look(&mut self, look: Look<'_>) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64().min(1.0);
        self.last = now;
        if self.conn.as_ref().is_some_and(|c| c.url != look.url || c.password != look.password) {
            // A new Redis or password: reconnect (a probe for the old one is of no use).
            self.conn = None;
            if let Some(p) = self.probe.take() {
                p.abort();
            }
        }
        let (store, identity) = (self.store, &self.identity);
        let seen = &mut self.seen;
        let Some(mut lines) =
            look.admission.with_leases(|l| plan(l, seen, now, dt, identity, look.quota, store))
        else {
            return false;
        };
        if self.mode == Mode::Shared {
            if self.conn.is_none() {
                match connect(look.url, look.password.as_deref()).await {
                    Ok(manager) => {
                        self.conn =
                            Some(Conn { url: look.url.to_owned(), password: look.password.clone(), manager });
                    }
                    Err(e) => self.go_local(now, &redacted(&e.to_string()), look.replicas),
                }
            }
            let due = !lines.is_empty() || now.duration_since(self.last_beat) >= RETRY_REDIS;
            if let Some(c) = self.conn.as_mut().filter(|_| due) {
                if self.resume_until.is_some_and(|u| now < u) {
                    for l in &mut lines {
                        if l.mode == "g" {
                            l.mode = "r";
                        }
                    }
                }
                let member_key = store.member_key(&self.identity, look.quota);
                let call = exchange(
                    &self.script,
                    &mut c.manager,
                    &lines,
                    &member_key,
                    &self.identity,
                    look.quota,
                    look.metrics,
                );
                match tokio::time::timeout(REDIS_TIMEOUT, call).await {
                    Ok(Ok((grants, live))) => {
                        self.members = live.clamp(1, 100_000);
                        self.last_beat = now;
                        grant(look.admission, &lines, &grants);
                    }
                    Ok(Err(e)) => self.go_local(now, &redacted(&e.to_string()), look.replicas),
                    Err(_) => self.go_local(now, "no answer in time", look.replicas),
                }
            }
        }
        if self.mode == Mode::Local {
            // Alone: what was asked of Redis is handed out here, at a share of the rate.
            let share = f64::from(self.members.max(look.replicas).max(1));
            fill_locally(look.admission, &lines, dt, share);
            self.try_again(now, &look);
        }
        true
    }

    /// Redis is out of reach: go on alone from this moment, with a local share of each rate.
    fn go_local(&mut self, now: Instant, why: &str, replicas: u32) {
        tracing::warn!(
            error = %why,
            "Redis cannot be reached; enforcing a local share of {} shared limits (1/{})",
            self.store.label(),
            self.members.max(replicas).max(1)
        );
        self.mode = Mode::Local;
        self.conn = None;
        self.last_try = now;
    }

    /// While out: look at the probe in flight, start one a second, and go back to sharing when
    /// one got through.
    fn try_again(&mut self, now: Instant, look: &Look<'_>) {
        if self.probe.as_ref().is_some_and(tokio::task::JoinHandle::is_finished) {
            let done = self.probe.take().and_then(|p| p.now_or_never());
            match done {
                Some(Ok(Ok((conn, live)))) if conn.url == look.url && conn.password == look.password => {
                    tracing::info!("Redis is back; sharing {} limits through it again", self.store.label());
                    self.conn = Some(conn);
                    self.mode = Mode::Shared;
                    self.members = live.clamp(1, 100_000);
                    self.last_beat = now;
                    self.resume_until = now.checked_add(MEMBER_TTL);
                    // What was handed out alone never came from Redis: spent, so the switch
                    // brings no burst.
                    let store = self.store;
                    look.admission.with_leases(|l| {
                        for (key, s) in &mut l.stocks {
                            if store.holds(key) {
                                s.have = [s.have[0].min(0.0), s.have[1].min(0.0)];
                            }
                        }
                    });
                    return;
                }
                Some(Ok(Err(e))) => tracing::debug!(error = %redacted(&e.to_string()), "Redis still out"),
                Some(Err(e)) => tracing::warn!(error = %e, "a try of Redis failed"),
                _ => {}
            }
        }
        if self.probe.is_none() && now.duration_since(self.last_try) >= RETRY_REDIS {
            self.last_try = now;
            let (url, password) = (look.url.to_owned(), look.password.clone());
            let script = self.script.clone();
            let member_key = self.store.member_key(&self.identity, look.quota);
            let identity = self.identity.clone();
            let quota = look.quota.cloned();
            let metrics = Arc::clone(look.metrics);
            self.probe = Some(tokio::spawn(async move {
                let mut manager = connect(&url, password.as_deref()).await?;
                let beat =
                    exchange(&script, &mut manager, &[], &member_key, &identity, quota.as_ref(), &metrics);
                let (_, live) = tokio::time::timeout(REDIS_TIMEOUT, beat)
                    .await
                    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "no answer in time")))??;
                Ok((Conn { url, password, manager }, live))
            }));
        }
    }
}

/// Add what Redis granted to the stocks: never more than asked, whatever the store answers.
fn grant(admission: &crate::queue::Admission, lines: &[Line], grants: &[f64]) {
    admission.with_leases(|l| {
        for (line, granted) in lines.iter().zip(grants) {
            let granted = if granted.is_finite() { granted.clamp(0.0, line.ask) } else { 0.0 };
            if let Some(s) = l.stocks.get_mut(&line.key) {
                s.have[line.unit] += granted;
            }
        }
    });
}

/// Alone: top each asked-for stock up by its share (`1 / share`) of the rate over `dt`, up to
/// its share of the burst.
fn fill_locally(admission: &crate::queue::Admission, lines: &[Line], dt: f64, share: f64) {
    admission.with_leases(|l| {
        for line in lines {
            if let Some(s) = l.stocks.get_mut(&line.key) {
                let cap = (line.burst / share).max(1.0);
                let room = (cap - s.have[line.unit]).max(0.0);
                s.have[line.unit] += (line.per_sec / share * dt).min(room);
            }
        }
    });
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
    quota: Option<&QuotaPolicy>,
    store: Store,
) -> Vec<Line> {
    seen.retain(|k, _| leases.stocks.contains_key(k));
    let mut dry = Vec::new();
    leases.dry.retain(|k| {
        let mine = store.holds(k);
        if mine {
            dry.push(k.clone());
        }
        !mine
    });
    let mut lines = Vec::new();
    for (key, stock) in leases.stocks.iter_mut().filter(|(k, _)| store.holds(k)) {
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

    fn line(key: LeaseKey, redis_key: &str, ask: f64, mode: &'static str) -> Line {
        Line { key, unit: 0, redis_key: redis_key.into(), per_sec: 100.0, burst: 100.0, ask, give: 0.0, mode }
    }

    #[tokio::test]
    async fn malformed_entries_are_skipped_and_counted_never_failing_the_call() {
        let redis = Redis::start().await;
        let mut c = connect(&redis.1, None).await.unwrap();
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
            let () = cmd.query_async(&mut c).await.map(|_: redis::Value| ()).unwrap();
        }
        let lines = [
            line(LeaseKey::Total, "llmproxy:p:ns/p:total:r", 5.0, "g"),
            line(LeaseKey::Quota, "llmproxy:q:org:total:r", 10.0, "q"),
        ];
        let metrics = crate::metrics::Metrics::new(prometheus::Registry::new()).unwrap();
        let script = redis::Script::new(SCRIPT);
        let id = identity();
        let call = exchange(&script, &mut c, &lines, "llmproxy:members:org", &id, Some(&quota), &metrics);
        let (grants, members) = call.await.expect("one bad entry failed the call");
        // The replaced bucket starts empty; the quota's stock is granted; this member counts.
        assert_eq!((grants, members), (vec![0.0, 10.0], 1));
        assert_eq!(metrics.quota_malformed_entries.get(), 5, "two keys of another type, three bad records");
        // Dropped or skipped once: the next call finds nothing malformed.
        let call = exchange(&script, &mut c, &lines, "llmproxy:members:org", &id, Some(&quota), &metrics);
        call.await.unwrap();
        assert_eq!(metrics.quota_malformed_entries.get(), 5);
    }

    #[test]
    fn a_stock_asks_for_what_is_wanted_and_gives_back_when_idle() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.configure(&[(LeaseKey::Total, RateConfig::per_minute(Some(6000), None))], t0);
        let mut seen = HashMap::new();
        // Nothing wanted yet: one request's worth is kept ready.
        let lines = plan(&mut l, &mut seen, t0, 0.025, &identity(), None, Store::Proxy);
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].ask, lines[0].redis_key.as_str()), (1.0, "llmproxy:p:ns/p:total:r"));
        // Busy at 100/s for a second (smoothed over about a quarter second): a quarter
        // second's worth ahead.
        let mut ask = 0.0;
        for _ in 0..40 {
            if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
                s.used[0] = 2.5;
            }
            ask = plan(&mut l, &mut seen, t0, 0.025, &identity(), None, Store::Proxy)[0].ask;
        }
        assert!((ask - 25.0).abs() < 0.5, "{ask}");
        // Idle for more than a second: what it holds goes back.
        if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
            s.have[0] = 7.0;
        }
        let lines =
            plan(&mut l, &mut seen, t0 + Duration::from_secs(2), 0.025, &identity(), None, Store::Proxy);
        assert_eq!((lines[0].ask, lines[0].give), (0.0, 7.0));
        assert_eq!(l.stocks[&LeaseKey::Total].have[0], 0.0);
    }
}
