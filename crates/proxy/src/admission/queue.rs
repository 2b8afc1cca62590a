//! Admission: a bounded queue in front of the limiter. A request that can go at once (nobody
//! waiting, the limits allow it) takes its permit inline; otherwise it waits in line and one
//! dispatcher task hands out permits as the limits allow, rejecting requests whose deadline
//! passes or can no longer be met. Waiting costs a channel, not a poll.
//!
//! The line is fair between clients: start-time fair queueing, where each request's place is
//! its client's virtual start time and each admission advances that client's clock by the
//! request's cost (tokens charged, where tokens are limited) over the client's weight. So a
//! flood from one client cannot starve another, weights share what is contended, and nothing
//! is reserved for idle clients (work-conserving). Within a client, first come, first served.
//! `interactive` requests go before `batch` ones, except that a batch request held back longer
//! than `clients.batchMaxDelay` goes first, so batch work always progresses.
//!
//! A request keeps its place across attempts: one the upstream refused with 429 goes back to
//! its old place. A request held by something of its own (its model's pause, its client's cap)
//! never holds up the requests behind it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use llmproxy_api::Policy;
use llmproxy_api::policy::{LimitsPolicy, UpstreamPolicy};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::admission::budget::RetryBudget;
use crate::admission::limiter::{
    Ask, Calibration, Decision, EndpointReport, Holds, Limit, Limiter, Mark, Verdict,
};
use crate::protocol::ratelimit_headers::QuotaHeaders;
use crate::telemetry::labels::TokenKind;
use crate::telemetry::metrics::{ClientMetrics, Metrics};

/// Why a request was not admitted; becomes a 429 with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The limit that held the request.
    pub limit: Limit,
    /// True when the queue was full, false when the deadline would pass first.
    pub queue_full: bool,
    /// When trying again makes sense.
    pub retry_after: Duration,
    /// How long the request waited before being refused.
    pub waited: Duration,
}

/// A request's place in line, taken once on arrival and kept across its attempts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Place {
    seq: u64,
    /// Its client's virtual start time, set at its first admission attempt.
    tag: Option<f64>,
}

/// Who a request is from, as far as admission cares.
#[derive(Clone)]
pub struct Party {
    /// The client (`None`: no client identified).
    pub name: Option<Arc<str>>,
    /// Its share under contention.
    pub weight: u32,
    /// Whether its requests are `batch`.
    pub batch: bool,
    /// Most of its requests waiting at once.
    pub(crate) max_queued: usize,
    /// Its series.
    pub metrics: Arc<ClientMetrics>,
}

impl Party {
    /// The one party of a proxy without client identities.
    #[cfg(test)]
    pub(crate) fn anonymous(metrics: &Metrics) -> Self {
        Self { name: None, weight: 1, batch: false, max_queued: usize::MAX, metrics: metrics.client(None) }
    }
}

type Grant = Result<Permit, Rejection>;

struct Waiter {
    ask: Ask,
    party: Party,
    key: LineKey,
    deadline: Instant,
    start: Instant,
    tx: oneshot::Sender<Grant>,
    /// What held it the last time the dispatcher looked.
    held_by: Limit,
}

/// Order in a line: virtual start time (as bits: non-negative floats order like their bits),
/// then arrival.
type LineKey = (u64, u64);

#[derive(Default)]
struct Lines {
    interactive: BTreeMap<LineKey, u64>,
    batch: BTreeMap<LineKey, u64>,
    batch_by_start: BTreeSet<(Instant, u64)>,
    waiters: HashMap<u64, Waiter>,
    deadlines: BTreeSet<(Instant, u64)>,
    queued_by_client: HashMap<Option<Arc<str>>, usize>,
}

impl Lines {
    fn len(&self) -> usize {
        self.waiters.len()
    }

    fn insert(&mut self, seq: u64, w: Waiter) {
        if w.party.batch {
            self.batch.insert(w.key, seq);
            self.batch_by_start.insert((w.start, seq));
        } else {
            self.interactive.insert(w.key, seq);
        }
        self.deadlines.insert((w.deadline, seq));
        *self.queued_by_client.entry(w.party.name.clone()).or_default() += 1;
        self.waiters.insert(seq, w);
    }

    fn remove(&mut self, seq: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&seq)?;
        if w.party.batch {
            self.batch.remove(&w.key);
            self.batch_by_start.remove(&(w.start, seq));
        } else {
            self.interactive.remove(&w.key);
        }
        self.deadlines.remove(&(w.deadline, seq));
        if let Some(n) = self.queued_by_client.get_mut(&w.party.name) {
            *n -= 1;
            if *n == 0 {
                self.queued_by_client.remove(&w.party.name);
            }
        }
        Some(w)
    }

    /// The order the dispatcher looks at waiters in: batch requests held back too long, then
    /// interactive, then batch, each by virtual start time.
    fn order(&self, now: Instant, batch_max_delay: Duration) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len());
        let aged: Vec<u64> = match now.checked_sub(batch_max_delay) {
            Some(cutoff) => self.batch_by_start.range(..=(cutoff, u64::MAX)).map(|(_, s)| *s).collect(),
            None => Vec::new(),
        };
        out.extend(&aged);
        out.extend(self.interactive.values());
        out.extend(self.batch.values().filter(|s| !aged.contains(s)));
        out
    }
}

