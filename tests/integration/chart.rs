//! The Helm chart: lint, render, schema, CRD drift, install into the API server, and the
//! dashboard and alerts checked against metric names from real scrapes.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams};
use llmproxy_api::LlmProxy;
use llmproxy_mock::{Fault, MockConfig, load};
use serde_json::{Value, json};

use crate::support::proxy_env::{TestProxy, manifest, mock};
use crate::support::{KubeEnv, MANAGER, eventually, helm, repo_path};

const ALL_ON: &str = "replicaCount=2,dashboard.enabled=true,prometheusRule.enabled=true,serviceMonitor.enabled=true,serviceMonitor.proxies=true";

fn chart() -> String {
    repo_path("charts/llmproxy").display().to_string()
}

/// `helm install llmproxy` into `llmproxy-system` of `env`, with `--set set`; Helm's output.
fn install_release(env: &KubeEnv, set: &str) -> String {
    let kubeconfig = env.kubeconfig().display().to_string();
    helm::ok(&[
        "install",
        "llmproxy",
        &chart(),
        "-n",
        "llmproxy-system",
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
        "--set",
        set,
    ])
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| v.is_object())
        .collect()
}

fn kinds(rendered: &[Value]) -> BTreeSet<String> {
    rendered.iter().filter_map(|d| d["kind"].as_str().map(str::to_owned)).collect()
}

#[test]
fn the_chart_lints_and_renders_with_defaults_and_with_every_option() {
    let chart = chart();
    helm::ok(&["lint", "--strict", &chart]);
    helm::ok(&["lint", "--strict", &chart, "--set", ALL_ON]);

    let defaults = docs(&helm::ok(&["template", "llmproxy", &chart, "-n", "llmproxy-system"]));
    let k = kinds(&defaults);
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
    ] {
        assert!(k.contains(kind), "{kind} missing from the default render: {k:?}");
    }
    for kind in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(!k.contains(kind), "{kind} rendered although its option is off");
    }
    // The one Role by default is the LlmQuota consumers' identities' (leader election is off).
    let roles: Vec<&Value> = defaults.iter().filter(|d| d["kind"] == "Role").collect();
    assert_eq!(roles.len(), 1, "{roles:?}");
    assert_eq!(roles[0]["metadata"]["name"], "llmproxy-quota-identities");
    let all = docs(&helm::ok(&["template", "llmproxy", &chart, "-n", "llmproxy-system", "--set", ALL_ON]));
    let k = kinds(&all);
    for kind in ["ServiceMonitor", "PrometheusRule", "ConfigMap", "Role", "RoleBinding"] {
        assert!(k.contains(kind), "{kind} missing with every option on: {k:?}");
    }
    let deployment = all.iter().find(|d| d["kind"] == "Deployment").cloned().unwrap_or_default();
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--leader-election"), "two replicas elect a leader: {args}");
    let dashboard = all.iter().find(|d| d["kind"] == "ConfigMap").cloned().unwrap_or_default();
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value =
        serde_json::from_str(dashboard["data"]["llmproxy.json"].as_str().unwrap_or("")).unwrap_or_default();
    assert_eq!(json["uid"], "llmproxy", "the ConfigMap carries the dashboard JSON");
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    let chart = chart();
    for (set, complaint) in [
        ("replicaCount=0", "replicaCount"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("logFormat=xml", "logFormat"),
        ("prometheusRule.queueFullRatio=2", "queueFullRatio"),
        ("typo=1", "typo"),
    ] {
        let out = helm::run(&["template", "x", &chart, "--set", set]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(complaint),
            "--set {set} was accepted or unclear: {err}"
        );
    }
}

