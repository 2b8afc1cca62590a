//! Admission decisions: the LlmProxy's total quota, per-model and per-client caps, the
//! concurrency cap, and each upstream endpoint's own quota, pauses and health. Pure: every
//! method takes `now`, so tests drive a fake clock. The buckets are token buckets that may go
//! into debt (governor's GCRA cannot give tokens back or charge a request larger than the
//! burst, and settling token reservations against real usage needs both).
//!
//! A request goes to the endpoint, among those that serve its model, that can take it soonest
//! by that endpoint's own quota; ties go by weight (smooth weighted round robin). The buckets
//! follow the upstream's own count: a request is charged what the provider charges (see
//! `limits.tokenAccounting`), each endpoint's `x-ratelimit-limit-*` headers lower its quota to
//! what it really grants, and its `x-ratelimit-remaining-*` / `reset-*` lower a bucket that
//! ran ahead.

mod bucket;
mod endpoint;
pub(crate) mod lease;
mod limit;
pub(crate) mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use llmproxy_api::policy::{ClientsPolicy, LimitsPolicy, QuotaPolicy, UpstreamPolicy};
use llmproxy_api::{Policy, TokenAccounting};
use tokio::time::Instant;

pub(crate) use self::bucket::RateConfig;
use self::bucket::{Correction, Rates};
pub(crate) use self::endpoint::Verdict;
use self::endpoint::{Avail, Endpoint, Target};
use self::lease::{LeaseKey, Leases, TOP_UP_WAIT};
pub(crate) use self::limit::Hold;
pub(crate) use self::limit::{Ask, Limit};
use crate::protocol::ratelimit_headers::QuotaHeaders;

/// What a wait applies to, when it does not apply to everyone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One model (`limits.models`).
    Model(Arc<str>),
    /// One client (its own cap).
    Client(Option<Arc<str>>),
    /// The endpoints that could take the request.
    Endpoints(Vec<Hold>),
}

/// What earlier waiters hold during one look at the line.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    models: Vec<Arc<str>>,
    clients: Vec<Option<Arc<str>>>,
    endpoints: Vec<Hold>,
}

impl Holds {
    pub(crate) fn add(&mut self, scope: Scope) {
        match scope {
            Scope::Model(m) => self.models.push(m),
            Scope::Client(c) => self.clients.push(c),
            Scope::Endpoints(holds) => self.endpoints.extend(holds),
        }
    }

    /// Whether `ask` waits behind an earlier waiter of its model or its client.
    pub(crate) fn skips(&self, ask: &Ask) -> bool {
        ask.model.as_ref().is_some_and(|m| self.models.contains(m)) || self.clients.contains(&ask.client)
    }

    fn holds(&self, index: usize, model: Option<&Arc<str>>) -> bool {
        self.endpoints.iter().any(|h| match h {
            Hold::Endpoint(i) => *i == index,
            Hold::EndpointModel(i, m) => *i == index && model.is_some_and(|x| x == m),
        })
    }
}

/// What the request should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Admit now, to the endpoint at this index.
    Go(usize),
    /// Nothing can change before `at` unless the limits are reloaded or corrected. With a
    /// `scope`, only requests of that scope are held; others may go ahead.
    Wait { at: Instant, limit: Limit, scope: Option<Scope> },
    /// All concurrency slots are taken; wait for one to be released.
    WaitForSlot,
    /// Every endpoint that could take it is held for an earlier waiter.
    Held,
}

/// Where things stood right after a request was charged, so that the upstream's answer to it
/// can be compared with what was charged since, and where the request went.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    at: Instant,
    /// Admission order.
    pub(crate) order: u64,
    /// The endpoint it was admitted to.
    pub(crate) endpoint: Arc<UpstreamPolicy>,
    model: Option<Arc<str>>,
    target: Target,
    /// Token charges of earlier requests to the same endpoint still unanswered when this one
    /// was charged: any of them may reach the upstream after this one.
    unseen_before: u64,
    /// This request probes an endpoint that is out.
    probe: bool,
}

/// What a correction from upstream headers needs besides the headers and the mark.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Calibration {
    /// Tokens given back since because the upstream did not count the request.
    pub(crate) refunded: u64,
    /// The upstream refused the request for lack of quota (a 429).
    pub(crate) refused: bool,
    /// The longest reset taken at its word.
    pub(crate) max_reset: Duration,
}

/// An endpoint's state for metrics and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointReport {
    /// Its name.
    pub name: String,
    /// Taking requests.
    pub healthy: bool,
    /// The latest failure.
    pub last_error: Option<String>,
    /// Limits its headers reported (requests, tokens per minute), the tightest over models.
    pub observed: (Option<u64>, Option<u64>),
    /// The endpoint-wide limits it enforces: configured, or lower as reported.
    pub in_force: (Option<u64>, Option<u64>),
    /// What its headers last said remains (requests, tokens).
    pub remaining: (Option<u64>, Option<u64>),
    /// Times it was taken out.
    pub ejections: u64,
}

