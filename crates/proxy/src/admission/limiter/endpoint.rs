//! One upstream endpoint as admission sees it: its own quota (configured, lowered to what its
//! `x-ratelimit-limit-*` headers report), per-model quotas, the pauses its 429s asked for, the
//! quotas it reported spent for longer than a queue waits, and its health (taken out after
//! failures for a growing back-off, probed one request at a time).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use llmproxy_api::policy::UpstreamPolicy;
use tokio::time::Instant;

use super::bucket::{Correction, Names, RateConfig, Rates, Spent};
use super::limit::{Ask, Cost, Hold, Limit};
use crate::protocol::provider::{Exhaustion, Reason};
use crate::protocol::ratelimit_headers::QuotaHeaders;

/// The most models an endpoint keeps quotas or pauses for; beyond it idle ones are forgotten
/// (a client naming models cannot grow the maps without bound).
pub(crate) const MAX_MODELS: usize = 1024;

/// Consecutive 5xx answers that take an endpoint out (a refused connection or a timeout does
/// at once).
const FAILURES_TO_EJECT: u32 = 3;

/// How often one request may go to an endpoint (or model) whose quota the upstream reported
/// spent, to see whether it is back (a top-up, a raised limit) before its reset.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(60);

/// A quota the upstream reported spent for longer than a queue waits.
#[derive(Clone, Debug)]
pub(crate) struct Exhausted {
    pub(crate) reason: Reason,
    /// The upstream's reset, where known: on the monotonic clock (which decides) and the wall
    /// clock (which status reports).
    until: Option<Instant>,
    pub(crate) reset: Option<SystemTime>,
    /// When the next probe may go.
    next_probe: Instant,
    /// The admission order from which answers are probes: only a success of one of those brings
    /// the quota back (a request sent before it was spent proves nothing).
    from_order: u64,
}

impl Exhausted {
    fn over(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u <= now)
    }

    /// Until when it holds requests back: `None` when it is over or a probe may go now. A known
    /// reset is the answer's Retry-After; else the next probe.
    fn holds_until(&self, now: Instant) -> Option<Instant> {
        if self.over(now) || self.next_probe <= now {
            return None;
        }
        Some(self.until.unwrap_or(self.next_probe))
    }

    /// Its reset as an RFC 3339 time, where known.
    pub(crate) fn until_text(&self) -> Option<String> {
        self.reset.and_then(|r| jiff::Timestamp::try_from(r).ok()).map(|t| t.to_string())
    }
}

/// One model's quota at an endpoint: configured (`limits.models`) and reported by its headers.
#[derive(Debug)]
struct ModelQuota {
    rates: Rates,
    configured: RateConfig,
    observed: RateConfig,
}

/// Whether an endpoint takes requests now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Avail {
    /// Healthy.
    In,
    /// Out, and its back-off is over: one request may probe it.
    Probe,
    /// Out until then (or until its probe comes back).
    Out(Instant),
}

/// Passive health: failures take an endpoint out, a successful probe brings it back.
#[derive(Debug, Default)]
pub(crate) struct Health {
    failures: u32,
    ejections: u32,
    out_until: Option<Instant>,
    probing: bool,
    pub(crate) last_error: Option<String>,
}

impl Health {
    pub(crate) fn avail(&self, now: Instant) -> Avail {
        match self.out_until {
            None => Avail::In,
            Some(until) if until > now => Avail::Out(until),
            // Its probe is out: the answer wakes the line; look again in a second at most.
            Some(_) if self.probing => Avail::Out(now + Duration::from_secs(1)),
            Some(_) => Avail::Probe,
        }
    }

    pub(crate) fn is_in(&self) -> bool {
        self.out_until.is_none()
    }
}

/// How an attempt at an endpoint went, for its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It answered (whatever it answered, short of a server error).
    Answered,
    /// A server error (5xx).
    ServerError(String),
    /// No answer: the connection failed or it timed out.
    NoAnswer(String),
    /// It answered that a quota no wait fixes is spent (its health is fine).
    Exhausted(Exhaustion),
}