struct Shared {
    limiter: Limiter,
    budget: RetryBudget,
    lines: Lines,
    /// The virtual time: the start tag of the latest admission.
    virtual_time: f64,
    /// Each client's virtual finish time.
    finish: HashMap<Option<Arc<str>>, f64>,
    batch_max_delay: Duration,
}

impl Shared {
    /// A request's virtual start time, set once (at its first attempt).
    fn tag(&mut self, place: &mut Place, ask: &Ask, party: &Party) -> f64 {
        if let Some(tag) = place.tag {
            return tag;
        }
        #[allow(clippy::cast_precision_loss)]
        let cost =
            if self.limiter.limits().tokens_per_minute.is_some() { ask.tokens.max(1) as f64 } else { 1.0 };
        let finish = self.finish.entry(party.name.clone()).or_insert(0.0);
        let start = self.virtual_time.max(*finish);
        *finish = start + cost / f64::from(party.weight.max(1));
        place.tag = Some(start);
        if self.finish.len() > 10_000 {
            // Clients whose clock is behind the virtual time start from it anyway.
            let v = self.virtual_time;
            self.finish.retain(|_, f| *f > v);
        }
        start
    }
}

/// Shared admission state of one proxy.
pub struct Admission {
    shared: Mutex<Shared>,
    /// Request body bytes held by waiting and in-flight requests, and the most allowed.
    bytes_held: AtomicU64,
    bytes_max: AtomicU64,
    /// Requests that count against the queue bound outside the line (coalesced followers,
    /// retries sleeping through a back-off).
    held: AtomicUsize,
    /// Wakes the dispatcher: a request joined the line, a slot or tokens came free, limits
    /// changed.
    wake: Arc<Notify>,
    waiting: AtomicUsize,
    next_place: AtomicU64,
    metrics: Arc<Metrics>,
    /// Never notified: what the lessee waits on without shared state (it ticks instead).
    idle_lessee: Arc<Notify>,
}

/// An admitted request: holds a concurrency slot and its token charge until dropped.
pub struct Permit {
    admission: Arc<Admission>,
    client: Option<Arc<str>>,
    /// Tokens charged for this attempt (changes when settled).
    charged: u64,
    /// Tokens given back because the upstream did not count the attempt.
    refunded: u64,
    mark: Mark,
    /// How long the request queued.
    pub waited: Duration,
}

impl Permit {
    /// The endpoint this attempt goes to.
    pub fn endpoint(&self) -> &Arc<UpstreamPolicy> {
        &self.mark.endpoint
    }

    /// The upstream charged nothing for this attempt (it refused it with 429, refused the
    /// proxy's key, or never saw it): its tokens go back.
    pub fn refund(&mut self) {
        if self.charged == 0 {
            return;
        }
        let mut shared = self.admission.lock();
        shared.limiter.refund(Instant::now(), &self.mark, &self.client, self.charged);
        shared.limiter.answered(&self.mark);
        drop(shared);
        self.refunded += self.charged;
        self.charged = 0;
        self.admission.wake_if_waiting();
    }

    /// The answer is complete; `used` is its real usage if it reported one. Under `used`
    /// accounting the charge becomes the usage, under `requested` it stands.
    pub fn settle(&mut self, used: Option<u64>) {
        let charged = self.admission.lock().limiter.settle(
            Instant::now(),
            &self.mark,
            &self.client,
            self.charged,
            used,
        );
        if charged != self.charged {
            self.charged = charged;
            self.admission.wake_if_waiting();
        }
    }

    /// Follow what the upstream's headers say remains; `refused` when they came with a 429.
    pub(crate) fn calibrate(&self, quota: &QuotaHeaders, refused: bool, max_reset: Duration) {
        if !quota.says_remaining() {
            return;
        }
        let c = Calibration { refunded: self.refunded, refused, max_reset };
        self.admission.lock().limiter.calibrate(Instant::now(), quota, &self.mark, c);
    }

    /// Hold this attempt's model at its endpoint (everything there, without a model) until
    /// `until`, because the endpoint said that window is spent.
    pub fn pause(&self, until: Instant) {
        self.admission.lock().limiter.pause(Instant::now(), &self.mark, until);
        self.admission.metrics.upstream_pauses.inc();
        self.admission.wake.notify_one();
    }

