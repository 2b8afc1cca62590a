//! The operator against a real API server (no controllers there: the tests write Deployment
//! status themselves), and a real `llmproxy proxy --resource` process reloading from it.

use std::time::Duration;

use futures_util::future::join_all;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use llmproxy_api::LlmProxy;
use llmproxy_mock::{MockConfig, load};
use llmproxy_operator::{Config, LeaseConfig, Metrics, Settings};
use serde_json::{Value, json};

use crate::support::proxy_env::{TestProxy, get_text, metric, mock};
use crate::support::{self, KubeEnv, MANAGER, eventually};

pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A running in-process operator; stops when dropped.
pub(crate) struct Operator {
    metrics: Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    pub(crate) fn start(client: &Client, ns: &str, identity: &str, lease: bool) -> Self {
        Self::start_with(client, ns, Some(ns), identity, lease, None)
    }

    /// Watching `watch` (`None`: every namespace), its own namespace `operator_ns`.
    fn start_with(
        client: &Client,
        ns: &str,
        watch: Option<&str>,
        identity: &str,
        lease: bool,
        operator_ns: Option<&str>,
    ) -> Self {
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap();
        let mut lease_cfg = LeaseConfig::new(ns, identity);
        lease_cfg.duration = Duration::from_secs(4);
        lease_cfg.retry = Duration::from_millis(500);
        let config = Config {
            settings: Settings {
                image: "llmproxy:test".into(),
                image_pull_policy: None,
                metrics_namespace: None,
                operator_namespace: operator_ns.map(str::to_owned),
            },
            namespace: watch.map(str::to_owned),
            lease: lease.then_some(lease_cfg),
            identity: identity.to_owned(),
            observe: llmproxy_operator::ObserveConfig {
                interval: Duration::from_millis(300),
                ..llmproxy_operator::ObserveConfig::default()
            },
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(llmproxy_operator::run(
            client.clone(),
            config,
            metrics.clone(),
            std::sync::Arc::new(llmproxy_operator::Health::new(lease)),
            async move {
                let _ = stopped.await;
            },
        ));
        Self { metrics, stop: Some(stop), task }
    }

    fn reconciles(&self) -> f64 {
        metric(&self.metrics.render(), "llmproxy_operator_reconciles_total")
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn llmproxy(name: &str, upstream: &str, spec_extra: Value) -> Value {
    let mut spec = json!({
        "upstream": {"url": upstream, "apiKeySecretRef": {"name": "upstream-key"}},
        "limits": {"requestsPerMinute": 600},
        "queue": {"maxWait": "500ms"},
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        s.extend(extra.clone());
    }
    json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "metadata": {"name": name}, "spec": spec})
}

pub(crate) async fn apply(api: &Api<LlmProxy>, manifest: &Value) -> LlmProxy {
    let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(manifest)).await.expect("apply")
}

/// The upstream-key Secret, opted in to being read by proxies.
pub(crate) async fn secret(client: &Client, ns: &str, key: &str) {
    let labels = [(llmproxy_api::SECRET_OPT_IN_LABEL.to_owned(), "true".to_owned())].into();
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("upstream-key".into()),
            labels: Some(labels),
            ..Default::default()
        },
        data: Some([("api-key".to_owned(), ByteString(key.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch("upstream-key", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&s))
        .await
        .expect("secret");
}

pub(crate) async fn setup(prefix: &str) -> (KubeEnv, Client, String, Api<LlmProxy>) {
    let env = KubeEnv::start().await;
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = env.namespace(&client, prefix).await;
    let api = Api::namespaced(client.clone(), &ns);
    (env, client, ns, api)
}

pub(crate) async fn wait_for<K>(api: &Api<K>, name: &str) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} to exist"), WAIT, || async { api.get_opt(name).await.ok().flatten() }).await
}

pub(crate) async fn condition(
    api: &Api<LlmProxy>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> LlmProxy {
    eventually(&format!("{type_}={status} ({reason})"), WAIT, || async {
        let p = api.get(name).await.ok()?;
        let c = llmproxy_operator::condition_status(p.status.as_ref(), type_)?;
        (c.status == status && c.reason == reason).then_some(p.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llmproxy_gets_owned_labelled_locked_down_children() {
    let (_env, client, ns, api) = setup("children").await;
    secret(&client, &ns, "sk-1").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let p = apply(&api, &llmproxy("openai", "https://api.openai.com/v1", json!({}))).await;
    let uid = p.uid().unwrap_or_default();

    let deployment = wait_for(&Api::<Deployment>::namespaced(client.clone(), &ns), "openai").await;
    let service = wait_for(&Api::<Service>::namespaced(client.clone(), &ns), "openai").await;
    let sa = wait_for(&Api::<ServiceAccount>::namespaced(client.clone(), &ns), "openai-proxy").await;
    let role = wait_for(&Api::<Role>::namespaced(client.clone(), &ns), "openai-proxy").await;
    let binding = wait_for(&Api::<RoleBinding>::namespaced(client.clone(), &ns), "openai-proxy").await;
    for (kind, refs, labels) in [
        ("Deployment", deployment.owner_references(), deployment.labels()),
        ("Service", service.owner_references(), service.labels()),
        ("ServiceAccount", sa.owner_references(), sa.labels()),
        ("Role", role.owner_references(), role.labels()),
        ("RoleBinding", binding.owner_references(), binding.labels()),
    ] {
        assert!(
            refs.iter().any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "LlmProxy"),
            "{kind} not owned"
        );
        assert_eq!(
            labels.get("app.kubernetes.io/managed-by").map(String::as_str),
            Some("llmproxy-operator"),
            "{kind}"
        );
    }
    // Only its own LlmProxy and Secret, read-only.
    let rules = role.rules.unwrap_or_default();
    let mut seen = Vec::new();
    for r in &rules {
        assert_eq!(r.verbs, ["get", "list", "watch"]);
        seen.push((
            r.resources.clone().unwrap_or_default().join(","),
            r.resource_names.clone().unwrap_or_default().join(","),
        ));
    }
    assert_eq!(
        seen,
        [("llmproxies".to_owned(), "openai".to_owned()), ("secrets".to_owned(), "upstream-key".to_owned())]
    );
    assert_eq!(binding.subjects.unwrap_or_default()[0].name, "openai-proxy");

    let pod = deployment.spec.and_then(|s| s.template.spec).unwrap_or_default();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("llmproxy:test"));
    assert!(c.args.as_ref().is_some_and(|a| a.join(" ").contains(&format!("--resource {ns}/openai"))));
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    let sc = c.security_context.clone().unwrap_or_default();
    assert_eq!(
        (sc.read_only_root_filesystem, sc.allow_privilege_escalation, sc.run_as_non_root),
        (Some(true), Some(false), Some(true))
    );
    let ports: Vec<i32> =
        service.spec.and_then(|s| s.ports).unwrap_or_default().iter().map(|p| p.port).collect();
    assert_eq!(ports, [8080, 9090]);

    let p = condition(&api, "openai", "Degraded", "False", "AsExpected").await;
    let status = p.status.unwrap_or_default();
    assert_eq!(status.endpoint.as_deref(), Some(format!("http://openai.{ns}.svc:8080/v1").as_str()));
    assert_eq!(status.observed_generation, p.metadata.generation);
    // Events say what the operator did.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("a Created event", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("Created")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_in_place_while_replicas_scale_the_deployment() {
    let (_env, client, ns, api) = setup("scale").await;
    secret(&client, &ns, "sk-1").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    let before = wait_for(&deployments, "p").await;

    // New limits: the proxies reload them from the LlmProxy; the pod template must not move.
    let changed = apply(
        &api,
        &llmproxy("p", "https://api.openai.com/v1", json!({"limits": {"requestsPerMinute": 60}})),
    )
    .await;
    let generation = changed.metadata.generation;
    eventually("the new generation to be observed", WAIT, || async {
        let p = api.get("p").await.ok()?;
        (p.status?.observed_generation == generation).then_some(())
    })
    .await;
    let after = deployments.get("p").await.unwrap();
    assert_eq!(before.metadata.generation, after.metadata.generation, "no rollout for a limits change");
    assert_eq!(before.spec.map(|s| s.template), after.spec.clone().map(|s| s.template));

    // Replicas: the Deployment follows, and a PDB appears for more than one pod.
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({"replicas": 3}))).await;
    eventually("3 replicas", WAIT, || async {
        (deployments.get("p").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    wait_for(&pdbs, "p").await;

    // Autoscaling: an HPA owns the count from here, starting from the 3 pods running now (the
    // operator stops applying `replicas`, and the field must not fall back to 1 meanwhile).
    let scaling = json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 5, "targetQueueDepth": 10}});
    let scaled = apply(&api, &llmproxy("p", "https://api.openai.com/v1", scaling)).await;
    let hpa = wait_for(&Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns), "p").await;
    let spec = hpa.spec.unwrap_or_default();
    assert_eq!(
        (spec.min_replicas, spec.max_replicas, spec.scale_target_ref.name.as_str()),
        (Some(2), 5, "p")
    );
    eventually("the new generation to be observed", WAIT, || async {
        let p = api.get("p").await.ok()?;
        (p.status?.observed_generation == scaled.metadata.generation).then_some(())
    })
    .await;
    assert_eq!(deployments.get("p").await.ok().and_then(|d| d.spec?.replicas), Some(3));

    // Back to a fixed count of one: the HPA and the PDB go.
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({"replicas": 1}))).await;
    eventually("the PDB to go", WAIT, || async { pdbs.get_opt("p").await.ok()?.is_none().then_some(()) })
        .await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    eventually("the HPA to go", WAIT, || async { hpas.get_opt("p").await.ok()?.is_none().then_some(()) })
        .await;
    assert_eq!(deployments.get("p").await.ok().and_then(|d| d.spec?.replicas), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_degrades_until_it_appears() {
    let (_env, client, ns, api) = setup("secret").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    let p = condition(&api, "p", "Degraded", "True", "SecretNotFound").await;
    let msg = llmproxy_operator::condition_status(p.status.as_ref(), "Degraded").map(|c| c.message.clone());
    assert!(msg.unwrap_or_default().contains("upstream-key"));
    assert_eq!(
        llmproxy_operator::condition_status(p.status.as_ref(), "Ready").map(|c| c.status.as_str()),
        Some("False")
    );

    secret(&client, &ns, "sk-1").await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pods_make_the_llmproxy_ready() {
    let (_env, client, ns, api) = setup("ready").await;
    secret(&client, &ns, "sk-1").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({"replicas": 2}))).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = wait_for(&deployments, "p").await;
    condition(&api, "p", "Ready", "False", "ProxiesNotReady").await;

    // No Deployment controller here: write the status it would.
    let status = json!({"apiVersion": "apps/v1", "kind": "Deployment", "status": {
        "observedGeneration": d.metadata.generation, "replicas": 2, "readyReplicas": 2,
        "updatedReplicas": 2, "availableReplicas": 2}});
    deployments
        .patch_status("p", &PatchParams::apply("kube-controller-manager").force(), &Patch::Apply(&status))
        .await
        .unwrap();
    let p = condition(&api, "p", "Ready", "True", "ProxiesReady").await;
    let s = p.status.unwrap_or_default();
    assert_eq!((s.ready_replicas, s.replicas), (Some(2), Some(2)));
    assert_eq!(s.observed_generation, p.metadata.generation);
    assert_eq!(
        llmproxy_operator::condition_status(Some(&s), "Progressing").map(|c| c.status.as_str()),
        Some("False")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrunnable_spec_is_reported_once_not_retried_in_a_loop() {
    let (_env, client, ns, api) = setup("invalid").await;
    secret(&client, &ns, "sk-1").await;
    let op = Operator::start(&client, &ns, "op-1", false);
    // The schema accepts "0" as a quantity; the policy refuses an empty cache budget.
    apply(
        &api,
        &llmproxy("p", "https://api.openai.com/v1", json!({"cache": {"ttl": "5m", "maxBytes": "0"}})),
    )
    .await;
    let p = condition(&api, "p", "Degraded", "True", "InvalidPolicy").await;
    let msg = llmproxy_operator::condition_status(p.status.as_ref(), "Degraded").map(|c| c.message.clone());
    assert!(msg.unwrap_or_default().contains("spec.cache.maxBytes: must be > 0"));
    let settled = eventually("the reconcile to be counted", WAIT, || async {
        (op.reconciles() >= 1.0).then(|| op.reconciles())
    })
    .await;
    // Absence of activity needs a window of time; two seconds would hold dozens of hot-loop rounds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(op.reconciles() <= settled + 1.0, "hot loop: {} -> {}", settled, op.reconciles());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_elect_exactly_one_leader() {
    let (_env, client, ns, api) = setup("leader").await;
    secret(&client, &ns, "sk-1").await;
    let a = Operator::start(&client, &ns, "op-a", true);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let first = eventually("a leader", WAIT, || async {
        leases.get_opt("llmproxy-operator").await.ok()??.spec?.holder_identity
    })
    .await;
    assert_eq!(first, "op-a");
    let b = Operator::start(&client, &ns, "op-b", true);
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    eventually("op-a to count its reconcile", WAIT, || async { (a.reconciles() > 0.0).then_some(()) }).await;
    assert_eq!(b.reconciles(), 0.0, "the standby must not reconcile");
    assert_eq!(metric(&b.metrics.render(), "llmproxy_operator_leader"), 0.0);

    // The leader steps down; the standby takes over and reconciles.
    a.stop().await;
    eventually("op-b to lead", WAIT, || async {
        let holder = leases.get_opt("llmproxy-operator").await.ok()??.spec?.holder_identity;
        (holder.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({"replicas": 2}))).await;
    eventually("op-b to reconcile", WAIT, || async { (b.reconciles() > 0.0).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_reloads_limits_and_keys_from_the_cluster() {
    let (env, client, ns, api) = setup("reload").await;
    let upstream = mock(MockConfig { api_key: Some("sk-first".into()), ..MockConfig::default() }).await;
    secret(&client, &ns, "sk-first").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &llmproxy("p", &upstream.url(), json!({"limits": {"requestsPerMinute": 6000}}))).await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;

    // The proxy as it runs in the pod, with a kubeconfig instead of a service account.
    let kubeconfig = env.kubeconfig().display().to_string();
    let proxy = crate::support::proxy_env::ProxyProcess::start_with_args(
        &["proxy", "--resource", &format!("{ns}/p")],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .await;
    let pid = proxy.pid();
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    let url = proxy.url("/chat/completions");
    let client_http = load::client();
    assert_eq!(load::shoot(&client_http, &url, None, &load::chat_body(1)).await.status, Some(200));

    apply(&api, &llmproxy("p", &upstream.url(), json!({"limits": {"requestsPerMinute": 60}}))).await;
    eventually("the proxy to enforce 60 RPM", WAIT, || {
        let url = metrics_url.clone();
        async move { (metric(&get_text(&url).await, "llmproxy_limit_requests_per_minute") == 60.0).then_some(()) }
    })
    .await;
    let burst = load::burst(&client_http, &url, None, 3).await;
    assert_eq!((burst.ok, burst.rate_limited), (1, 2), "one per second, and maxWait 500ms: {burst:?}");

    // Rotate the key: the upstream now wants the new one; the next call must carry it.
    upstream.mock.set_api_key(Some("sk-second".into()));
    secret(&client, &ns, "sk-second").await;
    eventually("the rotated key to be used", WAIT, || {
        let (client_http, url, upstream) = (client_http.clone(), url.clone(), upstream.mock.clone());
        async move {
            let shot = load::shoot(&client_http, &url, None, &load::chat_body(2)).await;
            (shot.status == Some(200) && upstream.seen().last()?.key.as_deref() == Some("sk-second"))
                .then_some(())
        }
    })
    .await;
    assert_eq!(proxy.pid(), pid, "the same process throughout");
    let logs = proxy.logs();
    assert!(!logs.contains("sk-first") && !logs.contains("sk-second"), "a key leaked into the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_example_applies_and_reconciles() {
    let (_env, client, ns, api) = setup("quickstart").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let text = std::fs::read_to_string(support::repo_path("examples/quickstart.yaml")).unwrap_or_default();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
        // kube-apiserver-lite does not fold a Secret's write-only stringData into data as
        // kube-apiserver does; do it here, as the real server would.
        if let Some(Value::Object(plain)) = v.as_object_mut().and_then(|o| o.remove("stringData")) {
            let data: serde_json::Map<String, Value> = plain
                .into_iter()
                .map(|(k, val)| {
                    (
                        k,
                        serde_json::to_value(ByteString(
                            val.as_str().unwrap_or_default().as_bytes().to_vec(),
                        ))
                        .unwrap_or_default(),
                    )
                })
                .collect();
            v["data"] = Value::Object(data);
        }
        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let pp = PatchParams::apply(MANAGER).force();
        let result = match v["kind"].as_str() {
            Some("Secret") => Api::<Secret>::namespaced(client.clone(), &ns)
                .patch(&name, &pp, &Patch::Apply(&v))
                .await
                .map(drop),
            Some("LlmProxy") => api.patch(&name, &pp.validation_strict(), &Patch::Apply(&v)).await.map(drop),
            other => panic!("unexpected kind {other:?}"),
        };
        result.unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }
    condition(&api, "openai", "Degraded", "False", "AsExpected").await;
    wait_for(&Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns), "openai").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_binary_reconciles_and_serves_its_admin_port() {
    let (env, client, ns, api) = setup("binary").await;
    secret(&client, &ns, "sk-1").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap();
    let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .args([
                "operator",
                "--admin-listen",
                &admin.to_string(),
                "--namespace",
                &ns,
                "--proxy-image",
                "llmproxy:bin",
            ])
            .args(["--leader-election", "--lease-namespace", &ns, "--identity", "op-bin"])
            .env("KUBECONFIG", env.kubeconfig())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    let result = async {
        let d = wait_for(&Api::<Deployment>::namespaced(client.clone(), &ns), "p").await;
        let image = d.spec.and_then(|s| s.template.spec).and_then(|s| s.containers[0].image.clone());
        assert_eq!(image.as_deref(), Some("llmproxy:bin"));
        condition(&api, "p", "Degraded", "False", "AsExpected").await;
        assert_eq!(get_text(&format!("http://{admin}/livez")).await, "ok");
        let ready = format!("http://{admin}/readyz");
        eventually("the operator to be ready (its watch established)", WAIT, || {
            let ready = ready.clone();
            async move { (get_text(&ready).await == "ok").then_some(()) }
        })
        .await;
        let url = format!("http://{admin}/metrics");
        eventually("reconciles in the operator's metrics", WAIT, || {
            let url = url.clone();
            async move {
                (metric(&get_text(&url).await, "llmproxy_operator_reconciles_total{result=\"ok\"}") >= 1.0)
                    .then_some(())
            }
        })
        .await;
        assert_eq!(metric(&get_text(&url).await, "llmproxy_operator_leader"), 1.0);
    };
    result.await;
    let _ = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    let exited = eventually("the operator to exit on SIGTERM", WAIT, || {
        let status = child.0.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(exited.success(), "{exited}");
    // On the way out it gave the Lease up for a standby.
    let lease = Api::<Lease>::namespaced(client.clone(), &ns).get("llmproxy-operator").await;
    assert_eq!(lease.ok().and_then(|l| l.spec?.holder_identity), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_proxy_is_not_ready_until_its_key_secret_exists() {
    let (env, client, ns, api) = setup("keywait").await;
    let upstream = mock(MockConfig { api_key: Some("sk-late".into()), ..MockConfig::default() }).await;
    apply(&api, &llmproxy("p", &upstream.url(), json!({}))).await;
    let kubeconfig = env.kubeconfig().display().to_string();
    let proxy = crate::support::proxy_env::ProxyProcess::spawn(
        &["proxy", "--resource", &format!("{ns}/p")],
        &[("KUBECONFIG", kubeconfig.as_str())],
    );
    let readyz = format!("http://{}/readyz", proxy.admin);
    eventually("readyz to say it waits for the key", WAIT, || {
        let url = readyz.clone();
        async move { (get_text(&url).await == "waiting for the upstream API key Secret").then_some(()) }
    })
    .await;
    secret(&client, &ns, "sk-late").await;
    eventually("ready once the Secret exists", WAIT, || {
        let url = readyz.clone();
        async move { (get_text(&url).await == "ok").then_some(()) }
    })
    .await;
    let shot = load::shoot(&load::client(), &proxy.url("/chat/completions"), None, &load::chat_body(1)).await;
    assert_eq!(shot.status, Some(200));
}

/// A child process killed if the test fails before it is stopped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llmproxy_that_cannot_be_read_is_reported_and_the_others_still_reconciled() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::runtime::wait::{await_condition, conditions};

    let env = KubeEnv::start().await;
    let client = env.client().await;
    // An object stored under a looser schema (an older CRD, or one edited around it): the spec
    // is anything at all.
    let mut crd = serde_json::to_value(LlmProxy::crd()).unwrap_or_default();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "llmproxies.llmproxy.io";
    crds.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
        .await
        .expect("permissive CRD");
    tokio::time::timeout(WAIT, await_condition(crds, name, conditions::is_crd_established()))
        .await
        .expect("CRD not established")
        .unwrap();
    let ns = env.namespace(&client, "unreadable").await;
    let api: Api<LlmProxy> = Api::namespaced(client.clone(), &ns);
    secret(&client, &ns, "sk-1").await;
    let raw: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &kube::api::ApiResource::erase::<LlmProxy>(&()));
    let broken = json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "metadata": {"name": "broken"},
                        "spec": {"upstream": 5, "limits": "plenty"}});
    raw.patch("broken", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&broken)).await.unwrap();
    let _op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &llmproxy("good", "https://api.openai.com/v1", json!({}))).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for(&deployments, "good").await;
    let status = eventually("the broken one's status", WAIT, || async {
        let obj = raw.get("broken").await.ok()?;
        let conditions = obj.data.get("status")?.get("conditions")?.as_array()?.clone();
        conditions.into_iter().find(|c| c["type"] == "Degraded" && c["status"] == "True")
    })
    .await;
    assert_eq!(status["reason"], "InvalidPolicy");
    assert!(status["message"].as_str().unwrap_or_default().contains("cannot be read"), "{status}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("a warning event", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("InvalidPolicy")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
        })
    })
    .await;
    assert!(deployments.get_opt("broken").await.ok().flatten().is_none(), "nothing built from it");
    // The controller still follows edits of the readable one.
    apply(&api, &llmproxy("good", "https://api.openai.com/v1", json!({"replicas": 3}))).await;
    eventually("the edit to be reconciled", WAIT, || async {
        let d = deployments.get("good").await.ok()?;
        (d.spec?.replicas == Some(3)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_did_not_opt_in_is_never_granted() {
    let (_env, client, ns, api) = setup("optin").await;
    // The confused deputy: someone who may edit LlmProxies but not read Secrets names a Secret
    // of the namespace and points the upstream at a host of theirs.
    let unlabelled = Secret {
        metadata: kube::api::ObjectMeta { name: Some("upstream-key".into()), ..Default::default() },
        data: Some([("api-key".to_owned(), ByteString(b"sk-theirs".to_vec()))].into()),
        ..Default::default()
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    secrets
        .patch("upstream-key", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&unlabelled))
        .await
        .unwrap();
    let _op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &llmproxy("p", "https://attacker.example/v1", json!({}))).await;
    let p = condition(&api, "p", "Degraded", "True", "SecretNotAllowed").await;
    let msg = llmproxy_operator::condition_status(p.status.as_ref(), "Degraded").map(|c| c.message.clone());
    assert!(
        msg.unwrap_or_default().contains("kubectl label secret upstream-key llmproxy.io/upstream-key=true")
    );
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let role = wait_for(&roles, "p-proxy").await;
    let grants_secrets = |r: &Role| {
        r.rules.iter().flatten().any(|rule| rule.resources.iter().flatten().any(|x| x == "secrets"))
    };
    assert!(!grants_secrets(&role), "no Secret access without the owner's opt-in: {role:?}");

    // Opted in, but narrowed to another LlmProxy: still not this one.
    let narrowed = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "upstream-key",
        "labels": {"llmproxy.io/upstream-key": "true"}, "annotations": {"llmproxy.io/allowed-proxies": "other"}},
        "data": {"api-key": "c2stdGhlaXJz"}});
    secrets.patch("upstream-key", &PatchParams::apply(MANAGER), &Patch::Apply(&narrowed)).await.unwrap();
    condition(&api, "p", "Degraded", "True", "SecretNotAllowed").await;
    // The owner opts in for it: granted at once (the Secret watch brings the LlmProxy back).
    let allowed = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "upstream-key",
        "labels": {"llmproxy.io/upstream-key": "true"}, "annotations": {"llmproxy.io/allowed-proxies": "other, p"}},
        "data": {"api-key": "c2stdGhlaXJz"}});
    secrets.patch("upstream-key", &PatchParams::apply(MANAGER), &Patch::Apply(&allowed)).await.unwrap();
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    let role = roles.get("p-proxy").await.unwrap();
    assert!(grants_secrets(&role), "{role:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_any_child_is_repaired_at_once() {
    let (_env, client, ns, api) = setup("drift").await;
    secret(&client, &ns, "sk-1").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let original = wait_for(&roles, "p-proxy").await;
    wait_for(&accounts, "p-proxy").await;
    // Someone widens the proxy's Role, and deletes its ServiceAccount and RoleBinding.
    let widened = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "p-proxy"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]});
    roles.patch("p-proxy", &PatchParams::apply("intruder").force(), &Patch::Apply(&widened)).await.unwrap();
    accounts.delete("p-proxy", &Default::default()).await.unwrap();
    bindings.delete("p-proxy", &Default::default()).await.unwrap();
    // Repaired well within the 300 s periodic requeue.
    eventually("the Role to be restored", WAIT, || async {
        let r = roles.get("p-proxy").await.ok()?;
        (r.rules == original.rules).then_some(())
    })
    .await;
    wait_for(&accounts, "p-proxy").await;
    wait_for(&bindings, "p-proxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keys_are_checked_granted_and_reported_and_allow_from_fences_the_proxy() {
    let (_env, client, ns, api) = setup("clientkeys").await;
    secret(&client, &ns, "sk-1").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let keys = |labels: Value, data: Value| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-keys", "labels": labels},
               "stringData": data})
    };
    let put = |s: Value| {
        let secrets = secrets.clone();
        async move {
            secrets.patch("team-keys", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&s)).await.unwrap()
        }
    };
    let _op = Operator::start(&client, &ns, "op-1", false);

    // Without client keys, the status says so: anything that reaches the Service spends the key.
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    condition(&api, "p", "ClientAuth", "False", "ClientAuthDisabled").await;

    // Keys named, and a fence: the Secret consented to being an upstream key, not client keys.
    put(keys(json!({"llmproxy.io/upstream-key": "true"}), json!({"web": "sk-web"}))).await;
    let clients = json!({"clients": {"keysSecretRef": {"name": "team-keys"},
                                     "allowFrom": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}});
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", clients.clone())).await;
    let p = condition(&api, "p", "Degraded", "True", "SecretNotAllowed").await;
    let message = llmproxy_operator::condition_status(p.status.as_ref(), "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("spec.clients.keysSecretRef") && message.contains(llmproxy_api::CLIENT_KEYS_LABEL),
        "{message}"
    );
    condition(&api, "p", "ClientAuth", "True", "ClientKeysRequired").await;
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let granted = |r: &Role| -> Vec<String> {
        r.rules.iter().flatten().filter_map(|rule| rule.resource_names.clone()).flatten().collect()
    };
    assert!(!granted(&wait_for(&roles, "p-proxy").await).contains(&"team-keys".to_owned()));

    // Consent, but two clients share one key: the proxy would refuse the table.
    put(keys(json!({llmproxy_api::CLIENT_KEYS_LABEL: "true"}), json!({"web": "sk-same", "etl": "sk-same"})))
        .await;
    let p = condition(&api, "p", "Degraded", "True", "ClientKeysInvalid").await;
    let message = llmproxy_operator::condition_status(p.status.as_ref(), "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("etl") && !message.contains("sk-same"),
        "names the client, never the key: {message}"
    );

    // Fixed: granted (the proxy may read it, and nothing else new), not degraded.
    put(keys(json!({llmproxy_api::CLIENT_KEYS_LABEL: "true"}), json!({"web": "sk-web", "etl": "sk-etl"})))
        .await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    let role = roles.get("p-proxy").await.unwrap();
    let mut names = granted(&role);
    names.sort();
    assert_eq!(names, ["p", "team-keys", "upstream-key"], "{role:?}");

    // The fence admits allowFrom's peers to the API port. Without allowFrom it stays: the API
    // port opens to anyone, the metrics port (client names and usage) still only to the
    // monitoring and operator namespaces, neither of which this operator names.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let np = wait_for(&policies, "p").await;
    assert!(np.owner_references().iter().any(|o| o.name == "p" && o.controller == Some(true)));
    apply(&api, &llmproxy("p", "https://api.openai.com/v1", json!({}))).await;
    let http = Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()));
    eventually("the API port to open to anyone, and only it", WAIT, || async {
        let rules = policies.get_opt("p").await.ok()??.spec?.ingress?;
        let only_http = rules.len() == 1 && rules[0].ports.as_ref()?.first()?.port == http;
        (only_http && rules[0].from.is_none()).then_some(())
    })
    .await;
    condition(&api, "p", "ClientAuth", "False", "ClientAuthDisabled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_pods_learn_of_their_upstreams_reaches_the_status() {
    let (_env, client, ns, api) = setup("observe").await;
    // a grants 600/min where the spec will ask for 1200; b grants what the spec asks.
    let a = mock(MockConfig { requests_per_minute: Some(600), ..MockConfig::default() }).await;
    let b = mock(MockConfig { requests_per_minute: Some(6000), ..MockConfig::default() }).await;
    let spec = |a_rpm: u64| {
        json!({
            "upstreams": [
                {"name": "a", "url": a.url(), "models": ["ma"], "limits": {"requestsPerMinute": a_rpm}},
                {"name": "b", "url": b.url(), "models": ["mb"], "limits": {"requestsPerMinute": 6000}},
            ],
            "limits": {"requestsPerMinute": 10000},
        })
    };
    let manifest = |a_rpm: u64| {
        json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "metadata": {"name": "team"},
               "spec": spec(a_rpm)})
    };
    // A proxy pod (a standalone process of the same spec) that has spoken to both upstreams.
    let yaml = serde_yaml::to_string(&manifest(1200)).unwrap();
    let proxy = TestProxy::start(&yaml, None).await;
    let client_http = load::client();
    for model in ["ma", "mb"] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let r = load::shoot(&client_http, &proxy.url("/chat/completions"), None, &body).await;
        assert_eq!(r.status, Some(200), "{model}");
    }
    let op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &manifest(1200)).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    wait_for(&services, "team").await;
    // The test API server runs no controllers: the EndpointSlice a real one would write.
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "team-pods", "labels": {"kubernetes.io/service-name": "team"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": proxy.addr.port(), "protocol": "TCP"},
                  {"name": "metrics", "port": proxy.admin.port(), "protocol": "TCP"}],
    });
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(client.clone(), &ns)
        .patch("team-pods", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&slice))
        .await
        .unwrap();

    let p = condition(&api, "team", "LimitsAboveUpstream", "True", "UpstreamGrantsLess").await;
    let message = &llmproxy_operator::condition_status(p.status.as_ref(), "LimitsAboveUpstream")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("a: requestsPerMinute 1200 configured, the upstream grants 600"), "{message}");
    assert!(!message.contains("b:"), "{message}");
    let upstreams = p.status.as_ref().map(|s| s.upstreams.clone()).unwrap_or_default();
    let seen: Vec<_> = upstreams
        .iter()
        .map(|u| (u.name.as_str(), u.observed_limits.as_ref().and_then(|l| l.requests_per_minute), u.healthy))
        .collect();
    assert_eq!(seen, [("a", Some(600), true), ("b", Some(6000), true)]);

    // Nothing changes: passes go on, writes do not.
    let writes = || metric(&op.metrics.render(), "llmproxy_operator_observed_status_writes_total");
    let passes = || metric(&op.metrics.render(), "llmproxy_operator_observe_passes_total");
    // (A write still in flight from the last change may land first; then three passes in a row
    // must write nothing. A status written on every pass never gets there.)
    let quiet = std::sync::Mutex::new((writes(), passes()));
    eventually("three passes in a row with no status write", WAIT, || async {
        let mut q = quiet.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (w, p) = (writes(), passes());
        if w != q.0 {
            *q = (w, p);
            return None;
        }
        (p >= q.1 + 3.0).then_some(())
    })
    .await;

    // The reconciler's own writes (a new generation) keep what the observer wrote, and the
    // observer's keep the reconciler's conditions.
    let mut lower = manifest(600);
    lower["spec"]["queue"] = json!({"maxWait": "2s"});
    apply(&api, &lower).await;
    let p = condition(&api, "team", "LimitsAboveUpstream", "False", "WithinUpstreamLimits").await;
    let s = p.status.clone().unwrap_or_default();
    assert_eq!(s.upstreams.len(), 2, "{s:?}");
    for type_ in ["Ready", "Progressing", "Degraded", "ClientAuth"] {
        assert!(llmproxy_operator::condition_status(Some(&s), type_).is_some(), "{type_}: {s:?}");
    }
    let p = eventually("the reconciler's write of generation 2", WAIT, || async {
        let p = api.get("team").await.ok()?;
        (p.status.as_ref()?.observed_generation == p.metadata.generation).then_some(p)
    })
    .await;
    let s = p.status.unwrap_or_default();
    assert_eq!(s.upstreams.len(), 2, "the reconciler left the pods' report alone: {s:?}");
    assert!(llmproxy_operator::condition_status(Some(&s), "LimitsAboveUpstream").is_some());
    op.stop().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llmquota_grants_allowed_namespaces_and_refuses_the_rest() {
    use k8s_openapi::api::core::v1::Namespace;
    use llmproxy_api::redis_acl::{consumer_secret, consumer_user, shares_key};
    let (env, client, ops, _) = setup("quota-ops").await;
    let redis = crate::support::redis::RedisServer::start(Some("admin-pass")).await;
    let admin = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-auth"}, "stringData": {"password": "admin-pass"}});
    Api::<Secret>::namespaced(client.clone(), &ops)
        .patch("redis-auth", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&admin))
        .await
        .unwrap();
    let team_a = env.namespace(&client, "team-a").await;
    let other = env.namespace(&client, "other").await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let label = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": team_a, "labels": {"team": "a"}}});
    namespaces.patch(&team_a, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&label)).await.unwrap();
    let quota = json!({
        "apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmQuota", "metadata": {"name": "org"},
        "spec": {
            "requestsPerMinute": 6000, "tokensPerMinute": 1000000,
            "sharedState": {"redis": {"url": redis.url(), "passwordSecretRef": {"name": "redis-auth"}}},
            "allowedNamespaces": {"matchLabels": {"team": "a"}},
            "consumers": [{"namespace": team_a, "name": "first", "weight": 3, "guaranteed": 60}],
        },
    });
    let quotas: Api<llmproxy_api::LlmQuota> = Api::all(client.clone());
    // The owner's guarantees sum to at most 100: the API server refuses more, saying why.
    let mut over = quota.clone();
    over["spec"]["consumers"] = json!([
        {"namespace": team_a, "name": "first", "guaranteed": 60},
        {"namespace": other, "name": "x", "guaranteed": 50},
    ]);
    let refused = quotas.patch("org", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&over)).await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("guarantees sum to more than 100"), "{message}");
    quotas.patch("org", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&quota)).await.unwrap();
    let op = Operator::start_with(&client, &ops, None, "op-1", false, Some(&ops));
    let in_ns = |ns: &str| Api::<LlmProxy>::namespaced(client.clone(), ns);
    let with_ref = |name: &str, guaranteed: i32| {
        llmproxy(
            name,
            "https://api.openai.com/v1",
            json!({"quotaRef": {"name": "org", "guaranteed": guaranteed}}),
        )
    };
    for ns in [&team_a, &other] {
        secret(&client, ns, "sk-1").await;
    }
    apply(&in_ns(&team_a), &with_ref("first", 100)).await;
    apply(&in_ns(&other), &with_ref("outsider", 0)).await;
    apply(&in_ns(&team_a), &with_ref("greedy", 50)).await;

    // Allowed: granted in its status, with the password's namespace and the owner's share
    // (asking for all of it gets what the owner set).
    let granted = |name: &'static str| {
        let api = in_ns(&team_a);
        async move {
            eventually("the quota granted", WAIT, || async {
                let p = api.get(name).await.ok()?;
                p.status.as_ref()?.quota.clone()
            })
            .await
        }
    };
    let first = granted("first").await;
    assert_eq!((first.name.as_str(), first.requests_per_minute), ("org", 6000));
    assert_eq!(first.password_namespace.as_deref(), Some(ops.as_str()));
    assert_eq!((first.weight, first.guaranteed), (3, Some(60)));
    // A consumer the owner did not list: allowed, with the default share and no guarantee,
    // whatever it asks for.
    let greedy = granted("greedy").await;
    assert_eq!((greedy.weight, greedy.guaranteed), (1, None));
    // Another namespace: refused, and said why.
    let outsider = condition(&in_ns(&other), "outsider", "Degraded", "True", "QuotaNotAllowed").await;
    let message = llmproxy_operator::condition_status(outsider.status.as_ref(), "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("allowedNamespaces"), "{message}");
    assert!(outsider.status.as_ref().is_some_and(|s| s.quota.is_none()), "nothing granted");

    // The LlmQuota lists its consumers; only the allowed one may read the password.
    let q = eventually("the consumers listed", WAIT, || async {
        let q = quotas.get("org").await.ok()?;
        (q.status.as_ref()?.consumers.len() == 3).then_some(q)
    })
    .await;
    let s = q.status.unwrap_or_default();
    assert_eq!(s.consumer_count, Some(2));
    let allowed: Vec<(&str, bool)> = s.consumers.iter().map(|c| (c.name.as_str(), c.allowed)).collect();
    assert!(
        allowed.contains(&("first", true))
            && allowed.contains(&("outsider", false))
            && allowed.contains(&("greedy", true)),
        "{allowed:?}"
    );
    // Each allowed consumer has its own Redis user, its password in a Secret of its own in the
    // operator's namespace; the grant names those, never the quota's own password.
    assert_eq!(first.username, Some(consumer_user("org", &format!("{team_a}/first"))));
    let own = consumer_secret("org", &team_a, "first");
    assert_eq!(first.redis.password_secret_ref.as_ref().map(|r| r.name.as_str()), Some(own.as_str()));
    let secrets = Api::<Secret>::namespaced(client.clone(), &ops);
    let password_of = |name: String| {
        let secrets = secrets.clone();
        async move {
            eventually("a consumer's password Secret", WAIT, || async {
                let s = secrets.get_opt(&name).await.ok()??;
                String::from_utf8(s.data?.get("password")?.0.clone()).ok()
            })
            .await
        }
    };
    let first_password = password_of(own.clone()).await;
    let greedy_secret = consumer_secret("org", &team_a, "greedy");
    let greedy_password = password_of(greedy_secret.clone()).await;
    assert_ne!(first_password, greedy_password);
    let mut admin_conn = redis_as(&redis, "default", "admin-pass").await;
    let users = |conn: redis::aio::MultiplexedConnection| async move {
        let mut conn = conn;
        redis::cmd("ACL").arg("USERS").query_async::<Vec<String>>(&mut conn).await.unwrap_or_default()
    };
    let (first_user, greedy_user) =
        (consumer_user("org", &format!("{team_a}/first")), consumer_user("org", &format!("{team_a}/greedy")));
    eventually("both consumers' Redis users", WAIT, || async {
        let u = users(admin_conn.clone()).await;
        (u.contains(&first_user) && u.contains(&greedy_user)).then_some(())
    })
    .await;
    // The owner's shares, where every consumer reads them.
    let shares: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(shares_key("org")).query_async(&mut admin_conn).await.unwrap();
    assert_eq!(shares.get(&format!("{team_a}/first")).map(String::as_str), Some("3,60"), "{shares:?}");
    assert_eq!(shares.get(&format!("{team_a}/greedy")).map(String::as_str), Some("1,0"), "{shares:?}");
    // With its credential, first writes its own entries and nobody else's, nor the shares.
    let mut as_first = redis_as(&redis, &first_user, &first_password).await;
    let own_key = format!("llmproxy:q:org:f:{team_a}/first:total:r");
    let greedy_key = format!("llmproxy:q:org:f:{team_a}/greedy:total:r");
    let hset = |key: String| redis::cmd("HSET").arg(key).arg("l").arg("1").clone();
    assert!(hset(own_key).query_async::<i64>(&mut as_first).await.is_ok());
    let denied = hset(greedy_key).query_async::<i64>(&mut as_first).await;
    let refused = |e: &redis::RedisError| e.to_string().to_ascii_lowercase().contains("noperm");
    assert!(denied.as_ref().is_err_and(refused), "another consumer's entry: {denied:?}");
    let denied = hset(shares_key("org")).query_async::<i64>(&mut as_first).await;
    assert!(denied.as_ref().is_err_and(refused), "the owner's shares: {denied:?}");

    // As the allowed proxy's ServiceAccount (RBAC enforced): its own password, not the
    // quota's, not another consumer's, nothing else.
    let other_secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other"}, "stringData": {"x": "v"}});
    secrets.patch("other", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&other_secret)).await.unwrap();
    let as_proxy = env.service_account_client(&team_a, "first-proxy").await;
    let proxy_secrets = Api::<Secret>::namespaced(as_proxy, &ops);
    let forbidden = |r: Result<Secret, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    eventually("its own password readable", WAIT, || async { proxy_secrets.get(&own).await.ok() }).await;
    for name in ["redis-auth", "other", greedy_secret.as_str()] {
        assert!(forbidden(proxy_secrets.get(name).await), "{name} is readable by the first consumer");
    }
    let as_outsider = env.service_account_client(&other, "outsider-proxy").await;
    let outsider_secrets = Api::<Secret>::namespaced(as_outsider, &ops);
    for name in ["redis-auth", own.as_str()] {
        assert!(forbidden(outsider_secrets.get(name).await), "a refused consumer reads {name}");
    }

    // Revoked: team-a's namespace no longer allowed. The users are gone from Redis (the
    // credential no longer logs in) and the Secrets from the cluster.
    let mut narrowed = quota.clone();
    narrowed["spec"]["allowedNamespaces"] = json!({"matchLabels": {"team": "nobody"}});
    narrowed["spec"]["consumers"] = json!([]);
    quotas.patch("org", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&narrowed)).await.unwrap();
    eventually("the consumers' Redis users removed", WAIT, || async {
        let u = users(admin_conn.clone()).await;
        (!u.contains(&first_user) && !u.contains(&greedy_user)).then_some(())
    })
    .await;
    eventually("the consumers' Secrets removed", WAIT, || async {
        (secrets.get_opt(&own).await.ok()?.is_none() && secrets.get_opt(&greedy_secret).await.ok()?.is_none())
            .then_some(())
    })
    .await;
    let client_as = |user: &str, password: &str| {
        use redis::IntoConnectionInfo;
        let info = redis.url().into_connection_info().unwrap();
        let settings = info.redis_settings().clone().set_username(user).set_password(password);
        redis::Client::open(info.set_redis_settings(settings)).unwrap()
    };
    let revoked = client_as(&first_user, &first_password).get_multiplexed_async_connection().await;
    assert!(revoked.is_err(), "a revoked consumer still logs in to the quota's Redis");
    op.stop().await;
}

