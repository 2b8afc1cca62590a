//! Request and token buckets (GCRA-equivalent token buckets that may go into debt), the
//! concurrency cap and the upstream pause. Pure: every method takes `now`, so tests drive a
//! fake clock. Governor's GCRA cannot give tokens back or charge a request larger than the burst,
//! and settling token reservations against real usage needs both, hence this small type.

use std::fmt;
use std::time::Duration;

use llmproxy_api::policy::LimitsPolicy;
use tokio::time::Instant;

/// Which limit held a request back; named in 429 messages and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `limits.requestsPerMinute` / `burst`.
    Requests,
    /// `limits.tokensPerMinute`.
    Tokens,
    /// `limits.maxConcurrent`.
    Concurrency,
    /// The upstream asked everyone to wait (429 with Retry-After, or remaining quota 0).
    UpstreamPause,
    /// `queue.maxSize`.
    QueueSize,
}

impl Limit {
    /// Every limit, for initialising metric series.
    pub const ALL: [Limit; 5] =
        [Limit::Requests, Limit::Tokens, Limit::Concurrency, Limit::UpstreamPause, Limit::QueueSize];

    /// A low-cardinality label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests_per_minute",
            Limit::Tokens => "tokens_per_minute",
            Limit::Concurrency => "max_concurrent",
            Limit::UpstreamPause => "upstream_retry_after",
            Limit::QueueSize => "queue_size",
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
        })
    }
}

/// A token bucket: `cap` units, refilled at `per_sec`, allowed to go negative so that a cost
/// larger than the bucket is admitted once the bucket is full and then paid off over time.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    per_sec: f64,
    cap: f64,
    level: f64,
    at: Instant,
}

#[allow(clippy::cast_precision_loss)] // rates and costs are far below 2^52
impl Bucket {
    pub(crate) fn full(per_minute: u64, cap: u64, now: Instant) -> Self {
        let cap = cap.max(1) as f64;
        Self { per_sec: per_minute as f64 / 60.0, cap, level: cap, at: now }
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
        now + Duration::from_micros(micros as u64)
    }

    pub(crate) fn take(&mut self, now: Instant, cost: u64) {
        self.refill(now);
        self.level -= cost as f64;
    }

    pub(crate) fn give(&mut self, now: Instant, amount: u64) {
        self.refill(now);
        self.level = (self.level + amount as f64).min(self.cap);
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Admit now.
    Go,
    /// Nothing can change before this instant unless the limits are reloaded.
    WaitUntil(Instant, Limit),
    /// All concurrency slots are taken; wait for one to be released.
    WaitForSlot,
}

/// All limits of one LlmProxy, as seen by one replica.
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: LimitsPolicy,
    requests: Bucket,
    tokens: Option<Bucket>,
    paused_until: Option<Instant>,
    inflight: u32,
}

impl Limiter {
    pub(crate) fn new(limits: &LimitsPolicy, now: Instant) -> Self {
        Self {
            requests: Bucket::full(limits.requests_per_minute, limits.request_burst, now),
            tokens: limits.tokens_per_minute.map(|tpm| Bucket::full(tpm, limits.token_burst, now)),
            limits: limits.clone(),
            paused_until: None,
            inflight: 0,
        }
    }

    pub(crate) fn decide(&mut self, now: Instant, tokens: u64) -> Decision {
        if self.inflight >= self.limits.max_concurrent {
            return Decision::WaitForSlot;
        }
        let mut at = now;
        let mut why = Limit::Requests;
        if let Some(until) = self.paused_until.filter(|u| *u > now) {
            (at, why) = (until, Limit::UpstreamPause);
        }
        let r = self.requests.ready_at(now, 1);
        if r > at {
            (at, why) = (r, Limit::Requests);
        }
        if let Some(bucket) = &mut self.tokens {
            let t = bucket.ready_at(now, tokens);
            if t > at {
                (at, why) = (t, Limit::Tokens);
            }
        }
        if at > now { Decision::WaitUntil(at, why) } else { Decision::Go }
    }

    /// Take one request, `tokens` tokens and a concurrency slot. Call after `decide` said Go.
    pub(crate) fn admit(&mut self, now: Instant, tokens: u64) {
        self.requests.take(now, 1);
        if let Some(bucket) = &mut self.tokens {
            bucket.take(now, tokens);
        }
        self.inflight += 1;
    }

