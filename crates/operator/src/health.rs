//! What the operator's `/readyz` reports: ready when it does its job, that is when it leads and
//! its watch of LlmProxies is established, or when it stands by and can still reach the Lease
//! (ready to take over).

use std::sync::atomic::{AtomicBool, Ordering};

/// The operator's state, shared between the controller, the leader election and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    elected: AtomicBool,
    leading: AtomicBool,
    lease_reachable: AtomicBool,
    watching: AtomicBool,
}

impl Health {
    /// State for an operator that does (`elected`) or does not compete for a Lease.
    pub fn new(elected: bool) -> Self {
        let h = Self::default();
        h.elected.store(elected, Ordering::SeqCst);
        h.leading.store(!elected, Ordering::SeqCst);
        h
    }

    /// The controller's watch of LlmProxies is established (or stopped).
    pub fn set_watching(&self, on: bool) {
        self.watching.store(on, Ordering::SeqCst);
    }

    /// This instance leads (or stopped leading).
    pub fn set_leading(&self, on: bool) {
        self.leading.store(on, Ordering::SeqCst);
    }

    /// The last attempt to read or write the Lease succeeded (or failed).
    pub fn set_lease_reachable(&self, ok: bool) {
        self.lease_reachable.store(ok, Ordering::SeqCst);
    }

    /// Why the operator is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.leading.load(Ordering::SeqCst) {
            return (!self.watching.load(Ordering::SeqCst))
                .then_some("leading, but the LlmProxy watch is not established");
        }
        if self.elected.load(Ordering::SeqCst) && !self.lease_reachable.load(Ordering::SeqCst) {
            return Some("standing by, and the leader Lease cannot be reached");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_doing_its_job_or_able_to_take_over() {
        let single = Health::new(false);
        assert!(single.not_ready().is_some(), "no watch yet");
        single.set_watching(true);
        assert_eq!(single.not_ready(), None);

        let elected = Health::new(true);
        assert!(elected.not_ready().is_some(), "the Lease was never reached");
        elected.set_lease_reachable(true);
        assert_eq!(elected.not_ready(), None, "a healthy standby");
        elected.set_leading(true);
        assert!(elected.not_ready().is_some(), "leading without a watch");
        elected.set_watching(true);
        assert_eq!(elected.not_ready(), None);
    }
}
