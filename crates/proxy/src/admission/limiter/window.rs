//! What went upstream in the last minute, in one-second slots: the usage a pod reports for
//! its LlmProxy's and LlmQuota's status.

use tokio::time::Instant;

/// Requests and tokens admitted over the last 60 seconds.
#[derive(Debug)]
pub(crate) struct MinuteWindow {
    start: Instant,
    /// Per slot: the second it holds (since `start`), requests, tokens.
    slots: [(u64, u64, u64); 60],
}

impl MinuteWindow {
    pub(crate) fn new(now: Instant) -> Self {
        Self { start: now, slots: [(u64::MAX, 0, 0); 60] }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    /// Count `requests` and `tokens` (negative tokens: given back) now.
    pub(crate) fn add(&mut self, now: Instant, requests: u64, tokens: i64) {
        let s = self.second(now);
        let slot = &mut self.slots[(s % 60) as usize];
        if slot.0 != s {
            *slot = (s, 0, 0);
        }
        slot.1 = slot.1.saturating_add(requests);
        slot.2 = slot.2.saturating_add_signed(tokens);
    }

    /// Requests and tokens of the last minute.
    pub(crate) fn total(&self, now: Instant) -> (u64, u64) {
        let s = self.second(now);
        self.slots
            .iter()
            .filter(|(at, _, _)| *at != u64::MAX && s.saturating_sub(*at) < 60)
            .fold((0, 0), |(r, t), (_, sr, st)| (r.saturating_add(*sr), t.saturating_add(*st)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn counts_the_last_minute_only() {
        let t0 = Instant::now();
        let mut w = MinuteWindow::new(t0);
        w.add(t0, 1, 100);
        w.add(t0 + Duration::from_secs(30), 2, 50);
        w.add(t0 + Duration::from_secs(30), 0, -20);
        assert_eq!(w.total(t0 + Duration::from_secs(59)), (3, 130));
        assert_eq!(w.total(t0 + Duration::from_secs(61)), (2, 30));
        assert_eq!(w.total(t0 + Duration::from_secs(200)), (0, 0));
    }
}
