//! What a replica asks of and gives back to each shared bucket: a stock's recent use sets how far
//! ahead of need it holds, an idle stock goes back to the others.

use std::collections::HashMap;
use std::time::Duration;

use llmproxy_api::policy::QuotaPolicy;
use tokio::time::Instant;

use super::exchange::{Line, RETRY_REDIS};
use super::store::{Identity, Store};
use crate::admission::limiter::lease::{LeaseKey, Leases};

/// How far ahead of need a replica holds stock: this much of its recent rate.
const LEASE_WINDOW: f64 = 0.25;
/// How long a replica may hold stock nobody needs before it gives it back.
const IDLE_RETURN: Duration = Duration::from_secs(1);

/// What the lessee remembers about a stock between looks.
#[derive(Default)]
pub(super) struct Seen {
    /// Recent use per second, smoothed.
    pub(super) rate: [f64; 2],
    /// The demand last told an LlmQuota's store, and when.
    pub(super) told: [(f64, Option<Instant>); 2],
}

/// What to ask of and give back to each shared bucket now.
#[allow(clippy::cast_precision_loss)]
pub(super) fn plan(
    leases: &mut Leases,
    seen: &mut HashMap<LeaseKey, Seen>,
    now: Instant,
    dt: f64,
    identity: &Identity,
    quota: Option<&QuotaPolicy>,
    store: Store,
) -> Vec<Line> {
    seen.retain(|k, _| leases.stocks.contains_key(k));
    let mut dry = Vec::new();
    leases.dry.retain(|k| {
        let mine = store.holds(k);
        if mine {
            dry.push(k.clone());
        }
        !mine
    });
    let mut lines = Vec::new();
    for (key, stock) in leases.stocks.iter_mut().filter(|(k, _)| store.holds(k)) {
        let s = seen.entry(key.clone()).or_default();
        let idle = now.duration_since(stock.active) > IDLE_RETURN;
        for unit in 0..2 {
            let Some((per_minute, burst)) =
                (if unit == 0 { stock.config.requests } else { stock.config.tokens })
            else {
                continue;
            };
            // Smoothed use per second (half-life of about a quarter of a second).
            let used = std::mem::take(&mut stock.used[unit]);
            if dt > 0.0 {
                let alpha = (dt / 0.25).min(1.0);
                s.rate[unit] += alpha * (used / dt - s.rate[unit]);
            }
            let per_sec = per_minute as f64 / 60.0;
            let burst = burst as f64;
            let (ask, give) = if idle {
                // Nobody needs it here: back to the others.
                let give = stock.have[unit].max(0.0);
                stock.have[unit] -= give;
                (0.0, give)
            } else {
                let ahead = (s.rate[unit] * LEASE_WINDOW).min(burst);
                let floor = if unit == 0 { 1.0 } else { 0.0 };
                let target = ahead.max(stock.want[unit]).max(floor);
                ((target - stock.have[unit]).max(0.0), 0.0)
            };
            let is_dry = dry.contains(key);
            // An LlmQuota divides its rate by the consumers' demands: tell it when this
            // replica's changed, and at least once a second while there is any (an untold
            // demand lapses after the member TTL).
            let demand = if idle { 0.0 } else { s.rate[unit].max(stock.want[unit] / LEASE_WINDOW) };
            let (told, at) = s.told[unit];
            let tell = store == Store::Quota
                && ((demand - told).abs() > 0.2 * told.max(1.0)
                    || (told > 0.0 && at.is_none_or(|at| now.duration_since(at) >= RETRY_REDIS)));
            if ask <= 0.0 && give <= 0.0 && !is_dry && !tell {
                continue;
            }
            if store == Store::Quota {
                s.told[unit] = (demand, Some(now));
            }
            let mode = if is_dry { "d" } else { "g" };
            lines.push(Line {
                key: key.clone(),
                unit,
                redis_key: redis_key(key, unit, identity, quota),
                per_sec,
                burst,
                ask,
                give,
                mode,
                demand,
            });
        }
    }
    lines
}

/// The Redis key of a bucket unit. An LlmProxy's are under its namespace and name; its share
/// of an LlmQuota's under the quota's name and its own.
fn redis_key(key: &LeaseKey, unit: usize, identity: &Identity, quota: Option<&QuotaPolicy>) -> String {
    let u = if unit == 0 { "r" } else { "t" };
    let q = quota.map_or("", |q| q.name.as_str());
    let p = &identity.proxy;
    match key {
        LeaseKey::Total => format!("llmproxy:p:{p}:total:{u}"),
        LeaseKey::Model(m) => format!("llmproxy:p:{p}:model:{m}:{u}"),
        LeaseKey::Client(c) => format!("llmproxy:p:{p}:client:{c}:{u}"),
        LeaseKey::Endpoint(e) => format!("llmproxy:p:{p}:endpoint:{e}:{u}"),
        LeaseKey::Quota => format!("llmproxy:q:{q}:f:{p}:total:{u}"),
        LeaseKey::QuotaModel(m) => format!("llmproxy:q:{q}:f:{p}:model:{m}:{u}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::limiter::RateConfig;

    fn identity() -> Identity {
        Identity { proxy: "ns/p".into(), member: "m".into(), replicas: 1 }
    }

    #[test]
    fn a_stock_asks_for_what_is_wanted_and_gives_back_when_idle() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.configure(&[(LeaseKey::Total, RateConfig::per_minute(Some(6000), None))], t0);
        let mut seen = HashMap::new();
        // Nothing wanted yet: one request's worth is kept ready.
        let lines = plan(&mut l, &mut seen, t0, 0.025, &identity(), None, Store::Proxy);
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].ask, lines[0].redis_key.as_str()), (1.0, "llmproxy:p:ns/p:total:r"));
        // Busy at 100/s for a second (smoothed over about a quarter second): a quarter
        // second's worth ahead.
        let mut ask = 0.0;
        for _ in 0..40 {
            if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
                s.used[0] = 2.5;
            }
            ask = plan(&mut l, &mut seen, t0, 0.025, &identity(), None, Store::Proxy)[0].ask;
        }
        assert!((ask - 25.0).abs() < 0.5, "{ask}");
        // Idle for more than a second: what it holds goes back.
        if let Some(s) = l.stocks.get_mut(&LeaseKey::Total) {
            s.have[0] = 7.0;
        }
        let lines =
            plan(&mut l, &mut seen, t0 + Duration::from_secs(2), 0.025, &identity(), None, Store::Proxy);
        assert_eq!((lines[0].ask, lines[0].give), (0.0, 7.0));
        assert_eq!(l.stocks[&LeaseKey::Total].have[0], 0.0);
    }
}
