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
mod decide;
mod endpoint;
pub(crate) mod lease;
mod limit;
mod settle;
pub(crate) mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use llmproxy_api::Policy;
use llmproxy_api::policy::{ClientsPolicy, LimitsPolicy, QuotaPolicy, UpstreamPolicy};
use tokio::time::Instant;

pub(crate) use self::bucket::RateConfig;
use self::bucket::Rates;
pub(crate) use self::endpoint::Verdict;
use self::endpoint::{Avail, Endpoint, Target};
use self::lease::{LeaseKey, Leases, TOP_UP_WAIT};
pub(crate) use self::limit::Hold;
pub(crate) use self::limit::{Ask, Cost, Limit};

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
    /// The model it was charged for.
    pub(crate) model: Option<Arc<str>>,
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
    pub(crate) refunded: Cost,
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
    /// The quotas it reported spent, as `status.upstreams[].exhausted` shows them.
    pub exhausted: Vec<llmproxy_api::ExhaustedStatus>,
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
        input: l.input_tokens_per_minute.map(|pm| (pm, l.input_token_burst)),
        output: l.output_tokens_per_minute.map(|pm| (pm, l.output_token_burst)),
        per_day: l.requests_per_day,
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
            let config = RateConfig::for_model(m);
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
            let config = RateConfig::for_model(m);
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

    /// Whether another endpoint than `avoid` could take `ask` (it serves it and is in, or due
    /// for a probe).
    pub(crate) fn alternative(&self, now: Instant, ask: &Ask, avoid: &str) -> bool {
        self.endpoints.iter().any(|e| {
            e.name() != avoid
                && e.can_serve(ask)
                && !matches!(e.health.avail(now), Avail::Out(_))
                && e.exhausted_until(now, ask.model.as_ref()).is_none()
        })
    }

    /// What holds `ask` back at the endpoints that serve it and reported its quota spent, in
    /// words for its 429 (which quota, for which model, until when).
    pub(crate) fn exhausted_for(&self, now: Instant, ask: &Ask) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.endpoints.iter().filter(|e| e.can_serve(ask)) {
            for (model, x) in e.exhausted_report(now) {
                if model.is_some() && model != ask.model.as_deref() {
                    continue;
                }
                let of = model.map(|m| format!(" for model {m}")).unwrap_or_default();
                let until = match x.until_text() {
                    Some(t) => format!("until {t}"),
                    None => "until a probe (one a minute) succeeds".to_owned(),
                };
                let (what, label) = (x.reason.what(), x.reason.label());
                out.push(format!("upstream {} reports {what} ({label}){of} spent {until}", e.name()));
            }
        }
        out
    }

    /// Requests admitted and tokens charged in the last minute.
    pub(crate) fn last_minute(&self, now: Instant) -> (u64, u64) {
        self.usage.total(now)
    }

    /// Every endpoint's state, for metrics and status.
    pub(crate) fn reports(&self, now: Instant) -> Vec<EndpointReport> {
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
                exhausted: e
                    .exhausted_report(now)
                    .into_iter()
                    .map(|(model, x)| llmproxy_api::ExhaustedStatus {
                        model: model.map(str::to_owned),
                        reason: x.reason.label().to_owned(),
                        until: x.until_text(),
                    })
                    .collect(),
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
mod tests;
