//! The fair lines: who waits, in which order. Start-time fair queueing between clients (each
//! request's place is its client's virtual start time), `interactive` before `batch` except a
//! batch request held back too long, and first come, first served within a client.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::permit::{Permit, Rejection};
use crate::admission::limiter::{Ask, Limit};
use crate::telemetry::metrics::ClientMetrics;
#[cfg(test)]
use crate::telemetry::metrics::Metrics;

/// A request's place in line, taken once on arrival and kept across its attempts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Place {
    pub(super) seq: u64,
    /// Its client's virtual start time, set at its first admission attempt.
    tag: Option<f64>,
}

impl Place {
    /// The place of the `seq`th arrival, not yet tagged.
    pub(super) fn new(seq: u64) -> Self {
        Self { seq, tag: None }
    }
}

/// Who a request is from, as far as admission cares.
#[derive(Clone)]
pub struct Party {
    /// The client (`None`: no client identified).
    pub name: Option<Arc<str>>,
    /// Its share under contention.
    pub weight: u32,
    /// Whether its requests are `batch`.
    pub batch: bool,
    /// Most of its requests waiting at once.
    pub(crate) max_queued: usize,
    /// Its series.
    pub metrics: Arc<ClientMetrics>,
}

impl Party {
    /// The one party of a proxy without client identities.
    #[cfg(test)]
    pub(crate) fn anonymous(metrics: &Metrics) -> Self {
        Self { name: None, weight: 1, batch: false, max_queued: usize::MAX, metrics: metrics.client(None) }
    }
}

/// What a waiter is told: its permit, or why not.
pub(super) type Grant = Result<Permit, Rejection>;

/// A request waiting in line.
pub(super) struct Waiter {
    pub(super) ask: Ask,
    pub(super) party: Party,
    pub(super) key: LineKey,
    pub(super) deadline: Instant,
    pub(super) start: Instant,
    pub(super) tx: oneshot::Sender<Grant>,
    /// What held it the last time the dispatcher looked.
    pub(super) held_by: Limit,
}

/// Order in a line: virtual start time (as bits: non-negative floats order like their bits),
/// then arrival.
pub(super) type LineKey = (u64, u64);

/// Every waiter, in the orders the dispatcher and the bounds need, and the clients' clocks.
#[derive(Default)]
pub(super) struct Lines {
    interactive: BTreeMap<LineKey, u64>,
    batch: BTreeMap<LineKey, u64>,
    pub(super) batch_by_start: BTreeSet<(Instant, u64)>,
    pub(super) waiters: HashMap<u64, Waiter>,
    pub(super) deadlines: BTreeSet<(Instant, u64)>,
    pub(super) queued_by_client: HashMap<Option<Arc<str>>, usize>,
    /// The virtual time: the start tag of the latest admission.
    virtual_time: f64,
    /// Each client's virtual finish time.
    finish: HashMap<Option<Arc<str>>, f64>,
}

impl Lines {
    pub(super) fn len(&self) -> usize {
        self.waiters.len()
    }

    pub(super) fn insert(&mut self, seq: u64, w: Waiter) {
        if w.party.batch {
            self.batch.insert(w.key, seq);
            self.batch_by_start.insert((w.start, seq));
        } else {
            self.interactive.insert(w.key, seq);
        }
        self.deadlines.insert((w.deadline, seq));
        *self.queued_by_client.entry(w.party.name.clone()).or_default() += 1;
        self.waiters.insert(seq, w);
    }

    pub(super) fn remove(&mut self, seq: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&seq)?;
        if w.party.batch {
            self.batch.remove(&w.key);
            self.batch_by_start.remove(&(w.start, seq));
        } else {
            self.interactive.remove(&w.key);
        }
        self.deadlines.remove(&(w.deadline, seq));
        if let Some(n) = self.queued_by_client.get_mut(&w.party.name) {
            *n -= 1;
            if *n == 0 {
                self.queued_by_client.remove(&w.party.name);
            }
        }
        Some(w)
    }

    /// The order the dispatcher looks at waiters in: batch requests held back too long, then
    /// interactive, then batch, each by virtual start time.
    pub(super) fn order(&self, now: Instant, batch_max_delay: Duration) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len());
        let aged: Vec<u64> = match now.checked_sub(batch_max_delay) {
            Some(cutoff) => self.batch_by_start.range(..=(cutoff, u64::MAX)).map(|(_, s)| *s).collect(),
            None => Vec::new(),
        };
        out.extend(&aged);
        out.extend(self.interactive.values());
        out.extend(self.batch.values().filter(|s| !aged.contains(s)));
        out
    }

    /// A request's virtual start time, set once (at its first attempt); `cost` is what its
    /// admission advances its client's clock by, before the client's weight.
    pub(super) fn tag(&mut self, place: &mut Place, cost: f64, party: &Party) -> f64 {
        if let Some(tag) = place.tag {
            return tag;
        }
        let finish = self.finish.entry(party.name.clone()).or_insert(0.0);
        let start = self.virtual_time.max(*finish);
        *finish = start + cost / f64::from(party.weight.max(1));
        place.tag = Some(start);
        if self.finish.len() > 10_000 {
            // Clients whose clock is behind the virtual time start from it anyway.
            let v = self.virtual_time;
            self.finish.retain(|_, f| *f > v);
        }
        start
    }

    /// A request tagged `tag` was admitted: the virtual time moves up to it.
    pub(super) fn admitted(&mut self, tag: f64) {
        self.virtual_time = self.virtual_time.max(tag);
    }
}

