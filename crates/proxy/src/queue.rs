//! Admission: a bounded queue in front of the limiter. A request that can go at once (nobody
//! waiting, the limits allow it) takes its permit inline; otherwise it waits in line and one
//! dispatcher task hands out permits in order as the limits allow, rejecting requests whose
//! deadline passes or can no longer be met. Waiting costs a channel, not a poll.
//!
//! A request keeps its place in line (`Place`) across attempts: one the upstream refused with
//! 429 goes back in front of everyone who arrived after it. A request held by a pause of its
//! own model never holds up requests for other models behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use llmproxy_api::policy::LimitsPolicy;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::labels::TokenKind;
use crate::limiter::{Ask, Calibration, Decision, Limit, Limiter, Mark};
use crate::metrics::Metrics;
use crate::quota::QuotaHeaders;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place(u64);

type Grant = Result<Permit, Rejection>;

struct Waiter {
    ask: Ask,
    deadline: Instant,
    start: Instant,
    tx: oneshot::Sender<Grant>,
    /// What held it the last time the dispatcher looked.
    held_by: Limit,
}

struct Shared {
    limiter: Limiter,
    line: BTreeMap<Place, Waiter>,
    deadlines: BTreeSet<(Instant, Place)>,
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
}

/// An admitted request: holds a concurrency slot and its token charge until dropped.
pub struct Permit {
    admission: Arc<Admission>,
    /// Tokens charged for this attempt (changes when settled).
    charged: u64,
    /// Tokens given back because the upstream did not count the attempt.
    refunded: u64,
    mark: Mark,
    /// How long the request queued.
    pub waited: Duration,
}

impl Permit {
    /// The upstream charged nothing for this attempt (it refused it with 429, refused the
    /// proxy's key, or never saw it): its tokens go back.
    pub fn refund(&mut self) {
        if self.charged == 0 {
            return;
        }
        let mut shared = self.admission.lock();
        shared.limiter.refund(Instant::now(), self.charged);
        shared.limiter.answered(&self.mark);
        drop(shared);
        self.refunded += self.charged;
        self.charged = 0;
        self.admission.wake_if_waiting();
    }

    /// The answer is complete; `used` is its real usage if it reported one. Under `used`
    /// accounting the charge becomes the usage, under `requested` it stands.
    pub fn settle(&mut self, used: Option<u64>) {
        let charged = self.admission.lock().limiter.settle(Instant::now(), self.charged, used);
        if charged != self.charged {
            self.charged = charged;
            self.admission.wake_if_waiting();
        }
    }

