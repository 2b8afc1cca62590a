//! The mock's rate limit, written as GCRA (theoretical arrival time) rather than as the proxy's
//! token bucket, so that tests check the proxy against an independent model of the upstream.

use std::time::Duration;

use tokio::time::Instant;

/// `limit` units per minute, of which at most `window`'s worth may arrive back to back.
#[derive(Debug)]
pub(crate) struct Quota {
    pub(crate) limit: u64,
    /// Seconds per unit.
    interval: f64,
    /// Burst tolerance in seconds (`window`).
    tau: f64,
    /// Theoretical arrival time of the next unit.
    tat: Instant,
}

/// Slack for clock arithmetic, far below anything observable.
const EPSILON: f64 = 1e-6;

#[allow(clippy::cast_precision_loss)] // limits and costs are far below 2^52
impl Quota {
    pub(crate) fn new(limit: u64, window: Duration, now: Instant) -> Self {
        let interval = 60.0 / limit.max(1) as f64;
        // At least one unit of tolerance, so a limit under 60/min still admits one at a time.
        let tau = window.as_secs_f64().max(interval);
        Self { limit, interval, tau, tat: now }
    }

    fn ahead(&self, now: Instant) -> f64 {
        self.tat.saturating_duration_since(now).as_secs_f64()
    }

    /// Take `n` units, or say how long until they would fit. A request larger than the burst
    /// passes when the quota is untouched (the per-minute limit still holds over time).
    pub(crate) fn try_take(&mut self, now: Instant, n: u64) -> Result<(), Duration> {
        let ahead = self.ahead(now);
        let after = ahead + n as f64 * self.interval;
        if ahead <= EPSILON || after <= self.tau + EPSILON {
            self.tat = now + Duration::from_secs_f64(after);
            Ok(())
        } else {
            Err(Duration::from_secs_f64(after - self.tau))
        }
    }

    /// Give back `n` units charged in advance and not used.
    pub(crate) fn refund(&mut self, now: Instant, n: u64) {
        let ahead = (self.ahead(now) - n as f64 * self.interval).max(0.0);
        self.tat = now + Duration::from_secs_f64(ahead);
    }

    /// Units that could be taken now.
    pub(crate) fn remaining(&self, now: Instant) -> u64 {
        let free = (self.tau - self.ahead(now)) / self.interval;
        if free <= 0.0 { 0 } else { free.floor() as u64 }
    }

    /// Time until the quota is untouched again (OpenAI's `x-ratelimit-reset-*`).
    pub(crate) fn reset(&self, now: Instant) -> Duration {
        self.tat.saturating_duration_since(now)
    }
}

/// OpenAI's spelling of a duration in `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{}s", (secs * 1000.0).round() / 1000.0);
    }
    let m = d.as_secs() / 60;
    format!("{m}m{}s", d.as_secs() % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_of_a_window_then_paced() {
        let t0 = Instant::now();
        let mut q = Quota::new(600, Duration::from_secs(1), t0);
        for _ in 0..10 {
            assert_eq!(q.try_take(t0, 1), Ok(()));
        }
        assert_eq!(q.remaining(t0), 0);
        let wait = q.try_take(t0, 1).err().unwrap_or_default();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(q.try_take(t0 + Duration::from_millis(100), 1), Ok(()));
    }

    #[test]
    fn refunds_make_room() {
        let t0 = Instant::now();
        let mut q = Quota::new(6000, Duration::from_secs(1), t0); // 100/s, window 100
        assert_eq!(q.try_take(t0, 100), Ok(()));
        assert!(q.try_take(t0, 50).is_err());
        q.refund(t0, 60);
        assert_eq!(q.try_take(t0, 50), Ok(()));
    }

    #[test]
    fn formats_like_openai() {
        assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
    }
}
