//! Token buckets that may go into debt, and [`Rates`]: the request, token, input-token and
//! output-token buckets and the daily request count that hold one quota (the LlmProxy's
//! total, an endpoint's, one model's).

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::limit::{Cost, Limit};
use crate::protocol::ratelimit_headers::QuotaHeaders;

/// A token bucket: `cap` units, refilled at `per_sec`, allowed to go negative so that a cost
/// larger than the bucket is admitted once the bucket is full and then paid off over time.
/// `spent` counts every unit charged minus every charge given back (not the corrections from
/// upstream headers), so a correction can tell what was charged after a given moment.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    per_sec: f64,
    pub(super) cap: f64,
    level: f64,
    at: Instant,
    pub(super) spent: f64,
}

#[allow(clippy::cast_precision_loss)] // rates and costs are far below 2^52
impl Bucket {
    pub(crate) fn full(per_minute: u64, cap: u64, now: Instant) -> Self {
        let cap = cap.max(1) as f64;
        Self { per_sec: per_minute as f64 / 60.0, cap, level: cap, at: now, spent: 0.0 }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.at {
            let dt = now.duration_since(self.at).as_secs_f64();
            self.level = (self.level + dt * self.per_sec).min(self.cap);
            self.at = now;
        }
    }

    /// The earliest time `cost` can be taken.
    pub(crate) fn ready_at(&mut self, now: Instant, cost: u64) -> Instant {
        self.refill(now);
        let need = (cost as f64).min(self.cap);
        let missing = need - self.level;
        if missing <= 1e-6 {
            return now;
        }
        // Whole microseconds, rounded up (after forgiving float noise far below a microsecond).
        let micros = (missing / self.per_sec * 1e6 - 1e-3).ceil();
        // A wait beyond a day is as good as never; it also keeps the conversion in range.
        now + Duration::from_micros(micros.min(86_400e6) as u64)
    }

    pub(crate) fn take(&mut self, now: Instant, cost: u64) {
        self.refill(now);
        self.level -= cost as f64;
        self.spent += cost as f64;
    }

    pub(crate) fn give(&mut self, now: Instant, amount: u64) {
        self.refill(now);
        self.level = (self.level + amount as f64).min(self.cap);
        self.spent -= amount as f64;
    }

    /// The upstream says at most `ceiling` units are left now: never more here.
    pub(super) fn lower_to(&mut self, now: Instant, ceiling: f64) {
        self.refill(now);
        if ceiling < self.level {
            self.level = ceiling;
        }
    }

    /// The upstream says `target` units are left now, more than here: raise the level by up to
    /// `most` (refunds that were withheld until the upstream confirmed them). Returns the raise.
    pub(super) fn raise_to(&mut self, now: Instant, target: f64, most: f64) -> f64 {
        self.refill(now);
        let raise = (target.min(self.cap) - self.level).clamp(0.0, most.max(0.0));
        self.level += raise;
        raise
    }

    /// What the upstream's `remaining` and `reset` (time until full) say about the level now,
    /// as a range. The upstream measured them after the request was charged here (`since`
    /// ago) and before it answered; of what was charged here since (`charged_after`), it may
    /// have seen any part (requests overtake each other on the way), and of the earlier charges
    /// still unanswered when this one was charged (`unseen_before`), maybe none. The low end
    /// assumes it saw none of those and has refilled nothing since; the high end that it saw
    /// everything and refilled all along, so lowering to it never takes more than the
    /// upstream itself would.
    pub(super) fn upstream_level(
        &self,
        q: (Option<u64>, Option<Duration>),
        since: Duration,
        charged_after: f64,
        unseen_before: f64,
    ) -> Option<(f64, f64)> {
        let by_remaining = q.0.map(|r| r as f64);
        let by_reset = q.1.map(|d| self.cap - d.as_secs_f64() * self.per_sec);
        let then = match (by_remaining, by_reset) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let low = then.min(self.cap) - charged_after - unseen_before;
        let high = (then + since.as_secs_f64() * self.per_sec).min(self.cap);
        Some((low, high))
    }

    pub(super) fn reconfigure(&mut self, now: Instant, per_minute: u64, cap: u64) {
        self.refill(now);
        self.per_sec = per_minute as f64 / 60.0;
        self.cap = cap.max(1) as f64;
        self.level = self.level.min(self.cap);
    }

