//! Admission: a bounded FIFO queue in front of the limiter. Requests line up on a fair mutex
//! (the turnstile); only the head of the line consults the limiter and sleeps until its turn,
//! so waiting costs one timer, not a thundering herd of polls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use llmproxy_api::policy::LimitsPolicy;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::labels::TokenKind;
use crate::limiter::{Decision, Limit, Limiter};
use crate::metrics::Metrics;

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

/// Shared admission state of one proxy.
pub struct Admission {
    limiter: Mutex<Limiter>,
    turnstile: tokio::sync::Mutex<()>,
    changed: Notify,
    waiting: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// An admitted request: holds a concurrency slot and a token reservation until dropped.
pub struct Permit {
    admission: Arc<Admission>,
    reserved: u64,
    /// How long the request queued.
    pub waited: Duration,
}

impl Permit {
    /// Correct the token reservation to what the upstream reported.
    pub fn settle(&mut self, used: u64) {
        self.admission.lock().settle(Instant::now(), self.reserved, used);
        self.reserved = used;
        self.admission.changed.notify_one();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.lock().release();
        self.admission.metrics.inflight.dec();
        self.admission.changed.notify_one();
    }
}

/// Decrements the queue depth however the wait ends.
struct Queued<'a>(&'a Admission);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.queue_depth.dec();
    }
}