/// The most clients with caps tracked at once; idle ones beyond it are forgotten.
const MAX_CLIENT_CAPS: usize = 10_000;

/// All limits of one LlmProxy, as seen by one replica.
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: LimitsPolicy,
    total: Rates,
    /// `limits.models`, within the total.
    models: HashMap<Arc<str>, Rates>,
    endpoints: Vec<Endpoint>,
    inflight: u32,
    next_order: u64,
    /// Client caps, by the client's settings in force.
    clients: Option<ClientsPolicy>,
    caps: HashMap<Option<Arc<str>>, Rates>,
    /// How long an endpoint stays out after its nth ejection in a row.
    ejection: llmproxy_api::policy::RetryPolicy,
    /// With shared state: this replica's stocks of the shared buckets.
    pub(crate) leases: Option<Leases>,
    /// The LlmQuota drawn from.
    quota: Option<QuotaPolicy>,
    /// What went upstream in the last minute.
    usage: window::MinuteWindow,
}

fn total_config(l: &LimitsPolicy) -> RateConfig {
    RateConfig {
        requests: Some((l.requests_per_minute, l.request_burst)),
        tokens: l.tokens_per_minute.map(|pm| (pm, l.token_burst)),
    }
}

impl Limiter {
    pub(crate) fn new(policy: &Policy, now: Instant) -> Self {
        let mut l = Self {
            limits: policy.limits.clone(),
            total: Rates::new(total_config(&policy.limits), now),
            models: HashMap::new(),
            endpoints: Vec::new(),
            inflight: 0,
            next_order: 0,
            clients: None,
            caps: HashMap::new(),
            ejection: policy.retry.clone(),
            leases: None,
            quota: None,
            usage: window::MinuteWindow::new(now),
        };
        l.reconfigure(policy, now);
        l
    }

    /// The shared buckets of a policy and their rates: the total, each model's, each endpoint's
    /// own (with several), the LlmQuota's and its models'. Client caps join as clients come.
    fn shared_buckets(policy: &Policy) -> Vec<(LeaseKey, RateConfig)> {
        let mut keys = vec![(LeaseKey::Total, total_config(&policy.limits))];
        for (name, m) in &policy.limits.models {
            let config = RateConfig::per_minute(m.requests_per_minute, m.tokens_per_minute);
            keys.push((LeaseKey::Model(Arc::from(name.as_str())), config));
        }
        if policy.upstreams.len() > 1 {
            for u in &policy.upstreams {
                let config = endpoint::configured(u);
                if !config.is_unlimited() {
                    keys.push((LeaseKey::Endpoint(Arc::from(u.name.as_str())), config));
                }
            }
        }
        if let Some(q) = &policy.quota {
            keys.push((
                LeaseKey::Quota,
                RateConfig::per_minute(Some(q.requests_per_minute), q.tokens_per_minute),
            ));
            for (name, m) in &q.models {
                let config = RateConfig::per_minute(m.requests_per_minute, m.tokens_per_minute);
                keys.push((LeaseKey::QuotaModel(Arc::from(name.as_str())), config));
            }
        }
        keys
    }

    /// The shared buckets one request of `model` from `client` at endpoint `endpoint` draws on
    /// (those this replica holds stock of).
    fn lease_keys(
        &self,
        model: Option<&Arc<str>>,
        client: &Option<Arc<str>>,
        endpoint: &str,
    ) -> Vec<LeaseKey> {
        let Some(leases) = &self.leases else { return Vec::new() };
        let mut keys = vec![LeaseKey::Total, LeaseKey::Endpoint(Arc::from(endpoint)), LeaseKey::Quota];
        if let Some(m) = model {
            keys.push(LeaseKey::Model(Arc::clone(m)));
            keys.push(LeaseKey::QuotaModel(Arc::clone(m)));
        }
        if let Some(c) = client {
            keys.push(LeaseKey::Client(Arc::clone(c)));
        }
        keys.retain(|k| leases.stocks.contains_key(k));
        keys
    }

    /// Whether the stock of a shared bucket lacks what `ask` needs: the wait (the lessee is
    /// told through the stock's `want`, and a grant wakes the dispatcher).
    fn lease_wait(
        &mut self,
        now: Instant,
        key: &LeaseKey,
        ask: &Ask,
        scope: Option<Scope>,
    ) -> Option<Decision> {
        let limit = self.leases.as_mut()?.lacks(key, ask.tokens, now)?;
        Some(Decision::Wait { at: now + TOP_UP_WAIT, limit, scope })
    }

