//! What admission hands out: a permit for one attempt, a lease on request body bytes, a place
//! held outside the line. Each gives back what it holds when dropped.

use std::sync::Arc;
use std::time::Duration;

use llmproxy_api::policy::UpstreamPolicy;
use tokio::time::Instant;

use crate::admission::limiter::{Calibration, Cost, Limit, Mark, Verdict};
use crate::protocol::ratelimit_headers::QuotaHeaders;
use crate::protocol::tokens::Usage;

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

/// What a permit, a byte lease and a held place need of the gate that issued them, and no
/// more: the gate implements it, so this module depends on its own view of the gate, not on
/// the gate. A permit calls it twice at most: once with what its attempt learned, once when
/// it goes.
pub(crate) trait Issuer: Send + Sync {
    /// What the attempt of `mark` learned, under one lock: its verdict, `refund` tokens given
    /// back (the attempt is answered), then the upstream's quota headers followed.
    fn report(
        &self,
        mark: &Mark,
        client: &Option<Arc<str>>,
        verdict: &Verdict,
        refund: Option<Cost>,
        calibration: Option<(&QuotaHeaders, Calibration)>,
    );
    /// The attempt of `mark` is over, under one lock: settled as `end` says, its model paused
    /// if it says so, and its concurrency slot free.
    fn release(&self, mark: &Mark, client: &Option<Arc<str>>, end: End);
    /// Count `n` more body bytes, if the budget has room.
    fn take_bytes(&self, n: u64) -> Result<(), Rejection>;
    /// Body bytes no longer held.
    fn give_bytes(&self, n: u64);
    /// A place held outside the line is given up.
    fn unhold(&self);
}

/// How an attempt ends, told to the gate as its permit goes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct End {
    /// The answer completed: the tokens charged, and its real usage if it reported one.
    pub(crate) settle: Option<(Cost, Option<Usage>)>,
    /// Hold its model at its endpoint until then.
    pub(crate) pause: Option<Instant>,
}

/// What an attempt learned from its endpoint (its answer, or its silence).
pub(crate) struct Report<'a> {
    /// How it went at the endpoint (its health).
    pub(crate) verdict: Verdict,
    /// The upstream charged nothing for it (it refused it with 429, refused the proxy's key,
    /// or never saw it): its tokens go back.
    pub(crate) refund: bool,
    /// What the upstream's headers said of its quota, if they said anything.
    pub(crate) quota: Option<&'a QuotaHeaders>,
    /// The headers came with a 429.
    pub(crate) refused: bool,
    /// The longest reset taken at its word.
    pub(crate) max_reset: Duration,
}

/// An admitted request: holds a concurrency slot and its token charge until dropped (or
/// settled, or paused). It takes the gate's lock twice at most: when it reports, and when it
/// goes.
pub struct Permit {
    issuer: Arc<dyn Issuer>,
    client: Option<Arc<str>>,
    /// Tokens charged for this attempt.
    charged: Cost,
    /// Tokens given back because the upstream did not count the attempt.
    refunded: Cost,
    mark: Mark,
    /// The gate was told the attempt is over (settled or paused): nothing is left to release.
    released: bool,
    /// How long the request queued.
    pub waited: Duration,
}

impl Permit {
    /// A permit for the attempt of `mark`, charged `charged` tokens.
    pub(super) fn new(
        issuer: Arc<dyn Issuer>,
        client: Option<Arc<str>>,
        charged: Cost,
        mark: Mark,
        waited: Duration,
    ) -> Self {
        Self { issuer, client, charged, refunded: Cost::default(), mark, released: false, waited }
    }

    /// The endpoint this attempt goes to.
    pub fn endpoint(&self) -> &Arc<UpstreamPolicy> {
        &self.mark.endpoint
    }

    /// Tell the gate what the attempt learned, in one go.
    pub(crate) fn report(&mut self, report: &Report<'_>) {
        let refund = (report.refund && self.charged != Cost::default()).then_some(self.charged);
        if let Some(cost) = refund {
            self.refunded = Cost {
                tokens: self.refunded.tokens.saturating_add(cost.tokens),
                input: self.refunded.input.saturating_add(cost.input),
                output: self.refunded.output.saturating_add(cost.output),
            };
            self.charged = Cost::default();
        }
        let calibration = report.quota.filter(|q| q.says_remaining()).map(|q| {
            let c =
                Calibration { refunded: self.refunded, refused: report.refused, max_reset: report.max_reset };
            (q, c)
        });
        self.issuer.report(&self.mark, &self.client, &report.verdict, refund, calibration);
    }

