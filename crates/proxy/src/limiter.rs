//! Request and token buckets (GCRA-equivalent token buckets that may go into debt), the
//! concurrency cap and the upstream's pauses. Pure: every method takes `now`, so tests drive a
//! fake clock. Governor's GCRA cannot give tokens back or charge a request larger than the burst,
//! and settling token reservations against real usage needs both, hence this small type.
//!
//! The buckets follow the upstream's own count: a request is charged what the provider charges
//! (see `limits.tokenAccounting`), and whatever the upstream says remains (its
//! `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` headers) lowers a bucket that ran ahead.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use llmproxy_api::TokenAccounting;
use llmproxy_api::policy::LimitsPolicy;
use tokio::time::Instant;

use crate::quota::QuotaHeaders;

/// Which limit held a request back; named in 429 messages and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `limits.requestsPerMinute` / `burst`.
    Requests,
    /// `limits.tokensPerMinute`.
    Tokens,
    /// `limits.maxConcurrent`.
    Concurrency,
    /// The upstream asked to wait (429 with Retry-After) for what the request needs.
    UpstreamPause,
    /// `queue.maxSize`.
    QueueSize,
    /// `queue.maxBytes`.
    QueueBytes,
    /// The client's own `requestsPerMinute`.
    ClientRequests,
    /// The client's own `tokensPerMinute`.
    ClientTokens,
}

impl Limit {
    /// Every limit, for initialising metric series.
    pub const ALL: [Limit; 8] = [
        Limit::Requests,
        Limit::Tokens,
        Limit::Concurrency,
        Limit::UpstreamPause,
        Limit::QueueSize,
        Limit::QueueBytes,
        Limit::ClientRequests,
        Limit::ClientTokens,
    ];

    /// A low-cardinality label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests_per_minute",
            Limit::Tokens => "tokens_per_minute",
            Limit::Concurrency => "max_concurrent",
            Limit::UpstreamPause => "upstream_retry_after",
            Limit::QueueSize => "queue_size",
            Limit::QueueBytes => "queue_bytes",
            Limit::ClientRequests => "client_requests_per_minute",
            Limit::ClientTokens => "client_tokens_per_minute",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Requests => "the requests-per-minute limit",
            Limit::Tokens => "the tokens-per-minute limit",
            Limit::Concurrency => "the max-concurrent-requests limit",
            Limit::UpstreamPause => "the upstream's Retry-After",
            Limit::QueueSize => "the queue size limit",
            Limit::QueueBytes => "the queue's memory budget (queue.maxBytes)",
            Limit::ClientRequests => "this client's requests-per-minute cap",
            Limit::ClientTokens => "this client's tokens-per-minute cap",
        })
    }
}

/// What one request asks of the limiter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// Tokens charged at admission.
    pub tokens: u64,
    /// The model it is for; pauses (and model limits) apply per model.
    pub model: Option<Arc<str>>,
    /// The client it is from (`None`: no client identified); client caps apply per client.
    pub client: Option<Arc<str>>,
}

impl Ask {
    /// An ask for `tokens` with no model and no client.
    pub fn tokens(tokens: u64) -> Self {
        Self { tokens, model: None, client: None }
    }
}

/// What a hold applies to, when it does not apply to everyone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    /// One model (an upstream pause).
    Model(Arc<str>),
    /// One client (its own cap).
    Client(Option<Arc<str>>),
}

/// A client's own caps.
#[derive(Debug)]
struct Caps {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// The caps they were built for, to tell a reload that changes them.
    per_minute: (Option<u64>, Option<u64>),
}

impl Caps {
    fn new(per_minute: (Option<u64>, Option<u64>), now: Instant) -> Self {
        let bucket =
            |pm: Option<u64>| pm.map(|pm| Bucket::full(pm, llmproxy_api::policy::per_second(pm), now));
        Self { requests: bucket(per_minute.0), tokens: bucket(per_minute.1), per_minute }
    }
}

/// The most clients with caps tracked at once; idle ones beyond it are forgotten.
const MAX_CLIENT_CAPS: usize = 10_000;