    pub(crate) fn release(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Correct a token reservation once the real usage is known.
    pub(crate) fn settle(&mut self, now: Instant, reserved: u64, used: u64) {
        if let Some(bucket) = &mut self.tokens {
            if used < reserved {
                bucket.give(now, reserved - used);
            } else {
                bucket.take(now, used - reserved);
            }
        }
    }

    /// Hold every request until `until` (the upstream's window reopens).
    pub(crate) fn pause_until(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
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
            requests_per_minute: rpm,
            request_burst: burst,
            tokens_per_minute: tpm,
            token_burst,
            max_concurrent,
            default_max_tokens: 100,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_paced_at_the_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(600, 3, None, 0, 100), t0); // 10/s, burst 3
        for _ in 0..3 {
            assert_eq!(l.decide(t0, 0), Decision::Go);
            l.admit(t0, 0);
        }
        assert_eq!(l.decide(t0, 0), Decision::WaitUntil(t0 + ms(100), Limit::Requests));
        assert_eq!(l.decide(t0 + ms(99), 0), Decision::WaitUntil(t0 + ms(100), Limit::Requests));
        assert_eq!(l.decide(t0 + ms(100), 0), Decision::Go);
        l.admit(t0 + ms(100), 0);
        assert_eq!(l.decide(t0 + ms(100), 0), Decision::WaitUntil(t0 + ms(200), Limit::Requests));
    }

    #[test]
    fn a_minute_of_requests_takes_a_minute() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(60, 1, None, 0, 100), t0);
        let mut now = t0;
        for _ in 0..61 {
            match l.decide(now, 0) {
                Decision::Go => {}
                Decision::WaitUntil(t, _) => now = t,
                Decision::WaitForSlot => panic!("no concurrency limit here"),
            }
            l.admit(now, 0);
        }
        assert_eq!(now.duration_since(t0), Duration::from_secs(60));
    }

    #[test]
    fn token_reservations_wait_and_settle() {
        let t0 = Instant::now();
        // 6000 TPM = 100 tokens/s, bucket of 100.
        let mut l = Limiter::new(&limits(6000, 100, Some(6000), 100, 100), t0);
        assert_eq!(l.decide(t0, 80), Decision::Go);
        l.admit(t0, 80);
        assert_eq!(l.decide(t0, 80), Decision::WaitUntil(t0 + ms(600), Limit::Tokens));
        // The first request used only 20 of its 80: the difference is free at once.
        l.settle(t0, 80, 20);
        assert_eq!(l.decide(t0, 80), Decision::Go);
        // Using more than reserved is charged too.
        l.admit(t0, 80);
        l.settle(t0, 80, 100);
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-20.0));
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_goes_into_debt() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, Some(6000), 100, 100), t0);
        l.admit(t0, 50);
        assert_eq!(l.decide(t0, 1000), Decision::WaitUntil(t0 + ms(500), Limit::Tokens));
        l.admit(t0 + ms(500), 1000);
        // 900 tokens of debt at 100/s: the next small request waits 9 s + its own cost.
        assert_eq!(l.decide(t0 + ms(500), 10), Decision::WaitUntil(t0 + ms(9600), Limit::Tokens));
    }

    #[test]
    fn concurrency_slots() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, None, 0, 2), t0);
        l.admit(t0, 0);
        l.admit(t0, 0);
        assert_eq!(l.decide(t0, 0), Decision::WaitForSlot);
        l.release();
        assert_eq!(l.decide(t0, 0), Decision::Go);
    }

    #[test]
    fn upstream_pause_holds_everyone() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&limits(6000, 100, None, 0, 10), t0);
        l.pause_until(t0 + Duration::from_secs(2));
        l.pause_until(t0 + Duration::from_secs(1)); // an earlier pause never shortens a longer one
        assert_eq!(l.decide(t0, 0), Decision::WaitUntil(t0 + Duration::from_secs(2), Limit::UpstreamPause));
        assert_eq!(l.decide(t0 + Duration::from_secs(2), 0), Decision::Go);
    }

    #[test]
    fn reload_keeps_state_unless_limits_change() {
        let t0 = Instant::now();
        let base = limits(60, 1, Some(600), 10, 10);
        let mut l = Limiter::new(&base, t0);
        l.admit(t0, 10);
        assert!(!l.reconfigure(&base.clone(), t0), "same limits: nothing changes");
        assert_eq!(l.decide(t0, 1), Decision::WaitUntil(t0 + Duration::from_secs(1), Limit::Requests));
        // Lowering the rate slows admission at once; the spent burst stays spent.
        assert!(l.reconfigure(&limits(30, 1, Some(600), 10, 10), t0));
        assert_eq!(l.decide(t0, 1), Decision::WaitUntil(t0 + Duration::from_secs(2), Limit::Requests));
        // Dropping the token limit removes that bucket.
        assert!(l.reconfigure(&limits(30, 1, None, 0, 10), t0));
        assert_eq!(l.tokens_available(t0), None);
    }
}
