//! The replica rule the operator and the proxies share: how many pods an LlmProxy wants, and
//! how many a pod must assume share the quota when it enforces a static share.

use crate::spec::{LlmProxy, LlmProxySpec};

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