#[test]
fn the_charts_crd_does_not_drift_from_llmproxy_crd() {
    let copy = std::fs::read_to_string(repo_path("charts/llmproxy/files/llmproxy.io_llmproxies.yaml"))
        .unwrap_or_default();
    assert!(
        copy == llmproxy_api::crd_yaml(),
        "charts/llmproxy/files/llmproxy.io_llmproxies.yaml is stale: cargo run -- crd > charts/llmproxy/files/llmproxy.io_llmproxies.yaml"
    );
    let copy = std::fs::read_to_string(repo_path("charts/llmproxy/files/llmproxy.io_llmquotas.yaml"))
        .unwrap_or_default();
    assert!(
        copy == llmproxy_api::quota_crd_yaml(),
        "charts/llmproxy/files/llmproxy.io_llmquotas.yaml is stale: cargo run -- crd llmquota > charts/llmproxy/files/llmproxy.io_llmquotas.yaml"
    );
    let rendered = docs(&helm::ok(&["template", "x", &chart()]));
    let crds: Vec<&Value> = rendered.iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect();
    assert_eq!(crds.len(), 2, "both CRDs ship with the chart");
    for generated in [
        serde_json::to_value(LlmProxy::crd()).unwrap_or_default(),
        serde_json::to_value(llmproxy_api::LlmQuota::crd()).unwrap_or_default(),
    ] {
        let crd = crds
            .iter()
            .find(|d| d["metadata"]["name"] == generated["metadata"]["name"])
            .copied()
            .cloned()
            .unwrap_or_default();
        // Helm's YAML round trip writes 2.0 as 2: compare numbers by value.
        assert!(
            normalized(&crd["spec"]) == normalized(&generated["spec"]),
            "the rendered CRD {} differs from the generated one",
            generated["metadata"]["name"]
        );
        assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    }
}

/// Numbers as f64, so that 2 and 2.0 compare equal.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), normalized(v))).collect()),
        other => other.clone(),
    }
}