/// Which quota an answer corrects (its model's, or the endpoint's), and where that quota's
/// spent counters stood when the request was charged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Target {
    model: bool,
    spent: Spent,
}

/// When an endpoint can take a request, what holds it until then, and what to reserve for it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Ready {
    pub(crate) at: Instant,
    pub(crate) limit: Limit,
    /// What a later request must not take meanwhile: the whole endpoint when its own quota,
    /// pause or health holds the request, only the model when the model's does.
    pub(crate) hold: Hold,
}

/// One endpoint's admission state.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) policy: Arc<UpstreamPolicy>,
    pub(crate) index: usize,
    /// Its own quota: configured, lowered to what model-less answers report.
    rates: Rates,
    configured: RateConfig,
    observed: RateConfig,
    models: HashMap<Arc<str>, ModelQuota>,
    key_paused_until: Option<Instant>,
    model_paused_until: HashMap<Arc<str>, Instant>,
    /// The whole endpoint's quota reported spent (its account's credit), and per model.
    exhausted: Option<Exhausted>,
    model_exhausted: HashMap<Arc<str>, Exhausted>,
    /// Token charges of requests sent here and not yet answered, by admission order.
    pub(super) unanswered: BTreeMap<u64, Cost>,
    pub(crate) health: Health,
    /// Smooth weighted round robin among endpoints ready at once.
    pub(super) swrr: i64,
    /// The latest `remaining` its headers reported (requests, tokens).
    pub(crate) remaining: (Option<u64>, Option<u64>),
    /// Times it was taken out, for metrics.
    pub(crate) ejections_total: u64,
}

/// An endpoint's own quota as configured, with headroom (it models the upstream's count).
pub(super) fn configured(policy: &UpstreamPolicy) -> RateConfig {
    let l = &policy.limits;
    RateConfig {
        requests: l.requests_per_minute.map(|pm| (pm, l.request_burst)),
        tokens: l.tokens_per_minute.map(|pm| (pm, l.token_burst.max(llmproxy_api::policy::per_second(pm)))),
        input: None,
        output: None,
        per_day: l.requests_per_day,
    }
    .with_io(
        l.input_tokens_per_minute.map(|pm| (pm, l.input_token_burst)),
        l.output_tokens_per_minute.map(|pm| (pm, l.output_token_burst)),
    )
    .with_headroom()
}

/// What an answer's `x-ratelimit-limit-*` headers report, with headroom. A per-minute limit
/// says nothing of the burst: a report no lower than what `spec` configures (with headroom)
/// keeps the spec's burst, a lower one scales that burst down by the same ratio, and a rate the
/// spec does not limit gets one second's worth.
fn reported(q: &QuotaHeaders, spec: RateConfig) -> RateConfig {
    let unit = |reported: Option<u64>, spec: Option<(u64, u64)>| {
        let pm = reported?;
        Some(match spec {
            Some((spec_pm, burst)) if pm >= spec_pm => (pm, burst),
            Some((spec_pm, burst)) => {
                let scaled = u128::from(burst) * u128::from(pm) / u128::from(spec_pm.max(1));
                (pm, u64::try_from(scaled).unwrap_or(u64::MAX).max(1))
            }
            None => RateConfig::per_minute(Some(pm), None).with_headroom().requests?,
        })
    };
    RateConfig {
        requests: unit(q.limit_requests, spec.requests),
        tokens: unit(q.limit_tokens, spec.tokens),
        input: unit(q.limit_input_tokens, spec.input),
        output: unit(q.limit_output_tokens, spec.output),
        per_day: None,
    }
}

fn model_config(policy: &UpstreamPolicy, model: &str) -> RateConfig {
    policy
        .limits
        .models
        .get(model)
        .map_or_else(RateConfig::default, |m| RateConfig::for_model(m).with_headroom())
}

impl Endpoint {
    pub(crate) fn new(policy: Arc<UpstreamPolicy>, index: usize, now: Instant) -> Self {
        let configured = configured(&policy);
        let mut e = Self {
            rates: Rates::new(configured, now),
            configured,
            observed: RateConfig::default(),
            models: HashMap::new(),
            key_paused_until: None,
            model_paused_until: HashMap::new(),
            exhausted: None,
            model_exhausted: HashMap::new(),
            unanswered: BTreeMap::new(),
            health: Health::default(),
            swrr: 0,
            remaining: (None, None),
            ejections_total: 0,
            policy,
            index,
        };
        e.configure_models(now);
        e
    }