/// A token bucket: `cap` units, refilled at `per_sec`, allowed to go negative so that a cost
/// larger than the bucket is admitted once the bucket is full and then paid off over time.
/// `spent` counts every unit charged minus every charge given back (not the corrections from
/// upstream headers), so a correction can tell what was charged after a given moment.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    per_sec: f64,
    cap: f64,
    level: f64,
    at: Instant,
    spent: f64,
}

#[allow(clippy::cast_precision_loss)] // rates and costs are far below 2^52
impl Bucket {
    pub(crate) fn full(per_minute: u64, cap: u64, now: Instant) -> Self {
        let cap = cap.max(1) as f64;
        Self { per_sec: per_minute as f64 / 60.0, cap, level: cap, at: now, spent: 0.0 }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.at {
            let dt = now.duration_since(self.at).as_secs_f64();
            self.level = (self.level + dt * self.per_sec).min(self.cap);
            self.at = now;
        }
    }

    /// The earliest time `cost` can be taken.
    pub(crate) fn ready_at(&mut self, now: Instant, cost: u64) -> Instant {
        self.refill(now);
        let need = (cost as f64).min(self.cap);
        let missing = need - self.level;
        if missing <= 1e-6 {
            return now;
        }
        // Whole microseconds, rounded up (after forgiving float noise far below a microsecond).
        let micros = (missing / self.per_sec * 1e6 - 1e-3).ceil();
        // A wait beyond a day is as good as never; it also keeps the conversion in range.
        now + Duration::from_micros(micros.min(86_400e6) as u64)
    }

    pub(crate) fn take(&mut self, now: Instant, cost: u64) {
        self.refill(now);
        self.level -= cost as f64;
        self.spent += cost as f64;
    }

    pub(crate) fn give(&mut self, now: Instant, amount: u64) {
        self.refill(now);
        self.level = (self.level + amount as f64).min(self.cap);
        self.spent -= amount as f64;
    }

    /// The upstream says at most `ceiling` units are left now: never more here.
    fn lower_to(&mut self, now: Instant, ceiling: f64) {
        self.refill(now);
        if ceiling < self.level {
            self.level = ceiling;
        }
    }

    /// The upstream says `target` units are left now, more than here: raise the level by up to
    /// `most` (refunds that were withheld until the upstream confirmed them). Returns the raise.
    fn raise_to(&mut self, now: Instant, target: f64, most: f64) -> f64 {
        self.refill(now);
        let raise = (target.min(self.cap) - self.level).clamp(0.0, most.max(0.0));
        self.level += raise;
        raise
    }

    /// What the upstream's `remaining` and `reset` (time until full) say about the level now,
    /// as a range. The upstream measured them after the request was charged here (`since`
    /// ago) and before it answered; of what was charged here since (`charged_after`), it may
    /// have seen any part (requests overtake each other on the way), and of the earlier charges
    /// still unanswered when this one was charged (`unseen_before`), maybe none. The low end
    /// assumes it saw none of those and has refilled nothing since; the high end that it saw
    /// everything and refilled all along, so lowering to it never takes more than the
    /// upstream itself would.
    fn upstream_level(
        &self,
        q: (Option<u64>, Option<Duration>),
        since: Duration,
        charged_after: f64,
        unseen_before: f64,
    ) -> Option<(f64, f64)> {
        let by_remaining = q.0.map(|r| r as f64);
        let by_reset = q.1.map(|d| self.cap - d.as_secs_f64() * self.per_sec);
        let then = match (by_remaining, by_reset) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let low = then.min(self.cap) - charged_after - unseen_before;
        let high = (then + since.as_secs_f64() * self.per_sec).min(self.cap);
        Some((low, high))
    }

    fn reconfigure(&mut self, now: Instant, per_minute: u64, cap: u64) {
        self.refill(now);
        self.per_sec = per_minute as f64 / 60.0;
        self.cap = cap.max(1) as f64;
        self.level = self.level.min(self.cap);
    }

    /// Units available now (negative while in debt).
    pub(crate) fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }
}