    /// Units available now (negative while in debt).
    pub(crate) fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// Whether it is full (nothing to remember about it).
    pub(super) fn is_full(&mut self, now: Instant) -> bool {
        self.level(now) >= self.cap
    }
}

/// Requests counted over a calendar day (Gemini's, from midnight US Pacific): a fixed window,
/// not a bucket, since the provider's own count starts again at its midnight.
#[derive(Clone, Debug)]
pub(crate) struct DayCount {
    limit: u64,
    used: u64,
    ends: Instant,
}

impl DayCount {
    fn new(limit: u64, now: Instant) -> Self {
        Self { limit, used: 0, ends: day_ends(now) }
    }

    /// A new day starts the count again.
    fn roll(&mut self, now: Instant) {
        if now >= self.ends {
            self.used = 0;
            self.ends = day_ends(now);
        }
    }

    /// When one more request may go: now, or when the day ends.
    fn ready_at(&mut self, now: Instant) -> Instant {
        self.roll(now);
        if self.used < self.limit { now } else { self.ends }
    }

    fn take(&mut self, now: Instant) {
        self.roll(now);
        self.used = self.used.saturating_add(1);
    }
}

/// When the provider's day that holds `now` ends, on the monotonic clock.
fn day_ends(now: Instant) -> Instant {
    let wall = SystemTime::now();
    let left = crate::protocol::gemini::day_ends(wall).duration_since(wall).unwrap_or(Duration::ZERO);
    now + left.max(Duration::from_millis(1))
}

/// The limits a quota's units are named as when they hold a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Names {
    pub(crate) requests: Limit,
    pub(crate) tokens: Limit,
    pub(crate) input: Limit,
    pub(crate) output: Limit,
    pub(crate) day: Limit,
}

impl Names {
    /// The LlmProxy's own limits.
    pub(crate) const TOTAL: Names = Names {
        requests: Limit::Requests,
        tokens: Limit::Tokens,
        input: Limit::InputTokens,
        output: Limit::OutputTokens,
        day: Limit::RequestsPerDay,
    };
    /// A client's caps (which have no input or output limit).
    pub(crate) const CLIENT: Names = Names {
        requests: Limit::ClientRequests,
        tokens: Limit::ClientTokens,
        input: Limit::ClientTokens,
        output: Limit::ClientTokens,
        day: Limit::ClientRequests,
    };
    /// A model's limits.
    pub(crate) const MODEL: Names = Names {
        requests: Limit::ModelRequests,
        tokens: Limit::ModelTokens,
        input: Limit::ModelInputTokens,
        output: Limit::ModelOutputTokens,
        day: Limit::ModelRequestsPerDay,
    };
    /// An endpoint's own quota.
    pub(crate) const UPSTREAM: Names = Names {
        requests: Limit::UpstreamRequests,
        tokens: Limit::UpstreamTokens,
        input: Limit::UpstreamInputTokens,
        output: Limit::UpstreamOutputTokens,
        day: Limit::UpstreamRequestsPerDay,
    };
}

/// Per-minute rates and bursts of one quota; `None` where that unit is not limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RateConfig {
    /// Requests per minute and burst.
    pub(crate) requests: Option<(u64, u64)>,
    /// Tokens per minute and burst.
    pub(crate) tokens: Option<(u64, u64)>,
    /// Input tokens per minute and burst.
    pub(crate) input: Option<(u64, u64)>,
    /// Output tokens per minute and burst.
    pub(crate) output: Option<(u64, u64)>,
    /// Requests per day.
    pub(crate) per_day: Option<u64>,
}

impl RateConfig {
    /// One second's worth of each rate as its burst.
    pub(crate) fn per_minute(requests: Option<u64>, tokens: Option<u64>) -> Self {
        let burst = |pm: u64| (pm, llmproxy_api::policy::per_second(pm));
        Self {
            requests: requests.map(burst),
            tokens: tokens.map(burst),
            input: None,
            output: None,
            per_day: None,
        }
    }