/// What the operator's code calls, as (API group, resource, verb). The chart must grant each.
const OPERATOR_NEEDS: &[(&str, &str, &[&str])] = &[
    ("llmproxy.io", "llmproxies", &["get", "list", "watch"]),
    ("llmproxy.io", "llmproxies/status", &["patch"]),
    ("llmproxy.io", "llmquotas", &["get", "list", "watch"]),
    ("llmproxy.io", "llmquotas/status", &["patch"]),
    ("", "namespaces", &["get"]),
    ("apps", "deployments", &["list", "watch", "create", "patch"]),
    ("", "services", &["list", "watch", "create", "patch"]),
    ("", "serviceaccounts", &["list", "watch", "create", "patch"]),
    ("", "secrets", &["get", "list", "watch"]),
    ("rbac.authorization.k8s.io", "roles", &["list", "watch", "create", "patch"]),
    ("rbac.authorization.k8s.io", "rolebindings", &["list", "watch", "create", "patch"]),
    ("policy", "poddisruptionbudgets", &["get", "list", "watch", "create", "patch", "delete"]),
    ("autoscaling", "horizontalpodautoscalers", &["get", "list", "watch", "create", "patch", "delete"]),
    ("networking.k8s.io", "networkpolicies", &["get", "list", "watch", "create", "patch", "delete"]),
    ("discovery.k8s.io", "endpointslices", &["list"]),
    ("keda.sh", "scaledobjects", &["get", "create", "patch", "delete"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_then_the_operator_reconciles_in_that_setting() {
    let env = KubeEnv::start().await;
    let client = env.client().await;
    let kubeconfig = env.kubeconfig().display().to_string();
    let out = install_release(&env, "replicaCount=2,image.tag=test");
    assert!(out.contains("STATUS: deployed") && out.contains("kubectl -n team-a apply"), "{out}");

    // The installed ClusterRole grants what the operator uses (RBAC is not enforced by this
    // API server, so the rules are read, not exercised).
    let role = Api::<ClusterRole>::all(client.clone()).get("llmproxy").await.unwrap();
    let rules = role.rules.unwrap_or_default();
    for (group, resource, verbs) in OPERATOR_NEEDS {
        for verb in *verbs {
            let granted = rules.iter().any(|r| {
                r.api_groups.as_ref().is_some_and(|g| g.iter().any(|g| g == group))
                    && r.resources.as_ref().is_some_and(|rs| rs.iter().any(|rs| rs == resource))
                    && r.verbs.iter().any(|v| v == verb)
            });
            assert!(granted, "the chart's ClusterRole lacks {verb} on {group}/{resource}");
        }
    }
    // In its own namespace only, it writes the LlmQuota consumers' identities.
    let own = Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), "llmproxy-system")
        .get("llmproxy-quota-identities")
        .await
        .unwrap();
    let own_rules = own.rules.unwrap_or_default();
    for (group, resource, verb) in [
        ("", "secrets", "create"),
        ("", "secrets", "delete"),
        ("rbac.authorization.k8s.io", "roles", "delete"),
        ("rbac.authorization.k8s.io", "rolebindings", "delete"),
    ] {
        let granted = own_rules.iter().any(|r| {
            r.api_groups.as_ref().is_some_and(|g| g.iter().any(|g| g == group))
                && r.resources.as_ref().is_some_and(|rs| rs.iter().any(|rs| rs == resource))
                && r.verbs.iter().any(|v| v == verb)
        });
        assert!(granted, "the chart's quota-identities Role lacks {verb} on {group}/{resource}");
    }
    // The CRD came with the release.
    crate::support::install_crd(&client).await;

    // The operator as the chart runs it: leader election in the release namespace, the chart's
    // image for the proxies.
    let deployment = docs(&helm::ok(&[
        "get",
        "manifest",
        "llmproxy",
        "-n",
        "llmproxy-system",
        "--kubeconfig",
        &kubeconfig,
    ]))
    .into_iter()
    .find(|d| d["kind"] == "Deployment")
    .unwrap_or_default();
    let args: Vec<String> =
        serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap_or_default();
    assert!(args.contains(&"--leader-election".to_owned()), "{args:?}");
    let image = args.iter().find_map(|a| a.strip_prefix("--proxy-image=")).unwrap_or_default().to_owned();
    assert_eq!(image, "ghcr.io/llmproxy/llmproxy:test");
    let metrics = llmproxy_operator::Metrics::new(prometheus::Registry::new()).unwrap();
    let config = llmproxy_operator::Config {
        settings: llmproxy_operator::Settings {
            image: image.clone(),
            image_pull_policy: Some("IfNotPresent".into()),
            metrics_namespace: None,
            operator_namespace: None,
        },
        namespace: None,
        lease: Some(llmproxy_operator::LeaseConfig::new("llmproxy-system", "llmproxy-0")),
        identity: "llmproxy-0".into(),
        observe: llmproxy_operator::ObserveConfig::default(),
    };
    let operator = tokio::spawn(llmproxy_operator::run(
        client.clone(),
        config,
        metrics,
        std::sync::Arc::new(llmproxy_operator::Health::new(true)),
        std::future::pending(),
    ));

    let ns = env.namespace(&client, "team-a").await;
    let api: Api<LlmProxy> = Api::namespaced(client.clone(), &ns);
    let p = json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "metadata": {"name": "openai"},
                   "spec": {"upstream": {"url": "https://api.openai.com/v1"}, "limits": {"requestsPerMinute": 3500}}});
    api.patch("openai", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&p)).await.unwrap();
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    let d = eventually("the proxy Deployment", Duration::from_secs(30), || async {
        deployments.get_opt("openai").await.ok().flatten()
    })
    .await;
    let pod_image =
        d.spec.and_then(|s| s.template.spec).map(|s| s.containers[0].image.clone().unwrap_or_default());
    assert_eq!(pod_image.as_deref(), Some(image.as_str()));
    let lease = Api::<Lease>::namespaced(client.clone(), "llmproxy-system").get("llmproxy-operator").await;
    assert_eq!(lease.ok().and_then(|l| l.spec?.holder_identity).as_deref(), Some("llmproxy-0"));
    eventually("the status to be written", Duration::from_secs(30), || async {
        api.get("openai").await.ok().and_then(|p| p.status)
    })
    .await;
    operator.abort();
}

/// Metric names in PromQL text: `llmproxy_...`, with histogram suffixes folded onto the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("llmproxy_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        names.insert(family.to_owned());
        i = end;
    }
    names
}