    /// Record how the attempt went at its endpoint (its health).
    pub fn verdict(&self, verdict: &Verdict) {
        let ejected = self.admission.lock().limiter.verdict(Instant::now(), &self.mark, verdict);
        if ejected {
            tracing::warn!(upstream = %self.mark.endpoint.name, "upstream endpoint taken out after failures");
            self.admission.metrics.upstream_ejected(&self.mark.endpoint.name);
            self.admission.wake.notify_one();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut shared = self.admission.lock();
        shared.limiter.answered(&self.mark);
        shared.limiter.release();
        drop(shared);
        self.admission.metrics.inflight.dec();
        self.admission.wake_if_waiting();
    }
}

/// Request body bytes counted against `queue.maxBytes` until dropped.
pub(crate) struct BytesLease {
    admission: Arc<Admission>,
    bytes: u64,
}

impl BytesLease {
    /// Count `more` bytes too, if the budget has room.
    pub(crate) fn grow(&mut self, more: u64) -> Result<(), Rejection> {
        self.admission.take_bytes(more)?;
        self.bytes += more;
        Ok(())
    }
}

impl Drop for BytesLease {
    fn drop(&mut self) {
        self.admission.bytes_held.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A place counted against `queue.maxSize` outside the line, until dropped.
pub struct Held(Arc<Admission>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a waiter out of line however its wait ends (granted, refused, or the request dropped).
struct InLine<'a> {
    admission: &'a Admission,
    seq: u64,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let removed = self.admission.lock().lines.remove(self.seq);
        if removed.is_some() {
            self.admission.left_line();
        }
    }
}

impl Admission {
    /// A new admission gate with full buckets, and its dispatcher task (on the current tokio
    /// runtime; it ends when the gate is dropped).
    pub fn new(policy: &Policy, metrics: Arc<Metrics>) -> Arc<Self> {
        let admission = Arc::new(Self {
            shared: Mutex::new(Shared {
                limiter: Limiter::new(policy, Instant::now()),
                budget: RetryBudget::new(&policy.retry, Instant::now()),
                lines: Lines::default(),
                virtual_time: 0.0,
                finish: HashMap::new(),
                batch_max_delay: policy
                    .clients
                    .as_ref()
                    .map_or(Duration::from_secs(10), |c| c.batch_max_delay),
            }),
            wake: Arc::new(Notify::new()),
            bytes_held: AtomicU64::new(0),
            bytes_max: AtomicU64::new(u64::MAX),
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            next_place: AtomicU64::new(0),
            metrics,
            idle_lessee: Arc::new(Notify::new()),
        });
        tokio::spawn(dispatch(Arc::downgrade(&admission), Arc::clone(&admission.wake)));
        admission
    }

    /// What wakes the lessee of the shared buckets (a stock ran short): of the LlmQuota's
    /// buckets if `quota`, else of the LlmProxy's.
    pub(crate) fn lease_wake(&self, quota: bool) -> Arc<Notify> {
        let mut s = self.lock();
        match s.limiter.leases.as_mut() {
            Some(l) => Arc::clone(&l.wake[usize::from(quota)]),
            None => Arc::clone(&self.idle_lessee),
        }
    }

    /// Work on this replica's stocks of the shared buckets; `None` without shared state.
    pub(crate) fn with_leases<R>(
        &self,
        f: impl FnOnce(&mut crate::admission::limiter::lease::Leases) -> R,
    ) -> Option<R> {
        self.lock().limiter.leases.as_mut().map(f)
    }

    /// Let the dispatcher look at the line again (stocks were topped up).
    pub(crate) fn wake_dispatcher(&self) {
        self.wake_if_waiting();
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_if_waiting(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake.notify_one();
        }
    }

    fn left_line(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.dec();
    }

    /// Set `queue.maxBytes`.
    pub(crate) fn set_byte_budget(&self, max: u64) {
        self.bytes_max.store(max, Ordering::SeqCst);
    }

    fn take_bytes(&self, n: u64) -> Result<(), Rejection> {
        let max = self.bytes_max.load(Ordering::SeqCst);
        let taken = self.bytes_held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            held.checked_add(n).filter(|total| *total <= max)
        });
        match taken {
            Ok(_) => Ok(()),
            Err(_) => {
                self.metrics.client(None).throttled(Limit::QueueBytes);
                Err(Rejection {
                    limit: Limit::QueueBytes,
                    queue_full: true,
                    retry_after: Duration::from_secs(1),
                    waited: Duration::ZERO,
                })
            }
        }
    }

    /// Count `bytes` of a request body against `queue.maxBytes`.
    pub(crate) fn reserve_bytes(self: &Arc<Self>, bytes: u64) -> Result<BytesLease, Rejection> {
        self.take_bytes(bytes)?;
        Ok(BytesLease { admission: Arc::clone(self), bytes })
    }

    /// The most body bytes held at once (`queue.maxBytes`).
    pub(crate) fn byte_budget(&self) -> u64 {
        self.bytes_max.load(Ordering::SeqCst)
    }