/// A connection to `redis` as `user` (an ACL user) with `password`.
async fn redis_as(
    redis: &crate::support::redis::RedisServer,
    user: &str,
    password: &str,
) -> redis::aio::MultiplexedConnection {
    use redis::IntoConnectionInfo;
    let info = redis.url().into_connection_info().unwrap_or_else(|e| panic!("{e}"));
    let settings = info.redis_settings().clone().set_username(user).set_password(password);
    let client = redis::Client::open(info.set_redis_settings(settings)).unwrap_or_else(|e| panic!("{e}"));
    client.get_multiplexed_async_connection().await.unwrap_or_else(|e| panic!("{user}: {e}"))
}

/// An EndpointSlice of the Service `service` with one ready pod at 127.0.0.1 whose metrics
/// port is `admin` (the test API server runs no controllers; a real one would write it).
async fn pod_slice(client: &Client, ns: &str, service: &str, name: &str, admin: u16) {
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "metrics", "port": admin, "protocol": "TCP"}],
    });
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&slice))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_bottlenecks_reach_the_status_from_two_pods() {
    let (_env, client, ns, api) = setup("usage").await;
    let upstream = mock(MockConfig::default()).await;
    // 10 requests per second for the LlmProxy; each of the two pods enforces its half.
    let spec = json!({
        "upstream": {"url": upstream.url()},
        "limits": {"requestsPerMinute": 600, "maxConcurrent": 50},
        "queue": {"maxSize": 1000, "maxWait": "60s"},
        "replicas": 2,
    });
    let manifest = json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "metadata": {"name": "team"}, "spec": spec});
    let mut half = manifest.clone();
    half["spec"]["limits"]["requestsPerMinute"] = json!(300);
    let yaml = serde_yaml::to_string(&half).unwrap();
    let pods = [TestProxy::start(&yaml, None).await, TestProxy::start(&yaml, None).await];
    let op = Operator::start(&client, &ns, "op-1", false);
    apply(&api, &manifest).await;
    wait_for(&Api::<Service>::namespaced(client.clone(), &ns), "team").await;
    for (i, p) in pods.iter().enumerate() {
        pod_slice(&client, &ns, "team", &format!("team-pod-{i}"), p.admin.port()).await;
    }
    // 60 requests at once, 30 to each pod: 5 go at once on each, the rest wait on the quota
    // with slots free.
    let http = load::client();
    let load = {
        let urls: Vec<String> = pods.iter().map(|p| p.url("/chat/completions")).collect();
        tokio::spawn(async move {
            join_all((0..60).map(|i| {
                let (http, url) = (http.clone(), urls[i % 2].clone());
                async move { load::shoot(&http, &url, None, &load::chat_body(i)).await.status }
            }))
            .await
        })
    };
    let bound = condition(&api, "team", "QuotaBound", "True", "WaitingForUpstreamQuota").await;
    let usage = bound.status.and_then(|s| s.usage).unwrap_or_default();
    assert!(usage.queue_depth > 0, "{usage:?}");
    assert_eq!(
        llmproxy_operator::condition_status(
            api.get("team").await.ok().as_ref().and_then(|p| p.status.as_ref()),
            "Saturated"
        )
        .map(|c| c.status.clone()),
        Some("False".into())
    );
    let statuses = load.await.unwrap_or_default();
    assert!(statuses.iter().all(|s| *s == Some(200)));
    // Load over: the queue empties, and the minute's count is what the upstream counted.
    let counted = upstream.mock.stats().ok as i64;
    let p = eventually("usage after the load", WAIT, || async {
        let p = api.get("team").await.ok()?;
        let u = p.status.as_ref()?.usage.clone()?;
        (u.queue_depth == 0 && u.requests_last_minute == counted).then_some(p)
    })
    .await;
    let u = p.status.clone().and_then(|s| s.usage).unwrap_or_default();
    assert_eq!(u.utilization_percent, 10, "60 of 600 per minute");
    assert!(u.queue_wait_p99_seconds > 1.0, "{u:?}");
    assert_eq!(
        llmproxy_operator::condition_status(p.status.as_ref(), "QuotaBound").map(|c| c.status.clone()),
        Some("False".into())
    );

    // All slots taken, requests waiting: Saturated.
    upstream.mock.hold();
    let mut tight = half.clone();
    tight["spec"]["limits"] = json!({"requestsPerMinute": 100000, "maxConcurrent": 1});
    pods[0].proxy.apply_policy(
        llmproxy_api::Policy::from_spec(&serde_json::from_value(tight["spec"].clone()).unwrap()).unwrap(),
    );
    let url = pods[0].url("/chat/completions");
    let held: Vec<_> = (0..3)
        .map(|i| {
            let (http, url) = (load::client(), url.clone());
            tokio::spawn(
                async move { load::shoot(&http, &url, None, &load::chat_body(100 + i)).await.status },
            )
        })
        .collect();
    condition(&api, "team", "Saturated", "True", "ConcurrencyExhausted").await;
    upstream.mock.release();
    for h in held {
        assert_eq!(h.await.ok().flatten(), Some(200));
    }
    // One LlmProxy: at most one status write per pass, however busy.
    let m = op.metrics.render();
    let (writes, passes) = (
        metric(&m, "llmproxy_operator_observed_status_writes_total"),
        metric(&m, "llmproxy_operator_observe_passes_total"),
    );
    assert!(writes >= 3.0 && writes <= passes + 1.0, "{writes} writes in {passes} passes");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_scales_on_saturation_where_asked_and_the_adapter_rules_render() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::DynamicObject;
    let (_env, client, ns, api) = setup("keda").await;
    // KEDA does not run here: its ScaledObject CRD, as little of it as the API server needs.
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "scaledobjects.keda.sh"},
        "spec": {"group": "keda.sh", "scope": "Namespaced",
                 "names": {"plural": "scaledobjects", "singular": "scaledobject", "kind": "ScaledObject"},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch("scaledobjects.keda.sh", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
        .await
        .unwrap();
    let scaled: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &llmproxy_operator::scaled_object_resource());
    eventually("the ScaledObject type served", WAIT, || async {
        scaled.list(&Default::default()).await.ok()
    })
    .await;
    secret(&client, &ns, "sk-1").await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let keda = json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 8,
        "keda": {"prometheusAddress": "http://prometheus.monitoring.svc:9090", "targetSaturation": 75}}});
    apply(&api, &llmproxy("scaled", "https://api.openai.com/v1", keda)).await;
    let so = wait_for(&scaled, "scaled").await;
    let spec = &so.data["spec"];
    assert_eq!(spec["scaleTargetRef"]["name"], "scaled");
    assert_eq!((spec["minReplicaCount"].as_i64(), spec["maxReplicaCount"].as_i64()), (Some(2), Some(8)));
    let trigger = &spec["triggers"][0];
    assert_eq!(trigger["type"], "prometheus");
    assert_eq!(trigger["metadata"]["threshold"], "0.75");
    assert_eq!(
        trigger["metadata"]["query"],
        format!("sum(llmproxy_saturation{{namespace=\"{ns}\",service=\"scaled\"}})")
    );
    assert_eq!(so.metadata.owner_references.unwrap_or_default()[0].kind, "LlmProxy");
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    assert!(hpas.get_opt("scaled").await.ok().flatten().is_none(), "KEDA instead of an HPA");

    // Back to an HPA on the saturation pods metric: the ScaledObject goes.
    let hpa = json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 8, "targetSaturation": 80}});
    apply(&api, &llmproxy("scaled", "https://api.openai.com/v1", hpa)).await;
    let h = wait_for(&hpas, "scaled").await;
    let metric = h.spec.and_then(|s| s.metrics).unwrap_or_default();
    let pods = metric[0].pods.clone().expect("a pods metric");
    assert_eq!(
        (pods.metric.name.as_str(), pods.target.average_value.map(|q| q.0)),
        ("llmproxy_saturation", Some("800m".into()))
    );
    eventually("the ScaledObject removed", WAIT, || async {
        scaled.get_opt("scaled").await.ok().flatten().is_none().then_some(())
    })
    .await;

    // The adapter rules the HPA needs, as the chart renders them.
    let chart = crate::support::repo_path("charts/llmproxy").display().to_string();
    let out = crate::support::helm::ok(&[
        "template",
        "x",
        &chart,
        "--set",
        "prometheusAdapter.enabled=true",
        "--show-only",
        "templates/prometheus-adapter-rules.yaml",
    ]);
    let cm: Value = serde_yaml::from_str(&out).unwrap();
    let rules: Value =
        serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap_or_default()).unwrap_or_default();
    let names: Vec<&str> =
        rules["rules"].as_array().into_iter().flatten().filter_map(|r| r["name"]["as"].as_str()).collect();
    assert_eq!(names, ["llmproxy_saturation", "llmproxy_queue_depth"]);
}