    /// Apply a reloaded policy. Buckets carry over where their limits did not change (clamped
    /// to a new capacity where they did); endpoints are matched by name, keeping their pauses
    /// and health. Returns whether any limit changed.
    pub(crate) fn reconfigure(&mut self, policy: &Policy, now: Instant) -> bool {
        let mut changed = self.total.set(total_config(&policy.limits), now);
        changed |= self.limits != policy.limits;
        self.limits = policy.limits.clone();
        self.models.retain(|m, _| policy.limits.models.contains_key(m.as_ref()));
        for (name, m) in &policy.limits.models {
            let config = RateConfig::per_minute(m.requests_per_minute, m.tokens_per_minute);
            match self.models.get_mut(name.as_str()) {
                Some(rates) => changed |= rates.set(config, now),
                None => {
                    self.models.insert(Arc::from(name.as_str()), Rates::new(config, now));
                }
            }
        }
        let mut old: HashMap<String, Endpoint> =
            self.endpoints.drain(..).map(|e| (e.name().to_owned(), e)).collect();
        for (index, u) in policy.upstreams.iter().enumerate() {
            let u = Arc::new(u.clone());
            let e = match old.remove(&u.name) {
                Some(mut e) => {
                    changed |= *e.policy != *u;
                    e.reconfigure(u, index, now);
                    e
                }
                None => {
                    changed = true;
                    Endpoint::new(u, index, now)
                }
            };
            self.endpoints.push(e);
        }
        changed |= !old.is_empty();
        if self.clients.as_ref() != policy.clients.as_ref() {
            self.clients = policy.clients.clone();
        }
        self.ejection = policy.retry.clone();
        self.quota.clone_from(&policy.quota);
        if policy.shared.is_some() {
            let mut keys = Self::shared_buckets(policy);
            // Client caps already known keep their stocks.
            if let Some(leases) = &self.leases {
                keys.extend(
                    leases
                        .stocks
                        .iter()
                        .filter(|(k, _)| matches!(k, LeaseKey::Client(_)))
                        .map(|(k, s)| (k.clone(), s.config)),
                );
            }
            self.leases.get_or_insert_with(Leases::default).configure(&keys, now);
        } else {
            self.leases = None;
        }
        changed
    }

    /// The caps of a client under the settings in force (`None` when it has none).
    fn caps(&mut self, client: &Option<Arc<str>>, now: Instant) -> Option<&mut Rates> {
        let config = {
            let clients = self.clients.as_ref()?;
            let p = client.as_deref().map_or(&clients.default, |name| clients.client(name));
            RateConfig::per_minute(p.requests_per_minute, p.tokens_per_minute)
        };
        if config.is_unlimited() {
            return None;
        }
        if self.caps.len() >= MAX_CLIENT_CAPS && !self.caps.contains_key(client) {
            // Forget caps that have fully refilled (nothing to remember about them).
            self.caps.retain(|_, c| {
                c.requests.as_mut().is_some_and(|b| b.level(now) < b.cap)
                    || c.tokens.as_mut().is_some_and(|b| b.level(now) < b.cap)
            });
        }
        if let (Some(leases), Some(name)) = (self.leases.as_mut(), client) {
            let key = LeaseKey::Client(Arc::clone(name));
            if !leases.stocks.contains_key(&key) && leases.stocks.len() < MAX_CLIENT_CAPS {
                let mut all: Vec<(LeaseKey, RateConfig)> =
                    leases.stocks.iter().map(|(k, s)| (k.clone(), s.config)).collect();
                all.push((key, config));
                leases.configure(&all, now);
            }
        }
        let caps = self.caps.entry(client.clone()).or_insert_with(|| Rates::new(config, now));
        caps.set(config, now);
        Some(caps)
    }

