//! The dispatcher: one task per gate that pumps the line whenever something changed or a wait
//! is due, handing out every permit the limits allow and refusing waiters whose deadline passed
//! or cannot be met.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::gate::Admission;
use super::lines::{Grant, Waiter};
use crate::admission::limiter::{Decision, Holds, Limit};

impl Admission {
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
    pub(super) fn pump(self: &Arc<Self>, now: Instant) -> (Option<Instant>, Vec<Grant>) {
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
                    shared.lines.admitted(f64::from_bits(w.key.0));
                    self.left_line();
                    let permit = self.issue(&w.ask, &w.party, mark, w.start);
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
            let may_shrink = limit.is_token_debt() && shared.limiter.inflight() > 0;
            // A quota the upstream reported spent is not waited for, whatever the deadline: its
            // reset is hours away or unknown, and a probe goes by itself.
            if (at > w.deadline && !may_shrink) || limit == Limit::UpstreamExhausted {
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
}

/// The dispatcher: pumps the line whenever something changed or a wait is due. A panic in one
/// pump (a bug) is logged and the loop goes on, so the queue never silently stops moving.
pub(super) async fn dispatch(admission: Weak<Admission>, wake: Arc<Notify>) {
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
    use crate::admission::limiter::Ask;

    use super::super::tests::*;
    use super::*;

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
        let first = take(&a, 500, t0 + secs(30)).await.expect("first goes at once");
        let second = spawn_anon(&a, 10, t0 + secs(30));
        tokio::time::sleep(secs(1)).await;
        // It used 20: the debt shrinks to what 20 tokens cost, and the second one goes soon.
        first.settle(Some(crate::protocol::tokens::Usage { completion: 20, ..Default::default() }));
        let waited = second.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited > secs(1) && waited < secs(5), "{waited:?}");
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
