//! Single flight: while one request for a cache key is upstream, identical requests wait for
//! its answer instead of spending quota on their own. If the leader fails, the waiters are told
//! so and one of them leads the next attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::cache::{CachedResponse, Key};

/// The state of one flight, as followers see it.
#[derive(Clone, Debug)]
pub enum Flight {
    /// The leader is still waiting for the upstream.
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
}

/// What a request does about its key.
pub enum Join {
    /// Go upstream; report the outcome through the guard.
    Leader(Leader),
    /// Wait for the leader.
    Follower(watch::Receiver<Flight>),
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
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(Flight::Running);
        running.insert(key, rx);
        Join::Leader(Leader { key, flights: Arc::clone(self), tx, resolved: false })
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).len()
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
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.resolve(Flight::Failed);
    }
}

/// Wait for a flight to end: the answer, or `None` if the leader failed.
pub async fn follow(mut rx: watch::Receiver<Flight>) -> Option<Arc<CachedResponse>> {
    let state = rx.wait_for(|f| !matches!(f, Flight::Running)).await.ok()?.clone();
    match state {
        Flight::Done(answer) => Some(answer),
        Flight::Running | Flight::Failed => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;

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
        let waiter = tokio::spawn(follow(rx));
        leader.complete(answer());
        assert!(waiter.await.ok().flatten().is_some());
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_leader_fails_the_flight_and_frees_the_key() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(leader) = flights.join([2; 32]) else { panic!("leader") };
        let Join::Follower(rx) = flights.join([2; 32]) else { panic!("follower") };
        drop(leader);
        assert!(follow(rx).await.is_none());
        assert!(matches!(flights.join([2; 32]), Join::Leader(_)), "the next request leads");
    }
}