/// What the head of the queue should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Admit now.
    Go,
    /// Nothing can change before `at` unless the limits are reloaded or corrected. With a
    /// `scope`, only requests of that scope (a model, a client) are held; others may go ahead.
    Wait { at: Instant, limit: Limit, scope: Option<Scope> },
    /// All concurrency slots are taken; wait for one to be released.
    WaitForSlot,
}

/// Where the bucket levels stood right after a request was charged, so that the upstream's
/// answer to it can be compared with what was charged since.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark {
    at: Instant,
    requests: f64,
    tokens: f64,
    /// Admission order, for telling which charges came before this one.
    pub(crate) order: u64,
    /// Token charges of earlier requests still unanswered when this one was charged: any of
    /// them may reach the upstream after this one.
    unseen_before: u64,
}

/// What a correction from upstream headers needs besides the headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Calibration {
    /// Where the buckets stood right after the request was charged.
    pub(crate) mark: Mark,
    /// Tokens given back since because the upstream did not count the request.
    pub(crate) refunded: u64,
    /// The upstream refused the request for lack of quota (a 429).
    pub(crate) refused: bool,
    /// The longest reset taken at its word.
    pub(crate) max_reset: Duration,
}

/// The most distinct models paused at once; beyond it the oldest pauses are forgotten (a
/// client cannot grow the map without bound by naming models).
const MAX_PAUSES: usize = 1024;

/// All limits of one LlmProxy, as seen by one replica.
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: LimitsPolicy,
    requests: Bucket,
    tokens: Option<Bucket>,
    /// The upstream paused everything this key does (a 429 for a request without a model).
    key_paused_until: Option<Instant>,
    /// The upstream paused one model.
    model_paused_until: HashMap<Arc<str>, Instant>,
    inflight: u32,
    /// The upstream reports what remains of its token quota (`x-ratelimit-remaining-tokens`):
    /// under `used` accounting its word, not our guess, decides when unused tokens return.
    upstream_reports_tokens: bool,
    /// Unused tokens not yet given back, waiting for the upstream's headers to confirm them
    /// (at most one bucket's worth).
    withheld: f64,
    /// Token charges of admitted requests whose answer has not come yet, by admission order.
    unanswered: BTreeMap<u64, u64>,
    next_order: u64,
    /// Client caps, by the client's settings in force.
    clients: Option<llmproxy_api::policy::ClientsPolicy>,
    caps: HashMap<Option<Arc<str>>, Caps>,
}

impl Limiter {
    pub(crate) fn new(limits: &LimitsPolicy, now: Instant) -> Self {
        Self {
            requests: Bucket::full(limits.requests_per_minute, limits.request_burst, now),
            tokens: limits.tokens_per_minute.map(|tpm| Bucket::full(tpm, limits.token_burst, now)),
            limits: limits.clone(),
            key_paused_until: None,
            model_paused_until: HashMap::new(),
            inflight: 0,
            upstream_reports_tokens: false,
            withheld: 0.0,
            unanswered: BTreeMap::new(),
            next_order: 0,
            clients: None,
            caps: HashMap::new(),
        }
    }

    /// The caps of a client under the settings in force (`None` when it has none).
    fn caps(&mut self, client: &Option<Arc<str>>, now: Instant) -> Option<&mut Caps> {
        let per_minute = {
            let clients = self.clients.as_ref()?;
            let p = client.as_deref().map_or(&clients.default, |name| clients.client(name));
            (p.requests_per_minute, p.tokens_per_minute)
        };
        if per_minute == (None, None) {
            return None;
        }
        if self.caps.len() >= MAX_CLIENT_CAPS && !self.caps.contains_key(client) {
            // Forget caps that have fully refilled (nothing to remember about them).
            self.caps.retain(|_, c| {
                c.requests.as_mut().is_some_and(|b| b.level(now) < b.cap)
                    || c.tokens.as_mut().is_some_and(|b| b.level(now) < b.cap)
            });
        }
        let caps = self.caps.entry(client.clone()).or_insert_with(|| Caps::new(per_minute, now));
        if caps.per_minute != per_minute {
            *caps = Caps::new(per_minute, now);
        }
        Some(caps)
    }