    /// The answer is complete; `used` is its real usage if it reported one. Under `used`
    /// accounting the token charge becomes the usage, under `requested` it stands; input and
    /// output settle to it either way. The attempt is over.
    pub fn settle(self, used: Option<Usage>) {
        let settle = Some((self.charged, used));
        self.release(End { settle, pause: None });
    }

    /// Hold this attempt's model at its endpoint (everything there, without a model) until
    /// `until`, because the endpoint said that window is spent. The attempt is over.
    pub fn pause(self, until: Instant) {
        self.release(End { settle: None, pause: Some(until) });
    }

    fn release(mut self, end: End) {
        self.issuer.release(&self.mark, &self.client, end);
        self.released = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.released {
            self.issuer.release(&self.mark, &self.client, End::default());
        }
    }
}

/// Request body bytes counted against `queue.maxBytes` until dropped.
pub(crate) struct BytesLease {
    issuer: Arc<dyn Issuer>,
    bytes: u64,
}

impl BytesLease {
    /// A lease on `bytes` already counted.
    pub(super) fn new(issuer: Arc<dyn Issuer>, bytes: u64) -> Self {
        Self { issuer, bytes }
    }

    /// Count `more` bytes too, if the budget has room.
    pub(crate) fn grow(&mut self, more: u64) -> Result<(), Rejection> {
        self.issuer.take_bytes(more)?;
        self.bytes += more;
        Ok(())
    }
}

impl Drop for BytesLease {
    fn drop(&mut self) {
        self.issuer.give_bytes(self.bytes);
    }
}

/// A place counted against `queue.maxSize` outside the line, until dropped.
pub struct Held(Arc<dyn Issuer>);

impl Held {
    /// A place already counted.
    pub(super) fn new(issuer: Arc<dyn Issuer>) -> Self {
        Self(issuer)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.unhold();
    }
}

#[cfg(test)]
mod tests {
    use crate::admission::limiter::Ask;

    use super::super::tests::*;
    use super::*;

    /// An answer with these headers, `refund`ed, `refused` with a 429.
    fn answered(quota: Option<&QuotaHeaders>, refund: bool, refused: bool) -> Report<'_> {
        Report { verdict: Verdict::Answered, refund, quota, refused, max_reset: secs(30) }
    }

    // tokio's paused clock auto-advances while every task sleeps: a fake clock, no real waiting.
    #[tokio::test(start_paused = true)]
    async fn requested_accounting_never_refunds_but_a_refused_attempt_is_not_charged() {
        // 100 tokens/s, bucket 100; the upstream's bucket here keeps 10 of them in hand.
        let limits = limits(6000, 100, Some(6000), 100);
        let (a, t0) = (with(limits.clone()), Instant::now());
        let p = take(&a, 80, t0 + secs(30)).await.expect("goes at once");
        p.settle(Some(crate::protocol::tokens::Usage { completion: 10, ..Default::default() }));
        assert_eq!(a.tokens_available().map(f64::round), Some(10.0), "requested: the charge stands");
        let a = with(limits);
        let mut p = take(&a, 80, t0 + secs(30)).await.expect("goes at once");
        p.report(&answered(None, true, false));
        assert_eq!(a.tokens_available().map(f64::round), Some(90.0), "a 429'd attempt costs nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstreams_remaining_lowers_a_bucket_that_ran_ahead() {
        let a = with(limits(6000, 100, Some(60_000), 100)); // 1000 tokens/s, bucket 1000
        let t0 = Instant::now();
        let mut p = take(&a, 100, t0 + secs(30)).await.expect("goes at once");
        // Another request charged 200 after ours was sent; the upstream (others use the key)
        // says only 300 remained after ours.
        let _q = take(&a, 200, t0 + secs(30)).await;
        let headers = QuotaHeaders { remaining_tokens: Some(300), ..QuotaHeaders::default() };
        p.report(&answered(Some(&headers), false, true));
        assert_eq!(a.tokens_available().map(f64::round), Some(100.0), "300 then, minus the 200 since");
        // It never raises the level.
        let generous = QuotaHeaders { remaining_tokens: Some(100_000), ..QuotaHeaders::default() };
        p.report(&answered(Some(&generous), false, true));
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
}
