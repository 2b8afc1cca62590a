//! The retry budget: over a sliding window, retries after errors may be at most a share of
//! first attempts plus a floor per second (as Finagle and Linkerd budget them), so an upstream
//! outage is not multiplied by `retry.maxAttempts`. Waiting out a 429's window is a requeue,
//! not a retry, and is not counted here. Pure: every method takes `now`.

use llmproxy_api::policy::RetryPolicy;
use tokio::time::Instant;

/// The window, in one-second slots.
const WINDOW_SECS: usize = 10;

/// First attempts and retries per second over the last [`WINDOW_SECS`] seconds.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    ratio: f64,
    floor_per_sec: u32,
    base: Instant,
    /// The slot (seconds since `base`) written last.
    last: u64,
    /// (first attempts, retries) per second, indexed by second modulo the window.
    slots: [(u64, u64); WINDOW_SECS],
}

impl RetryBudget {
    pub(crate) fn new(policy: &RetryPolicy, now: Instant) -> Self {
        Self {
            ratio: policy.budget_ratio,
            floor_per_sec: policy.budget_min_per_second,
            base: now,
            last: 0,
            slots: [(0, 0); WINDOW_SECS],
        }
    }

    pub(crate) fn reconfigure(&mut self, policy: &RetryPolicy) {
        self.ratio = policy.budget_ratio;
        self.floor_per_sec = policy.budget_min_per_second;
    }

    /// Move to the slot of `now`, clearing the seconds that passed since the last one.
    fn roll(&mut self, now: Instant) -> usize {
        let second = now.saturating_duration_since(self.base).as_secs();
        let passed = second.saturating_sub(self.last);
        for s in 1..=passed.min(WINDOW_SECS as u64) {
            self.slots[((self.last + s) % WINDOW_SECS as u64) as usize] = (0, 0);
        }
        self.last = self.last.max(second);
        (self.last % WINDOW_SECS as u64) as usize
    }

    /// Count a first attempt.
    pub(crate) fn first(&mut self, now: Instant) {
        let slot = self.roll(now);
        self.slots[slot].0 += 1;
    }

    /// Whether one more retry fits the budget; if so it is counted.
    pub(crate) fn try_retry(&mut self, now: Instant) -> bool {
        let slot = self.roll(now);
        let (firsts, retries) = self.slots.iter().fold((0u64, 0u64), |a, s| (a.0 + s.0, a.1 + s.1));
        #[allow(clippy::cast_precision_loss)]
        let allowed = self.ratio * firsts as f64 + f64::from(self.floor_per_sec) * WINDOW_SECS as f64;
        #[allow(clippy::cast_precision_loss)]
        let fits = (retries + 1) as f64 <= allowed;
        if fits {
            self.slots[slot].1 += 1;
        }
        fits
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(percent: u32, floor: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            multiplier: 2.0,
            jitter: false,
            budget_ratio: f64::from(percent) / 100.0,
            budget_min_per_second: floor,
        }
    }

    #[test]
    fn retries_stay_within_a_fifth_of_first_attempts_plus_the_floor() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(&policy(20, 1), t0);
        for _ in 0..100 {
            b.first(t0);
        }
        let allowed = (0..1000).take_while(|_| b.try_retry(t0)).count();
        assert_eq!(allowed, 20 + 10, "20 % of 100, plus 1/s over the 10 s window");
        // The window slides: ten seconds later it is all forgotten, and the floor is back.
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..1000).take_while(|_| b.try_retry(later)).count(), 10);
    }

    #[test]
    fn no_floor_no_traffic_no_retries() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(&policy(20, 0), t0);
        assert!(!b.try_retry(t0));
        for _ in 0..5 {
            b.first(t0 + Duration::from_secs(3));
        }
        assert!(b.try_retry(t0 + Duration::from_secs(3)));
        assert!(!b.try_retry(t0 + Duration::from_secs(3)), "one retry per five first attempts");
    }
}