    /// Take a new policy for the same endpoint: quotas carry over where their limits did not
    /// change, pauses and health stay.
    pub(crate) fn reconfigure(&mut self, policy: Arc<UpstreamPolicy>, index: usize, now: Instant) {
        self.configured = configured(&policy);
        self.rates.set(self.configured.min(self.observed), now);
        self.policy = policy;
        self.index = index;
        self.configure_models(now);
    }

    fn configure_models(&mut self, now: Instant) {
        let policy = Arc::clone(&self.policy);
        for q in self.models.values_mut() {
            q.configured = RateConfig::default();
        }
        for name in policy.limits.models.keys() {
            let configured = model_config(&policy, name);
            match self.models.get_mut(name.as_str()) {
                Some(q) => q.configured = configured,
                None => {
                    let q = ModelQuota {
                        rates: Rates::new(configured, now),
                        configured,
                        observed: RateConfig::default(),
                    };
                    self.models.insert(Arc::from(name.as_str()), q);
                }
            }
        }
        self.models.retain(|_, q| !q.configured.min(q.observed).is_unlimited());
        for q in self.models.values_mut() {
            q.rates.set(q.configured.min(q.observed), now);
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.policy.name
    }

    /// Whether it can ever take `ask`: it serves the model, and the charge fits its quotas.
    pub(crate) fn can_serve(&self, ask: &Ask) -> bool {
        if !self.policy.serves(ask.model.as_deref()) {
            return false;
        }
        if let Some(names) = &ask.endpoints
            && !names.iter().any(|n| **n == *self.policy.name)
        {
            return false;
        }
        let model = ask.model.as_ref().and_then(|m| self.models.get(m));
        !(self.rates.never_fits(ask.cost()) || model.is_some_and(|q| q.rates.never_fits(ask.cost())))
    }

    /// When it can take `ask`, or `None` for now.
    pub(crate) fn ready_at(&mut self, now: Instant, ask: &Ask) -> Ready {
        let whole = Hold::Endpoint(self.index);
        let mut out = Ready { at: now, limit: Limit::UpstreamRequests, hold: whole.clone() };
        let mut later = |at: Instant, limit: Limit, hold: &Hold| {
            if at > out.at {
                out = Ready { at, limit, hold: hold.clone() };
            }
        };
        match self.health.avail(now) {
            Avail::Out(until) => later(until, Limit::UpstreamUnavailable, &whole),
            Avail::In | Avail::Probe => {}
        }
        if let Some(until) = self.key_paused_until {
            later(until, Limit::UpstreamPause, &whole);
        }
        let (at, limit) = self.rates.ready_at(now, ask.cost(), Names::UPSTREAM);
        later(at, limit, &whole);
        if let Some(model) = &ask.model {
            let only = Hold::EndpointModel(self.index, Arc::clone(model));
            if let Some(until) = self.model_paused_until.get(model) {
                later(*until, Limit::UpstreamPause, &only);
            }
            if let Some(q) = self.models.get_mut(model) {
                let (at, limit) = q.rates.ready_at(now, ask.cost(), Names::MODEL);
                later(at, limit, &only);
            }
        }
        out
    }

    /// Charge `ask` here. Returns whether this request is its probe, and where the quota its
    /// answer will correct stood.
    pub(crate) fn take(&mut self, now: Instant, ask: &Ask, order: u64) -> (bool, Target) {
        self.probe_exhausted(now, ask.model.as_ref());
        self.rates.take(now, ask.cost());
        let model = ask.model.as_ref().and_then(|m| self.models.get_mut(m));
        let spent = match model {
            Some(q) => {
                q.rates.take(now, ask.cost());
                Target { model: true, spent: q.rates.spent() }
            }
            None => Target { model: false, spent: self.rates.spent() },
        };
        self.unanswered.insert(order, ask.cost());
        let probe = self.health.avail(now) == Avail::Probe;
        if probe {
            self.health.probing = true;
        }
        (probe, spent)
    }

    /// Give tokens back (the upstream did not count the attempt).
    pub(crate) fn give_tokens(&mut self, now: Instant, model: Option<&Arc<str>>, cost: Cost) {
        self.rates.give_tokens(now, cost);
        if let Some(q) = model.and_then(|m| self.models.get_mut(m)) {
            q.rates.give_tokens(now, cost);
        }
    }

    /// Settle a charge to usage.
    pub(crate) fn settle(&mut self, now: Instant, model: Option<&Arc<str>>, reserved: Cost, used: Cost) {
        let target_is_model = model.is_some_and(|m| self.models.contains_key(m));
        self.rates.settle(now, reserved, used, !target_is_model);
        if let Some(q) = model.and_then(|m| self.models.get_mut(m)) {
            q.rates.settle(now, reserved, used, true);
        }
    }

    /// Until when a quota the upstream reported spent holds `model` here (`None`: it does not,
    /// or a probe may go now).
    pub(crate) fn exhausted_until(&self, now: Instant, model: Option<&Arc<str>>) -> Option<Instant> {
        let whole = self.exhausted.as_ref().and_then(|x| x.holds_until(now));
        let only = model.and_then(|m| self.model_exhausted.get(m)).and_then(|x| x.holds_until(now));
        whole.max(only)
    }

    /// A request is about to go here: where it is a probe of a spent quota, the next one waits
    /// a while; quotas whose reset passed are forgotten.
    fn probe_exhausted(&mut self, now: Instant, model: Option<&Arc<str>>) {
        if self.exhausted.as_ref().is_some_and(|x| x.over(now)) {
            self.exhausted = None;
        }
        self.model_exhausted.retain(|_, x| !x.over(now));
        let model = model.and_then(|m| self.model_exhausted.get_mut(m));
        for x in self.exhausted.iter_mut().chain(model) {
            if x.next_probe <= now {
                x.next_probe = now + PROBE_EVERY;
            }
        }
    }

    /// The upstream reported a quota spent (the endpoint's, or only `model`'s): no request for
    /// it goes here before its reset or a successful probe; `next_order` is the admission
    /// order of the next request.
    pub(crate) fn exhaust(
        &mut self,
        now: Instant,
        wall: SystemTime,
        model: Option<&Arc<str>>,
        e: &Exhaustion,
        next_order: u64,
    ) {
        let until = e.reset.map(|r| now + r.duration_since(wall).unwrap_or(Duration::ZERO));
        let x = Exhausted {
            reason: e.reason,
            until,
            reset: e.reset,
            next_probe: now + PROBE_EVERY,
            from_order: next_order,
        };
        match model.filter(|_| e.model_only) {
            None => self.exhausted = Some(x),
            Some(m) => {
                if self.model_exhausted.len() >= MAX_MODELS && !self.model_exhausted.contains_key(m) {
                    self.model_exhausted.retain(|_, x| !x.over(now));
                    if self.model_exhausted.len() >= MAX_MODELS {
                        return;
                    }
                }
                self.model_exhausted.insert(Arc::clone(m), x);
            }
        }
    }

    /// A request of admission order `order` was answered: a probe's answer brings a spent quota
    /// back.
    pub(crate) fn recovered(&mut self, model: Option<&Arc<str>>, order: u64) {
        if self.exhausted.as_ref().is_some_and(|x| order >= x.from_order) {
            self.exhausted = None;
        }
        if let Some(m) = model
            && self.model_exhausted.get(m).is_some_and(|x| order >= x.from_order)
        {
            self.model_exhausted.remove(m);
        }
    }

    /// The quotas reported spent and not yet over: the endpoint's (no model) first, then each
    /// model's by name.
    pub(crate) fn exhausted_report(&self, now: Instant) -> Vec<(Option<&str>, &Exhausted)> {
        let whole = self.exhausted.iter().map(|x| (None, x));
        let models = self.model_exhausted.iter().map(|(m, x)| (Some(&**m), x));
        let mut out: Vec<_> = whole.chain(models).filter(|(_, x)| !x.over(now)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Hold requests for `model` here (or, without a model, everything here) until `until`.
    pub(crate) fn pause(&mut self, now: Instant, model: Option<&Arc<str>>, until: Instant) {
        let Some(model) = model else {
            self.key_paused_until = Some(self.key_paused_until.map_or(until, |p| p.max(until)));
            return;
        };
        if self.model_paused_until.len() >= MAX_MODELS {
            self.model_paused_until.retain(|_, u| *u > now);
        }
        if self.model_paused_until.len() >= MAX_MODELS
            && let Some(oldest) =
                self.model_paused_until.iter().min_by_key(|(_, u)| **u).map(|(m, _)| Arc::clone(m))
        {
            self.model_paused_until.remove(&oldest);
        }
        let entry = self.model_paused_until.entry(Arc::clone(model)).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Learn the limits an answer reports: for its model where it names one, else for the
    /// endpoint. Never more than configured: the tighter of the two is enforced.
    fn observe(&mut self, now: Instant, model: Option<&Arc<str>>, q: &QuotaHeaders) {
        if q.limit_requests.is_none()
            && q.limit_tokens.is_none()
            && q.limit_input_tokens.is_none()
            && q.limit_output_tokens.is_none()
        {
            return;
        }
        match model {
            None => {
                let seen = reported(q, self.configured);
                self.observed = seen;
                self.rates.set(self.configured.min(seen), now);
            }
            Some(m) => {
                if !self.models.contains_key(m) && self.models.len() >= MAX_MODELS {
                    self.models.retain(|_, q| {
                        !q.configured.is_unlimited()
                            || q.rates.requests.as_mut().is_some_and(|b| !b.is_full(now))
                            || q.rates.tokens.as_mut().is_some_and(|b| !b.is_full(now))
                    });
                    if self.models.len() >= MAX_MODELS {
                        return;
                    }
                }
                let configured = model_config(&self.policy, m);
                // A model the spec does not limit takes its burst from the endpoint's.
                let spec = RateConfig {
                    requests: configured.requests.or(self.configured.requests),
                    tokens: configured.tokens.or(self.configured.tokens),
                    input: configured.input.or(self.configured.input),
                    output: configured.output.or(self.configured.output),
                    per_day: configured.per_day,
                };
                let seen = reported(q, spec);
                let in_flight = &self.unanswered;
                let q = self.models.entry(Arc::clone(m)).or_insert_with(|| {
                    // A quota learned now starts where it would stand had it existed all along:
                    // what is in flight here is charged to it too.
                    let mut rates = Rates::new(configured.min(seen), now);
                    for cost in in_flight.values() {
                        rates.take(now, *cost);
                    }
                    ModelQuota { rates, configured, observed: seen }
                });
                q.observed = seen;
                q.rates.set(q.configured.min(seen), now);
            }
        }
    }

    /// Follow an answer's headers: learn reported limits, then correct the quota the answer
    /// speaks for (its model's where one exists, else the endpoint's). `target`: where that
    /// quota stood when the request was charged (`None`: unknown).
    pub(super) fn calibrate(
        &mut self,
        now: Instant,
        model: Option<&Arc<str>>,
        q: &QuotaHeaders,
        target: Option<Target>,
        mut c: Correction,
    ) {
        self.observe(now, model, q);
        if q.remaining_requests.is_some() || q.remaining_tokens.is_some() {
            self.remaining = (q.remaining_requests, q.remaining_tokens);
        }
        if !q.says_remaining() {
            return;
        }
        let quota = model.and_then(|m| self.models.get_mut(m));
        // A quota learned since the request was charged knows nothing of what came after.
        c.spent_at = target.filter(|t| t.model == quota.is_some()).map(|t| t.spent);
        match quota {
            Some(quota) => quota.rates.correct(now, q, c),
            None => self.rates.correct(now, q, c),
        }
    }

    /// Tokens in its own bucket now (`None` when it has none).
    pub(crate) fn tokens_level(&mut self, now: Instant) -> Option<f64> {
        self.rates.tokens.as_mut().map(|b| b.level(now))
    }

    /// The limits its headers reported, the tightest over its models (per minute).
    /// The tightest limits it enforces (requests, tokens per minute): configured, or lower as
    /// its headers report (for the endpoint or, as OpenAI's do, for the model asked).
    pub(crate) fn limits_in_force(&self) -> (Option<u64>, Option<u64>) {
        let c = self.configured;
        let (r, t) = self.observed_limits();
        let low = |a: Option<(u64, u64)>, b: Option<u64>| match (a.map(|(pm, _)| pm), b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (low(c.requests, r), low(c.tokens, t))
    }

    pub(crate) fn observed_limits(&self) -> (Option<u64>, Option<u64>) {
        let all = std::iter::once(self.observed).chain(self.models.values().map(|q| q.observed));
        let min = |f: fn(&RateConfig) -> Option<(u64, u64)>| {
            all.clone().filter_map(|c| f(&c)).map(|(pm, _)| pm).min()
        };
        (min(|c| c.requests), min(|c| c.tokens))
    }

    /// Record how an attempt went. Returns whether it took the endpoint out. It is taken out
    /// only while another endpoint is in (`others_in`), so one blip never empties the pool.
    pub(crate) fn verdict(
        &mut self,
        now: Instant,
        probe: bool,
        verdict: &Verdict,
        others_in: bool,
        backoff: impl Fn(u32) -> Duration,
    ) -> bool {
        let h = &mut self.health;
        if probe {
            h.probing = false;
        }
        let (hard, error) = match verdict {
            Verdict::Answered | Verdict::Exhausted(_) => {
                h.failures = 0;
                if probe {
                    h.ejections = 0;
                    h.out_until = None;
                }
                return false;
            }
            Verdict::ServerError(e) => (false, e),
            Verdict::NoAnswer(e) => (true, e),
        };
        h.last_error = Some(error.clone());
        h.failures = h.failures.saturating_add(1);
        let out_again = probe && h.out_until.is_some();
        if out_again || ((hard || h.failures >= FAILURES_TO_EJECT) && others_in && h.out_until.is_none()) {
            h.ejections = h.ejections.saturating_add(1);
            h.out_until = now.checked_add(backoff(h.ejections));
            h.failures = 0;
            self.ejections_total += 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(yaml_limits: &str) -> Endpoint {
        let yaml = format!(
            "upstreams: [{{name: e, url: 'https://e.example/v1'{yaml_limits}}}, {{name: f, url: 'https://f.example/v1'}}]\nlimits: {{requestsPerMinute: 100000}}"
        );
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
        let policy = llmproxy_api::Policy::from_spec(&spec).unwrap();
        Endpoint::new(Arc::new(policy.upstreams[0].clone()), 0, Instant::now())
    }

    fn ask(model: &str, tokens: u64) -> Ask {
        Ask { tokens, model: Some(Arc::from(model)), ..Ask::default() }
    }

    fn correction() -> Correction {
        Correction {
            since: Duration::ZERO,
            spent_at: None,
            refunded: Cost::default(),
            unseen_before: 0.0,
            refused: false,
            max_reset: Duration::from_secs(30),
            used_accounting: false,
        }
    }

    #[test]
    fn reported_limits_lower_the_configured_ones_never_raise_them() {
        let t0 = Instant::now();
        let mut e = endpoint(", limits: {requestsPerMinute: 1200}");
        let m: Arc<str> = Arc::from("gpt");
        let says = |rpm| QuotaHeaders { limit_requests: Some(rpm), ..QuotaHeaders::default() };
        e.calibrate(t0, Some(&m), &says(600), None, correction());
        assert_eq!(e.observed_limits(), (Some(600), None));
        // 600/min = 10/s, burst 10 less the one kept in hand: the tenth at once waits 100 ms.
        for i in 0..9 {
            assert_eq!(e.ready_at(t0, &ask("gpt", 0)).at, t0, "request {i}");
            e.take(t0, &ask("gpt", 0), i);
        }
        let held = e.ready_at(t0, &ask("gpt", 0));
        assert_eq!((held.at, held.limit), (t0 + Duration::from_millis(100), Limit::ModelRequests));
        assert_eq!(held.hold, Hold::EndpointModel(0, Arc::clone(&m)), "other models may still go");
        // Another model has its own reported quota, and the endpoint's 1200 still bounds both.
        assert_eq!(e.ready_at(t0, &ask("other", 0)).at, t0);
        // A report above the configured 1200 is not believed beyond it.
        let mut wide = endpoint(", limits: {requestsPerMinute: 60}");
        wide.calibrate(t0, None, &says(6000), None, correction());
        wide.take(t0, &Ask::default(), 0);
        assert_eq!(wide.ready_at(t0, &Ask::default()).at, t0 + Duration::from_secs(1));
    }

    #[test]
    fn a_reported_limit_keeps_the_configured_burst_unless_it_is_lower() {
        let t0 = Instant::now();
        let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(
            "upstream: {url: 'https://e.example/v1'}\nlimits: {requestsPerMinute: 1200, burst: 100}",
        )
        .unwrap();
        let policy = llmproxy_api::Policy::from_spec(&spec).unwrap();
        let says = |rpm| QuotaHeaders { limit_requests: Some(rpm), ..QuotaHeaders::default() };
        let m: Arc<str> = Arc::from("gpt");
        let burst_after = |rpm| {
            let mut e = Endpoint::new(Arc::new(policy.upstreams[0].clone()), 0, t0);
            e.calibrate(t0, Some(&m), &says(rpm), None, correction());
            let mut n = 0;
            while e.ready_at(t0, &ask("gpt", 0)).at == t0 && n < 1000 {
                e.take(t0, &ask("gpt", 0), n);
                n += 1;
            }
            n
        };
        // The burst of 100, less the tenth kept in hand, whatever the same or a higher report.
        assert_eq!(burst_after(1200), 90);
        assert_eq!(burst_after(6000), 90);
        // Half the rate reported: half the burst.
        assert_eq!(burst_after(600), 45);
    }

    #[test]
    fn failures_take_it_out_and_a_probe_brings_it_back() {
        let t0 = Instant::now();
        let mut e = endpoint("");
        let backoff = |n: u32| Duration::from_secs(1 << (n - 1));
        let fail = Verdict::ServerError("503".into());
        assert!(!e.verdict(t0, false, &fail, true, backoff));
        assert!(!e.verdict(t0, false, &fail, true, backoff));
        assert!(e.verdict(t0, false, &fail, true, backoff), "the third 5xx in a row");
        assert_eq!(e.health.avail(t0), Avail::Out(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(e.health.avail(t1), Avail::Probe);
        let (probe, _) = e.take(t1, &Ask::default(), 0);
        assert!(probe);
        assert!(matches!(e.health.avail(t1), Avail::Out(_)), "one probe at a time");
        // The probe fails: out for twice as long.
        assert!(e.verdict(t1, true, &Verdict::NoAnswer("refused".into()), true, backoff));
        assert_eq!(e.health.avail(t1), Avail::Out(t1 + Duration::from_secs(2)));
        let t3 = t1 + Duration::from_secs(2);
        let (probe, _) = e.take(t3, &Ask::default(), 1);
        assert!(!e.verdict(t3, probe, &Verdict::Answered, true, backoff));
        assert_eq!(e.health.avail(t3), Avail::In);
        // The last endpoint in is never taken out.
        assert!(!e.verdict(t3, false, &Verdict::NoAnswer("refused".into()), false, backoff));
        assert_eq!(e.health.avail(t3), Avail::In);
        assert_eq!(e.health.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn learned_models_are_bounded() {
        let t0 = Instant::now();
        let mut e = endpoint("");
        let says = QuotaHeaders { limit_requests: Some(600), ..QuotaHeaders::default() };
        for i in 0..(MAX_MODELS + 50) {
            let m: Arc<str> = Arc::from(format!("m{i}"));
            e.calibrate(t0, Some(&m), &says, None, correction());
            e.take(t0, &ask(&m, 0), i as u64);
        }
        assert!(e.models.len() <= MAX_MODELS);
    }
}
