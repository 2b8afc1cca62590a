//! What an admitted request's answer teaches: refunds for attempts the upstream did not
//! count, settling the charge against real usage, pauses, the upstream's quota headers
//! (calibration) and the endpoint's health.

use std::sync::Arc;
use std::time::SystemTime;

use llmproxy_api::TokenAccounting;
use tokio::time::Instant;

use super::bucket::Correction;
use super::endpoint::{Endpoint, Verdict};
use super::lease::LeaseKey;
use super::{Calibration, Cost, Limiter, Mark};
use crate::protocol::ratelimit_headers::QuotaHeaders;
use crate::protocol::tokens::Usage;

impl Limiter {
    fn endpoint_of(&mut self, mark: &Mark) -> Option<&mut Endpoint> {
        self.endpoints.iter_mut().find(|e| e.name() == mark.endpoint.name)
    }

    /// The request of `mark` got its answer (or will get none): it no longer counts as possibly
    /// unseen by the upstream.
    pub(crate) fn answered(&mut self, mark: &Mark) {
        if let Some(e) = self.endpoint_of(mark) {
            e.unanswered.remove(&mark.order);
        }
    }

    pub(crate) fn release(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// The upstream charged nothing for an attempt (it refused it, or never saw it): its
    /// tokens go back. The request itself stays counted.
    pub(crate) fn refund(&mut self, now: Instant, mark: &Mark, client: &Option<Arc<str>>, cost: Cost) {
        self.total.give_tokens(now, cost);
        if let Some(rates) = mark.model.as_ref().and_then(|m| self.models.get_mut(m)) {
            rates.give_tokens(now, cost);
        }
        if let Some(caps) = self.caps(client, now) {
            caps.give_tokens(now, cost);
        }
        let model = mark.model.clone();
        self.usage.add(now, 0, -i64::try_from(cost.tokens).unwrap_or(i64::MAX));
        self.give_leased(mark, client, cost.tokens as f64);
        if let Some(e) = self.endpoint_of(mark) {
            e.give_tokens(now, model.as_ref(), cost);
        }
    }

    /// Give tokens back to (or, negative, charge more from) the stocks a request drew on.
    #[allow(clippy::cast_precision_loss)]
    fn give_leased(&mut self, mark: &Mark, client: &Option<Arc<str>>, tokens: f64) {
        let keys = self.lease_keys(mark.model.as_ref(), client, &mark.endpoint.name);
        if let Some(leases) = self.leases.as_mut() {
            for k in &keys {
                leases.give_tokens(k, tokens);
            }
        }
    }

    /// The answer is complete, with `used` its reported usage. Under `used` accounting the
    /// token charge becomes its total; under `requested` it stands. Where the upstream reports
    /// its own count, unused tokens of the quota it speaks for are withheld until its headers
    /// show them back (a provider that does not refund, though configured as one that does,
    /// then never lets the proxy run ahead of it); the proxy's own totals and caps follow the
    /// usage at once. Input and output always settle to the usage (input without cache reads),
    /// as Anthropic settles them; without usage every charge stands.
    pub(crate) fn settle(
        &mut self,
        now: Instant,
        mark: &Mark,
        client: &Option<Arc<str>>,
        reserved: Cost,
        used: Option<Usage>,
    ) {
        let Some(usage) = used else { return };
        let used_accounting = self.limits.token_accounting == TokenAccounting::Used;
        let used = Cost {
            tokens: if used_accounting { usage.total() } else { reserved.tokens },
            input: usage.input(),
            output: usage.completion,
        };
        if used == reserved {
            return;
        }
        self.total.settle(now, reserved, used, false);
        if let Some(rates) = mark.model.as_ref().and_then(|m| self.models.get_mut(m)) {
            rates.settle(now, reserved, used, false);
        }
        if let Some(caps) = self.caps(client, now) {
            caps.settle(now, reserved, used, false);
        }
        let model = mark.model.clone();
        #[allow(clippy::cast_precision_loss)]
        self.give_leased(mark, client, reserved.tokens as f64 - used.tokens as f64);
        if let Some(e) = self.endpoint_of(mark) {
            e.settle(now, model.as_ref(), reserved, used);
        }
    }

    /// Hold requests for `model` at the endpoint of `mark` (everything there, without a
    /// model) until `until`.
    pub(crate) fn pause(&mut self, now: Instant, mark: &Mark, until: Instant) {
        let model = mark.model.clone();
        if let Some(e) = self.endpoint_of(mark) {
            e.pause(now, model.as_ref(), until);
        }
    }

    /// Follow what the endpoint said about its quota in its answer to the request of `mark`.
    pub(crate) fn calibrate(&mut self, now: Instant, q: &QuotaHeaders, mark: &Mark, c: Calibration) {
        let used_accounting = self.limits.token_accounting == TokenAccounting::Used;
        let model = mark.model.clone();
        if c.refused {
            // The upstream's bucket is dry: so is the shared bucket that stands for it, for
            // every replica (the lessee lowers it in Redis too).
            let several = self.endpoints.len() > 1;
            if let Some(leases) = self.leases.as_mut() {
                let own = LeaseKey::Endpoint(Arc::from(mark.endpoint.name.as_str()));
                let key = if several { own } else { LeaseKey::Total };
                for k in [key, LeaseKey::Quota] {
                    if leases.stocks.contains_key(&k) {
                        leases.drain(&k);
                        leases.dry.push(k);
                    }
                }
            }
        }
        let Some(e) = self.endpoint_of(mark) else { return };
        e.unanswered.remove(&mark.order);
        #[allow(clippy::cast_precision_loss)]
        let correction = Correction {
            since: now.saturating_duration_since(mark.at),
            spent_at: None,
            refunded: c.refunded,
            unseen_before: mark.unseen_before as f64,
            refused: c.refused,
            max_reset: c.max_reset,
            used_accounting,
        };
        e.calibrate(now, model.as_ref(), q, Some(mark.target), correction);
    }

    /// Record how an attempt at the endpoint of `mark` went. Returns whether it took the
    /// endpoint out.
    pub(crate) fn verdict(&mut self, now: Instant, mark: &Mark, verdict: &Verdict) -> bool {
        let name = &mark.endpoint.name;
        let others_in = self.endpoints.iter().any(|e| e.name() != name && e.health.is_in());
        let ejection = self.ejection.clone();
        let backoff = move |n: u32| crate::admission::retry::backoff(&ejection, n, 1.0);
        let next_order = self.next_order;
        let Some(e) = self.endpoint_of(mark) else { return false };
        match verdict {
            Verdict::Exhausted(x) => e.exhaust(now, SystemTime::now(), mark.model.as_ref(), x, next_order),
            Verdict::Answered => e.recovered(mark.model.as_ref(), mark.order),
            Verdict::ServerError(_) | Verdict::NoAnswer(_) => {}
        }
        e.verdict(now, mark.probe, verdict, others_in, backoff)
    }
}