    /// Hold a place against `max_queue` outside the line (a request waiting for an identical
    /// one's answer, or for its next attempt).
    pub fn hold(self: &Arc<Self>, max_queue: usize) -> Result<Held, Rejection> {
        let depth = self.lock().lines.len();
        let held = self.held.fetch_add(1, Ordering::SeqCst);
        if depth + held >= max_queue {
            self.held.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejection {
                limit: Limit::QueueSize,
                queue_full: true,
                retry_after: Duration::from_secs(1),
                waited: Duration::ZERO,
            });
        }
        Ok(Held(Arc::clone(self)))
    }

    /// A place at the end of the line, for a request that just arrived.
    pub fn place(&self) -> Place {
        Place { seq: self.next_place.fetch_add(1, Ordering::Relaxed), tag: None }
    }

    /// Wait for a turn under the limits, at most until `deadline`, behind at most `max_queue`
    /// other waiting requests (and at most the party's own bound). A request that was
    /// admitted before (a requeue) passes `usize::MAX`: the bound is for new arrivals.
    pub async fn admit(
        self: &Arc<Self>,
        place: &mut Place,
        ask: &Ask,
        party: &Party,
        deadline: Instant,
        max_queue: usize,
    ) -> Result<Permit, Rejection> {
        let start = Instant::now();
        let rx = {
            let mut guard = self.lock();
            let shared = &mut *guard;
            let tag = shared.tag(place, ask, party);
            if shared.lines.len() == 0
                && let Decision::Go(endpoint) = shared.limiter.decide(start, ask, &Holds::default())
            {
                let mark = shared.limiter.admit(start, ask, endpoint);
                shared.virtual_time = shared.virtual_time.max(tag);
                drop(guard);
                return Ok(self.permit(ask, party, mark, start));
            }
            let depth = shared.lines.len() + self.held.load(Ordering::SeqCst);
            let own = shared.lines.queued_by_client.get(&party.name).copied().unwrap_or(0);
            if depth >= max_queue || (max_queue != usize::MAX && own >= party.max_queued) {
                let retry_after = queue_full_retry_after(shared.limiter.limits(), depth);
                drop(guard);
                return Err(self.reject(party, Limit::QueueSize, true, start, retry_after));
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter {
                ask: ask.clone(),
                party: party.clone(),
                key: (tag.to_bits(), place.seq),
                deadline,
                start,
                tx,
                held_by: Limit::Requests,
            };
            shared.lines.insert(place.seq, waiter);
            rx
        };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.metrics.queue_depth.inc();
        let _in_line = InLine { admission: self, seq: place.seq };
        self.wake.notify_one();
        match rx.await {
            Ok(grant) => grant,
            // The dispatcher went away (the proxy is being dropped).
            Err(_) => Err(self.reject(party, Limit::Requests, false, start, Duration::from_secs(1))),
        }
    }

    fn permit(self: &Arc<Self>, ask: &Ask, party: &Party, mark: Mark, start: Instant) -> Permit {
        let waited = start.elapsed();
        self.metrics.inflight.inc();
        self.metrics.recent_wait(waited);
        party.metrics.queue_wait(waited.as_secs_f64());
        party.metrics.tokens(TokenKind::Reserved, ask.tokens);
        Permit {
            admission: Arc::clone(self),
            client: ask.client.clone(),
            charged: ask.tokens,
            refunded: 0,
            mark,
            waited,
        }
    }

    fn reject(
        &self,
        party: &Party,
        limit: Limit,
        queue_full: bool,
        start: Instant,
        retry_after: Duration,
    ) -> Rejection {
        party.metrics.throttled(limit);
        Rejection { limit, queue_full, retry_after, waited: start.elapsed() }
    }

    /// Tell a waiter it may go, or why not; a grant whose request went away meanwhile is kept
    /// for the caller to drop outside the lock (dropping a permit takes the lock).
    fn answer(w: Waiter, grant: Grant, undelivered: &mut Vec<Grant>) {
        if let Err(grant) = w.tx.send(grant) {
            undelivered.push(grant);
        }
    }

    /// Hand out every permit the limits allow now and refuse waiters whose deadline passed or
    /// cannot be met. Returns when to look again (besides being woken), and the grants whose
    /// requests went away meanwhile (dropped by the caller, outside the lock).
    fn pump(self: &Arc<Self>, now: Instant) -> (Option<Instant>, Vec<Grant>) {
        let mut undelivered = Vec::new();
        let mut guard = self.lock();
        let shared = &mut *guard;
        // Deadlines that passed.
        while let Some(&(deadline, seq)) = shared.lines.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(w) = shared.lines.remove(seq) {
                let rejection = self.reject(&w.party, w.held_by, false, w.start, Duration::from_secs(1));
                self.left_line();
                Self::answer(w, Err(rejection), &mut undelivered);
            } else {
                shared.lines.deadlines.pop_first();
            }
        }
        // Admit in order. A limit every request shares stops the scan (the head keeps its
        // turn); a hold of one model or one client only skips that scope's requests.
        let mut next = shared.lines.deadlines.first().map(|(d, _)| *d);
        let mut holds = Holds::default();
        for seq in shared.lines.order(now, shared.batch_max_delay) {
            let Some(w) = shared.lines.waiters.get(&seq) else { continue };
            if holds.skips(&w.ask) {
                continue;
            }
            let (at, limit, scope) = match shared.limiter.decide(now, &w.ask, &holds) {
                Decision::Held => continue,
                Decision::Go(endpoint) => {
                    let Some(w) = shared.lines.remove(seq) else { continue };
                    let mark = shared.limiter.admit(now, &w.ask, endpoint);
                    shared.virtual_time = shared.virtual_time.max(f64::from_bits(w.key.0));
                    self.left_line();
                    let permit = self.permit(&w.ask, &w.party, mark, w.start);
                    Self::answer(w, Ok(permit), &mut undelivered);
                    continue;
                }
                Decision::WaitForSlot => {
                    if let Some(w) = shared.lines.waiters.get_mut(&seq) {
                        w.held_by = Limit::Concurrency;
                    }
                    break;
                }
                Decision::Wait { at, limit, scope } => (at, limit, scope),
            };
            // Token debt can shrink: requests in flight settle against real usage.
            let may_shrink = matches!(
                limit,
                Limit::Tokens | Limit::ClientTokens | Limit::UpstreamTokens | Limit::ModelTokens
            ) && shared.limiter.inflight() > 0;
            if at > w.deadline && !may_shrink {
                // Refuse at once: waiting cannot help.
                if let Some(w) = shared.lines.remove(seq) {
                    let rejection = self.reject(&w.party, limit, false, w.start, at - now);
                    self.left_line();
                    Self::answer(w, Err(rejection), &mut undelivered);
                }
                continue;
            }
            if let Some(w) = shared.lines.waiters.get_mut(&seq) {
                w.held_by = limit;
            }
            next = Some(next.map_or(at, |n| n.min(at)));
            match scope {
                Some(scope) => holds.add(scope),
                None => break,
            }
        }
        // An aged batch request is due for promotion when it crosses the delay.
        if let Some((start, _)) = shared.lines.batch_by_start.first()
            && let Some(due) = start.checked_add(shared.batch_max_delay)
            && due > now
        {
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        (next, undelivered)
    }

    /// Apply a reloaded policy (limits, endpoints, client settings); the line is looked at
    /// again at once. Returns whether any limit changed.
    pub(crate) fn reconfigure(&self, policy: &Policy) -> bool {
        let mut shared = self.lock();
        let changed = shared.limiter.reconfigure(policy, Instant::now());
        shared.budget.reconfigure(&policy.retry);
        shared.batch_max_delay =
            policy.clients.as_ref().map_or(Duration::from_secs(10), |c| c.batch_max_delay);
        drop(shared);
        self.wake.notify_one();
        changed
    }

    /// Whether an endpoint other than `avoid` could take `ask` now (or probe it).
    pub fn alternative(&self, ask: &Ask, avoid: &str) -> bool {
        self.lock().limiter.alternative(Instant::now(), ask, avoid)
    }

    /// Count a first attempt towards the retry budget.
    pub(crate) fn first_attempt(&self) {
        self.lock().budget.first(Instant::now());
    }

    /// Whether the retry budget allows one more retry now (and, if so, spend it).
    pub(crate) fn retry_allowed(&self) -> bool {
        let allowed = self.lock().budget.try_retry(Instant::now());
        if !allowed {
            self.metrics.retry_budget_exhausted.inc();
        }
        allowed
    }

    /// Every endpoint's state, for metrics and status.
    pub fn endpoints(&self) -> Vec<EndpointReport> {
        self.lock().limiter.reports()
    }

    /// Requests admitted and tokens charged in the last minute (for status).
    pub(crate) fn last_minute(&self) -> (u64, u64) {
        self.lock().limiter.last_minute(Instant::now())
    }

    /// Requests waiting now (in line).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Body bytes held now by waiting and in-flight requests.
    #[cfg(test)]
    pub(crate) fn bytes_held(&self) -> u64 {
        self.bytes_held.load(Ordering::SeqCst)
    }

    /// Requests admitted and not yet finished.
    pub fn inflight(&self) -> u32 {
        self.lock().limiter.inflight()
    }

    /// Tokens available now (negative while in debt), `None` when unlimited.
    pub fn tokens_available(&self) -> Option<f64> {
        self.lock().limiter.tokens_available(Instant::now())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Let the dispatcher notice that the gate is gone.
        self.wake.notify_one();
    }
}