#[cfg(test)]
mod tests {
    use llmproxy_api::policy::ClientsPolicy;

    use super::super::tests::*;
    use super::*;

    // tokio's paused clock auto-advances while every task sleeps: a fake clock, no real waiting.
    #[tokio::test(start_paused = true)]
    async fn a_requeued_request_goes_before_later_arrivals() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let mut early = a.place();
        let _first = a.admit(&mut early, &Ask::tokens(0), &anon(), t0 + secs(30), 100).await;
        let later = spawn_anon(&a, 0, t0 + secs(30));
        tokio::task::yield_now().await;
        // The early request comes back (its upstream said 429) after the later one queued.
        let again = spawn_admit(&a, early, Ask::tokens(0), anon(), t0 + secs(30));
        let (again, later) = (again.await.ok().and_then(Result::ok), later.await.ok().and_then(Result::ok));
        assert_eq!((again, later), (Some(secs(1)), Some(secs(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_from_one_client_does_not_starve_another() {
        let a = admission(60, 1, 100); // one per second
        let t0 = Instant::now();
        let (flood, quiet) = (party("flood", 1, false), party("quiet", 1, false));
        let _first = a.admit(&mut a.place(), &ask_of(&flood), &flood, t0 + secs(300), 1000).await;
        let mut floods = Vec::new();
        for _ in 0..50 {
            floods.push(spawn_admit(&a, a.place(), ask_of(&flood), flood.clone(), t0 + secs(300)));
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // The quiet client's one request goes next, not behind the remaining 47.
        let waited =
            a.admit(&mut a.place(), &ask_of(&quiet), &quiet, t0 + secs(300), 1000).await.map(|p| p.waited);
        assert!(waited.as_ref().is_ok_and(|w| *w <= secs(1)), "{waited:?}");
        for f in floods {
            assert!(f.await.ok().is_some_and(|r| r.is_ok()), "every flood request still goes");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_what_is_contended() {
        let a = admission(60, 1, 100);
        let t0 = Instant::now();
        let (heavy, light) = (party("heavy", 3, false), party("light", 1, false));
        let _first = take(&a, 0, t0 + secs(300)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for p in [&heavy, &light] {
            for _ in 0..40 {
                let (a, p, tx) = (Arc::clone(&a), p.clone(), tx.clone());
                tokio::spawn(async move {
                    let mut place = a.place();
                    if a.admit(&mut place, &ask_of(&p), &p, t0 + secs(300), 1000).await.is_ok() {
                        let _ = tx.send(p.name.clone());
                    }
                });
            }
        }
        drop(tx);
        // The first 40 admissions, while both are busy: 3 to 1.
        let mut first = Vec::new();
        while first.len() < 40 {
            match rx.recv().await {
                Some(name) => first.push(name),
                None => break,
            }
        }
        let heavy_share = first.iter().filter(|n| n.as_deref() == Some("heavy")).count();
        assert!((28..=32).contains(&heavy_share), "heavy got {heavy_share} of 40");
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_goes_first_and_batch_is_never_held_back_longer_than_its_delay() {
        let a = admission(60, 1, 100);
        let clients: ClientsPolicy = serde_yaml_clients("batchMaxDelay: 5s");
        assert!(!a.reconfigure(&policy_of(limits(60, 1, None, 100), Some(clients))));
        let t0 = Instant::now();
        let (chat, nightly) = (party("chat", 1, false), party("nightly", 1, true));
        let _first = take(&a, 0, t0 + secs(300)).await;
        let batch = spawn_admit(&a, a.place(), ask_of(&nightly), nightly.clone(), t0 + secs(300));
        tokio::task::yield_now().await;
        let mut chats = Vec::new();
        for _ in 0..20 {
            chats.push(spawn_admit(&a, a.place(), ask_of(&chat), chat.clone(), t0 + secs(300)));
        }
        // Interactive saturates the line; the batch request still goes once it has waited 5 s.
        let waited = batch.await.ok().and_then(Result::ok).unwrap_or_default();
        assert!(waited >= secs(5) && waited <= secs(6), "batch waited {waited:?}");
        // And the first interactive request went at the next turn, ahead of the batch one.
        let first_chat = chats.remove(0).await.ok().and_then(Result::ok).unwrap_or_default();
        assert_eq!(first_chat, secs(1));
    }
}
