//! The admission gate's state: what its lock guards (the limiter, the retry budget, the lines)
//! and the counters beside it, how a permit is issued, and how permits report back.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::lines::{Lines, Party, Place};
use super::permit::{End, Issuer, Permit, Rejection};
use crate::admission::budget::RetryBudget;
use crate::admission::limiter::{Ask, Calibration, Cost, Limit, Limiter, Mark, Verdict};
use crate::protocol::ratelimit_headers::QuotaHeaders;
use crate::telemetry::labels::TokenKind;
use crate::telemetry::metrics::Metrics;

/// What the gate's lock guards.
pub(super) struct Shared {
    pub(super) limiter: Limiter,
    pub(super) budget: RetryBudget,
    pub(super) lines: Lines,
    pub(super) batch_max_delay: Duration,
}

impl Shared {
    /// A request's virtual start time, set once (at its first attempt).
    pub(super) fn tag(&mut self, place: &mut Place, ask: &Ask, party: &Party) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let cost =
            if self.limiter.limits().tokens_per_minute.is_some() { ask.tokens.max(1) as f64 } else { 1.0 };
        self.lines.tag(place, cost, party)
    }
}

/// Shared admission state of one proxy.
pub struct Admission {
    pub(super) shared: Mutex<Shared>,
    /// Request body bytes held by waiting and in-flight requests, and the most allowed.
    pub(super) bytes_held: AtomicU64,
    pub(super) bytes_max: AtomicU64,
    /// Requests that count against the queue bound outside the line (coalesced followers,
    /// retries sleeping through a back-off).
    pub(super) held: AtomicUsize,
    /// Wakes the dispatcher: a request joined the line, a slot or tokens came free, limits
    /// changed.
    pub(super) wake: Arc<Notify>,
    pub(super) waiting: AtomicUsize,
    pub(super) next_place: AtomicU64,
    pub(super) metrics: Arc<Metrics>,
    /// Never notified: what the lessee waits on without shared state (it ticks instead).
    pub(super) idle_lessee: Arc<Notify>,
}

impl Admission {
    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn wake_if_waiting(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake.notify_one();
        }
    }

    pub(super) fn left_line(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.dec();
    }

    pub(super) fn take_bytes(&self, n: u64) -> Result<(), Rejection> {
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

    /// The permit of a request admitted at `mark` that arrived at `start`.
    pub(super) fn issue(self: &Arc<Self>, ask: &Ask, party: &Party, mark: Mark, start: Instant) -> Permit {
        let waited = start.elapsed();
        self.metrics.inflight.inc();
        self.metrics.recent_wait(waited);
        party.metrics.queue_wait(waited.as_secs_f64());
        party.metrics.tokens(TokenKind::Reserved, ask.tokens);
        Permit::new(Arc::clone(self) as Arc<dyn Issuer>, ask.client.clone(), ask.cost(), mark, waited)
    }

    pub(super) fn reject(
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
}

impl Issuer for Admission {
    fn report(
        &self,
        mark: &Mark,
        client: &Option<Arc<str>>,
        verdict: &Verdict,
        refund: Option<Cost>,
        calibration: Option<(&QuotaHeaders, Calibration)>,
    ) {
        let now = Instant::now();
        let mut shared = self.lock();
        let ejected = shared.limiter.verdict(now, mark, verdict);
        if let Some(tokens) = refund {
            shared.limiter.refund(now, mark, client, tokens);
            shared.limiter.answered(mark);
        }
        if let Some((quota, c)) = calibration {
            shared.limiter.calibrate(now, quota, mark, c);
        }
        drop(shared);
        if let Verdict::Exhausted(x) = verdict {
            tracing::warn!(
                upstream = %mark.endpoint.name,
                model = mark.model.as_deref().unwrap_or_default(),
                reason = x.reason.label(),
                "the upstream reports a quota no wait fixes is spent: its requests are refused at once or \
                 sent elsewhere until its reset or a successful probe"
            );
            self.metrics.upstream_exhausted(&mark.endpoint.name, x.reason.label());
        }
        if ejected {
            tracing::warn!(upstream = %mark.endpoint.name, "upstream endpoint taken out after failures");
            self.metrics.upstream_ejected(&mark.endpoint.name);
            self.wake.notify_one();
        } else if refund.is_some() {
            self.wake_if_waiting();
        }
    }

    fn release(&self, mark: &Mark, client: &Option<Arc<str>>, end: End) {
        let now = Instant::now();
        let mut shared = self.lock();
        if let Some((charged, used)) = end.settle {
            shared.limiter.settle(now, mark, client, charged, used);
        }
        if let Some(until) = end.pause {
            shared.limiter.pause(now, mark, until);
        }
        shared.limiter.answered(mark);
        shared.limiter.release();
        drop(shared);
        self.metrics.inflight.dec();
        if end.pause.is_some() {
            self.metrics.upstream_pauses.inc();
            self.wake.notify_one();
        } else {
            self.wake_if_waiting();
        }
    }

    fn take_bytes(&self, n: u64) -> Result<(), Rejection> {
        Admission::take_bytes(self, n)
    }

    fn give_bytes(&self, n: u64) {
        self.bytes_held.fetch_sub(n, Ordering::SeqCst);
    }

    fn unhold(&self) {
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}