    /// A model's limits (`limits.models`), one second's worth of each as its burst.
    pub(crate) fn for_model(m: &llmproxy_api::policy::ModelLimits) -> Self {
        let rates = Self::per_minute(m.requests_per_minute, m.tokens_per_minute).with_io(
            m.input_tokens_per_minute.map(|pm| (pm, 0)),
            m.output_tokens_per_minute.map(|pm| (pm, 0)),
        );
        Self { per_day: m.requests_per_day, ..rates }
    }

    /// The same, with input and output tokens per minute limited apart (one second's worth of
    /// each as its burst, unless a larger one is given).
    pub(crate) fn with_io(self, input: Option<(u64, u64)>, output: Option<(u64, u64)>) -> Self {
        let burst = |(pm, b): (u64, u64)| (pm, b.max(llmproxy_api::policy::per_second(pm)));
        Self { input: input.map(burst), output: output.map(burst), ..self }
    }

    /// The tighter of two configurations, unit by unit.
    pub(crate) fn min(self, other: Self) -> Self {
        let tighter = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| match (a, b) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        Self {
            requests: tighter(self.requests, other.requests),
            tokens: tighter(self.tokens, other.tokens),
            input: tighter(self.input, other.input),
            output: tighter(self.output, other.output),
            per_day: match (self.per_day, other.per_day) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// The same rates with a tenth of each burst kept in hand. An upstream counts a request
    /// when it arrives, the proxy when it sends it; requests that travel unevenly (a slow
    /// connection, a busy host) bunch up on arrival, and with both buckets spent to the last
    /// unit that bunching alone is a 429. The sustained rate is unchanged.
    pub(crate) fn with_headroom(self) -> Self {
        let keep = |c: Option<(u64, u64)>| c.map(|(pm, burst)| (pm, (burst - burst / 10).max(1)));
        Self {
            requests: keep(self.requests),
            tokens: keep(self.tokens),
            input: keep(self.input),
            output: keep(self.output),
            per_day: self.per_day,
        }
    }

    pub(crate) fn is_unlimited(self) -> bool {
        self.requests.is_none()
            && self.tokens.is_none()
            && self.input.is_none()
            && self.output.is_none()
            && self.per_day.is_none()
    }
}

/// One quota: a request bucket, a token bucket and input and output token buckets, each absent
/// when not limited. Under
/// `used` accounting, unused tokens it was told about wait in `withheld` until the upstream's
/// headers confirm them (`reports_tokens`: the upstream reports what remains of this quota).
#[derive(Clone, Debug)]
pub(crate) struct Rates {
    pub(crate) requests: Option<Bucket>,
    pub(crate) tokens: Option<Bucket>,
    pub(crate) input: Option<Bucket>,
    pub(crate) output: Option<Bucket>,
    pub(crate) day: Option<DayCount>,
    pub(super) config: RateConfig,
    pub(super) withheld: f64,
    pub(super) reports_tokens: bool,
}

/// What a correction from upstream headers needs besides the headers, for one quota.
#[derive(Clone, Copy, Debug)]
pub(super) struct Correction {
    /// How long ago the request was charged.
    pub(super) since: Duration,
    /// The buckets' `spent` right after the request was charged (`None`: the quota did not
    /// exist then, so nothing is known about what came after).
    pub(super) spent_at: Option<Spent>,
    /// Tokens given back since because the upstream did not count the request.
    pub(super) refunded: Cost,
    /// Token charges of earlier requests still unanswered when it was charged.
    pub(super) unseen_before: f64,
    /// It came with a 429: decisive, what was charged since comes on top.
    pub(super) refused: bool,
    /// The longest reset taken at its word.
    pub(super) max_reset: Duration,
    /// Settle to usage, with withheld refunds returned as the upstream confirms them.
    pub(super) used_accounting: bool,
}

impl Rates {
    pub(crate) fn new(config: RateConfig, now: Instant) -> Self {
        Self {
            requests: config.requests.map(|(pm, burst)| Bucket::full(pm, burst, now)),
            tokens: config.tokens.map(|(pm, burst)| Bucket::full(pm, burst, now)),
            input: config.input.map(|(pm, burst)| Bucket::full(pm, burst, now)),
            output: config.output.map(|(pm, burst)| Bucket::full(pm, burst, now)),
            day: config.per_day.map(|limit| DayCount::new(limit, now)),
            config,
            withheld: 0.0,
            reports_tokens: false,
        }
    }

    /// Apply a new configuration; levels carry over (clamped to the new capacity), a bucket
    /// that appears starts full. Returns whether anything changed.
    pub(crate) fn set(&mut self, config: RateConfig, now: Instant) -> bool {
        if config == self.config {
            return false;
        }
        let update = |bucket: &mut Option<Bucket>, c: Option<(u64, u64)>| {
            *bucket = match (bucket.take(), c) {
                (Some(mut b), Some((pm, burst))) => {
                    b.reconfigure(now, pm, burst);
                    Some(b)
                }
                (None, Some((pm, burst))) => Some(Bucket::full(pm, burst, now)),
                (_, None) => None,
            };
        };
        update(&mut self.requests, config.requests);
        update(&mut self.tokens, config.tokens);
        update(&mut self.input, config.input);
        update(&mut self.output, config.output);
        // The day's count carries over a new limit: the provider's own count does.
        self.day = match (self.day.take(), config.per_day) {
            (Some(d), Some(limit)) => Some(DayCount { limit, ..d }),
            (None, Some(limit)) => Some(DayCount::new(limit, now)),
            (_, None) => None,
        };
        self.config = config;
        true
    }

    /// When `cost` (and one request) can be taken, and which unit holds it until then.
    pub(crate) fn ready_at(&mut self, now: Instant, cost: Cost, names: Names) -> (Instant, Limit) {
        let mut out = (now, names.requests);
        if let Some(b) = &mut self.requests {
            out = (b.ready_at(now, 1), names.requests);
        }
        if let Some(d) = &mut self.day {
            let t = d.ready_at(now);
            if t > out.0 {
                out = (t, names.day);
            }
        }
        for (bucket, units, limit) in [
            (&mut self.tokens, cost.tokens, names.tokens),
            (&mut self.input, cost.input, names.input),
            (&mut self.output, cost.output, names.output),
        ] {
            if let Some(b) = bucket {
                let t = b.ready_at(now, units);
                if t > out.0 {
                    out = (t, limit);
                }
            }
        }
        out
    }

    /// Whether `cost` exceeds what this quota allows in a minute, in any unit (the provider
    /// refuses such a request as too large, whatever the wait).
    pub(crate) fn never_fits(&self, cost: Cost) -> bool {
        let over = |c: Option<(u64, u64)>, units: u64| c.is_some_and(|(pm, _)| units > pm);
        over(self.config.tokens, cost.tokens)
            || over(self.config.input, cost.input)
            || over(self.config.output, cost.output)
    }

    pub(crate) fn take(&mut self, now: Instant, cost: Cost) {
        if let Some(b) = &mut self.requests {
            b.take(now, 1);
        }
        if let Some(d) = &mut self.day {
            d.take(now);
        }
        for (bucket, units) in
            [(&mut self.tokens, cost.tokens), (&mut self.input, cost.input), (&mut self.output, cost.output)]
        {
            if let Some(b) = bucket {
                b.take(now, units);
            }
        }
    }

    /// Give tokens back (the upstream did not count an attempt).
    pub(crate) fn give_tokens(&mut self, now: Instant, cost: Cost) {
        for (bucket, units) in
            [(&mut self.tokens, cost.tokens), (&mut self.input, cost.input), (&mut self.output, cost.output)]
        {
            if let Some(b) = bucket {
                b.give(now, units);
            }
        }
    }

    /// Settle a charge to real usage: more used costs more at once; less used returns at once,
    /// unless `withhold` (the upstream reports its own count), when unused tokens wait for the
    /// upstream's word. Input and output settle at once either way, as Anthropic settles them.
    pub(crate) fn settle(&mut self, now: Instant, reserved: Cost, used: Cost, withhold: bool) {
        if let Some(bucket) = &mut self.tokens {
            if used.tokens >= reserved.tokens {
                bucket.take(now, used.tokens - reserved.tokens);
            } else if withhold && self.reports_tokens {
                #[allow(clippy::cast_precision_loss)]
                let unused = (reserved.tokens - used.tokens) as f64;
                self.withheld = (self.withheld + unused).min(bucket.cap);
            } else {
                bucket.give(now, reserved.tokens - used.tokens);
            }
        }
        for (bucket, reserved, used) in
            [(&mut self.input, reserved.input, used.input), (&mut self.output, reserved.output, used.output)]
        {
            if let Some(b) = bucket {
                if used >= reserved {
                    b.take(now, used - reserved);
                } else {
                    b.give(now, reserved - used);
                }
            }
        }
    }

    /// `spent` of each bucket (0 where absent).
    pub(crate) fn spent(&self) -> Spent {
        let spent = |b: &Option<Bucket>| b.as_ref().map_or(0.0, |b| b.spent);
        Spent {
            requests: spent(&self.requests),
            tokens: spent(&self.tokens),
            input: spent(&self.input),
            output: spent(&self.output),
        }
    }

    /// Follow what the upstream says remains of this quota.
    #[allow(clippy::cast_precision_loss)]
    pub(super) fn correct(&mut self, now: Instant, q: &QuotaHeaders, c: Correction) {
        let cap = |d: Option<Duration>| d.map(|d| d.min(c.max_reset));
        let spent = self.spent();
        let at = c.spent_at.unwrap_or(spent);
        // A refusal is decisive: what was charged here since it was measured comes on top of
        // what the upstream said was left. A success only caps the level at the upstream's
        // most favourable reading, since later requests may have overtaken it.
        let ceiling = |high: f64, charged_after: f64| if c.refused { high - charged_after } else { high };
        if let Some(bucket) = &mut self.requests {
            let charged_after = spent.requests - at.requests;
            let q_requests = (q.remaining_requests, cap(q.reset_requests));
            if let Some((_, high)) = bucket.upstream_level(q_requests, c.since, charged_after, 0.0) {
                bucket.lower_to(now, ceiling(high, charged_after));
            }
        }
        if let Some(bucket) = &mut self.tokens {
            let charged_after = spent.tokens - at.tokens + c.refunded.tokens as f64;
            let q_tokens = (q.remaining_tokens, cap(q.reset_tokens));
            if let Some((low, high)) =
                bucket.upstream_level(q_tokens, c.since, charged_after, c.unseen_before)
            {
                bucket.lower_to(now, ceiling(high, charged_after));
                // Withheld tokens return only on a reading whose low end is known: without
                // where the quota stood at the charge, what came after is unknown.
                if c.used_accounting && self.reports_tokens && c.spent_at.is_some() {
                    self.withheld -= bucket.raise_to(now, low, self.withheld);
                }
            }
            if q.remaining_tokens.is_some() {
                self.reports_tokens = true;
            }
        }
        // Input and output settle at once, so only a bucket that ran ahead is lowered.
        let io = [
            (
                &mut self.input,
                spent.input - at.input + c.refunded.input as f64,
                q.remaining_input_tokens,
                q.reset_input_tokens,
            ),
            (
                &mut self.output,
                spent.output - at.output + c.refunded.output as f64,
                q.remaining_output_tokens,
                q.reset_output_tokens,
            ),
        ];
        for (bucket, charged_after, remaining, reset) in io {
            if let Some(bucket) = bucket
                && let Some((_, high)) =
                    bucket.upstream_level((remaining, cap(reset)), c.since, charged_after, 0.0)
            {
                bucket.lower_to(now, ceiling(high, charged_after));
            }
        }
    }
}

/// Each bucket's `spent` at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Spent {
    pub(crate) requests: f64,
    pub(crate) tokens: f64,
    pub(crate) input: f64,
    pub(crate) output: f64,
}

#[cfg(test)]
mod tests {
    use super::RateConfig;

    #[test]
    fn headroom_trims_the_burst_never_the_rate_nor_below_one() {
        let c =
            RateConfig::per_minute(Some(600), Some(60_000)).with_io(None, Some((6_000, 0))).with_headroom();
        assert_eq!(c.output, Some((6_000, 90)), "one second's worth, less a tenth");
        assert_eq!((c.requests, c.tokens), (Some((600, 9)), Some((60_000, 900))));
        let tiny = RateConfig::per_minute(Some(1), None).with_headroom();
        assert_eq!((tiny.requests, tiny.tokens), (Some((1, 1)), None));
    }
}
