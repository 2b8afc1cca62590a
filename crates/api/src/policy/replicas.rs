//! The replica rule the operator and the proxies share: how many pods an LlmProxy wants, and
//! how many a pod must assume share the quota when it enforces a static share.

use super::{ModelLimits, Policy, per_second};
use crate::crd::{LlmProxy, LlmProxySpec};

/// Pods wanted: `replicas`, or with autoscaling its `minReplicas` (the autoscaler owns the
/// count from there).
pub fn desired(spec: &LlmProxySpec) -> i32 {
    spec.autoscaling.as_ref().map_or(spec.replicas, |a| a.min_replicas)
}

/// Pods sharing the quota: the most of what is wanted and what runs (the status the operator
/// reports), so that a scale-up never briefly grants every pod the whole quota. At least 1.
pub fn sharing(p: &LlmProxy) -> u32 {
    let running = p.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    u32::try_from(desired(&p.spec).max(running).max(1)).unwrap_or(1)
}

impl Policy {
    /// This replica's share when `replicas` pods split the quota without shared state: rates
    /// and bursts divided (never below 1 per minute and 1 in a burst); concurrency and queue
    /// are per pod already.
    #[must_use]
    pub fn for_replicas(mut self, replicas: u32) -> Self {
        let n = u64::from(replicas.max(1));
        // Shared buckets hold for all pods together; without Redis, the proxies divide by the
        // members they know of themselves.
        if n == 1 || self.shared.is_some() {
            return self;
        }
        if let Some(clients) = &mut self.clients {
            for c in std::iter::once(&mut clients.default).chain(clients.overrides.values_mut()) {
                c.requests_per_minute = c.requests_per_minute.map(|r| (r / n).max(1));
                c.tokens_per_minute = c.tokens_per_minute.map(|t| (t / n).max(1));
            }
        }
        let l = &mut self.limits;
        l.requests_per_minute = (l.requests_per_minute / n).max(1);
        l.request_burst = (l.request_burst / n).max(1);
        divide(&mut l.tokens_per_minute, &mut l.token_burst, n);
        divide(&mut l.input_tokens_per_minute, &mut l.input_token_burst, n);
        divide(&mut l.output_tokens_per_minute, &mut l.output_token_burst, n);
        l.requests_per_day = l.requests_per_day.map(|r| (r / n).max(1));
        for m in l.models.values_mut() {
            *m = m.divided(n);
        }
        for u in &mut self.upstreams {
            let e = &mut u.limits;
            e.requests_per_minute = e.requests_per_minute.map(|r| (r / n).max(1));
            e.request_burst = (e.request_burst / n).max(1);
            divide(&mut e.tokens_per_minute, &mut e.token_burst, n);
            divide(&mut e.input_tokens_per_minute, &mut e.input_token_burst, n);
            divide(&mut e.output_tokens_per_minute, &mut e.output_token_burst, n);
            e.requests_per_day = e.requests_per_day.map(|r| (r / n).max(1));
            for m in e.models.values_mut() {
                *m = m.divided(n);
            }
        }
        self
    }
}

/// A token rate and its bucket divided among `n` pods: the bucket never below one second of
/// the divided rate.
fn divide(per_minute: &mut Option<u64>, burst: &mut u64, n: u64) {
    *per_minute = per_minute.map(|t| (t / n).max(1));
    if let Some(t) = *per_minute {
        *burst = (*burst / n).max(per_second(t));
    }
}

impl ModelLimits {
    fn divided(self, n: u64) -> Self {
        let each = |r: Option<u64>| r.map(|r| (r / n).max(1));
        Self {
            requests_per_minute: each(self.requests_per_minute),
            tokens_per_minute: each(self.tokens_per_minute),
            input_tokens_per_minute: each(self.input_tokens_per_minute),
            output_tokens_per_minute: each(self.output_tokens_per_minute),
            requests_per_day: each(self.requests_per_day),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(extra: &str) -> LlmProxy {
        let yaml = format!(
            "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: p}}\nspec:\n  upstream: {{url: 'https://x.io'}}\n  limits: {{requestsPerMinute: 60}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn wanted_running_and_autoscaled_counts() {
        assert_eq!(desired(&proxy("  replicas: 3\n").spec), 3);
        assert_eq!(
            desired(&proxy("  replicas: 3\n  autoscaling: {minReplicas: 2, maxReplicas: 5}\n").spec),
            2
        );
        let mut p = proxy("  replicas: 2\n");
        assert_eq!(sharing(&p), 2);
        p.status = Some(crate::LlmProxyStatus { replicas: Some(3), ..Default::default() });
        assert_eq!(sharing(&p), 3, "a surge pod during a rollout");
        assert_eq!(sharing(&proxy("  replicas: 0\n")), 1, "never divided by zero");
    }
}