    /// Put the client settings in force (their caps follow at each client's next request).
    pub(crate) fn set_clients(&mut self, clients: Option<llmproxy_api::policy::ClientsPolicy>) {
        if self.clients != clients {
            self.clients = clients;
        }
    }

    pub(crate) fn decide(&mut self, now: Instant, ask: &Ask) -> Decision {
        if self.inflight >= self.limits.max_concurrent {
            return Decision::WaitForSlot;
        }
        let mut at = now;
        let mut why = Limit::Requests;
        if let Some(until) = self.key_paused_until.filter(|u| *u > now) {
            (at, why) = (until, Limit::UpstreamPause);
        }
        let r = self.requests.ready_at(now, 1);
        if r > at {
            (at, why) = (r, Limit::Requests);
        }
        if let Some(bucket) = &mut self.tokens {
            let t = bucket.ready_at(now, ask.tokens);
            if t > at {
                (at, why) = (t, Limit::Tokens);
            }
        }
        if at > now {
            return Decision::Wait { at, limit: why, scope: None };
        }
        if let Some(caps) = self.caps(&ask.client, now) {
            let r = caps.requests.as_mut().map_or(now, |b| b.ready_at(now, 1));
            let t = caps.tokens.as_mut().map_or(now, |b| b.ready_at(now, ask.tokens));
            let (at, limit) = if t > r { (t, Limit::ClientTokens) } else { (r, Limit::ClientRequests) };
            if at > now {
                return Decision::Wait { at, limit, scope: Some(Scope::Client(ask.client.clone())) };
            }
        }
        let paused = ask.model.as_ref().and_then(|m| self.model_paused_until.get(m)).filter(|u| **u > now);
        match (paused, &ask.model) {
            (Some(until), Some(model)) => Decision::Wait {
                at: *until,
                limit: Limit::UpstreamPause,
                scope: Some(Scope::Model(Arc::clone(model))),
            },
            _ => Decision::Go,
        }
    }

    /// Take one request, the ask's tokens and a concurrency slot. Call after `decide` said Go.
    pub(crate) fn admit(&mut self, now: Instant, ask: &Ask) -> Mark {
        self.requests.take(now, 1);
        if let Some(bucket) = &mut self.tokens {
            bucket.take(now, ask.tokens);
        }
        if let Some(caps) = self.caps(&ask.client, now) {
            if let Some(b) = &mut caps.requests {
                b.take(now, 1);
            }
            if let Some(b) = &mut caps.tokens {
                b.take(now, ask.tokens);
            }
        }
        self.inflight += 1;
        let order = self.next_order;
        self.next_order += 1;
        let unseen_before = self.unanswered.values().fold(0u64, |a, t| a.saturating_add(*t));
        if self.tokens.is_some() {
            self.unanswered.insert(order, ask.tokens);
        }
        Mark {
            at: now,
            requests: self.requests.spent,
            tokens: self.tokens.as_ref().map_or(0.0, |b| b.spent),
            order,
            unseen_before,
        }
    }

    /// The request of `mark` got its answer (or will get none): it no longer counts as possibly
    /// unseen by the upstream.
    pub(crate) fn answered(&mut self, mark: &Mark) {
        self.unanswered.remove(&mark.order);
    }