    /// Follow what the upstream's headers say remains; `refused` when they came with a 429.
    pub fn calibrate(&self, quota: &QuotaHeaders, refused: bool, max_reset: Duration) {
        if !quota.says_remaining() {
            return;
        }
        let c = Calibration { mark: self.mark, refunded: self.refunded, refused, max_reset };
        self.admission.lock().limiter.calibrate(Instant::now(), quota, c);
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
pub struct BytesLease {
    admission: Arc<Admission>,
    bytes: u64,
}

impl BytesLease {
    /// Count `more` bytes too, if the budget has room.
    pub fn grow(&mut self, more: u64) -> Result<(), Rejection> {
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
    place: Place,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let mut shared = self.admission.lock();
        if let Some(w) = shared.line.remove(&self.place) {
            shared.deadlines.remove(&(w.deadline, self.place));
            drop(shared);
            self.admission.left_line();
        }
    }
}

impl Admission {
    /// A new admission gate with full buckets, and its dispatcher task (on the current tokio
    /// runtime; it ends when the gate is dropped).
    pub fn new(limits: &LimitsPolicy, metrics: Arc<Metrics>) -> Arc<Self> {
        let admission = Arc::new(Self {
            shared: Mutex::new(Shared {
                limiter: Limiter::new(limits, Instant::now()),
                line: BTreeMap::new(),
                deadlines: BTreeSet::new(),
            }),
            wake: Arc::new(Notify::new()),
            bytes_held: AtomicU64::new(0),
            bytes_max: AtomicU64::new(u64::MAX),
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            next_place: AtomicU64::new(0),
            metrics,
        });
        tokio::spawn(dispatch(Arc::downgrade(&admission), Arc::clone(&admission.wake)));
        admission
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
    pub fn set_byte_budget(&self, max: u64) {
        self.bytes_max.store(max, Ordering::SeqCst);
    }

    fn take_bytes(&self, n: u64) -> Result<(), Rejection> {
        let max = self.bytes_max.load(Ordering::SeqCst);
        let taken = self.bytes_held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            held.checked_add(n).filter(|total| *total <= max)
        });
        match taken {
            Ok(_) => Ok(()),
            Err(_) => Err(self.reject(Limit::QueueBytes, true, Instant::now(), Duration::from_secs(1))),
        }
    }

    /// Count `bytes` of a request body against `queue.maxBytes`.
    pub fn reserve_bytes(self: &Arc<Self>, bytes: u64) -> Result<BytesLease, Rejection> {
        self.take_bytes(bytes)?;
        Ok(BytesLease { admission: Arc::clone(self), bytes })
    }

    /// The most body bytes held at once (`queue.maxBytes`).
    pub fn byte_budget(&self) -> u64 {
        self.bytes_max.load(Ordering::SeqCst)
    }

    /// Hold a place against `max_queue` outside the line (a request waiting for an identical
    /// one's answer, or for its next attempt).
    pub fn hold(self: &Arc<Self>, max_queue: usize) -> Result<Held, Rejection> {
        let depth = self.lock().line.len();
        let held = self.held.fetch_add(1, Ordering::SeqCst);
        if depth + held >= max_queue {
            self.held.fetch_sub(1, Ordering::SeqCst);
            let start = Instant::now();
            return Err(self.reject(Limit::QueueSize, true, start, Duration::from_secs(1)));
        }
        Ok(Held(Arc::clone(self)))
    }

    /// A place at the end of the line, for a request that just arrived.
    pub fn place(&self) -> Place {
        Place(self.next_place.fetch_add(1, Ordering::Relaxed))
    }

    /// Wait for a turn under the limits, at most until `deadline`, behind at most `max_queue`
    /// other waiting requests. A request that was admitted before (a requeue) passes
    /// `usize::MAX`: the bound is for new arrivals.
    pub async fn admit(
        self: &Arc<Self>,
        place: Place,
        ask: &Ask,
        deadline: Instant,
        max_queue: usize,
    ) -> Result<Permit, Rejection> {
        let start = Instant::now();
        let rx = {
            let mut shared = self.lock();
            if shared.line.is_empty() && shared.limiter.decide(start, ask) == Decision::Go {
                let mark = shared.limiter.admit(start, ask);
                drop(shared);
                return Ok(self.permit(ask, mark, start));
            }
            let depth = shared.line.len() + self.held.load(Ordering::SeqCst);
            if depth >= max_queue {
                let retry_after = queue_full_retry_after(shared.limiter.limits(), depth);
                drop(shared);
                return Err(self.reject(Limit::QueueSize, true, start, retry_after));
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { ask: ask.clone(), deadline, start, tx, held_by: Limit::Requests };
            shared.deadlines.insert((deadline, place));
            shared.line.insert(place, waiter);
            rx
        };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.metrics.queue_depth.inc();
        let _in_line = InLine { admission: self, place };
        self.wake.notify_one();
        match rx.await {
            Ok(grant) => grant,
            // The dispatcher went away (the proxy is being dropped).
            Err(_) => Err(self.reject(Limit::Requests, false, start, Duration::from_secs(1))),
        }
    }

    fn permit(self: &Arc<Self>, ask: &Ask, mark: Mark, start: Instant) -> Permit {
        let waited = start.elapsed();
        self.metrics.inflight.inc();
        self.metrics.queue_wait.observe(waited.as_secs_f64());
        self.metrics.tokens(TokenKind::Reserved, ask.tokens);
        Permit { admission: Arc::clone(self), charged: ask.tokens, refunded: 0, mark, waited }
    }

    fn reject(&self, limit: Limit, queue_full: bool, start: Instant, retry_after: Duration) -> Rejection {
        self.metrics.throttled(limit);
        Rejection { limit, queue_full, retry_after, waited: start.elapsed() }
    }

    /// Hand out every permit the limits allow now and refuse waiters whose deadline passed or
    /// cannot be met. Returns when to look again (besides being woken), and the grants whose
    /// requests went away meanwhile (dropped by the caller, outside the lock).
    fn pump(self: &Arc<Self>, now: Instant) -> (Option<Instant>, Vec<Grant>) {
        let mut undelivered = Vec::new();
        let mut shared = self.lock();
        let shared = &mut *shared;
        // Deadlines that passed.
        while let Some(&(deadline, place)) = shared.deadlines.first() {
            if deadline > now {
                break;
            }
            shared.deadlines.pop_first();
            if let Some(w) = shared.line.remove(&place) {
                let rejection = self.reject(w.held_by, false, w.start, Duration::from_secs(1));
                self.left_line();
                if let Err(grant) = w.tx.send(Err(rejection)) {
                    undelivered.push(grant);
                }
            }
        }
        // Admit in order. A limit every request shares stops the scan (first come, first
        // served); a pause of one model only skips that model's requests.
        let mut next = shared.deadlines.first().map(|(d, _)| *d);
        let mut paused_models: Vec<std::sync::Arc<str>> = Vec::new();
        let mut cursor = Bound::Unbounded;
        while let Some((&place, w)) = shared.line.range((cursor, Bound::Unbounded)).next() {
            cursor = Bound::Excluded(place);
            if w.ask.model.as_ref().is_some_and(|m| paused_models.contains(m)) {
                continue;
            }
            let decision = shared.limiter.decide(now, &w.ask);
            let (at, limit, scoped) = match decision {
                Decision::Go => {
                    let Some(w) = shared.line.remove(&place) else { continue };
                    shared.deadlines.remove(&(w.deadline, place));
                    let mark = shared.limiter.admit(now, &w.ask);
                    self.left_line();
                    let permit = self.permit(&w.ask, mark, w.start);
                    if let Err(grant) = w.tx.send(Ok(permit)) {
                        undelivered.push(grant);
                    }
                    continue;
                }
                Decision::WaitForSlot => {
                    if let Some(w) = shared.line.get_mut(&place) {
                        w.held_by = Limit::Concurrency;
                    }
                    break;
                }
                Decision::Wait { at, limit, scoped } => (at, limit, scoped),
            };
            let (deadline, model) = (w.deadline, w.ask.model.clone());
            // Token debt can shrink: requests in flight settle against real usage.
            let may_shrink = limit == Limit::Tokens && shared.limiter.inflight() > 0;
            if at > deadline && !may_shrink {
                // Refuse at once: waiting cannot help.
                if let Some(w) = shared.line.remove(&place) {
                    shared.deadlines.remove(&(w.deadline, place));
                    let rejection = self.reject(limit, false, w.start, at - now);
                    self.left_line();
                    if let Err(grant) = w.tx.send(Err(rejection)) {
                        undelivered.push(grant);
                    }
                }
                continue;
            }
            if let Some(w) = shared.line.get_mut(&place) {
                w.held_by = limit;
            }
            next = Some(next.map_or(at, |n| n.min(at)));
            match (scoped, model) {
                (true, Some(model)) => paused_models.push(model),
                _ => break,
            }
        }
        (next, undelivered)
    }

    /// Hold requests for `model` (every request, without a model) until `until`, because the
    /// upstream said that window is spent.
    pub fn pause(&self, model: Option<&Arc<str>>, until: Instant) {
        self.lock().limiter.pause(Instant::now(), model, until);
        self.metrics.upstream_pauses.inc();
        self.wake.notify_one();
    }

    /// Apply reloaded limits; the line is looked at again at once.
    pub fn reconfigure(&self, limits: &LimitsPolicy) -> bool {
        let changed = self.lock().limiter.reconfigure(limits, Instant::now());
        if changed {
            self.wake.notify_one();
        }
        changed
    }

    /// Requests waiting now (in line).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Body bytes held now by waiting and in-flight requests.
    pub fn bytes_held(&self) -> u64 {
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

    fn with(limits: LimitsPolicy) -> Arc<Admission> {
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        Admission::new(&limits, Arc::new(metrics))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    async fn take(a: &Arc<Admission>, tokens: u64, deadline: Instant) -> Result<Permit, Rejection> {
        a.admit(a.place(), &Ask::tokens(tokens), deadline, 100).await
    }

    fn spawn_admit(
        a: &Arc<Admission>,
        place: Place,
        ask: Ask,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Result<Duration, Rejection>> {
        let a = Arc::clone(a);
        tokio::spawn(async move { a.admit(place, &ask, deadline, 100).await.map(|p| p.waited) })
    }

    // tokio's paused clock auto-advances while every task sleeps: a fake clock, no real waiting.
    #[tokio::test(start_paused = true)]
    async fn queued_requests_are_admitted_in_order_at_the_rate() {
        let a = admission(60, 1, 100); // one per second
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            tasks.push((i, spawn_admit(&a, a.place(), Ask::tokens(0), t0 + secs(30))));
            tokio::task::yield_now().await; // arrive in order
        }
        for (i, task) in tasks {
            let waited = task.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(waited, Ok(secs(i)), "request {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeued_request_goes_before_later_arrivals() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let early = a.place();
        let _first = take(&a, 0, t0 + secs(30)).await;
        let later = spawn_admit(&a, a.place(), Ask::tokens(0), t0 + secs(30));
        tokio::task::yield_now().await;
        // The early request comes back (its upstream said 429) after the later one queued.
        let again = spawn_admit(&a, early, Ask::tokens(0), t0 + secs(30));
        let (again, later) = (again.await.ok().and_then(Result::ok), later.await.ok().and_then(Result::ok));
        assert_eq!((again, later), (Some(secs(1)), Some(secs(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let a = admission(60, 1, 100);
        let deadline = Instant::now() + secs(30);
        let _first = a.admit(a.place(), &Ask::tokens(0), deadline, 0).await;
        let r = a.admit(a.place(), &Ask::tokens(0), deadline, 0).await.err();
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
        let head = spawn_admit(&a, a.place(), Ask::tokens(0), t0 + secs(60));
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
        let mut first = take(&a, 500, t0 + secs(30)).await.unwrap_or_else(|_| panic!("first goes at once"));
        let second = spawn_admit(&a, a.place(), Ask::tokens(10), t0 + secs(30));
        tokio::time::sleep(secs(1)).await;
        // It used 20: the debt shrinks to what 20 tokens cost, and the second one goes soon.
        first.settle(Some(20));
        let waited = second.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited > secs(1) && waited < secs(5), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn requested_accounting_never_refunds_but_a_refused_attempt_is_not_charged() {
        let a = with(limits(6000, 100, Some(6000), 100)); // 100 tokens/s, bucket 100
        let t0 = Instant::now();
        let mut p = take(&a, 80, t0 + secs(30)).await.unwrap_or_else(|_| panic!("goes at once"));
        p.settle(Some(10));
        assert_eq!(a.tokens_available().map(f64::round), Some(20.0), "requested: the charge stands");
        p.refund();
        assert_eq!(a.tokens_available().map(f64::round), Some(100.0), "a 429'd attempt costs nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_model_holds_only_its_own_requests() {
        let a = admission(6000, 100, 100);
        let t0 = Instant::now();
        let model = |m: &str| Ask { tokens: 0, model: Some(Arc::from(m)) };
        a.pause(Some(&Arc::from("a")), t0 + secs(20));
        let held = spawn_admit(&a, a.place(), model("a"), t0 + secs(30));
        tokio::task::yield_now().await;
        let other = a.admit(a.place(), &model("b"), t0 + secs(30), 100).await.map(|p| p.waited);
        assert_eq!(other.ok(), Some(Duration::ZERO), "model b goes at once");
        assert_eq!(held.await.ok().and_then(Result::ok), Some(secs(20)));
        // A pause longer than the deadline is refused at once, not waited out.
        a.pause(Some(&Arc::from("a")), Instant::now() + secs(3600));
        let r = a.admit(a.place(), &model("a"), Instant::now() + secs(30), 100).await.err();
        assert_eq!(r.map(|r| r.limit), Some(Limit::UpstreamPause));
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstreams_remaining_lowers_a_bucket_that_ran_ahead() {
        let a = with(limits(6000, 100, Some(60_000), 100)); // 1000 tokens/s, bucket 1000
        let t0 = Instant::now();
        let p = take(&a, 100, t0 + secs(30)).await.unwrap_or_else(|_| panic!("goes at once"));
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
        let mut first = a.reserve_bytes(60).unwrap_or_else(|_| panic!("fits"));
        assert_eq!(a.reserve_bytes(50).err().map(|r| r.limit), Some(Limit::QueueBytes));
        assert!(first.grow(40).is_ok());
        assert!(first.grow(1).is_err(), "never past the budget");
        drop(first);
        assert_eq!(a.bytes_held(), 0);
        // Two places held outside the line fill a queue of two.
        let t0 = Instant::now();
        let _busy = take(&a, 0, t0 + secs(30)).await;
        let h1 = a.hold(2).unwrap_or_else(|_| panic!("room"));
        let _h2 = a.hold(2).unwrap_or_else(|_| panic!("room"));
        assert!(a.hold(2).is_err());
        let full = a.admit(a.place(), &Ask::tokens(0), t0 + secs(30), 2).await.err();
        assert_eq!(full.map(|r| (r.limit, r.queue_full)), Some((Limit::QueueSize, true)));
        drop(h1);
        assert!(a.hold(2).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_slot_freed_by_drop() {
        let a = admission(6000, 100, 1);
        let t0 = Instant::now();
        let first = take(&a, 0, t0 + secs(10)).await;
        let second = spawn_admit(&a, a.place(), Ask::tokens(0), t0 + secs(10));
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
        let gone = spawn_admit(&a, a.place(), Ask::tokens(0), t0 + secs(30));
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
        let head = spawn_admit(&a, a.place(), Ask::tokens(0), t0 + secs(60));
        tokio::time::sleep(secs(1)).await;
        assert!(a.reconfigure(&limits(60, 1, None, 100)));
        // 0.1 of a request refilled in the first second at 6 RPM; the other 0.9 takes 0.9 s at 60 RPM.
        let waited = head.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited >= Duration::from_millis(1900) && waited <= Duration::from_millis(1901), "{waited:?}");
    }
}