impl Admission {
    /// A new admission gate with full buckets.
    pub fn new(limits: &LimitsPolicy, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limiter: Mutex::new(Limiter::new(limits, Instant::now())),
            turnstile: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait for a turn under the limits, at most until `deadline`, behind at most `max_queue`
    /// other waiting requests.
    pub async fn admit(
        self: &Arc<Self>,
        tokens: u64,
        deadline: Instant,
        max_queue: usize,
    ) -> Result<Permit, Rejection> {
        let start = Instant::now();
        // Fast path: nobody waiting and the limits allow it now.
        if let Ok(_head) = self.turnstile.try_lock() {
            let mut limiter = self.lock();
            if limiter.decide(start, tokens) == Decision::Go {
                limiter.admit(start, tokens);
                return Ok(self.permit(tokens, start));
            }
        }
        let depth = self.waiting.fetch_add(1, Ordering::SeqCst);
        self.metrics.queue_depth.inc();
        let _queued = Queued(self);
        if depth >= max_queue {
            return Err(self.reject(Limit::QueueSize, true, start, self.queue_full_retry_after(depth)));
        }
        let Ok(_head) = timeout_at(deadline, self.turnstile.lock()).await else {
            // Still behind others at the deadline: the head is waiting on some limit.
            let limit = self.binding_limit(tokens);
            return Err(self.reject(limit, false, start, self.queue_full_retry_after(depth)));
        };
        loop {
            let changed = self.changed.notified();
            let now = Instant::now();
            let decision = self.lock().decide(now, tokens);
            match decision {
                Decision::Go => {
                    self.lock().admit(now, tokens);
                    return Ok(self.permit(tokens, start));
                }
                Decision::WaitUntil(at, limit) => {
                    // Refuse at once when the wait cannot shrink. Token debt can: requests in
                    // flight settle their reservations against real usage when they finish.
                    let may_shrink = limit == Limit::Tokens && self.inflight() > 0;
                    if at > deadline && !may_shrink {
                        return Err(self.reject(limit, false, start, at - now));
                    }
                    if now >= deadline {
                        return Err(self.reject(limit, false, start, at.saturating_duration_since(now)));
                    }
                    tokio::select! {
                        () = sleep_until(at.min(deadline)) => {}
                        () = changed => {}
                    }
                }
                Decision::WaitForSlot => {
                    tokio::select! {
                        () = sleep_until(deadline) => {
                            return Err(self.reject(Limit::Concurrency, false, start, Duration::from_secs(1)));
                        }
                        () = changed => {}
                    }
                }
            }
        }
    }

    fn permit(self: &Arc<Self>, tokens: u64, start: Instant) -> Permit {
        let waited = start.elapsed();
        self.metrics.inflight.inc();
        self.metrics.queue_wait.observe(waited.as_secs_f64());
        self.metrics.tokens(TokenKind::Reserved, tokens);
        Permit { admission: Arc::clone(self), reserved: tokens, waited }
    }

    fn reject(&self, limit: Limit, queue_full: bool, start: Instant, retry_after: Duration) -> Rejection {
        self.metrics.throttled(limit);
        Rejection { limit, queue_full, retry_after, waited: start.elapsed() }
    }

    /// What currently holds the queue (for messages when a waiter gives up).
    fn binding_limit(&self, tokens: u64) -> Limit {
        match self.lock().decide(Instant::now(), tokens) {
            Decision::WaitUntil(_, limit) => limit,
            Decision::WaitForSlot => Limit::Concurrency,
            Decision::Go => Limit::Requests,
        }
    }

    /// Roughly how long until `depth` queued requests have been admitted at the request rate.
    fn queue_full_retry_after(&self, depth: usize) -> Duration {
        let rpm = self.lock().limits().requests_per_minute.max(1);
        let secs = u64::try_from(depth).unwrap_or(u64::MAX).saturating_mul(60) / rpm;
        Duration::from_secs(secs.max(1))
    }

    /// Hold every request until `until`, because the upstream said its window is spent.
    pub fn pause_until(&self, until: Instant) {
        self.lock().pause_until(until);
        self.metrics.upstream_pauses.inc();
        self.changed.notify_one();
    }

    /// Apply reloaded limits; the head of the queue re-evaluates at once.
    pub fn reconfigure(&self, limits: &LimitsPolicy) -> bool {
        let changed = self.lock().reconfigure(limits, Instant::now());
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Requests admitted and not yet finished.
    pub fn inflight(&self) -> u32 {
        self.lock().inflight()
    }

    /// Tokens available now (negative while in debt), `None` when unlimited.
    pub fn tokens_available(&self) -> Option<f64> {
        self.lock().tokens_available(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(rpm: u64, burst: u64, max_concurrent: u32) -> Arc<Admission> {
        let limits = LimitsPolicy {
            requests_per_minute: rpm,
            request_burst: burst,
            tokens_per_minute: None,
            token_burst: 0,
            max_concurrent,
            default_max_tokens: 1,
        };
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        Admission::new(&limits, Arc::new(metrics))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    // tokio's paused clock auto-advances while every task sleeps: a fake clock, no real waiting.
    #[tokio::test(start_paused = true)]
    async fn queued_requests_are_admitted_in_order_at_the_rate() {
        let a = admission(60, 1, 100); // one per second
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            let a = Arc::clone(&a);
            tasks.push(tokio::spawn(async move {
                let p = a.admit(0, t0 + secs(30), 100).await;
                (i, p.map(|p| p.waited))
            }));
            tokio::task::yield_now().await; // arrive in order
        }
        for task in tasks {
            let (i, waited) = task.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(waited, Ok(secs(i)), "request {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let a = admission(60, 1, 100);
        let deadline = Instant::now() + secs(30);
        let _first = a.admit(0, deadline, 0).await.unwrap_or_else(|_| panic!("first goes at once"));
        let r = a.admit(0, deadline, 0).await.err();
        assert_eq!(
            r.as_ref().map(|r| (r.limit, r.queue_full, r.waited)),
            Some((Limit::QueueSize, true, Duration::ZERO))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_cannot_be_met_is_refused_without_waiting_for_it() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let _first = a.admit(0, t0 + secs(5), 10).await;
        let r = a.admit(0, t0 + Duration::from_millis(500), 10).await.err();
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
        let _first = a.admit(0, t0 + secs(60), 10).await;
        let head = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(0, t0 + secs(60), 10).await.map(|p| p.waited) }
        });
        tokio::task::yield_now().await;
        let behind = a.admit(0, t0 + secs(3), 10).await.err();
        assert_eq!(behind.map(|r| (r.limit, r.waited)), Some((Limit::Requests, secs(3))));
        assert_eq!(head.await.ok().and_then(Result::ok), Some(secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn token_debt_that_in_flight_requests_will_settle_is_waited_for_not_refused() {
        let limits = LimitsPolicy {
            requests_per_minute: 6000,
            request_burst: 100,
            tokens_per_minute: Some(600), // 10 tokens/s
            token_burst: 10,
            max_concurrent: 100,
            default_max_tokens: 1,
        };
        let a = Admission::new(
            &limits,
            Arc::new(Metrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"))),
        );
        let t0 = Instant::now();
        // In flight, reserving 500 tokens: 49 s of debt at 10/s, past the 30 s deadline.
        let mut first =
            a.admit(500, t0 + secs(30), 10).await.unwrap_or_else(|_| panic!("first goes at once"));
        let second = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(10, t0 + secs(30), 10).await.map(|p| p.waited) }
        });
        tokio::time::sleep(secs(1)).await;
        // It used 20: the debt shrinks to what 20 tokens cost, and the second one goes soon.
        first.settle(20);
        let waited = second.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited > secs(1) && waited < secs(5), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_slot_freed_by_drop() {
        let a = admission(6000, 100, 1);
        let t0 = Instant::now();
        let first = a.admit(0, t0 + secs(10), 10).await;
        let second = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(0, t0 + secs(10), 10).await.map(|p| p.waited) }
        });
        tokio::time::sleep(secs(2)).await;
        assert_eq!(a.waiting(), 1);
        drop(first);
        assert_eq!(second.await.ok().and_then(Result::ok), Some(secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn reload_wakes_the_head_with_the_new_rate() {
        let a = admission(6, 1, 100); // one per 10 s
        let t0 = Instant::now();
        let _first = a.admit(0, t0 + secs(60), 10).await;
        let head = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(0, t0 + secs(60), 10).await.map(|p| p.waited) }
        });
        tokio::time::sleep(secs(1)).await;
        let faster = LimitsPolicy {
            requests_per_minute: 60,
            request_burst: 1,
            tokens_per_minute: None,
            token_burst: 0,
            max_concurrent: 100,
            default_max_tokens: 1,
        };
        assert!(a.reconfigure(&faster));
        // 0.1 of a request refilled in the first second at 6 RPM; the other 0.9 takes 0.9 s at 60 RPM.
        let waited = head.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited >= Duration::from_millis(1900) && waited <= Duration::from_millis(1901), "{waited:?}");
    }
}