/// One chat request with a client key (`None`: none); status and body.
async fn chat_as(http: &reqwest::Client, url: &str, key: Option<&str>) -> (u16, String) {
    let mut req =
        http.post(url).header("content-type", "application/json").body(load::chat_body(1).to_string());
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    match req.send().await {
        Ok(resp) => (resp.status().as_u16(), resp.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_proxy_revokes_removed_and_deleted_client_keys() {
    let (env, client, ns, api) = setup("revoke").await;
    let upstream = mock(MockConfig { api_key: Some("sk-up".into()), ..MockConfig::default() }).await;
    secret(&client, &ns, "sk-up").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let keys = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "team-keys", "labels": {llmproxy_api::CLIENT_KEYS_LABEL: "true"}},
        "stringData": {"web": "sk-web", "etl": "sk-etl"}});
    secrets.patch("team-keys", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&keys)).await.unwrap();
    let clients = json!({"clients": {"keysSecretRef": {"name": "team-keys"}}});
    apply(&api, &llmproxy("p", &upstream.url(), clients)).await;
    let kubeconfig = env.kubeconfig().display().to_string();
    let proxy = crate::support::proxy_env::ProxyProcess::start_with_args(
        &["proxy", "--resource", &format!("{ns}/p")],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .await;
    let (http, url) = (load::client(), proxy.url("/chat/completions"));
    for key in ["sk-web", "sk-etl"] {
        assert_eq!(chat_as(&http, &url, Some(key)).await.0, 200, "{key}");
    }

    // etl removed and, in the same edit, an entry that cannot be used: the removal holds.
    let bad = ByteString(b"sha256:not-hex".to_vec());
    let edit = json!({"data": {"etl": null, "ops": bad}});
    secrets.patch("team-keys", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    eventually("etl's key to be revoked", WAIT, || {
        let (http, url) = (http.clone(), url.clone());
        async move { (chat_as(&http, &url, Some("sk-etl")).await.0 == 401).then_some(()) }
    })
    .await;
    assert_eq!(chat_as(&http, &url, Some("sk-web")).await.0, 200, "the valid entry stays in force");

    // The Secret deleted: its keys go with it.
    secrets.delete("team-keys", &Default::default()).await.unwrap();
    eventually("every key to be revoked", WAIT, || {
        let (http, url) = (http.clone(), url.clone());
        async move { (chat_as(&http, &url, Some("sk-web")).await.0 == 401).then_some(()) }
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.contains(r#"client \"ops\""#), "the refused entry is named: {logs}");
    for key in ["sk-web", "sk-etl", "sk-up", "not-hex"] {
        assert!(!logs.contains(key), "a key leaked into the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_quota_grant_stops_admission_until_it_is_granted_again() {
    use k8s_openapi::api::core::v1::Namespace;
    let (env, client, ops, _) = setup("withdraw-ops").await;
    let ns = env.namespace(&client, "team").await;
    let label =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"team": "a"}}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&label))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The quota's Redis asks for a password: the proxy logs in as its own consumer user.
    let redis = crate::support::redis::RedisServer::start(Some("admin-pass")).await;
    let admin = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-auth"}, "stringData": {"password": "admin-pass"}});
    Api::<Secret>::namespaced(client.clone(), &ops)
        .patch("redis-auth", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&admin))
        .await
        .unwrap();
    let quota = |team: &str| {
        json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmQuota", "metadata": {"name": "org"},
               "spec": {"requestsPerMinute": 6000,
                        "sharedState": {"redis": {"url": redis.url(), "passwordSecretRef": {"name": "redis-auth"}}},
                        "allowedNamespaces": {"matchLabels": {"team": team}}}})
    };
    let quotas: Api<llmproxy_api::LlmQuota> = Api::all(client.clone());
    let set_quota = |team: &'static str| {
        let (quotas, q) = (quotas.clone(), quota(team));
        async move {
            quotas.patch("org", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&q)).await.unwrap();
        }
    };
    set_quota("a").await;
    let _op = Operator::start_with(&client, &ops, None, "op-1", false, Some(&ops));
    let upstream = mock(MockConfig { api_key: Some("sk-up".into()), ..MockConfig::default() }).await;
    secret(&client, &ns, "sk-up").await;
    let api = Api::<LlmProxy>::namespaced(client.clone(), &ns);
    apply(&api, &llmproxy("p", &upstream.url(), json!({"quotaRef": {"name": "org"}}))).await;
    let granted = || {
        let api = api.clone();
        async move { api.get("p").await.ok()?.status?.quota.map(|_| ()) }
    };
    eventually("the quota granted", WAIT, granted).await;
    let kubeconfig = env.kubeconfig().display().to_string();
    let proxy = crate::support::proxy_env::ProxyProcess::start_with_args(
        &["proxy", "--resource", &format!("{ns}/p")],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .await;
    let (http, url) = (load::client(), proxy.url("/chat/completions"));
    assert_eq!(chat_as(&http, &url, None).await.0, 200);
    // It shares through the quota's Redis as itself, its buckets under its own keys.
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    eventually("the proxy sharing through the quota's Redis", WAIT, || async {
        let m = get_text(&metrics_url).await;
        (metric(&m, "llmproxy_quota_mode{mode=\"shared\"}") == 1.0).then_some(())
    })
    .await;
    let mut admin_conn = redis_as(&redis, "default", "admin-pass").await;
    let own: Vec<String> = redis::cmd("KEYS")
        .arg(format!("llmproxy:q:org:f:{ns}/p:*"))
        .query_async(&mut admin_conn)
        .await
        .unwrap();
    assert!(!own.is_empty(), "no buckets under the consumer's own keys");
    let logs = proxy.logs();
    assert!(!logs.contains("admin-pass"), "the quota's password in the proxy's logs");

    // The quota's owner no longer allows the namespace: the grant goes, and so does admission.
    set_quota("b").await;
    let (status, body) = eventually("admission to stop", WAIT, || {
        let (http, url) = (http.clone(), url.clone());
        async move { Some(chat_as(&http, &url, None).await).filter(|(s, _)| *s != 200) }
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(body["error"]["code"], "quota_not_granted", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("LlmQuota \"org\" is not granted"), "{message}");
    let before = upstream.mock.seen().len();
    assert_eq!(chat_as(&http, &url, None).await.0, 503);
    assert_eq!(upstream.mock.seen().len(), before, "nothing reaches the upstream while withdrawn");

    // Granted again: served again, by the same process.
    let pid = proxy.pid();
    set_quota("a").await;
    eventually("admission to resume", WAIT, || {
        let (http, url) = (http.clone(), url.clone());
        async move { (chat_as(&http, &url, None).await.0 == 200).then_some(()) }
    })
    .await;
    assert_eq!(proxy.pid(), pid);
}
