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
use llmproxy_api::redis_acl::redacted;
use tokio::time::Instant;

use crate::admission::limiter::lease::{LeaseKey, Leases};

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
/// How long a replica back from an outage goes on admitting only its local share: long enough
/// for every other replica's next try (one a second, each up to a connect and an answer's
/// timeout) to bring it back too. Drawing on Redis while another replica still admits alone
/// would take the whole rate on top of that replica's share.
const SETTLE: Duration = RETRY_REDIS.saturating_add(REDIS_TIMEOUT.saturating_mul(3)).saturating_add(TICK);

/// The grant script; see the module docs. Per bucket, six arguments: rate per second, burst,
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
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local extra = n * 6
local members, me, ttl = ARGV[extra + 1], ARGV[extra + 2], tonumber(ARGV[extra + 3])
local quota, consumer = ARGV[extra + 4], ARGV[extra + 5]
local weight, guaranteed = tonumber(ARGV[extra + 6]), tonumber(ARGV[extra + 7])
local keep = math.ceil(ttl * 2000)
local bad = 0
local function num(s)
  if s == nil or s == false then return nil end
  local v = tonumber(s)
  if v == nil or v ~= v or v == math.huge or v == -math.huge then return nil end
  return v
end
local function failed(r) return type(r) == 'table' and r.err ~= nil end
-- A command on a key of the caller's that someone filled with another type: the key is dropped
-- and counted, and the command runs again on a fresh one.
local function call(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if failed(r) then
    bad = bad + 1
    redis.call('DEL', key)
    r = redis.call(cmd, key, ...)
  end
  return r
end
call('ZADD', members, now, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - ttl)
redis.call('PEXPIRE', members, keep)
local out = {}
-- A bucket's level now, refilled at the rate it was last written with (a new one is empty).
local function fill(key, rate, burst)
  local v = call('HMGET', key, 'l', 't', 'r', 'b')
  local level, ts = num(v[1]), num(v[2])
  local r0, b0 = num(v[3]) or rate, num(v[4]) or burst
  if level == nil or ts == nil or r0 < 0 or b0 < 0 then
    if v[1] or v[2] then bad = bad + 1 end
    return 0
  end
  level = math.max(-b0, math.min(b0, level))
  return math.min(b0, level + math.max(0, now - ts) * math.min(r0, rate))
end

local qbase = 'llmproxy:q:' .. quota .. ':'
local mine = qbase .. 'f:' .. consumer .. ':'
local function share(s)
  if type(s) ~= 'string' then return nil end
  local w, g = string.match(s, '^([^,]+),([^,]+)$')
  w, g = num(w), num(g)
  if w == nil or g == nil or w < 1 or w > 1000 or g < 0 or g > 100 then return nil end
  return w, g
end
-- The quota's consumers with their weights and guarantees: the owner's, as the operator wrote
-- them (read only to consumers), or where no operator runs, as each consumer declares its own.
local sharers = {}
if quota ~= '' then
  local owned = redis.pcall('HGETALL', qbase .. 'shares')
  if failed(owned) then bad = bad + 1; owned = {} end
  if #owned > 0 then
    for j = 1, #owned, 2 do
      local w, g = share(owned[j + 1])
      if w then sharers[#sharers + 1] = {owned[j], w, g} else bad = bad + 1 end
    end
  else
    local index = qbase .. 'consumers'
    redis.call('SET', mine .. 'share', weight .. ',' .. guaranteed, 'PX', keep)
    local r = redis.pcall('ZADD', index, now, consumer)
    if failed(r) then
      if string.find(r.err, 'NOPERM', 1, true) then
        return redis.error_reply('ERR the LlmQuota ' .. quota .. ' has no shares written yet')
      end
      call('ZADD', index, now, consumer)
    end
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
    redis.call('PEXPIRE', index, keep)
    for _, name in ipairs(redis.call('ZRANGE', index, 0, 999)) do
      local s = redis.pcall('GET', qbase .. 'f:' .. name .. ':share')
      local w, g = share(s)
      if w then sharers[#sharers + 1] = {name, w, g} elseif s then bad = bad + 1 end
    end
  end
end
local sumw, sumg, wme, gme = 0, 0, 0, 0
for _, c in ipairs(sharers) do
  sumw = sumw + c[2]
  sumg = sumg + c[3]
  if c[1] == consumer then wme, gme = c[2], c[3] end
end
-- Guarantees beyond the whole are scaled down to it.
local gscale = 1
if sumg > 100 then gscale = 100 / sumg end
local fair = 1
if quota ~= '' then
  fair = 0
  if wme > 0 then fair = gme * gscale / 100 + (wme / sumw) * math.max(0, 1 - sumg * gscale / 100) end
end

-- A consumer's demand on a bucket: its live members' together.
local function demand(name, suffix)
  local key = qbase .. 'f:' .. name .. ':' .. suffix .. ':d'
  local all = redis.pcall('HGETALL', key)
  if failed(all) then bad = bad + 1; return 0 end
  local sum = 0
  for j = 1, #all, 2 do
    local d, seen = string.match(all[j + 1], '^([^,]+),([^,]+)$')
    d, seen = num(d), num(seen)
    if d == nil or seen == nil or d < 0 then
      bad = bad + 1
      if name == consumer then redis.call('HDEL', key, all[j]) end
    elseif now - seen <= ttl then
      sum = sum + d
    elseif name == consumer then
      redis.call('HDEL', key, all[j])
    end
  end
  return sum
end
-- This consumer's rate of a quota bucket of `rate` per second.
local function allot(suffix, rate, asked)
  local own = mine .. suffix .. ':d'
  call('HSET', own, me, asked .. ',' .. now)
  redis.call('PEXPIRE', own, keep)
  local cap, got, mine_at = {}, {}, 0
  local left = rate
  for i, c in ipairs(sharers) do
    cap[i] = math.min(rate, demand(c[1], suffix) * 1.25)
    got[i] = math.min(cap[i], rate * c[3] * gscale / 100)
    left = left - got[i]
    if c[1] == consumer then mine_at = i end
  end
  if mine_at == 0 then return 0 end
  for _ = 1, #sharers do
    local w = 0
    for i, c in ipairs(sharers) do if got[i] < cap[i] then w = w + c[2] end end
    if w == 0 or left <= 0 then break end
    local full = false
    for i, c in ipairs(sharers) do
      if got[i] < cap[i] and cap[i] - got[i] <= left * c[2] / w then full = true end
    end
    if not full then
      for i, c in ipairs(sharers) do
        if got[i] < cap[i] then got[i] = got[i] + left * c[2] / w end
      end
      left = 0
      break
    end
    local before = left
    for i, c in ipairs(sharers) do
      if got[i] < cap[i] and cap[i] - got[i] <= before * c[2] / w then
        left = left - (cap[i] - got[i])
        got[i] = cap[i]
      end
    end
  end
  -- What nobody asks for goes, by weight, to those who ask at all, so they may grow into it.
  if left > 0 then
    local w = 0
    for i, c in ipairs(sharers) do if cap[i] > 0 then w = w + c[2] end end
    if w > 0 and cap[mine_at] > 0 then got[mine_at] = got[mine_at] + left * sharers[mine_at][2] / w end
  end
  return math.max(0, math.min(rate, got[mine_at]))
end

for i = 1, n do
  local key = KEYS[i]
  local b = (i - 1) * 6
  local rate, burst = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local ask, give, mode, asked = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5], tonumber(ARGV[b + 6])
  if quota ~= '' then
    local r = allot(string.sub(key, #mine + 1), rate, asked)
    burst = math.max(burst * r / rate, math.min(burst, 1))
    rate = r
  end
  local level = fill(key, rate, burst)
  level = math.min(level, burst)
  level = math.min(burst, level + give)
  if mode == 'd' then level = math.min(level, 0) end
  local grant = 0
  if ask > 0 and level > 0 then grant = math.min(ask, level) end
  level = level - grant
  redis.call('HSET', key, 'l', tostring(level), 't', tostring(now), 'r', tostring(rate), 'b', tostring(burst))
  redis.call('PEXPIRE', key, math.ceil((math.min(burst / math.max(rate, 0.001), 3600) + 60) * 1000))
  out[i] = tostring(grant)
end
out[n + 1] = redis.call('ZCARD', members)
out[n + 2] = bad
out[n + 3] = tostring(fair)
return out
";

/// Whether this replica shares its buckets through Redis right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Through Redis.
    Shared,
    /// Alone, with a share of each rate (Redis cannot be reached).
    Local,
}

impl Mode {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
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
pub(crate) enum Store {
    /// The LlmProxy's buckets (its limits, models, clients, endpoints).
    Proxy,
    /// The LlmQuota's buckets.
    Quota,
}

impl Store {
    /// Both stores, each served by a lessee of its own so that one Redis failing never stalls
    /// the other.
    pub(crate) const ALL: [Store; 2] = [Store::Proxy, Store::Quota];

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

    /// The key of its member set: the LlmProxy's replicas, among its own keys in either store.
    fn member_key(self, identity: &Identity, quota: Option<&QuotaPolicy>) -> String {
        match (self, quota) {
            (Store::Quota, Some(q)) => format!("llmproxy:q:{}:f:{}:members", q.name, identity.proxy),
            _ => format!("llmproxy:members:{}", identity.proxy),
        }
    }

    /// The LlmQuota whose buckets this store's exchanges carry.
    fn quota(self, quota: Option<&QuotaPolicy>) -> Option<&QuotaPolicy> {
        quota.filter(|_| self == Store::Quota)
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
pub(crate) struct SharedState {
    modes: std::sync::Mutex<[Option<Mode>; 2]>,
    members: [AtomicU32; 2],
}

impl SharedState {
    /// The current mode, `Local` while any store is out of reach; `None` without shared state.
    pub(crate) fn mode(&self) -> Option<Mode> {
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
    pub(crate) fn members(&self) -> u32 {
        let quota = self.members[Store::Quota.index()].load(Ordering::Relaxed);
        if quota > 0 { quota } else { self.members[Store::Proxy.index()].load(Ordering::Relaxed) }
    }

    fn report(&self, metrics: &crate::telemetry::metrics::Metrics) {
        if let Some(mode) = self.mode() {
            metrics.set_quota_mode(mode.label());
            metrics.quota_members.set(i64::from(self.members()));
        }
    }
}

/// One bucket unit's line in an exchange with Redis.
#[derive(Clone)]
struct Line {
    key: LeaseKey,
    unit: usize,
    redis_key: String,
    per_sec: f64,
    burst: f64,
    ask: f64,
    give: f64,
    mode: &'static str,
    /// This replica's demand per second (what it used, or more when requests wait).
    demand: f64,
}

/// What the lessee remembers about a stock between looks.
#[derive(Default)]
struct Seen {
    /// Recent use per second, smoothed.
    rate: [f64; 2],
    /// The demand last told an LlmQuota's store, and when.
    told: [(f64, Option<Instant>); 2],
}

/// Where and as whom a store's Redis is reached.
#[derive(Clone, PartialEq, Eq)]
struct Login {
    url: String,
    username: Option<String>,
    password: Option<String>,
}

/// A connection to a store's Redis and what it was opened with.
struct Conn {
    login: Login,
    manager: redis::aio::ConnectionManager,
}

/// A background try of a Redis that was out: a connection and a heartbeat through the script,
/// then the live member count.
type Probe = tokio::task::JoinHandle<redis::RedisResult<(Conn, Answer)>>;

/// The lessee of one store: keeps this replica's stocks of that store's buckets topped up.
struct Lessee {
    store: Store,
    identity: Identity,
    state: Arc<SharedState>,
    script: redis::Script,
    conn: Option<Conn>,
    mode: Mode,
    members: u32,
    /// This consumer's part of the LlmQuota with every consumer busy, as Redis last said (1 for
    /// the LlmProxy's own buckets): the rate it admits alone.
    fair: f64,
    seen: HashMap<LeaseKey, Seen>,
    last: Instant,
    last_try: Instant,
    last_beat: Instant,
    /// Until when, back from an outage, this replica admits only its local share and keeps
    /// the shared buckets it uses empty (`d`), so that neither the replicas still alone nor a
    /// bucket that filled while nobody drew on it bring a burst.
    settle_until: Option<Instant>,
    /// While out: the try of Redis in flight, off the admission path.
    probe: Option<Probe>,
}

/// What the lessee needs of the proxy for one look.
struct Look<'a> {
    login: Login,
    replicas: u32,
    admission: &'a crate::admission::queue::Admission,
    quota: Option<&'a QuotaPolicy>,
    metrics: &'a Arc<crate::telemetry::metrics::Metrics>,
}

/// What a lessee needs of the proxy it serves, and no more: the proxy implements it, so the
/// lessee depends on this module's view of it, not on the proxy.
pub(crate) trait Host: Send + Sync + 'static {
    /// The policy in force.
    fn policy(&self) -> Arc<Policy>;
    /// A loaded Secret's value (the Redis password).
    fn secret_value(&self, secret: &str, key: &str) -> Option<String>;
    /// The replicas the cluster reports, `fallback` until it has.
    fn replicas(&self, fallback: u32) -> u32;
    /// The admission gate whose stocks the lessee keeps.
    fn admission(&self) -> &Arc<crate::admission::queue::Admission>;
    /// Where the lessee reports.
    fn metrics(&self) -> &Arc<crate::telemetry::metrics::Metrics>;
}

/// Runs the lessee of `store` for `host` until it is dropped; follows its policy (a new Redis
/// URL or password reconnects). `identity` names the buckets.
pub(crate) async fn run(proxy: Weak<dyn Host>, identity: Identity, state: Arc<SharedState>, store: Store) {
    let now = Instant::now();
    let mut lessee = Lessee {
        store,
        members: identity.replicas.max(1),
        identity,
        state,
        script: redis::Script::new(SCRIPT),
        conn: None,
        mode: Mode::Shared,
        fair: 1.0,
        seen: HashMap::new(),
        last: now,
        last_try: now.checked_sub(RETRY_REDIS).unwrap_or(now),
        last_beat: now.checked_sub(RETRY_REDIS).unwrap_or(now),
        settle_until: None,
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
        let replicas = proxy_now.replicas(lessee.identity.replicas);
        let admission = Arc::clone(proxy_now.admission());
        let metrics = Arc::clone(proxy_now.metrics());
        drop(proxy_now);
        let login = Login { url: redis.url.clone(), username: redis.username.clone(), password };
        let look =
            Look { login, replicas, admission: &admission, quota: p.quota.as_ref(), metrics: &metrics };
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
        if self.conn.as_ref().is_some_and(|c| c.login != look.login) {
            // A new Redis or password: reconnect (a probe for the old one is of no use).
            self.conn = None;
            if let Some(p) = self.probe.take() {
                p.abort();
            }
        }
        let (store, identity) = (self.store, &self.identity);
        let seen = &mut self.seen;
        let Some(lines) = look.admission.with_leases(|l| plan(l, seen, now, dt, identity, look.quota, store))
        else {
            return false;
        };
        if self.mode == Mode::Shared {
            if self.conn.is_none() {
                match connect(&look.login).await {
                    Ok(manager) => self.conn = Some(Conn { login: look.login.clone(), manager }),
                    Err(e) => self.go_local(now, &redacted(&e.to_string()), look.replicas),
                }
            }
            let due = !lines.is_empty() || now.duration_since(self.last_beat) >= RETRY_REDIS;
            if let Some(c) = self.conn.as_mut().filter(|_| due) {
                let settling = self.settle_until.is_some_and(|u| now < u);
                let dry: Vec<Line>;
                let send = if settling {
                    dry = lines.iter().map(|l| Line { ask: 0.0, mode: "d", ..l.clone() }).collect();
                    &dry
                } else {
                    self.settle_until = None;
                    &lines
                };
                let member_key = store.member_key(&self.identity, look.quota);
                let call = exchange(
                    &self.script,
                    &mut c.manager,
                    send,
                    &member_key,
                    &self.identity,
                    store.quota(look.quota),
                    look.metrics,
                );
                match tokio::time::timeout(REDIS_TIMEOUT, call).await {
                    Ok(Ok(answer)) => {
                        self.members = answer.members;
                        self.fair = answer.fair;
                        self.last_beat = now;
                        if settling {
                            let share = f64::from(self.members.max(look.replicas).max(1)) / self.fair;
                            fill_locally(look.admission, &lines, dt, share);
                        } else {
                            grant(look.admission, &lines, &answer.grants);
                        }
                    }
                    Ok(Err(e)) => self.go_local(now, &redacted(&e.to_string()), look.replicas),
                    Err(_) => self.go_local(now, "no answer in time", look.replicas),
                }
            }
        }
        if self.mode == Mode::Local {
            // Alone: what was asked of Redis is handed out here, at a share of the rate: the
            // replica's part of this LlmProxy's (and of its part of an LlmQuota's).
            let share = f64::from(self.members.max(look.replicas).max(1)) / self.fair;
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
                Some(Ok(Ok((conn, answer)))) if conn.login == look.login => {
                    tracing::info!("Redis is back; sharing {} limits through it again", self.store.label());
                    self.conn = Some(conn);
                    self.mode = Mode::Shared;
                    self.members = answer.members;
                    self.fair = answer.fair;
                    self.last_beat = now;
                    self.settle_until = now.checked_add(SETTLE);
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
            let login = look.login.clone();
            let script = self.script.clone();
            let member_key = self.store.member_key(&self.identity, look.quota);
            let identity = self.identity.clone();
            let quota = self.store.quota(look.quota).cloned();
            let metrics = Arc::clone(look.metrics);
            self.probe = Some(tokio::spawn(async move {
                let mut manager = connect(&login).await?;
                let beat =
                    exchange(&script, &mut manager, &[], &member_key, &identity, quota.as_ref(), &metrics);
                let answer = tokio::time::timeout(REDIS_TIMEOUT, beat)
                    .await
                    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "no answer in time")))??;
                Ok((Conn { login, manager }, answer))
            }));
        }
    }
}

/// Add what Redis granted to the stocks: never more than asked, whatever the store answers.
fn grant(admission: &crate::admission::queue::Admission, lines: &[Line], grants: &[f64]) {
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
fn fill_locally(admission: &crate::admission::queue::Admission, lines: &[Line], dt: f64, share: f64) {
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

async fn connect(login: &Login) -> redis::RedisResult<redis::aio::ConnectionManager> {
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
            // An LlmQuota divides its rate by the consumers' demands: tell it when this
            // replica's changed, and at least once a second while there is any (an untold
            // demand lapses after the member TTL).
            let demand = if idle { 0.0 } else { s.rate[unit].max(stock.want[unit] / LEASE_WINDOW) };
            let (told, at) = s.told[unit];
            let tell = store == Store::Quota
                && ((demand - told).abs() > 0.2 * told.max(1.0)
                    || (told > 0.0 && at.is_none_or(|at| now.duration_since(at) >= RETRY_REDIS)));
            if ask <= 0.0 && give <= 0.0 && !is_dry && !tell {
                continue;
            }
            if store == Store::Quota {
                s.told[unit] = (demand, Some(now));
            }
            let mode = if is_dry { "d" } else { "g" };
            lines.push(Line {
                key: key.clone(),
                unit,
                redis_key: redis_key(key, unit, identity, quota),
                per_sec,
                burst,
                ask,
                give,
                mode,
                demand,
            });
        }
    }
    lines
}

/// The Redis key of a bucket unit. An LlmProxy's are under its namespace and name; its share
/// of an LlmQuota's under the quota's name and its own.
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
        LeaseKey::Quota => format!("llmproxy:q:{q}:f:{p}:total:{u}"),
        LeaseKey::QuotaModel(m) => format!("llmproxy:q:{q}:f:{p}:model:{m}:{u}"),
    }
}

/// What one exchange with Redis answered.
#[derive(Debug, PartialEq)]
struct Answer {
    /// Units granted per line.
    grants: Vec<f64>,
    /// Live members of the member set.
    members: u32,
    /// This consumer's part of an LlmQuota with every consumer busy (1 for an LlmProxy's own).
    fair: f64,
}

/// One call of the script. `quota` is the LlmQuota whose buckets `lines` are, `None` for the
/// LlmProxy's own.
async fn exchange(
    script: &redis::Script,
    conn: &mut redis::aio::ConnectionManager,
    lines: &[Line],
    member_key: &str,
    identity: &Identity,
    quota: Option<&llmproxy_api::policy::QuotaPolicy>,
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
    use super::*;
    use crate::admission::limiter::RateConfig;

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
