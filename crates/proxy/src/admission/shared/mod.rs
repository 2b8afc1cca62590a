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

mod exchange;
mod plan;
mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use llmproxy_api::policy::{Policy, QuotaPolicy};
use llmproxy_api::redis_acl::redacted;
use tokio::time::Instant;

use crate::admission::limiter::lease::LeaseKey;

use self::exchange::{Answer, Conn, Line, Login, REDIS_TIMEOUT, RETRY_REDIS, SCRIPT, connect, exchange};
use self::plan::{Seen, plan};
pub use self::store::Identity;
pub(crate) use self::store::Store;

/// The lessee's pace when nothing asks it to hurry.
const TICK: Duration = Duration::from_millis(25);
/// How often an idle lessee (no shared state configured) looks at the policy again.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// How long a replica back from an outage goes on admitting only its local share: long enough
/// for every other replica's next try (one a second, each up to a connect and an answer's
/// timeout) to bring it back too. Drawing on Redis while another replica still admits alone
/// would take the whole rate on top of that replica's share.
const SETTLE: Duration = RETRY_REDIS.saturating_add(REDIS_TIMEOUT.saturating_mul(3)).saturating_add(TICK);

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
                let send: std::borrow::Cow<'_, [Line]> = if settling {
                    lines.iter().map(|l| Line { ask: 0.0, mode: "d", ..l.clone() }).collect()
                } else {
                    self.settle_until = None;
                    std::borrow::Cow::Borrowed(&lines)
                };
                let member_key = store.member_key(&self.identity, look.quota);
                let call = exchange(
                    &self.script,
                    &mut c.manager,
                    &send,
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
                            self.fill_alone(&look, &lines, dt);
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
            self.fill_alone(&look, &lines, dt);
            self.try_again(now, &look);
        }
        true
    }

    /// The pods this replica assumes divide each rate while it admits alone: the members Redis
    /// last counted, or the replicas the cluster reports, whichever is more.
    fn sharers(&self, replicas: u32) -> u32 {
        self.members.max(replicas).max(1)
    }

    /// Alone (Redis out, or settling back): hand out what was asked of Redis here, at this
    /// replica's part of this LlmProxy's rate (and of its consumer's part of an LlmQuota's).
    fn fill_alone(&self, look: &Look<'_>, lines: &[Line], dt: f64) {
        fill_locally(look.admission, lines, dt, f64::from(self.sharers(look.replicas)) / self.fair);
    }

    /// Redis is out of reach: go on alone from this moment, with a local share of each rate.
    fn go_local(&mut self, now: Instant, why: &str, replicas: u32) {
        tracing::warn!(
            error = %why,
            "Redis cannot be reached; enforcing a local share of {} shared limits (1/{})",
            self.store.label(),
            self.sharers(replicas)
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
