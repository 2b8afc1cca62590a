//! Single flight: while one request for a cache key is upstream, identical requests wait for
//! its answer instead of spending quota on their own. If the leader fails, the waiters are told
//! so and one of them leads the next attempt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::{CachedResponse, Key};

/// The state of one flight, as followers see it.
#[derive(Clone, Debug)]
pub(crate) enum Flight {
    /// The leader is still working; every progress signal re-sends this.
    Running,
    /// The leader's answer (also stored in the cache).
    Done(Arc<CachedResponse>),
    /// The leader got no cacheable answer; try again.
    Failed,
}

/// Flights in progress, by key.
#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<Key, watch::Receiver<Flight>>>,
    followers: AtomicUsize,
}

/// What a request does about its key.
pub enum Join {
    /// Go upstream; report the outcome through the guard.
    Leader(Leader),
    /// Wait for the leader.
    Follower(Follower),
}

/// A request waiting for a leader's answer; counted while it exists.
pub struct Follower {
    rx: watch::Receiver<Flight>,
    flights: Arc<Flights>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.flights.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The leader's obligation: it resolves the flight exactly once, as failed if dropped.
pub struct Leader {
    key: Key,
    flights: Arc<Flights>,
    tx: watch::Sender<Flight>,
    resolved: bool,
}

impl Flights {
    /// Lead a new flight for `key`, or follow the one in progress.
    pub fn join(self: &Arc<Self>, key: Key) -> Join {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = running.get(&key) {
            self.followers.fetch_add(1, Ordering::Relaxed);
            return Join::Follower(Follower { rx: rx.clone(), flights: Arc::clone(self) });
        }
        let (tx, rx) = watch::channel(Flight::Running);
        running.insert(key, rx);
        Join::Leader(Leader { key, flights: Arc::clone(self), tx, resolved: false })
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Requests waiting for an identical request's answer now.
    pub fn followers(&self) -> usize {
        self.followers.load(Ordering::Relaxed)
    }

    /// Whether no flight is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    fn resolve(&mut self, outcome: Flight) {
        if self.resolved {
            return;
        }
        self.resolved = true;
        let mut running = self.flights.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.get(&self.key).is_some_and(|rx| rx.same_channel(&self.tx.subscribe())) {
            running.remove(&self.key);
        }
        drop(running);
        self.tx.send_replace(outcome);
    }

    /// Hand the answer to every follower.
    pub fn complete(mut self, answer: Arc<CachedResponse>) {
        self.resolve(Flight::Done(answer));
    }

    /// Tell the followers the leader is still making progress (a chunk arrived), so they keep
    /// waiting for a long stream instead of giving up on it.
    pub(crate) fn progress(&self) {
        self.tx.send_replace(Flight::Running);
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.resolve(Flight::Failed);
    }
}

/// How following a flight ended.
#[derive(Debug)]
pub(crate) enum Followed {
    /// The leader's answer.
    Answer(Arc<CachedResponse>),
    /// The leader got no cacheable answer.
    Failed,
    /// The leader showed no progress in time (a stalled upstream, or a leader whose own client
    /// stopped reading); the follower should stop waiting for it.
    Stalled,
}

/// Wait for a flight to end, until `deadline` at first and then for `idle` after each progress
/// signal of the leader, so no follower waits on a stalled leader for ever.
pub(crate) async fn follow(follower: Follower, deadline: tokio::time::Instant, idle: Duration) -> Followed {
    let mut rx = follower.rx.clone();
    let mut deadline = deadline;
    loop {
        match &*rx.borrow_and_update() {
            Flight::Done(answer) => return Followed::Answer(Arc::clone(answer)),
            Flight::Failed => return Followed::Failed,
            Flight::Running => {}
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => deadline = deadline.max(tokio::time::Instant::now() + idle),
            Ok(Err(_)) => return Followed::Failed,
            Err(_) => return Followed::Stalled,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn followers_give_up_on_a_stalled_leader_but_not_on_a_progressing_one() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(leader) = flights.join([3; 32]) else { panic!("leader") };
        let Join::Follower(rx) = flights.join([3; 32]) else { panic!("follower") };
        let start = tokio::time::Instant::now();
        let waiter = tokio::spawn(follow(rx, start + Duration::from_secs(10), Duration::from_secs(5)));
        // Progress at 8 s extends the wait to 13 s; then silence.
        tokio::time::sleep(Duration::from_secs(8)).await;
        leader.progress();
        let followed = waiter.await;
        assert!(matches!(followed, Ok(Followed::Stalled)), "{followed:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(13));
        drop(leader);
    }

    fn answer() -> Arc<CachedResponse> {
        Arc::new(CachedResponse {
            status: 200,
            content_type: None,
            body: Bytes::from_static(b"{}"),
            stream: false,
            usage: None,
            created: Instant::now(),
        })
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(leader) = flights.join([1; 32]) else { panic!("first is the leader") };
        let Join::Follower(rx) = flights.join([1; 32]) else { panic!("second follows") };
        let waiter = tokio::spawn(follow(rx, far(), Duration::from_secs(60)));
        leader.complete(answer());
        assert!(matches!(waiter.await, Ok(Followed::Answer(_))));
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_leader_fails_the_flight_and_frees_the_key() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(leader) = flights.join([2; 32]) else { panic!("leader") };
        let Join::Follower(rx) = flights.join([2; 32]) else { panic!("follower") };
        drop(leader);
        assert!(matches!(follow(rx, far(), Duration::from_secs(60)).await, Followed::Failed));
        assert!(matches!(flights.join([2; 32]), Join::Leader(_)), "the next request leads");
    }
}