/// Families in a Prometheus text scrape.
fn scraped(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_proxy_and_operator_export() {
    // Traffic of every kind: misses, hits, coalescing, retries, a throttled request.
    let upstream = mock(MockConfig {
        requests_per_minute: Some(6000),
        tokens_per_minute: Some(1_000_000),
        ..MockConfig::default()
    })
    .await;
    let spec =
        "  cache: {ttl: 5m}\n  queue: {maxSize: 10, maxWait: 200ms}\n  retry: {initialBackoff: 10ms}\n";
    // Two requests' burst: a 503 and its retry (whose answer carries the upstream's quota
    // headers), then the bucket is empty and the burst below is throttled.
    let proxy = TestProxy::start(
        &manifest(&upstream.url(), "{requestsPerMinute: 120, tokensPerMinute: 100000}", spec),
        None,
    )
    .await;
    let client = load::client();
    upstream.mock.inject(Fault::Status { status: 503, retry_after_secs: None, code: None }, 1);
    let url = proxy.url("/chat/completions");
    let _ = load::shoot(&client, &url, None, &load::chat_body(1)).await;
    let _ = load::shoot(&client, &url, None, &load::chat_body(1)).await;
    let _ = load::burst(&client, &url, None, 3).await;
    let scrape = scraped(&proxy.metrics().await);
    let operator = llmproxy_operator::Metrics::new(prometheus::Registry::new()).unwrap();
    let exported: BTreeSet<String> = scrape.union(&scraped(&operator.render())).cloned().collect();

    let dashboard = std::fs::read_to_string(repo_path("charts/llmproxy/files/grafana-dashboard.json"))
        .unwrap_or_default();
    let alerts = std::fs::read_to_string(repo_path("charts/llmproxy/templates/prometheusrule.yaml"))
        .unwrap_or_default();
    for (what, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let used = metric_names(text);
        assert!(used.len() >= 5, "{what}: found only {used:?}");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "the {what} uses metrics nobody exports: {missing:?}\nexported: {exported:?}"
        );
    }
    // And the panels an operator looks for first are there.
    for needle in [
        "llmproxy_throttled_total",
        "status=\\\"429\\\"",
        "llmproxy_queue_depth",
        "llmproxy_queue_wait_seconds_bucket",
        "llmproxy_limit_tokens_per_minute",
        "result=\\\"hit\\\"",
        "llmproxy_retries_total",
        "llmproxy_upstream_latency_seconds_bucket",
        "sum by (le, client)",
        "sum by (client) (rate(llmproxy_tokens_total",
    ] {
        assert!(dashboard.contains(needle), "the dashboard lacks {needle}");
    }
}