/// Roughly how long until `depth` queued requests have been admitted at the request rate.
fn queue_full_retry_after(limits: &LimitsPolicy, depth: usize) -> Duration {
    let rpm = limits.requests_per_minute.max(1);
    let secs = u64::try_from(depth).unwrap_or(u64::MAX).saturating_mul(60) / rpm;
    Duration::from_secs(secs.max(1))
}

/// The dispatcher: pumps the line whenever something changed or a wait is due. A panic in one
/// pump (a bug) is logged and the loop goes on, so the queue never silently stops moving.
async fn dispatch(admission: Weak<Admission>, wake: Arc<Notify>) {
    loop {
        let Some(strong) = admission.upgrade() else { return };
        let pumped = std::panic::catch_unwind(AssertUnwindSafe(|| strong.pump(Instant::now())));
        drop(strong);
        let next = match pumped {
            Ok((next, undelivered)) => {
                drop(undelivered);
                next
            }
            Err(_) => {
                tracing::error!("admission dispatcher: a pump panicked; retrying in 100 ms");
                Some(Instant::now() + Duration::from_millis(100))
            }
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use llmproxy_api::policy::ClientsPolicy;

    use super::*;

    fn limits(rpm: u64, burst: u64, tpm: Option<u64>, max_concurrent: u32) -> LimitsPolicy {
        LimitsPolicy {
            request_burst: burst,
            token_burst: tpm.map_or(0, |t| t / 60),
            max_concurrent,
            ..LimitsPolicy::per_minute(rpm, tpm)
        }
    }

    fn admission(rpm: u64, burst: u64, max_concurrent: u32) -> Arc<Admission> {
        with(limits(rpm, burst, None, max_concurrent))
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(prometheus::Registry::new()).unwrap())
    }

    /// A policy of one upstream with these limits (as `spec.upstream` gives).
    fn policy_of(limits: LimitsPolicy, clients: Option<ClientsPolicy>) -> Policy {
        let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 60}";
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
        let mut p = Policy::from_spec(&spec).unwrap();
        p.upstreams[0].limits = llmproxy_api::policy::EndpointLimits::of(&limits);
        p.limits = limits;
        p.clients = clients;
        p
    }

    fn with(limits: LimitsPolicy) -> Arc<Admission> {
        Admission::new(&policy_of(limits, None), metrics())
    }

    fn anon() -> Party {
        Party::anonymous(&metrics())
    }

    fn party(name: &str, weight: u32, batch: bool) -> Party {
        Party {
            name: Some(Arc::from(name)),
            weight,
            batch,
            max_queued: usize::MAX,
            metrics: metrics().client(Some(name)),
        }
    }

    fn ask_of(p: &Party) -> Ask {
        Ask { client: p.name.clone(), ..Ask::default() }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    async fn take(a: &Arc<Admission>, tokens: u64, deadline: Instant) -> Result<Permit, Rejection> {
        a.admit(&mut a.place(), &Ask::tokens(tokens), &anon(), deadline, 100).await
    }

    fn spawn_admit(
        a: &Arc<Admission>,
        place: Place,
        ask: Ask,
        party: Party,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Result<Duration, Rejection>> {
        let a = Arc::clone(a);
        tokio::spawn(async move {
            let mut place = place;
            a.admit(&mut place, &ask, &party, deadline, 100).await.map(|p| p.waited)
        })
    }

    fn spawn_anon(
        a: &Arc<Admission>,
        tokens: u64,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Result<Duration, Rejection>> {
        spawn_admit(a, a.place(), Ask::tokens(tokens), anon(), deadline)
    }

    // tokio's paused clock auto-advances while every task sleeps: a fake clock, no real waiting.
    #[tokio::test(start_paused = true)]
    async fn queued_requests_are_admitted_in_order_at_the_rate() {
        let a = admission(60, 1, 100); // one per second
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            tasks.push((i, spawn_anon(&a, 0, t0 + secs(30))));
            tokio::task::yield_now().await; // arrive in order
        }
        for (i, task) in tasks {
            let waited = task.await.unwrap();
            assert_eq!(waited, Ok(secs(i)), "request {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeued_request_goes_before_later_arrivals() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let mut early = a.place();
        let _first = a.admit(&mut early, &Ask::tokens(0), &anon(), t0 + secs(30), 100).await;
        let later = spawn_anon(&a, 0, t0 + secs(30));
        tokio::task::yield_now().await;
        // The early request comes back (its upstream said 429) after the later one queued.
        let again = spawn_admit(&a, early, Ask::tokens(0), anon(), t0 + secs(30));
        let (again, later) = (again.await.ok().and_then(Result::ok), later.await.ok().and_then(Result::ok));
        assert_eq!((again, later), (Some(secs(1)), Some(secs(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_from_one_client_does_not_starve_another() {
        let a = admission(60, 1, 100); // one per second
        let t0 = Instant::now();
        let (flood, quiet) = (party("flood", 1, false), party("quiet", 1, false));
        let _first = a.admit(&mut a.place(), &ask_of(&flood), &flood, t0 + secs(300), 1000).await;
        let mut floods = Vec::new();
        for _ in 0..50 {
            floods.push(spawn_admit(&a, a.place(), ask_of(&flood), flood.clone(), t0 + secs(300)));
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // The quiet client's one request goes next, not behind the remaining 47.
        let waited =
            a.admit(&mut a.place(), &ask_of(&quiet), &quiet, t0 + secs(300), 1000).await.map(|p| p.waited);
        assert!(waited.as_ref().is_ok_and(|w| *w <= secs(1)), "{waited:?}");
        for f in floods {
            assert!(f.await.ok().is_some_and(|r| r.is_ok()), "every flood request still goes");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_what_is_contended() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let (heavy, light) = (party("heavy", 3, false), party("light", 1, false));
        let _first = take(&a, 0, t0 + secs(300)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for p in [&heavy, &light] {
            for _ in 0..40 {
                let (a, p, tx) = (Arc::clone(&a), p.clone(), tx.clone());
                tokio::spawn(async move {
                    let mut place = a.place();
                    if a.admit(&mut place, &ask_of(&p), &p, t0 + secs(300), 1000).await.is_ok() {
                        let _ = tx.send(p.name.clone());
                    }
                });
            }
        }
        drop(tx);
        // The first 40 admissions, while both are busy: 3 to 1.
        let mut first = Vec::new();
        while first.len() < 40 {
            match rx.recv().await {
                Some(name) => first.push(name),
                None => break,
            }
        }
        let heavy_share = first.iter().filter(|n| n.as_deref() == Some("heavy")).count();
        assert!((28..=32).contains(&heavy_share), "heavy got {heavy_share} of 40");
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_goes_first_and_batch_is_never_held_back_longer_than_its_delay() {
        let a = admission(60, 1, 100);
        let clients: ClientsPolicy = serde_yaml_clients("batchMaxDelay: 5s");
        assert!(!a.reconfigure(&policy_of(limits(60, 1, None, 100), Some(clients))));
        let t0 = Instant::now();
        let (chat, nightly) = (party("chat", 1, false), party("nightly", 1, true));
        let _first = take(&a, 0, t0 + secs(300)).await;
        let batch = spawn_admit(&a, a.place(), ask_of(&nightly), nightly.clone(), t0 + secs(300));
        tokio::task::yield_now().await;
        let mut chats = Vec::new();
        for _ in 0..20 {
            chats.push(spawn_admit(&a, a.place(), ask_of(&chat), chat.clone(), t0 + secs(300)));
        }
        // Interactive saturates the line; the batch request still goes once it has waited 5 s.
        let waited = batch.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited >= secs(5) && waited <= secs(6), "batch waited {waited:?}");
        // And the first interactive request went at the next turn, ahead of the batch one.
        let first_chat = chats.remove(0).await.ok().and_then(Result::ok).unwrap_or_default();
        assert_eq!(first_chat, secs(1));
    }

    fn serde_yaml_clients(extra: &str) -> ClientsPolicy {
        let yaml = format!(
            "upstream: {{url: 'https://x.io'}}\nlimits: {{requestsPerMinute: 60}}\nclients:\n  {extra}\n"
        );
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
        llmproxy_api::Policy::from_spec(&spec).ok().and_then(|p| p.clients).expect("clients")
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_has_its_own_queue_bound() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let mut small = party("small", 1, false);
        small.max_queued = 1;
        let _first = take(&a, 0, t0 + secs(300)).await;
        let _one = spawn_admit(&a, a.place(), ask_of(&small), small.clone(), t0 + secs(300));
        tokio::task::yield_now().await;
        let second = a.admit(&mut a.place(), &ask_of(&small), &small, t0 + secs(300), 1000).await.err();
        assert_eq!(second.map(|r| (r.limit, r.queue_full)), Some((Limit::QueueSize, true)));
        let other = spawn_anon(&a, 0, t0 + secs(300));
        tokio::task::yield_now().await;
        assert_eq!(a.waiting(), 2, "others still get in");
        drop(other);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let a = admission(60, 1, 100);
        let deadline = Instant::now() + secs(30);
        let _first = a.admit(&mut a.place(), &Ask::tokens(0), &anon(), deadline, 0).await;
        let r = a.admit(&mut a.place(), &Ask::tokens(0), &anon(), deadline, 0).await.err();
        assert_eq!(
            r.as_ref().map(|r| (r.limit, r.queue_full, r.waited)),
            Some((Limit::QueueSize, true, Duration::ZERO))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_cannot_be_met_is_refused_without_waiting_for_it() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let _first = take(&a, 0, t0 + secs(5)).await;
        let r = take(&a, 0, t0 + Duration::from_millis(500)).await.err();
        assert_eq!(
            r.map(|r| (r.limit, r.queue_full, r.retry_after)),
            Some((Limit::Requests, false, secs(1)))
        );
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_behind_the_head_give_up_at_their_deadline() {
        let a = admission(6, 1, 100); // one per 10 s
        let t0 = Instant::now();
        let _first = take(&a, 0, t0 + secs(60)).await;
        let head = spawn_anon(&a, 0, t0 + secs(60));
        tokio::task::yield_now().await;
        let behind = take(&a, 0, t0 + secs(3)).await.err();
        assert_eq!(behind.map(|r| (r.limit, r.waited)), Some((Limit::Requests, secs(3))));
        assert_eq!(head.await.ok().and_then(Result::ok), Some(secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn token_debt_that_in_flight_requests_will_settle_is_waited_for_not_refused() {
        let mut l = limits(6000, 100, Some(600), 100); // 10 tokens/s, bucket of 10
        l.token_accounting = llmproxy_api::TokenAccounting::Used;
        let a = with(l);
        let t0 = Instant::now();
        // In flight, reserving 500 tokens: 49 s of debt at 10/s, past the 30 s deadline.
        let mut first = take(&a, 500, t0 + secs(30)).await.expect("first goes at once");
        let second = spawn_anon(&a, 10, t0 + secs(30));
        tokio::time::sleep(secs(1)).await;
        // It used 20: the debt shrinks to what 20 tokens cost, and the second one goes soon.
        first.settle(Some(20));
        let waited = second.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited > secs(1) && waited < secs(5), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn requested_accounting_never_refunds_but_a_refused_attempt_is_not_charged() {
        // 100 tokens/s, bucket 100; the upstream's bucket here keeps 10 of them in hand.
        let a = with(limits(6000, 100, Some(6000), 100));
        let t0 = Instant::now();
        let mut p = take(&a, 80, t0 + secs(30)).await.expect("goes at once");
        p.settle(Some(10));
        assert_eq!(a.tokens_available().map(f64::round), Some(10.0), "requested: the charge stands");
        p.refund();
        assert_eq!(a.tokens_available().map(f64::round), Some(90.0), "a 429'd attempt costs nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_model_holds_only_its_own_requests() {
        let a = admission(6000, 100, 100);
        let t0 = Instant::now();
        let model = |m: &str| Ask { model: Some(Arc::from(m)), ..Ask::default() };
        let pause = |until: Instant| {
            let a = Arc::clone(&a);
            async move {
                let p = a.admit(&mut a.place(), &model("a"), &anon(), until, 100).await;
                p.expect("admitted").pause(until);
            }
        };
        pause(t0 + secs(20)).await;
        let held = spawn_admit(&a, a.place(), model("a"), anon(), t0 + secs(30));
        tokio::task::yield_now().await;
        let other = a.admit(&mut a.place(), &model("b"), &anon(), t0 + secs(30), 100).await.map(|p| p.waited);
        assert_eq!(other.ok(), Some(Duration::ZERO), "model b goes at once");
        assert_eq!(held.await.ok().and_then(Result::ok), Some(secs(20)));
        // A pause longer than the deadline is refused at once, not waited out.
        pause(Instant::now() + secs(3600)).await;
        let r = a.admit(&mut a.place(), &model("a"), &anon(), Instant::now() + secs(30), 100).await.err();
        assert_eq!(r.map(|r| r.limit), Some(Limit::UpstreamPause));
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstreams_remaining_lowers_a_bucket_that_ran_ahead() {
        let a = with(limits(6000, 100, Some(60_000), 100)); // 1000 tokens/s, bucket 1000
        let t0 = Instant::now();
        let p = take(&a, 100, t0 + secs(30)).await.expect("goes at once");
        // Another request charged 200 after ours was sent; the upstream (others use the key)
        // says only 300 remained after ours.
        let _q = take(&a, 200, t0 + secs(30)).await;
        let headers = QuotaHeaders { remaining_tokens: Some(300), ..QuotaHeaders::default() };
        p.calibrate(&headers, true, secs(30));
        assert_eq!(a.tokens_available().map(f64::round), Some(100.0), "300 then, minus the 200 since");
        // It never raises the level.
        let generous = QuotaHeaders { remaining_tokens: Some(100_000), ..QuotaHeaders::default() };
        p.calibrate(&generous, true, secs(30));
        assert_eq!(a.tokens_available().map(f64::round), Some(100.0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_and_held_places_bound_what_waits() {
        let a = admission(60, 1, 100);
        a.set_byte_budget(100);
        let mut first = a.reserve_bytes(60).expect("fits");
        assert_eq!(a.reserve_bytes(50).err().map(|r| r.limit), Some(Limit::QueueBytes));
        assert!(first.grow(40).is_ok());
        assert!(first.grow(1).is_err(), "never past the budget");
        drop(first);
        assert_eq!(a.bytes_held(), 0);
        // Two places held outside the line fill a queue of two.
        let t0 = Instant::now();
        let _busy = take(&a, 0, t0 + secs(30)).await;
        let h1 = a.hold(2).expect("room");
        let _h2 = a.hold(2).expect("room");
        assert!(a.hold(2).is_err());
        let full = a.admit(&mut a.place(), &Ask::tokens(0), &anon(), t0 + secs(30), 2).await.err();
        assert_eq!(full.map(|r| (r.limit, r.queue_full)), Some((Limit::QueueSize, true)));
        drop(h1);
        assert!(a.hold(2).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_slot_freed_by_drop() {
        let a = admission(6000, 100, 1);
        let t0 = Instant::now();
        let first = take(&a, 0, t0 + secs(10)).await;
        let second = spawn_anon(&a, 0, t0 + secs(10));
        tokio::time::sleep(secs(2)).await;
        assert_eq!(a.waiting(), 1);
        drop(first);
        assert_eq!(second.await.ok().and_then(Result::ok), Some(secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_goes_away_leaves_the_line() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let _first = take(&a, 0, t0 + secs(30)).await;
        let gone = spawn_anon(&a, 0, t0 + secs(30));
        tokio::task::yield_now().await;
        assert_eq!(a.waiting(), 1);
        gone.abort();
        let _ = gone.await;
        assert_eq!(a.waiting(), 0);
        let next = take(&a, 0, t0 + secs(30)).await.map(|p| p.waited);
        assert_eq!(next.ok(), Some(secs(1)), "its turn went to the next request");
    }

    #[tokio::test(start_paused = true)]
    async fn reload_wakes_the_head_with_the_new_rate() {
        let a = admission(6, 1, 100); // one per 10 s
        let t0 = Instant::now();
        let _first = take(&a, 0, t0 + secs(60)).await;
        let head = spawn_anon(&a, 0, t0 + secs(60));
        tokio::time::sleep(secs(1)).await;
        assert!(a.reconfigure(&policy_of(limits(60, 1, None, 100), None)));
        // 0.1 of a request refilled in the first second at 6 RPM; the other 0.9 takes 0.9 s at 60 RPM.
        let waited = head.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited >= Duration::from_millis(1900) && waited <= Duration::from_millis(1901), "{waited:?}");
    }
}
