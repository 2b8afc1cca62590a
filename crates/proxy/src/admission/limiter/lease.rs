//! Shares of shared buckets held by this replica. With shared state, a bucket lives in Redis
//! (or, while Redis is out, in a local share of it), and this replica holds a small stock taken
//! from it ahead of need (a lease): admission takes from the stock without a round trip, and
//! the lessee (`crate::admission::shared`) tops it up, from what requests wanted and what was used, and
//! gives back what an idle replica holds. What a stock holds has left the shared bucket, so
//! the replicas together never admit more than it grants.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::RateConfig;
use super::limit::Limit;

/// How long a request waits for a top-up before the dispatcher looks again (a grant wakes it
/// sooner).
pub(crate) const TOP_UP_WAIT: Duration = Duration::from_millis(50);

/// Which shared bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum LeaseKey {
    /// The LlmProxy's `limits`.
    Total,
    /// `limits.models.<model>`.
    Model(Arc<str>),
    /// One client's caps.
    Client(Arc<str>),
    /// An endpoint's own limits.
    Endpoint(Arc<str>),
    /// The LlmQuota of `quotaRef`.
    Quota,
    /// The LlmQuota's limits for one model.
    QuotaModel(Arc<str>),
}

impl LeaseKey {
    /// Whether it is one of the LlmQuota's buckets, which live in the quota's own Redis.
    pub(crate) fn is_quota(&self) -> bool {
        matches!(self, LeaseKey::Quota | LeaseKey::QuotaModel(_))
    }

    /// The limit named when this bucket holds a request back (requests, tokens).
    pub(crate) fn limits(&self) -> (Limit, Limit) {
        match self {
            LeaseKey::Total => (Limit::Requests, Limit::Tokens),
            LeaseKey::Model(_) => (Limit::ModelRequests, Limit::ModelTokens),
            LeaseKey::Client(_) => (Limit::ClientRequests, Limit::ClientTokens),
            LeaseKey::Endpoint(_) => (Limit::UpstreamRequests, Limit::UpstreamTokens),
            LeaseKey::Quota | LeaseKey::QuotaModel(_) => (Limit::QuotaRequests, Limit::QuotaTokens),
        }
    }
}

/// What this replica holds of one shared bucket, and what it needs.
#[derive(Clone, Debug)]
pub(crate) struct Stock {
    /// The bucket's rates (per minute, burst), requests and tokens.
    pub(crate) config: RateConfig,
    /// Held now: requests, tokens (tokens may be negative after a settle charged more).
    pub(crate) have: [f64; 2],
    /// The most one waiting request needs and the stock lacks.
    pub(crate) want: [f64; 2],
    /// Taken since the lessee last looked.
    pub(crate) used: [f64; 2],
    /// The last time a request needed it.
    pub(crate) active: Instant,
}

impl Stock {
    fn new(config: RateConfig, now: Instant) -> Self {
        Self { config, have: [0.0; 2], want: [0.0; 2], used: [0.0; 2], active: now }
    }
}

/// Every stock this replica holds.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    pub(crate) stocks: HashMap<LeaseKey, Stock>,
    /// Buckets an upstream 429 said are dry, for the lessee to lower in the shared store.
    pub(crate) dry: Vec<LeaseKey>,
    /// Wakes the lessee of a store when a request finds one of its stocks short: the
    /// LlmProxy's (0) or the LlmQuota's (1).
    pub(crate) wake: [Arc<tokio::sync::Notify>; 2],
}

#[allow(clippy::cast_precision_loss)] // costs are far below 2^52
impl Leases {
    /// Keep stocks only for these buckets, with these rates.
    pub(crate) fn configure(&mut self, wanted: &[(LeaseKey, RateConfig)], now: Instant) {
        self.stocks.retain(|k, _| wanted.iter().any(|(w, _)| w == k));
        for (key, config) in wanted {
            self.stocks.entry(key.clone()).or_insert_with(|| Stock::new(*config, now)).config = *config;
        }
    }

    /// Whether the stock of `key` covers one request of `tokens`; if not, the limit that holds
    /// it (the lack is noted for the lessee). A bucket this replica holds no stock for (not
    /// shared) never holds anything back.
    pub(crate) fn lacks(&mut self, key: &LeaseKey, tokens: u64, now: Instant) -> Option<Limit> {
        let s = self.stocks.get_mut(key)?;
        s.active = now;
        let need = [1.0, tokens as f64];
        let (requests, token_limit) = key.limits();
        let mut lack = None;
        for (unit, need) in need.into_iter().enumerate() {
            let limited = if unit == 0 { s.config.requests.is_some() } else { s.config.tokens.is_some() };
            if limited && s.have[unit] + 1e-9 < need {
                let want = need - s.have[unit].min(0.0);
                if want > s.want[unit] {
                    s.want[unit] = want;
                    self.wake[usize::from(key.is_quota())].notify_one();
                }
                lack.get_or_insert(if unit == 0 { requests } else { token_limit });
            }
        }
        lack
    }

    /// Take one request of `tokens` from the stock of `key`.
    pub(crate) fn take(&mut self, key: &LeaseKey, tokens: u64, now: Instant) {
        if let Some(s) = self.stocks.get_mut(key) {
            for (unit, cost) in [1.0, tokens as f64].into_iter().enumerate() {
                s.have[unit] -= cost;
                s.used[unit] += cost;
            }
            s.want = [0.0; 2];
            s.active = now;
        }
    }

    /// Give `tokens` back to the stock of `key` (negative: charge more).
    pub(crate) fn give_tokens(&mut self, key: &LeaseKey, tokens: f64) {
        if let Some(s) = self.stocks.get_mut(key) {
            s.have[1] += tokens;
            s.used[1] -= tokens;
        }
    }

    /// The upstream said the shared bucket of `key` has run dry: what this replica holds of it
    /// is spent too.
    pub(crate) fn drain(&mut self, key: &LeaseKey) {
        if let Some(s) = self.stocks.get_mut(key) {
            s.have = [s.have[0].min(0.0), s.have[1].min(0.0)];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stock_lacks_until_topped_up_and_remembers_what_was_wanted() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.configure(&[(LeaseKey::Total, RateConfig::per_minute(Some(600), Some(60_000)))], t0);
        assert_eq!(l.lacks(&LeaseKey::Total, 50, t0), Some(Limit::Requests));
        assert_eq!(l.stocks[&LeaseKey::Total].want, [1.0, 50.0]);
        if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
            s.have = [2.0, 40.0];
        }
        assert_eq!(l.lacks(&LeaseKey::Total, 50, t0), Some(Limit::Tokens));
        if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
            s.have[1] = 100.0;
        }
        assert_eq!(l.lacks(&LeaseKey::Total, 50, t0), None);
        l.take(&LeaseKey::Total, 50, t0);
        assert_eq!(l.stocks[&LeaseKey::Total].have, [1.0, 50.0]);
        assert_eq!(l.stocks[&LeaseKey::Total].used, [1.0, 50.0]);
        assert_eq!(l.lacks(&LeaseKey::Client(Arc::from("x")), 1, t0), None, "not shared: no limit");
    }
}