/// Whether a call was refused by RBAC (403).
fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_and_its_proxies_work_with_exactly_the_rbac_they_are_given() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::rbac::v1::Role;

    let env = KubeEnv::start().await;
    let admin = env.client().await;
    install_release(&env, "image.tag=test");
    crate::support::install_crd(&admin).await;

    // The team's objects, created by an admin.
    let upstream = mock(MockConfig { api_key: Some("sk-team".into()), ..MockConfig::default() }).await;
    let ns = env.namespace(&admin, "team-a").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    for (name, key) in [("upstream-key", "sk-team"), ("payroll", "hunter2")] {
        let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
            "labels": {"llmproxy.io/upstream-key": "true"}}, "stringData": {"api-key": key}});
        secrets.patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(&s)).await.unwrap();
    }
    let keys = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-keys",
        "labels": {llmproxy_api::CLIENT_KEYS_LABEL: "true"}}, "stringData": {"web": "sk-web-1"}});
    secrets.patch("team-keys", &PatchParams::apply(MANAGER), &Patch::Apply(&keys)).await.unwrap();
    let proxies: Api<LlmProxy> = Api::namespaced(admin.clone(), &ns);
    for (name, key) in [("openai", "upstream-key"), ("other", "payroll")] {
        let p = json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "metadata": {"name": name},
            "spec": {"upstream": {"url": upstream.url(), "apiKeySecretRef": {"name": key}},
                     "limits": {"requestsPerMinute": 6000},
                     "clients": {"keysSecretRef": {"name": "team-keys"},
                                 "allowFrom": [{"podSelector": {"matchLabels": {"app": "web"}}}]}}});
        proxies.patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(&p)).await.unwrap();
    }

    // The operator as the chart's ServiceAccount, with the chart's ClusterRole and nothing else.
    let operator = env.service_account_client("llmproxy-system", "llmproxy").await;
    let config = llmproxy_operator::Config {
        settings: llmproxy_operator::Settings {
            image: "llmproxy:test".into(),
            image_pull_policy: None,
            metrics_namespace: None,
            operator_namespace: None,
        },
        namespace: None,
        lease: None,
        identity: "llmproxy-0".into(),
        observe: llmproxy_operator::ObserveConfig::default(),
    };
    let metrics = llmproxy_operator::Metrics::new(prometheus::Registry::new()).unwrap();
    let health = std::sync::Arc::new(llmproxy_operator::Health::new(false));
    let running = tokio::spawn(llmproxy_operator::run(
        operator.clone(),
        config,
        metrics.clone(),
        std::sync::Arc::clone(&health),
        std::future::pending(),
    ));
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let roles: Api<Role> = Api::namespaced(admin.clone(), &ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &ns);
    eventually("the operator to build both proxies' children", Duration::from_secs(30), || async {
        deployments.get_opt("openai").await.ok()??;
        deployments.get_opt("other").await.ok()??;
        roles.get_opt("openai-proxy").await.ok()??;
        policies.get_opt("openai").await.ok()??;
        let status = proxies.get("openai").await.ok()?.status?;
        (!status.conditions.is_empty()).then_some(())
    })
    .await;
    eventually("the operator to report ready", Duration::from_secs(10), || async {
        health.not_ready().is_none().then_some(())
    })
    .await;
    let failures =
        crate::support::proxy_env::metric(&metrics.render(), "llmproxy_operator_reconcile_errors_total");
    assert_eq!(failures, 0.0, "no call of the operator was refused:\n{}", metrics.render());

    // A proxy as its ServiceAccount, with the Role the operator made for it.
    let proxy_kubeconfig = env.service_account_kubeconfig(&ns, "openai-proxy");
    let resource = format!("{ns}/openai");
    let proxy = crate::support::proxy_env::ProxyProcess::start_with_args(
        &["proxy", "--resource", &resource, "--drain-delay", "0s"],
        &[("KUBECONFIG", &proxy_kubeconfig.display().to_string())],
    )
    .await;
    let (status, _, body) =
        crate::support::proxy_env::post_json(&proxy.url("/chat/completions"), &load::chat_body(1)).await;
    assert_eq!(status, 401, "the proxy requires a client key: {body}");
    let resp = load::client()
        .post(proxy.url("/chat/completions"))
        .bearer_auth("sk-web-1")
        .header("content-type", "application/json")
        .body(load::chat_body(1).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the proxy read its LlmProxy, its upstream key and its client keys");

    // Only the labelled pods reach the proxy's HTTP port.
    let np = policies.get("openai").await.unwrap();
    let spec = np.spec.unwrap_or_default();
    let http =
        spec.ingress.unwrap_or_default().into_iter().find(|rule| {
            rule.ports.iter().flatten().any(|p| p.port == Some(IntOrString::String("http".into())))
        });
    let from = http.and_then(|r| r.from).unwrap_or_default();
    assert_eq!(from.len(), 1, "{from:?}");
    assert_eq!(
        from[0].pod_selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default().get("app"),
        Some(&"web".to_owned())
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));

    // What they were not given, they cannot do.
    let as_proxy = env.service_account_client(&ns, "openai-proxy").await;
    let proxy_secrets: Api<Secret> = Api::namespaced(as_proxy.clone(), &ns);
    assert!(forbidden(proxy_secrets.get("payroll").await), "another Secret");
    assert!(proxy_secrets.get("team-keys").await.is_ok(), "its client keys");
    assert!(forbidden(proxy_secrets.list(&Default::default()).await), "listing Secrets");
    let proxy_llmps: Api<LlmProxy> = Api::namespaced(as_proxy, &ns);
    assert!(forbidden(proxy_llmps.get("other").await), "another LlmProxy");
    assert!(proxy_llmps.get("openai").await.is_ok(), "its own LlmProxy");
    let operator_secrets: Api<Secret> = Api::namespaced(operator.clone(), &ns);
    assert!(
        forbidden(operator_secrets.delete("payroll", &Default::default()).await),
        "the operator deleting a Secret"
    );
    let operator_roles: Api<ClusterRole> = Api::all(operator);
    let wide = serde_json::from_value::<ClusterRole>(json!({"metadata": {"name": "everything"},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}))
    .unwrap_or_default();
    assert!(
        forbidden(operator_roles.create(&Default::default(), &wide).await),
        "the operator making ClusterRoles"
    );
    running.abort();
}