    pub(crate) fn release(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// The upstream charged nothing for an attempt (it refused it, or never saw it): its
    /// tokens go back. The request itself stays counted.
    pub(crate) fn refund(&mut self, now: Instant, client: &Option<Arc<str>>, tokens: u64) {
        if let Some(bucket) = &mut self.tokens {
            bucket.give(now, tokens);
        }
        if let Some(b) = self.caps(client, now).and_then(|c| c.tokens.as_mut()) {
            b.give(now, tokens);
        }
    }

    /// The answer is complete: under `used` accounting its charge becomes its real usage.
    /// Returns the charge that stands. Where the upstream reports its own count, unused tokens
    /// are withheld until its headers show them back (a provider that does not refund, though
    /// configured as one that does, then never lets the proxy run ahead of it).
    pub(crate) fn settle(
        &mut self,
        now: Instant,
        client: &Option<Arc<str>>,
        reserved: u64,
        used: Option<u64>,
    ) -> u64 {
        let (TokenAccounting::Used, Some(used)) = (self.limits.token_accounting, used) else {
            return reserved;
        };
        // A client's own cap is the proxy's alone: it follows the real usage at once.
        if let Some(b) = self.caps(client, now).and_then(|c| c.tokens.as_mut()) {
            if used < reserved {
                b.give(now, reserved - used);
            } else {
                b.take(now, used - reserved);
            }
        }
        if let Some(bucket) = &mut self.tokens {
            if used < reserved {
                if self.upstream_reports_tokens {
                    #[allow(clippy::cast_precision_loss)]
                    let unused = (reserved - used) as f64;
                    self.withheld = (self.withheld + unused).min(bucket.cap);
                } else {
                    bucket.give(now, reserved - used);
                }
            } else {
                bucket.take(now, used - reserved);
            }
        }
        used
    }

    /// Hold requests for `model` (or, without a model, everything) until `until`.
    pub(crate) fn pause(&mut self, now: Instant, model: Option<&Arc<str>>, until: Instant) {
        let Some(model) = model else {
            self.key_paused_until = Some(self.key_paused_until.map_or(until, |p| p.max(until)));
            return;
        };
        if self.model_paused_until.len() >= MAX_PAUSES {
            self.model_paused_until.retain(|_, u| *u > now);
        }
        if self.model_paused_until.len() >= MAX_PAUSES
            && let Some(oldest) =
                self.model_paused_until.iter().min_by_key(|(_, u)| **u).map(|(m, _)| m.clone())
        {
            self.model_paused_until.remove(&oldest);
        }
        let entry = self.model_paused_until.entry(Arc::clone(model)).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Follow what the upstream says remains. `mark` is where the buckets stood right after
    /// the request was charged; `refunded` is what was given back here since because the
    /// upstream did not count the request (a 429), so not a charge by anyone else. `refused`:
    /// the upstream just refused a request for lack of quota, so the buckets go down to its
    /// word at once; after a success they go down only past what is still in flight (requests
    /// overtake each other, and the upstream's count of them lags). Resets longer than
    /// `max_reset` count as `max_reset`, so a hostile header cannot freeze admission beyond one
    /// queue wait at a time. Under `used` accounting, withheld unused tokens come back as far
    /// as the upstream surely has them.
    pub(crate) fn calibrate(&mut self, now: Instant, q: &QuotaHeaders, c: Calibration) {
        let since = now.saturating_duration_since(c.mark.at);
        let cap = |d: Option<Duration>| d.map(|d| d.min(c.max_reset));
        #[allow(clippy::cast_precision_loss)]
        let unseen_before = c.mark.unseen_before as f64;
        self.unanswered.remove(&c.mark.order);
        // A refusal is decisive: what was charged here since it was measured comes on top of
        // what the upstream said was left. A success only caps the level at the upstream's
        // most favourable reading, since later requests may have overtaken it.
        let ceiling = |high: f64, charged_after: f64| if c.refused { high - charged_after } else { high };

        let q_requests = (q.remaining_requests, cap(q.reset_requests));
        let charged_after = self.requests.spent - c.mark.requests;
        if let Some((_, high)) = self.requests.upstream_level(q_requests, since, charged_after, 0.0) {
            self.requests.lower_to(now, ceiling(high, charged_after));
        }
        if let Some(bucket) = &mut self.tokens {
            #[allow(clippy::cast_precision_loss)]
            let charged_after = bucket.spent - c.mark.tokens + c.refunded as f64;
            let q_tokens = (q.remaining_tokens, cap(q.reset_tokens));
            if let Some((low, high)) = bucket.upstream_level(q_tokens, since, charged_after, unseen_before) {
                bucket.lower_to(now, ceiling(high, charged_after));
                if self.limits.token_accounting == TokenAccounting::Used && self.upstream_reports_tokens {
                    self.withheld -= bucket.raise_to(now, low, self.withheld);
                }
            }
            if q.remaining_tokens.is_some() {
                self.upstream_reports_tokens = true;
            }
        }
    }

    /// Apply new limits. Bucket levels carry over (clamped to the new capacity), so a reload
    /// that leaves the limits alone changes nothing. Returns whether anything changed.
    pub(crate) fn reconfigure(&mut self, limits: &LimitsPolicy, now: Instant) -> bool {
        if *limits == self.limits {
            return false;
        }
        self.requests.reconfigure(now, limits.requests_per_minute, limits.request_burst);
        self.tokens = match (self.tokens.take(), limits.tokens_per_minute) {
            (Some(mut b), Some(tpm)) => {
                b.reconfigure(now, tpm, limits.token_burst);
                Some(b)
            }
            (None, Some(tpm)) => Some(Bucket::full(tpm, limits.token_burst, now)),
            (_, None) => None,
        };
        self.limits = limits.clone();
        true
    }

    pub(crate) fn limits(&self) -> &LimitsPolicy {
        &self.limits
    }

    pub(crate) fn inflight(&self) -> u32 {
        self.inflight
    }

    /// Tokens available now, `None` when tokens are unlimited.
    pub(crate) fn tokens_available(&mut self, now: Instant) -> Option<f64> {
        self.tokens.as_mut().map(|b| b.level(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: u64, burst: u64, tpm: Option<u64>, token_burst: u64, max_concurrent: u32) -> LimitsPolicy {
        LimitsPolicy {
            request_burst: burst,
            token_burst,
            max_concurrent,
            ..LimitsPolicy::per_minute(rpm, tpm)
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn wait(at: Instant, limit: Limit) -> Decision {
        Decision::Wait { at, limit, scope: None }
    }

    #[test]
    fn burst_then_paced_at_the_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(600, 3, None, 0, 100), t0); // 10/s, burst 3
        for _ in 0..3 {
            assert_eq!(l.decide(t0, &Ask::tokens(0)), Decision::Go);
            l.admit(t0, &Ask::tokens(0));
        }
        assert_eq!(l.decide(t0, &Ask::tokens(0)), wait(t0 + ms(100), Limit::Requests));
        assert_eq!(l.decide(t0 + ms(99), &Ask::tokens(0)), wait(t0 + ms(100), Limit::Requests));
        assert_eq!(l.decide(t0 + ms(100), &Ask::tokens(0)), Decision::Go);
    }

    #[test]
    fn a_minute_of_requests_takes_a_minute() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(60, 1, None, 0, 100), t0);
        let mut now = t0;
        for _ in 0..61 {
            match l.decide(now, &Ask::tokens(0)) {
                Decision::Go => {}
                Decision::Wait { at, .. } => now = at,
                Decision::WaitForSlot => panic!("no concurrency limit here"),
            }
            l.admit(now, &Ask::tokens(0));
            l.release();
        }
        assert_eq!(now.duration_since(t0), Duration::from_secs(60));
    }

    #[test]
    fn requested_accounting_keeps_the_charge_used_settles_it() {
        let t0 = Instant::now();
        // 6000 TPM = 100 tokens/s, bucket of 100.
        let mut l = Limiter::new(&limits(6000, 100, Some(6000), 100, 100), t0);
        l.admit(t0, &Ask::tokens(80));
        assert_eq!(l.decide(t0, &Ask::tokens(80)), wait(t0 + ms(600), Limit::Tokens));
        assert_eq!(l.settle(t0, &None, 80, Some(20)), 80, "requested: the charge stands");
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(20.0));

        let mut used = limits(6000, 100, Some(6000), 100, 100);
        used.token_accounting = TokenAccounting::Used;
        let mut l = Limiter::new(&used, t0);
        l.admit(t0, &Ask::tokens(80));
        assert_eq!(l.settle(t0, &None, 80, Some(20)), 20);
        assert_eq!(l.decide(t0, &Ask::tokens(80)), Decision::Go, "the unused 60 came back");
        l.admit(t0, &Ask::tokens(80));
        assert_eq!(l.settle(t0, &None, 80, Some(100)), 100, "using more than charged costs more");
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-20.0));
        assert_eq!(l.settle(t0, &None, 80, None), 80, "no usage: the charge stands, never more");
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_goes_into_debt() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, Some(6000), 100, 100), t0);
        l.admit(t0, &Ask::tokens(50));
        assert_eq!(l.decide(t0, &Ask::tokens(1000)), wait(t0 + ms(500), Limit::Tokens));
        l.admit(t0 + ms(500), &Ask::tokens(1000));
        // 900 tokens of debt at 100/s: the next small request waits 9 s + its own cost.
        assert_eq!(l.decide(t0 + ms(500), &Ask::tokens(10)), wait(t0 + ms(9600), Limit::Tokens));
    }

    #[test]
    fn concurrency_slots() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, None, 0, 2), t0);
        l.admit(t0, &Ask::tokens(0));
        l.admit(t0, &Ask::tokens(0));
        assert_eq!(l.decide(t0, &Ask::tokens(0)), Decision::WaitForSlot);
        l.release();
        assert_eq!(l.decide(t0, &Ask::tokens(0)), Decision::Go);
    }

    #[test]
    fn pauses_hold_their_scope_only_and_never_shorten() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, None, 0, 10), t0);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let ask = |m: &Arc<str>| Ask { tokens: 0, model: Some(Arc::clone(m)), client: None };
        l.pause(t0, Some(&a), t0 + Duration::from_secs(2));
        l.pause(t0, Some(&a), t0 + Duration::from_secs(1));
        let held = Decision::Wait {
            at: t0 + Duration::from_secs(2),
            limit: Limit::UpstreamPause,
            scope: Some(Scope::Model(Arc::clone(&a))),
        };
        assert_eq!(l.decide(t0, &ask(&a)), held);
        assert_eq!(l.decide(t0, &ask(&b)), Decision::Go);
        assert_eq!(l.decide(t0 + Duration::from_secs(2), &ask(&a)), Decision::Go);
        // Without a model the whole key is paused: everyone waits.
        l.pause(t0, None, t0 + Duration::from_secs(3));
        assert_eq!(l.decide(t0, &ask(&b)), wait(t0 + Duration::from_secs(3), Limit::UpstreamPause));
    }

    #[test]
    fn a_client_at_its_cap_waits_alone() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, Some(600_000), 10_000, 100), t0);
        let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 6000}\nclients:\n  overrides: [{name: capped, requestsPerMinute: 60}]\n";
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
        l.set_clients(llmproxy_api::Policy::from_spec(&spec).ok().and_then(|p| p.clients));
        let of = |c: &str| Ask { tokens: 1, model: None, client: Some(Arc::from(c)) };
        assert_eq!(l.decide(t0, &of("capped")), Decision::Go);
        l.admit(t0, &of("capped"));
        let held = l.decide(t0, &of("capped"));
        assert_eq!(
            held,
            Decision::Wait {
                at: t0 + Duration::from_secs(1),
                limit: Limit::ClientRequests,
                scope: Some(Scope::Client(Some(Arc::from("capped")))),
            }
        );
        assert_eq!(l.decide(t0, &of("free")), Decision::Go, "other clients are not held");
    }

    #[test]
    fn model_pauses_are_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, None, 0, 10), t0);
        for i in 0..(MAX_PAUSES + 10) {
            l.pause(t0, Some(&Arc::from(format!("m{i}"))), t0 + Duration::from_secs(60));
        }
        assert!(l.model_paused_until.len() <= MAX_PAUSES);
    }

    fn calibration(mark: Mark, refused: bool) -> Calibration {
        Calibration { mark, refunded: 0, refused, max_reset: Duration::from_secs(30) }
    }

    #[test]
    fn a_429s_word_lowers_the_bucket_and_a_hostile_reset_is_capped() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, Some(60_000), 1000, 100), t0); // 1000/s
        let mark = l.admit(t0, &Ask::tokens(100));
        let said = QuotaHeaders {
            remaining_tokens: Some(0),
            reset_tokens: Some(Duration::from_secs(2)),
            ..QuotaHeaders::default()
        };
        l.calibrate(t0, &said, calibration(mark, true));
        // Full again in 2 s at 1000/s: 1000 - 2000 = -1000 now.
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-1000.0));
        let hostile =
            QuotaHeaders { reset_tokens: Some(Duration::from_secs(3600)), ..QuotaHeaders::default() };
        let mark = l.admit(t0, &Ask::tokens(0));
        l.calibrate(t0, &hostile, calibration(mark, true));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-29_000.0), "at most one max wait of debt");
    }

    #[test]
    fn after_a_success_the_bucket_goes_down_to_the_most_the_upstream_may_have() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, Some(60_000), 1000, 100), t0);
        let mine = l.admit(t0, &Ask::tokens(100));
        let _other = l.admit(t0, &Ask::tokens(300)); // in flight, maybe not yet seen upstream
        // The upstream says 500 remained after mine (others use the key). Whether it had seen
        // the other 300 or not, it has at most 500 now: 100 less than here.
        let said = QuotaHeaders { remaining_tokens: Some(500), ..QuotaHeaders::default() };
        l.calibrate(t0, &said, calibration(mine, false));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(500.0));
        // 100 remained, and 200 were charged here after that answer was measured. The
        // upstream may already have counted them (they overtake each other), so a success
        // caps the level at 100, no lower.
        let mark = l.admit(t0, &Ask::tokens(0));
        let _later = l.admit(t0, &Ask::tokens(200));
        let said = QuotaHeaders { remaining_tokens: Some(100), ..QuotaHeaders::default() };
        l.calibrate(t0, &said, calibration(mark, false));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(100.0), "capped at what the upstream said");
        // A 429 is decisive: the upstream refused for lack of quota, and what was charged
        // here after it measured comes on top.
        let mark = l.admit(t0, &Ask::tokens(0));
        let _later = l.admit(t0, &Ask::tokens(50));
        l.calibrate(t0, &said, calibration(mark, true));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(50.0));
    }

    #[test]
    fn withheld_refunds_return_only_as_far_as_the_upstream_confirms() {
        let t0 = Instant::now();
        let mut used = limits(6000, 100, Some(60_000), 1000, 100);
        used.token_accounting = TokenAccounting::Used;
        let mut l = Limiter::new(&used, t0);
        let first = l.admit(t0, &Ask::tokens(400));
        let seen = QuotaHeaders { remaining_tokens: Some(600), ..QuotaHeaders::default() };
        l.calibrate(t0, &seen, calibration(first, false));
        // It used 100 of its 400: the 300 wait for the upstream's word.
        l.settle(t0, &None, 400, Some(100));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(600.0));
        let next = l.admit(t0, &Ask::tokens(0));
        let refunded = QuotaHeaders { remaining_tokens: Some(900), ..QuotaHeaders::default() };
        l.calibrate(t0, &refunded, calibration(next, false));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(900.0), "the upstream refunded them");
        // An upstream that keeps what it charged never says so: nothing more comes back.
        let third = l.admit(t0, &Ask::tokens(400));
        l.settle(t0, &None, 400, Some(100));
        let kept = QuotaHeaders { remaining_tokens: Some(500), ..QuotaHeaders::default() };
        let after = l.admit(t0, &Ask::tokens(0));
        l.calibrate(t0, &kept, calibration(after, false));
        l.answered(&third);
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(500.0));
    }

    #[test]
    fn reload_keeps_state_unless_limits_change() {
        let t0 = Instant::now();
        let base = limits(60, 1, Some(600), 10, 10);
        let mut l = Limiter::new(&base, t0);
        l.admit(t0, &Ask::tokens(10));
        assert!(!l.reconfigure(&base.clone(), t0), "same limits: nothing changes");
        assert_eq!(l.decide(t0, &Ask::tokens(1)), wait(t0 + Duration::from_secs(1), Limit::Requests));
        // Lowering the rate slows admission at once; the spent burst stays spent.
        assert!(l.reconfigure(&limits(30, 1, Some(600), 10, 10), t0));
        assert_eq!(l.decide(t0, &Ask::tokens(1)), wait(t0 + Duration::from_secs(2), Limit::Requests));
        // Dropping the token limit removes that bucket.
        assert!(l.reconfigure(&limits(30, 1, None, 0, 10), t0));
        assert_eq!(l.tokens_available(t0), None);
    }
}
