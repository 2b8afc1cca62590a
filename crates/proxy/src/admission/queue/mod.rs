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

mod dispatcher;
mod gate;
mod lines;
mod permit;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmproxy_api::Policy;
use llmproxy_api::policy::LimitsPolicy;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use self::dispatcher::dispatch;
pub use self::gate::Admission;
use self::gate::Shared;
use self::lines::{Lines, Waiter};
pub(crate) use self::lines::{Party, Place};
pub(crate) use self::permit::BytesLease;
use self::permit::Issuer;
pub(crate) use self::permit::{Held, Permit, Rejection, Report};
use crate::admission::budget::RetryBudget;
use crate::admission::limiter::{Ask, Decision, EndpointReport, Holds, Limit, Limiter};
use crate::telemetry::metrics::Metrics;

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

    /// Set `queue.maxBytes`.
    pub(crate) fn set_byte_budget(&self, max: u64) {
        self.bytes_max.store(max, Ordering::SeqCst);
    }

    /// Count `bytes` of a request body against `queue.maxBytes`.
    pub(crate) fn reserve_bytes(self: &Arc<Self>, bytes: u64) -> Result<BytesLease, Rejection> {
        self.take_bytes(bytes)?;
        Ok(BytesLease::new(Arc::clone(self) as Arc<dyn Issuer>, bytes))
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
        Ok(Held::new(Arc::clone(self) as Arc<dyn Issuer>))
    }

    /// A place at the end of the line, for a request that just arrived.
    pub fn place(&self) -> Place {
        Place::new(self.next_place.fetch_add(1, Ordering::Relaxed))
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
                shared.lines.admitted(tag);
                drop(guard);
                return Ok(self.issue(ask, party, mark, start));
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

    /// Why the endpoints that serve `ask` take none of it: the quotas they reported spent.
    pub(crate) fn exhausted_for(&self, ask: &Ask) -> Vec<String> {
        self.lock().limiter.exhausted_for(Instant::now(), ask)
    }

    /// Every endpoint's state, for metrics and status.
    pub fn endpoints(&self) -> Vec<EndpointReport> {
        self.lock().limiter.reports(Instant::now())
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

#[cfg(test)]
mod tests {
    use llmproxy_api::policy::ClientsPolicy;

    use super::*;

    pub(super) fn limits(rpm: u64, burst: u64, tpm: Option<u64>, max_concurrent: u32) -> LimitsPolicy {
        LimitsPolicy {
            request_burst: burst,
            token_burst: tpm.map_or(0, |t| t / 60),
            max_concurrent,
            ..LimitsPolicy::per_minute(rpm, tpm)
        }
    }

    pub(super) fn admission(rpm: u64, burst: u64, max_concurrent: u32) -> Arc<Admission> {
        with(limits(rpm, burst, None, max_concurrent))
    }

    pub(super) fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(prometheus::Registry::new()).unwrap())
    }

    /// A policy of one upstream with these limits (as `spec.upstream` gives).
    pub(super) fn policy_of(limits: LimitsPolicy, clients: Option<ClientsPolicy>) -> Policy {
        let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 60}";
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
        let mut p = Policy::from_spec(&spec).unwrap();
        p.upstreams[0].limits = llmproxy_api::policy::EndpointLimits::of(&limits);
        p.limits = limits;
        p.clients = clients;
        p
    }

    pub(super) fn with(limits: LimitsPolicy) -> Arc<Admission> {
        Admission::new(&policy_of(limits, None), metrics())
    }

    pub(super) fn anon() -> Party {
        Party::anonymous(&metrics())
    }

    pub(super) fn party(name: &str, weight: u32, batch: bool) -> Party {
        Party {
            name: Some(Arc::from(name)),
            weight,
            batch,
            max_queued: usize::MAX,
            metrics: metrics().client(Some(name)),
        }
    }

    pub(super) fn ask_of(p: &Party) -> Ask {
        Ask { client: p.name.clone(), ..Ask::default() }
    }

    pub(super) fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    pub(super) async fn take(
        a: &Arc<Admission>,
        tokens: u64,
        deadline: Instant,
    ) -> Result<Permit, Rejection> {
        a.admit(&mut a.place(), &Ask::tokens(tokens), &anon(), deadline, 100).await
    }

    pub(super) fn spawn_admit(
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

    pub(super) fn spawn_anon(
        a: &Arc<Admission>,
        tokens: u64,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Result<Duration, Rejection>> {
        spawn_admit(a, a.place(), Ask::tokens(tokens), anon(), deadline)
    }

    pub(super) fn serde_yaml_clients(extra: &str) -> ClientsPolicy {
        let yaml = format!(
            "upstream: {{url: 'https://x.io'}}\nlimits: {{requestsPerMinute: 60}}\nclients:\n  {extra}\n"
        );
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
        llmproxy_api::Policy::from_spec(&spec).ok().and_then(|p| p.clients).expect("clients")
    }

    // tokio's paused clock auto-advances while every task sleeps: a fake clock, no real waiting.
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
}