    /// Whether `ask` could go now, and where; or what it waits for. `holds`: what earlier
    /// waiters in the same look at the line wait for.
    pub(crate) fn decide(&mut self, now: Instant, ask: &Ask, holds: &Holds) -> Decision {
        if self.inflight >= self.limits.max_concurrent {
            return Decision::WaitForSlot;
        }
        let (at, limit) = self.total.ready_at(now, ask.tokens, (Limit::Requests, Limit::Tokens));
        if at > now {
            return Decision::Wait { at, limit, scope: None };
        }
        if let Some(wait) = self.lease_wait(now, &LeaseKey::Total, ask, None) {
            return wait;
        }
        if let Some(caps) = self.caps(&ask.client, now) {
            let (at, limit) = caps.ready_at(now, ask.tokens, (Limit::ClientRequests, Limit::ClientTokens));
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
            let (at, limit) = rates.ready_at(now, ask.tokens, (Limit::ModelRequests, Limit::ModelTokens));
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
        self.total.take(now, ask.tokens);
        if let Some(rates) = ask.model.as_ref().and_then(|m| self.models.get_mut(m)) {
            rates.take(now, ask.tokens);
        }
        if let Some(caps) = self.caps(&ask.client, now) {
            caps.take(now, ask.tokens);
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
        let unseen_before = e.unanswered.values().fold(0u64, |a, t| a.saturating_add(*t));
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
    pub(crate) fn refund(&mut self, now: Instant, mark: &Mark, client: &Option<Arc<str>>, tokens: u64) {
        self.total.give_tokens(now, tokens);
        if let Some(rates) = mark.model.as_ref().and_then(|m| self.models.get_mut(m)) {
            rates.give_tokens(now, tokens);
        }
        if let Some(caps) = self.caps(client, now) {
            caps.give_tokens(now, tokens);
        }
        let model = mark.model.clone();
        self.usage.add(now, 0, -i64::try_from(tokens).unwrap_or(i64::MAX));
        self.give_leased(mark, client, tokens as f64);
        if let Some(e) = self.endpoint_of(mark) {
            e.give_tokens(now, model.as_ref(), tokens);
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

    /// The answer is complete: under `used` accounting its charge becomes its real usage.
    /// Returns the charge that stands. Where the upstream reports its own count, unused tokens
    /// of the quota it speaks for are withheld until its headers show them back (a provider
    /// that does not refund, though configured as one that does, then never lets the proxy run
    /// ahead of it); the proxy's own totals and caps follow the usage at once.
    pub(crate) fn settle(
        &mut self,
        now: Instant,
        mark: &Mark,
        client: &Option<Arc<str>>,
        reserved: u64,
        used: Option<u64>,
    ) -> u64 {
        let (TokenAccounting::Used, Some(used)) = (self.limits.token_accounting, used) else {
            return reserved;
        };
        self.total.settle(now, reserved, used, false);
        if let Some(rates) = mark.model.as_ref().and_then(|m| self.models.get_mut(m)) {
            rates.settle(now, reserved, used, false);
        }
        if let Some(caps) = self.caps(client, now) {
            caps.settle(now, reserved, used, false);
        }
        let model = mark.model.clone();
        #[allow(clippy::cast_precision_loss)]
        self.give_leased(mark, client, reserved as f64 - used as f64);
        if let Some(e) = self.endpoint_of(mark) {
            e.settle(now, model.as_ref(), reserved, used);
        }
        used
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
            refunded: c.refunded as f64,
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
        match self.endpoint_of(mark) {
            Some(e) => e.verdict(now, mark.probe, verdict, others_in, backoff),
            None => false,
        }
    }

    /// Whether another endpoint than `avoid` could take `ask` (it serves it and is in, or due
    /// for a probe).
    pub(crate) fn alternative(&self, now: Instant, ask: &Ask, avoid: &str) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.name() != avoid && e.can_serve(ask) && !matches!(e.health.avail(now), Avail::Out(_)))
    }

    /// Requests admitted and tokens charged in the last minute.
    pub(crate) fn last_minute(&self, now: Instant) -> (u64, u64) {
        self.usage.total(now)
    }

    /// Every endpoint's state, for metrics and status.
    pub(crate) fn reports(&self) -> Vec<EndpointReport> {
        self.endpoints
            .iter()
            .map(|e| EndpointReport {
                name: e.name().to_owned(),
                healthy: e.health.is_in(),
                last_error: e.health.last_error.clone(),
                observed: e.observed_limits(),
                in_force: e.limits_in_force(),
                remaining: e.remaining,
                ejections: e.ejections_total,
            })
            .collect()
    }

    pub(crate) fn limits(&self) -> &LimitsPolicy {
        &self.limits
    }

    pub(crate) fn inflight(&self) -> u32 {
        self.inflight
    }

    /// Tokens available now for a request without a model, the tightest of the total and each
    /// endpoint's own bucket; `None` when tokens are unlimited.
    pub(crate) fn tokens_available(&mut self, now: Instant) -> Option<f64> {
        let mut levels: Vec<f64> = self.total.tokens.as_mut().map(|b| b.level(now)).into_iter().collect();
        for e in &mut self.endpoints {
            levels.extend(e.tokens_level(now));
        }
        levels.into_iter().reduce(f64::min)
    }
}

#[cfg(test)]
mod tests {
    use llmproxy_api::policy::EndpointLimits;

    use super::*;

    /// One upstream whose quota is the LlmProxy's, as `spec.upstream` gives.
    fn policy(rpm: u64, burst: u64, tpm: Option<u64>, token_burst: u64, max_concurrent: u32) -> Policy {
        let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 60}";
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
        let mut p = Policy::from_spec(&spec).unwrap();
        p.limits = LimitsPolicy {
            request_burst: burst,
            token_burst,
            max_concurrent,
            ..LimitsPolicy::per_minute(rpm, tpm)
        };
        // The endpoint keeps a tenth of its burst in hand; these tests are about the total,
        // so its burst is set to come out at the total's.
        let mut own = EndpointLimits::of(&p.limits);
        own.request_burst = before_headroom(burst);
        own.token_burst = before_headroom(token_burst);
        p.upstreams[0].limits = own;
        p
    }

    /// The smallest burst that, less the tenth kept in hand, is still `b`.
    fn before_headroom(b: u64) -> u64 {
        (b..).find(|x| x - x / 10 >= b).unwrap_or(b)
    }

    fn two(yaml_upstreams: &str) -> Policy {
        let yaml = format!(
            "upstreams: {yaml_upstreams}\nlimits: {{requestsPerMinute: 100000, maxConcurrent: 1000}}"
        );
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
        Policy::from_spec(&spec).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn wait(at: Instant, limit: Limit) -> Decision {
        Decision::Wait { at, limit, scope: None }
    }

    fn decide(l: &mut Limiter, now: Instant, ask: &Ask) -> Decision {
        l.decide(now, ask, &Holds::default())
    }

    /// Decide and, if it may go, admit.
    fn go(l: &mut Limiter, now: Instant, ask: &Ask) -> Option<Mark> {
        match decide(l, now, ask) {
            Decision::Go(i) => Some(l.admit(now, ask, i)),
            _ => None,
        }
    }

    fn model(m: &str) -> Ask {
        Ask { model: Some(Arc::from(m)), ..Ask::default() }
    }

    #[test]
    fn burst_then_paced_at_the_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(600, 3, None, 0, 100), t0); // 10/s, burst 3
        for _ in 0..3 {
            assert!(go(&mut l, t0, &Ask::tokens(0)).is_some());
        }
        assert_eq!(decide(&mut l, t0, &Ask::tokens(0)), wait(t0 + ms(100), Limit::Requests));
        assert_eq!(decide(&mut l, t0 + ms(99), &Ask::tokens(0)), wait(t0 + ms(100), Limit::Requests));
        assert_eq!(decide(&mut l, t0 + ms(100), &Ask::tokens(0)), Decision::Go(0));
    }

    #[test]
    fn a_minute_of_requests_takes_a_minute() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(60, 1, None, 0, 100), t0);
        let mut now = t0;
        for _ in 0..61 {
            match decide(&mut l, now, &Ask::tokens(0)) {
                Decision::Go(_) => {}
                Decision::Wait { at, .. } => now = at,
                other => panic!("{other:?}"),
            }
            l.admit(now, &Ask::tokens(0), 0);
            l.release();
        }
        assert_eq!(now.duration_since(t0), Duration::from_secs(60));
    }

    #[test]
    fn requested_accounting_keeps_the_charge_used_settles_it() {
        let t0 = Instant::now();
        // 6000 TPM = 100 tokens/s, bucket of 100.
        let mut l = Limiter::new(&policy(6000, 100, Some(6000), 100, 100), t0);
        let m = l.admit(t0, &Ask::tokens(80), 0);
        assert_eq!(decide(&mut l, t0, &Ask::tokens(80)), wait(t0 + ms(600), Limit::Tokens));
        assert_eq!(l.settle(t0, &m, &None, 80, Some(20)), 80, "requested: the charge stands");
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(20.0));

        let mut used = policy(6000, 100, Some(6000), 100, 100);
        used.limits.token_accounting = TokenAccounting::Used;
        let mut l = Limiter::new(&used, t0);
        let m = l.admit(t0, &Ask::tokens(80), 0);
        assert_eq!(l.settle(t0, &m, &None, 80, Some(20)), 20);
        assert_eq!(decide(&mut l, t0, &Ask::tokens(80)), Decision::Go(0), "the unused 60 came back");
        let m = l.admit(t0, &Ask::tokens(80), 0);
        assert_eq!(l.settle(t0, &m, &None, 80, Some(100)), 100, "using more than charged costs more");
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-20.0));
        assert_eq!(l.settle(t0, &m, &None, 80, None), 80, "no usage: the charge stands, never more");
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_goes_into_debt() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(6000, 100, Some(6000), 100, 100), t0);
        l.admit(t0, &Ask::tokens(50), 0);
        assert_eq!(decide(&mut l, t0, &Ask::tokens(1000)), wait(t0 + ms(500), Limit::Tokens));
        l.admit(t0 + ms(500), &Ask::tokens(1000), 0);
        // 900 tokens of debt at 100/s: the next small request waits 9 s + its own cost.
        assert_eq!(decide(&mut l, t0 + ms(500), &Ask::tokens(10)), wait(t0 + ms(9600), Limit::Tokens));
    }

    #[test]
    fn concurrency_slots() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(6000, 100, None, 0, 2), t0);
        l.admit(t0, &Ask::tokens(0), 0);
        l.admit(t0, &Ask::tokens(0), 0);
        assert_eq!(decide(&mut l, t0, &Ask::tokens(0)), Decision::WaitForSlot);
        l.release();
        assert_eq!(decide(&mut l, t0, &Ask::tokens(0)), Decision::Go(0));
    }

    #[test]
    fn pauses_hold_their_endpoint_and_model_only_and_never_shorten() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(6000, 100, None, 0, 10), t0);
        let a = go(&mut l, t0, &model("a")).expect("goes");
        l.pause(t0, &a, t0 + Duration::from_secs(2));
        l.pause(t0, &a, t0 + Duration::from_secs(1));
        let held = Decision::Wait {
            at: t0 + Duration::from_secs(2),
            limit: Limit::UpstreamPause,
            scope: Some(Scope::Endpoints(vec![Hold::EndpointModel(0, Arc::from("a"))])),
        };
        assert_eq!(decide(&mut l, t0, &model("a")), held);
        assert_eq!(decide(&mut l, t0, &model("b")), Decision::Go(0));
        assert_eq!(decide(&mut l, t0 + Duration::from_secs(2), &model("a")), Decision::Go(0));
        // Without a model the whole endpoint is paused: everyone waits.
        let any = go(&mut l, t0, &Ask::tokens(0)).expect("goes");
        l.pause(t0, &any, t0 + Duration::from_secs(3));
        assert_eq!(
            decide(&mut l, t0, &model("b")),
            Decision::Wait {
                at: t0 + Duration::from_secs(3),
                limit: Limit::UpstreamPause,
                scope: Some(Scope::Endpoints(vec![Hold::Endpoint(0)])),
            }
        );
    }

    #[test]
    fn a_client_at_its_cap_waits_alone() {
        let t0 = Instant::now();
        let mut p = policy(6000, 100, Some(600_000), 10_000, 100);
        let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 6000}\nclients:\n  overrides: [{name: capped, requestsPerMinute: 60}]\n";
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
        p.clients = Policy::from_spec(&spec).ok().and_then(|p| p.clients);
        let mut l = Limiter::new(&p, t0);
        let of = |c: &str| Ask { tokens: 1, client: Some(Arc::from(c)), ..Ask::default() };
        assert!(go(&mut l, t0, &of("capped")).is_some());
        assert_eq!(
            decide(&mut l, t0, &of("capped")),
            Decision::Wait {
                at: t0 + Duration::from_secs(1),
                limit: Limit::ClientRequests,
                scope: Some(Scope::Client(Some(Arc::from("capped")))),
            }
        );
        assert_eq!(decide(&mut l, t0, &of("free")), Decision::Go(0), "other clients are not held");
    }

    fn calibration(refused: bool) -> Calibration {
        Calibration { refunded: 0, refused, max_reset: Duration::from_secs(30) }
    }

    #[test]
    fn a_429s_word_lowers_the_bucket_and_a_hostile_reset_is_capped() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(6000, 100, Some(60_000), 1000, 100), t0); // 1000/s
        let mark = l.admit(t0, &Ask::tokens(100), 0);
        let said = QuotaHeaders {
            remaining_tokens: Some(0),
            reset_tokens: Some(Duration::from_secs(2)),
            ..QuotaHeaders::default()
        };
        l.calibrate(t0, &said, &mark, calibration(true));
        // Full again in 2 s at 1000/s: 1000 - 2000 = -1000 now.
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-1000.0));
        let hostile =
            QuotaHeaders { reset_tokens: Some(Duration::from_secs(3600)), ..QuotaHeaders::default() };
        let mark = l.admit(t0, &Ask::tokens(0), 0);
        l.calibrate(t0, &hostile, &mark, calibration(true));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(-29_000.0), "at most one max wait of debt");
    }

    #[test]
    fn after_a_success_the_bucket_goes_down_to_the_most_the_upstream_may_have() {
        let t0 = Instant::now();
        let mut l = Limiter::new(&policy(6000, 100, Some(60_000), 1000, 100), t0);
        let mine = l.admit(t0, &Ask::tokens(100), 0);
        let _other = l.admit(t0, &Ask::tokens(300), 0); // in flight, maybe not yet seen upstream
        // The upstream says 500 remained after mine (others use the key). Whether it had seen
        // the other 300 or not, it has at most 500 now: 100 less than here.
        let said = QuotaHeaders { remaining_tokens: Some(500), ..QuotaHeaders::default() };
        l.calibrate(t0, &said, &mine, calibration(false));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(500.0));
        // 100 remained, and 200 were charged here after that answer was measured. The
        // upstream may already have counted them (they overtake each other), so a success
        // caps the level at 100, no lower.
        let mark = l.admit(t0, &Ask::tokens(0), 0);
        let _later = l.admit(t0, &Ask::tokens(200), 0);
        let said = QuotaHeaders { remaining_tokens: Some(100), ..QuotaHeaders::default() };
        l.calibrate(t0, &said, &mark, calibration(false));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(100.0), "capped at what the upstream said");
        // A 429 is decisive: the upstream refused for lack of quota, and what was charged
        // here after it measured comes on top.
        let mark = l.admit(t0, &Ask::tokens(0), 0);
        let _later = l.admit(t0, &Ask::tokens(50), 0);
        l.calibrate(t0, &said, &mark, calibration(true));
        assert_eq!(l.tokens_available(t0).map(f64::round), Some(50.0));
    }

    #[test]
    fn withheld_refunds_return_only_as_far_as_the_upstream_confirms() {
        let t0 = Instant::now();
        let mut used = policy(6000, 100, Some(60_000), 1000, 100);
        used.limits.token_accounting = TokenAccounting::Used;
        let mut l = Limiter::new(&used, t0);
        let endpoint_tokens = |l: &mut Limiter| l.endpoints[0].tokens_level(t0).map(f64::round);
        let first = l.admit(t0, &Ask::tokens(400), 0);
        let seen = QuotaHeaders { remaining_tokens: Some(600), ..QuotaHeaders::default() };
        l.calibrate(t0, &seen, &first, calibration(false));
        // It used 100 of its 400: the 300 wait for the upstream's word.
        l.settle(t0, &first, &None, 400, Some(100));
        assert_eq!(endpoint_tokens(&mut l), Some(600.0));
        let next = l.admit(t0, &Ask::tokens(0), 0);
        let refunded = QuotaHeaders { remaining_tokens: Some(900), ..QuotaHeaders::default() };
        l.calibrate(t0, &refunded, &next, calibration(false));
        assert_eq!(endpoint_tokens(&mut l), Some(900.0), "the upstream refunded them");
        // An upstream that keeps what it charged never says so: nothing more comes back.
        let third = l.admit(t0, &Ask::tokens(400), 0);
        l.settle(t0, &third, &None, 400, Some(100));
        let kept = QuotaHeaders { remaining_tokens: Some(500), ..QuotaHeaders::default() };
        let after = l.admit(t0, &Ask::tokens(0), 0);
        l.calibrate(t0, &kept, &after, calibration(false));
        l.answered(&third);
        assert_eq!(endpoint_tokens(&mut l), Some(500.0));
    }

    #[test]
    fn reload_keeps_state_unless_limits_change() {
        let t0 = Instant::now();
        let base = policy(60, 1, Some(600), 10, 10);
        let mut l = Limiter::new(&base, t0);
        l.admit(t0, &Ask::tokens(10), 0);
        assert!(!l.reconfigure(&base.clone(), t0), "same limits: nothing changes");
        assert_eq!(decide(&mut l, t0, &Ask::tokens(1)), wait(t0 + Duration::from_secs(1), Limit::Requests));
        // Lowering the rate slows admission at once; the spent burst stays spent.
        assert!(l.reconfigure(&policy(30, 1, Some(600), 10, 10), t0));
        assert_eq!(decide(&mut l, t0, &Ask::tokens(1)), wait(t0 + Duration::from_secs(2), Limit::Requests));
        // Dropping the token limit removes that bucket.
        assert!(l.reconfigure(&policy(30, 1, None, 0, 10), t0));
        assert_eq!(l.tokens_available(t0), None);
    }

    #[test]
    fn each_request_goes_where_it_can_be_admitted_soonest() {
        let t0 = Instant::now();
        // a: 60/s burst 60; b: 30/s burst 30; each keeps a tenth of its burst in hand.
        let p = two(
            "[{name: a, url: 'https://a.example', limits: {requestsPerMinute: 3600}}, {name: b, url: 'https://b.example', limits: {requestsPerMinute: 1800}}]",
        );
        let mut l = Limiter::new(&p, t0);
        let mut sent = [0u32; 2];
        let mut now = t0;
        // Three seconds of back-to-back requests: each endpoint takes its burst and its rate.
        while now < t0 + Duration::from_secs(3) {
            match decide(&mut l, now, &Ask::tokens(0)) {
                Decision::Go(i) => {
                    l.admit(now, &Ask::tokens(0), i);
                    l.release();
                    sent[i] += 1;
                }
                Decision::Wait { at, limit, .. } => {
                    assert_eq!(limit, Limit::UpstreamRequests);
                    now = at;
                }
                other => panic!("{other:?}"),
            }
        }
        // Bursts less the tenth kept in hand: 54 + 3 s x 60 = 234 less the last instant's,
        // and 27 + 90 = 117.
        assert!((232..=234).contains(&sent[0]) && (115..=117).contains(&sent[1]), "{sent:?}");
    }

    #[test]
    fn ties_go_by_weight_and_models_pick_their_endpoints() {
        let t0 = Instant::now();
        let p = two(
            "[{name: a, url: 'https://a.example', weight: 3}, {name: b, url: 'https://b.example'}, {name: c, url: 'https://c.example', models: [small]}]",
        );
        let mut l = Limiter::new(&p, t0);
        let mut sent = [0u32; 3];
        for _ in 0..400 {
            let Decision::Go(i) = decide(&mut l, t0, &model("big")) else { panic!("unlimited") };
            sent[i] += 1;
        }
        assert_eq!(sent, [300, 100, 0], "c does not serve the model");
        let only_c = Ask { endpoints: Some(Arc::from(vec![Arc::from("c")])), ..model("small") };
        assert_eq!(decide(&mut l, t0, &only_c), Decision::Go(2));
        let nowhere = Ask { endpoints: Some(Arc::from(vec![Arc::from("c")])), ..model("big") };
        assert!(matches!(
            decide(&mut l, t0, &nowhere),
            Decision::Wait { limit: Limit::UpstreamUnavailable, .. }
        ));
    }

    #[test]
    fn a_paused_or_failing_endpoint_sends_requests_to_the_other() {
        let t0 = Instant::now();
        let p = two("[{name: a, url: 'https://a.example'}, {name: b, url: 'https://b.example'}]");
        let mut l = Limiter::new(&p, t0);
        let first = l.admit(t0, &model("m"), 0);
        l.pause(t0, &first, t0 + Duration::from_secs(10));
        for _ in 0..5 {
            assert_eq!(decide(&mut l, t0, &model("m")), Decision::Go(1), "a is paused for m");
        }
        assert_eq!(decide(&mut l, t0, &model("n")), Decision::Go(0), "a still serves n");
        // b refuses connections: taken out at once, since a is still in.
        let at_b = l.admit(t0, &model("n"), 1);
        assert!(l.verdict(t0, &at_b, &Verdict::NoAnswer("connection refused".into())));
        assert!(!l.alternative(t0, &model("m"), "a"), "b is out and a is the one to avoid");
        let retry = Ask { avoid: Some(Arc::from("b")), ..model("n") };
        assert_eq!(decide(&mut l, t0, &retry), Decision::Go(0));
        // Model m: a paused, b out; it waits for the sooner of the two.
        let Decision::Wait { at, limit, .. } = decide(&mut l, t0, &model("m")) else { panic!("waits") };
        assert_eq!((at, limit), (t0 + Duration::from_secs(1), Limit::UpstreamUnavailable));
        // a fails too, but it is the last one in: it stays in.
        assert!(!l.verdict(t0, &first, &Verdict::NoAnswer("reset".into())));
        let reports = l.reports();
        assert_eq!(
            reports.iter().map(|r| (r.name.as_str(), r.healthy)).collect::<Vec<_>>(),
            [("a", true), ("b", false)]
        );
        assert_eq!(reports[1].last_error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn an_earlier_waiter_keeps_its_endpoint_from_later_ones() {
        let t0 = Instant::now();
        let p = two(
            "[{name: a, url: 'https://a.example', limits: {tokensPerMinute: 6000}}, {name: b, url: 'https://b.example', models: [other]}]",
        );
        let mut l = Limiter::new(&p, t0);
        let big = Ask { tokens: 100, ..model("m") };
        let _ = l.admit(t0, &big, 0);
        // The big one waits for a's tokens; a small one behind it must not take them first.
        let mut holds = Holds::default();
        let Decision::Wait { scope: Some(scope), .. } = l.decide(t0, &big, &holds) else { panic!("waits") };
        holds.add(scope);
        let small = Ask { tokens: 1, ..model("m") };
        assert_eq!(l.decide(t0, &small, &holds), Decision::Held);
        // A request for a model b serves still goes there.
        assert_eq!(l.decide(t0, &Ask { tokens: 1, ..model("other") }, &holds), Decision::Go(1));
    }
}
