//! Where a request goes and when: the total, per-model and per-client caps, the concurrency
//! cap, then the endpoint that can take it soonest by its own quota (ties by weight).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::Names;
use super::lease::{LeaseKey, TOP_UP_WAIT};
use super::{Ask, Decision, Holds, Limit, Limiter, Mark, Scope};

impl Limiter {
    /// Whether `ask` could go now, and where; or what it waits for. `holds`: what earlier
    /// waiters in the same look at the line wait for.
    pub(crate) fn decide(&mut self, now: Instant, ask: &Ask, holds: &Holds) -> Decision {
        if self.inflight >= self.limits.max_concurrent {
            return Decision::WaitForSlot;
        }
        let (at, limit) = self.total.ready_at(now, ask.cost(), Names::TOTAL);
        if at > now {
            return Decision::Wait { at, limit, scope: None };
        }
        if let Some(wait) = self.lease_wait(now, &LeaseKey::Total, ask, None) {
            return wait;
        }
        if let Some(caps) = self.caps(&ask.client, now) {
            let (at, limit) = caps.ready_at(now, ask.cost(), Names::CLIENT);
            if at > now {
                return Decision::Wait { at, limit, scope: Some(Scope::Client(ask.client.clone())) };
            }
            if let Some(name) = &ask.client {
                let scope = Some(Scope::Client(ask.client.clone()));
                if let Some(wait) = self.lease_wait(now, &LeaseKey::Client(Arc::clone(name)), ask, scope) {
                    return wait;
                }
            }
        }
        if let Some(model) = &ask.model
            && let Some(rates) = self.models.get_mut(model)
        {
            let (at, limit) = rates.ready_at(now, ask.cost(), Names::MODEL);
            if at > now {
                return Decision::Wait { at, limit, scope: Some(Scope::Model(Arc::clone(model))) };
            }
            let scope = Some(Scope::Model(Arc::clone(model)));
            if let Some(wait) = self.lease_wait(now, &LeaseKey::Model(Arc::clone(model)), ask, scope) {
                return wait;
            }
        }
        if let Some(wait) = self.lease_wait(now, &LeaseKey::Quota, ask, None) {
            return wait;
        }
        if let Some(model) = &ask.model {
            let scope = Some(Scope::Model(Arc::clone(model)));
            if let Some(wait) = self.lease_wait(now, &LeaseKey::QuotaModel(Arc::clone(model)), ask, scope) {
                return wait;
            }
        }
        self.decide_endpoint(now, ask, holds)
    }

    /// The endpoint for `ask`: among those that serve it and are not held for an earlier
    /// waiter, one that can take it now (by weight among several), else the soonest.
    fn decide_endpoint(&mut self, now: Instant, ask: &Ask, holds: &Holds) -> Decision {
        let mut candidates: Vec<usize> =
            self.endpoints.iter().filter(|e| e.can_serve(ask)).map(|e| e.index).collect();
        if candidates.is_empty() {
            // Nothing can ever take it (a reload removed its endpoints): refused at its deadline.
            let scope = ask.model.clone().map(Scope::Model);
            return Decision::Wait {
                at: now + Duration::from_secs(86_400),
                limit: Limit::UpstreamUnavailable,
                scope,
            };
        }
        // Endpoints whose upstream reported this quota spent take none but a probe: with no
        // other, the request is refused at once (the dispatcher never queues for this limit).
        let mut spent_until: Option<Instant> = None;
        candidates.retain(|i| match self.endpoints[*i].exhausted_until(now, ask.model.as_ref()) {
            Some(until) => {
                spent_until = Some(spent_until.map_or(until, |s| s.min(until)));
                false
            }
            None => true,
        });
        if candidates.is_empty() {
            let at = spent_until.unwrap_or(now);
            let scope = ask.model.clone().map(Scope::Model);
            return Decision::Wait { at, limit: Limit::UpstreamExhausted, scope };
        }
        if let Some(avoid) = &ask.avoid
            && candidates.len() > 1
        {
            let others: Vec<usize> =
                candidates.iter().copied().filter(|i| self.endpoints[*i].name() != &**avoid).collect();
            if !others.is_empty() {
                candidates = others;
            }
        }
        let mut ready = Vec::new();
        let mut soonest: Option<(Instant, Limit)> = None;
        let mut reserve = Vec::new();
        for i in candidates {
            if holds.holds(i, ask.model.as_ref()) {
                continue;
            }
            let mut r = self.endpoints[i].ready_at(now, ask);
            if r.at <= now {
                let key = LeaseKey::Endpoint(Arc::from(self.endpoints[i].name()));
                match self.leases.as_mut().and_then(|l| l.lacks(&key, ask.tokens, now)) {
                    None => {
                        ready.push(i);
                        continue;
                    }
                    Some(limit) => {
                        r.at = now + TOP_UP_WAIT;
                        r.limit = limit;
                    }
                }
            }
            if soonest.is_none_or(|(at, _)| r.at < at) {
                soonest = Some((r.at, r.limit));
            }
            reserve.push(r.hold);
        }
        if !ready.is_empty() {
            return Decision::Go(self.pick(&ready));
        }
        match soonest {
            Some((at, limit)) => Decision::Wait { at, limit, scope: Some(Scope::Endpoints(reserve)) },
            None => Decision::Held,
        }
    }

    /// Smooth weighted round robin among endpoints that could each take a request now.
    fn pick(&mut self, ready: &[usize]) -> usize {
        let mut total = 0i64;
        for &i in ready {
            let e = &mut self.endpoints[i];
            let w = i64::from(e.policy.weight.max(1));
            e.swrr += w;
            total += w;
        }
        let best = ready.iter().copied().max_by_key(|i| (self.endpoints[*i].swrr, std::cmp::Reverse(*i)));
        let best = best.unwrap_or(ready[0]);
        self.endpoints[best].swrr -= total;
        best
    }

    /// Take one request, the ask's tokens and a concurrency slot, at endpoint `index`. Call
    /// after `decide` said `Go(index)`.
    pub(crate) fn admit(&mut self, now: Instant, ask: &Ask, index: usize) -> Mark {
        self.total.take(now, ask.cost());
        if let Some(rates) = ask.model.as_ref().and_then(|m| self.models.get_mut(m)) {
            rates.take(now, ask.cost());
        }
        if let Some(caps) = self.caps(&ask.client, now) {
            caps.take(now, ask.cost());
        }
        self.usage.add(now, 1, i64::try_from(ask.tokens).unwrap_or(i64::MAX));
        let at = index.min(self.endpoints.len().saturating_sub(1));
        let endpoint_name = self.endpoints.get(at).map(|e| e.name().to_owned()).unwrap_or_default();
        let keys = self.lease_keys(ask.model.as_ref(), &ask.client, &endpoint_name);
        if let Some(leases) = self.leases.as_mut() {
            for k in &keys {
                leases.take(k, ask.tokens, now);
            }
        }
        self.inflight += 1;
        let order = self.next_order;
        self.next_order += 1;
        let index = index.min(self.endpoints.len().saturating_sub(1));
        let e = &mut self.endpoints[index];
        let unseen_before = e.unanswered.values().fold(0u64, |a, t| a.saturating_add(t.tokens));
        let (probe, target) = e.take(now, ask, order);
        Mark {
            at: now,
            order,
            endpoint: Arc::clone(&e.policy),
            model: ask.model.clone(),
            target,
            unseen_before,
            probe,
        }
    }
}
