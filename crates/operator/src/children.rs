//! Pure builders: an LlmProxy in, the objects that run it out. No client, no I/O; unit-tested
//! from inline YAML. The policy itself never enters the pod template: the proxies read it from
//! the LlmProxy through the API, so a change of limits reloads them in place instead of rolling
//! the Deployment.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricIdentifier,
    MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use llmproxy_api::LlmProxy;

/// Port of the OpenAI-compatible API in the proxy pods and the Service.
pub(crate) const API_PORT: i32 = 8080;
/// Port of `/metrics`, `/livez`, `/readyz`.
pub(crate) const ADMIN_PORT: i32 = 9090;
/// UID and GID the proxy runs as (the distroless "nonroot" user).
pub(crate) const PROXY_UID: i64 = 65532;

/// Operator settings that shape the children.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The proxy container image (the same `llmproxy` image as the operator).
    pub image: String,
    /// `imagePullPolicy`, if set.
    pub image_pull_policy: Option<String>,
    /// The namespace whose pods may scrape the proxies' metrics port when a NetworkPolicy
    /// guards them (`spec.clients.allowFrom`); `None`: nobody.
    pub metrics_namespace: Option<String>,
    /// The operator's own namespace: it reads the pods' reports on the metrics port, so a
    /// NetworkPolicy lets it in there too; `None`: only `metrics_namespace`.
    pub operator_namespace: Option<String>,
}

/// Everything one LlmProxy runs on.
#[derive(Clone, Debug)]
pub(crate) struct Children {
    /// The proxy pods' identity.
    pub service_account: ServiceAccount,
    /// Read access to this LlmProxy and its Secret, nothing else.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
    /// The proxy pods.
    pub deployment: Deployment,
    /// The stable address clients use.
    pub service: Service,
    /// Present when more than one pod runs.
    pub pdb: Option<PodDisruptionBudget>,
    /// Present when `spec.autoscaling` is set.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// With `spec.autoscaling.keda`: a KEDA ScaledObject instead of the HPA.
    pub scaled_object: Option<kube::api::DynamicObject>,
    /// Always: the metrics port tells client names and usage, so only the monitoring and the
    /// operator's namespaces reach it; the API port admits `spec.clients.allowFrom` (or all).
    pub network_policy: NetworkPolicy,
}

/// Labels on every child and pod.
pub(crate) fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector(name);
    l.insert("app.kubernetes.io/component".into(), "proxy".into());
    l.insert("app.kubernetes.io/managed-by".into(), "llmproxy-operator".into());
    l
}

/// The pod selector of one LlmProxy's proxies.
pub(crate) fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "llmproxy".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
    ])
}

/// Name of the ServiceAccount, Role and RoleBinding.
pub(crate) fn proxy_identity(name: &str) -> String {
    format!("{name}-proxy")
}

/// The URL clients use, through the Service.
pub(crate) fn endpoint(p: &LlmProxy) -> String {
    format!("http://{}.{}.svc:{API_PORT}/v1", p.name_any(), p.namespace().unwrap_or_default())
}

fn meta(p: &LlmProxy, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: p.namespace(),
        labels: Some(labels(&p.name_any())),
        owner_references: p.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// Pods wanted: the fixed count, or the autoscaler's floor.
pub(crate) fn desired_replicas(p: &LlmProxy) -> i32 {
    llmproxy_api::policy::replicas::desired(&p.spec)
}

/// What the checks before building found the proxies may be given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Grants {
    /// Secrets (names) the proxies may read: only those that opted in.
    pub secrets: Vec<String>,
}

/// Build every child of `p`.
pub(crate) fn build(p: &LlmProxy, settings: &Settings, grants: &Grants) -> Children {
    Children {
        service_account: ServiceAccount {
            metadata: meta(p, proxy_identity(&p.name_any())),
            automount_service_account_token: Some(true),
            ..ServiceAccount::default()
        },
        role: role(p, grants),
        role_binding: role_binding(p),
        deployment: deployment(p, settings),
        service: service(p),
        pdb: (desired_replicas(p) > 1).then(|| pdb(p)),
        hpa: p.spec.autoscaling.as_ref().filter(|a| a.keda.is_none()).map(|a| hpa(p, a)),
        scaled_object: p.spec.autoscaling.as_ref().and_then(|a| scaled_object(p, a)),
        network_policy: network_policy(
            p,
            p.spec.clients.as_ref().and_then(|c| c.allow_from.as_deref()),
            settings,
        ),
    }
}

/// Read access to this LlmProxy, and to the Secrets in `grants` (only those that opted in).
fn role(p: &LlmProxy, grants: &Grants) -> Role {
    let read = || Some(vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()]);
    let mut rules = vec![PolicyRule {
        api_groups: Some(vec![llmproxy_api::GROUP.to_owned()]),
        resources: Some(vec!["llmproxies".to_owned()]),
        resource_names: Some(vec![p.name_any()]),
        verbs: read().unwrap_or_default(),
        ..PolicyRule::default()
    }];
    if !grants.secrets.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_owned()]),
            resource_names: Some(grants.secrets.clone()),
            verbs: read().unwrap_or_default(),
            ..PolicyRule::default()
        });
    }
    Role { metadata: meta(p, proxy_identity(&p.name_any())), rules: Some(rules) }
}

fn role_binding(p: &LlmProxy) -> RoleBinding {
    let name = proxy_identity(&p.name_any());
    RoleBinding {
        metadata: meta(p, name.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: p.namespace(),
            ..Subject::default()
        }]),
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(2),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The proxy's drain delay after SIGTERM (its `--drain-delay` default).
const DRAIN_DELAY_SECONDS: i64 = 5;

/// Long enough for a terminating pod to drain, then finish what it holds: a request that just
/// arrived may wait `queue.maxWait` for admission and then `upstream.timeout` for its answer
/// to start (a stream that keeps flowing is cut at the end of this period).
pub(crate) fn grace_period_seconds(p: &LlmProxy) -> i64 {
    let secs = |d: &llmproxy_api::Duration| i64::try_from(d.get().as_secs()).unwrap_or(i64::MAX);
    DRAIN_DELAY_SECONDS
        .saturating_add(secs(&p.spec.queue.max_wait))
        .saturating_add(p.spec.endpoints().iter().map(|(_, _, u)| secs(&u.timeout)).max().unwrap_or(3600))
        .saturating_add(5)
}

fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".into(), q("100m")), ("memory".into(), q("64Mi"))])),
        limits: Some(BTreeMap::from([("memory".into(), q("256Mi"))])),
        ..ResourceRequirements::default()
    }
}

fn deployment(p: &LlmProxy, settings: &Settings) -> Deployment {
    let name = p.name_any();
    let template = pod_template(p, &name, proxy_container(p, settings, &name));
    Deployment {
        metadata: meta(p, name.clone()),
        spec: Some(DeploymentSpec {
            // With an autoscaler, the HPA owns the count; leaving the field out of the applied
            // object means the operator never fights it.
            replicas: p.spec.autoscaling.is_none().then_some(p.spec.replicas),
            selector: LabelSelector { match_labels: Some(selector(&name)), ..LabelSelector::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The proxy's container: its flags, ports, probes, resources and a locked-down security
/// context.
fn proxy_container(p: &LlmProxy, settings: &Settings, name: &str) -> Container {
    Container {
        name: "proxy".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(
            vec![
                "proxy".into(),
                "--resource".into(),
                format!("{}/{name}", p.namespace().unwrap_or_default()),
                "--listen".into(),
                format!("0.0.0.0:{API_PORT}"),
                "--admin-listen".into(),
                format!("0.0.0.0:{ADMIN_PORT}"),
            ]
            .into_iter()
            .chain(observability_args(p))
            .collect(),
        ),
        ports: Some(vec![
            ContainerPort { name: Some("http".into()), container_port: API_PORT, ..ContainerPort::default() },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: ADMIN_PORT,
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(probe("/livez", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: Some(p.spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// The pod template: the scrape annotations, the proxy's identity, a non-root pod and its
/// one container.
fn pod_template(p: &LlmProxy, name: &str, container: Container) -> PodTemplateSpec {
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), ADMIN_PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(name)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(proxy_identity(name)),
            automount_service_account_token: Some(true),
            termination_grace_period_seconds: Some(grace_period_seconds(p)),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(PROXY_UID),
                run_as_group: Some(PROXY_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            ..PodSpec::default()
        }),
    }
}

/// The proxy's process flags from `spec.observability` (JSON logs by default in a cluster).
fn observability_args(p: &LlmProxy) -> Vec<String> {
    let o = p.spec.observability.clone().unwrap_or_default();
    let format = match o.log_format {
        Some(llmproxy_api::crd::LogFormatSpec::Text) => "text",
        _ => "json",
    };
    let mut args = vec!["--log-format".to_owned(), format.to_owned()];
    if let Some(percent) = o.request_records {
        args.extend(["--request-records".to_owned(), percent.clamp(0, 100).to_string()]);
    }
    if let Some(header) = o.client_id_header {
        args.extend(["--client-id-header".to_owned(), header]);
    }
    args
}

fn service(p: &LlmProxy) -> Service {
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: meta(p, p.name_any()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector(&p.name_any())),
            ports: Some(vec![port("http", API_PORT), port("metrics", ADMIN_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Only `peers` (`None`: anyone) reach the API port, only the monitoring namespace and the
/// operator's the metrics port, whose `/metrics` and `/status` name clients and their usage.
fn network_policy(p: &LlmProxy, peers: Option<&[NetworkPolicyPeer]>, settings: &Settings) -> NetworkPolicy {
    let port = |name: &str| NetworkPolicyPort {
        port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    // A rule without `from` admits every source.
    let mut ingress =
        vec![NetworkPolicyIngressRule { from: peers.map(<[_]>::to_vec), ports: Some(vec![port("http")]) }];
    let mut readers: Vec<&String> =
        settings.metrics_namespace.iter().chain(&settings.operator_namespace).collect();
    readers.dedup();
    let from: Vec<NetworkPolicyPeer> = readers
        .into_iter()
        .map(|ns| NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), ns.clone())])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        })
        .collect();
    if !from.is_empty() {
        ingress.push(NetworkPolicyIngressRule { from: Some(from), ports: Some(vec![port("metrics")]) });
    }
    NetworkPolicy {
        metadata: meta(p, p.name_any()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(&p.name_any())),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn pdb(p: &LlmProxy) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(p, p.name_any()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(&p.name_any())),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// KEDA's ScaledObject type.
pub fn scaled_object_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: "ScaledObject".into(),
        plural: "scaledobjects".into(),
    }
}

/// A ScaledObject scaling the Deployment on the pods' saturation: desired pods = the sum of
/// their saturation over the target (KEDA's AverageValue).
fn scaled_object(p: &LlmProxy, a: &llmproxy_api::AutoscalingSpec) -> Option<kube::api::DynamicObject> {
    let keda = a.keda.as_ref()?;
    let name = p.name_any();
    let ns = p.namespace().unwrap_or_default();
    let mut obj = kube::api::DynamicObject::new(&name, &scaled_object_resource()).within(&ns);
    obj.metadata = meta(p, name.clone());
    obj.data = serde_json::json!({
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": keda.prometheus_address,
                    "query": format!("sum(llmproxy_saturation{{namespace=\"{ns}\",service=\"{name}\"}})"),
                    "threshold": format!("{}", f64::from(keda.target_saturation) / 100.0),
                },
            }],
        },
    });
    Some(obj)
}

fn hpa(p: &LlmProxy, a: &llmproxy_api::AutoscalingSpec) -> HorizontalPodAutoscaler {
    let mut metrics = Vec::new();
    let others = a.target_queue_depth.is_some() || a.target_saturation.is_some();
    let cpu = a.target_cpu_utilization.or(if others { None } else { Some(70) });
    if let Some(percent) = a.target_saturation {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "llmproxy_saturation".into(),
                    ..MetricIdentifier::default()
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(format!("{}m", i64::from(percent) * 10))),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    if let Some(cpu) = cpu {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(cpu),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    if let Some(depth) = a.target_queue_depth {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "llmproxy_queue_depth".into(),
                    ..MetricIdentifier::default()
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(depth.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    HorizontalPodAutoscaler {
        metadata: meta(p, p.name_any()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: p.name_any(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(yaml: &str) -> LlmProxy {
        serde_yaml::from_str(yaml).unwrap()
    }

    const BASE: &str = "
apiVersion: llmproxy.io/v1alpha1
kind: LlmProxy
metadata: {name: openai, namespace: team-a, uid: 1234-abcd}
spec:
  upstream:
    url: https://api.openai.com/v1
    apiKeySecretRef: {name: openai-key}
  limits: {requestsPerMinute: 3500, tokensPerMinute: 90000}
";

    fn granted() -> Grants {
        Grants { secrets: vec!["openai-key".to_owned()] }
    }

    fn settings() -> Settings {
        Settings {
            image: "llmproxy:test".into(),
            image_pull_policy: None,
            metrics_namespace: Some("monitoring".into()),
            operator_namespace: Some("llmproxy-system".into()),
        }
    }

    #[test]
    fn every_child_is_owned_and_labelled() {
        let p = proxy(BASE);
        let c = build(&p, &settings(), &granted());
        let metas = [
            &c.service_account.metadata,
            &c.role.metadata,
            &c.role_binding.metadata,
            &c.deployment.metadata,
            &c.service.metadata,
        ];
        for m in metas {
            let owner = m
                .owner_references
                .as_ref()
                .and_then(|o| o.first())
                .unwrap_or_else(|| panic!("no owner: {m:?}"));
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("LlmProxy", "openai", "1234-abcd")
            );
            assert_eq!(owner.controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("team-a"));
            assert_eq!(
                m.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/instance")).map(String::as_str),
                Some("openai")
            );
        }
        assert!(c.pdb.is_none() && c.hpa.is_none(), "one replica, no autoscaling");
        assert_eq!(endpoint(&p), "http://openai.team-a.svc:8080/v1");
    }

    #[test]
    fn the_role_reads_only_its_own_llmproxy_and_secret() {
        let role = build(&proxy(BASE), &settings(), &granted()).role;
        let rules = role.rules.unwrap_or_default();
        assert_eq!(rules.len(), 2);
        for r in &rules {
            assert_eq!(r.verbs, ["get", "list", "watch"]);
        }
        assert_eq!(rules[0].resources.as_deref(), Some(&["llmproxies".to_owned()][..]));
        assert_eq!(rules[0].resource_names.as_deref(), Some(&["openai".to_owned()][..]));
        assert_eq!(rules[1].resources.as_deref(), Some(&["secrets".to_owned()][..]));
        assert_eq!(rules[1].resource_names.as_deref(), Some(&["openai-key".to_owned()][..]));
        let not_granted = build(&proxy(BASE), &settings(), &Grants::default());
        assert_eq!(
            not_granted.role.rules.map(|r| r.len()),
            Some(1),
            "a Secret that did not opt in is not readable"
        );
    }

    #[test]
    fn the_pod_is_locked_down_and_probed_and_carries_no_policy() {
        let d = build(&proxy(BASE), &settings(), &granted()).deployment;
        let pod = d.spec.and_then(|s| s.template.spec).unwrap_or_default();
        assert_eq!(pod.service_account_name.as_deref(), Some("openai-proxy"));
        assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().map(|a| a.join(" ")).as_deref(),
            Some(
                "proxy --resource team-a/openai --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090 --log-format json"
            )
        );
        let yaml = format!(
            "{BASE}  observability: {{requestRecords: 10, clientIdHeader: x-team, logFormat: text}}\n"
        );
        let d = build(&proxy(&yaml), &settings(), &granted()).deployment;
        let args = d
            .spec
            .and_then(|s| s.template.spec)
            .map(|p| p.containers[0].args.clone().unwrap_or_default().join(" "));
        assert!(
            args.as_deref().is_some_and(
                |a| a.ends_with("--log-format text --request-records 10 --client-id-header x-team")
            ),
            "{args:?}"
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(5 + 30 + 600 + 5), "drain + maxWait + timeout");
        let sc = c.security_context.clone().unwrap_or_default();
        assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
        let path =
            |p: &Option<Probe>| p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|g| g.path.clone());
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/livez"));
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
        assert!(
            c.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some_and(|r| r.contains_key("cpu"))
        );
        let text = serde_json::to_string(&pod).unwrap_or_default();
        assert!(
            !text.contains("3500") && !text.contains("api.openai.com"),
            "policy leaked into the pod template"
        );
    }

    #[test]
    fn limits_do_not_touch_the_deployment_but_replicas_do() {
        let d1 = build(&proxy(BASE), &settings(), &granted()).deployment;
        let d2 = build(&proxy(&BASE.replace("3500", "100")), &settings(), &granted()).deployment;
        assert_eq!(d1, d2);
        let d3 = build(&proxy(&format!("{BASE}  replicas: 3\n")), &settings(), &granted());
        assert_eq!(d3.deployment.spec.as_ref().and_then(|s| s.replicas), Some(3));
        assert!(d3.pdb.is_some(), "a PDB once more than one pod runs");
    }

    #[test]
    fn allow_from_builds_a_network_policy_for_the_api_and_metrics_ports() {
        let yaml = format!(
            "{BASE}  clients:\n    allowFrom: [{{namespaceSelector: {{matchLabels: {{team: a}}}}}}]\n"
        );
        let np = build(&proxy(&yaml), &settings(), &granted()).network_policy.spec.unwrap_or_default();
        let selected = np.pod_selector.and_then(|s| s.match_labels).unwrap_or_default();
        assert_eq!(selected.get("app.kubernetes.io/instance").map(String::as_str), Some("openai"));
        let rules = np.ingress.unwrap_or_default();
        assert_eq!(rules.len(), 2);
        let port = |r: &NetworkPolicyIngressRule| r.ports.as_ref().and_then(|p| p[0].port.clone());
        assert_eq!(port(&rules[0]), Some(IntOrString::String("http".into())));
        let team = rules[0]
            .from
            .as_ref()
            .and_then(|f| f[0].namespace_selector.as_ref())
            .and_then(|s| s.match_labels.clone());
        assert_eq!(team, Some(BTreeMap::from([("team".to_owned(), "a".to_owned())])));
        assert_eq!(port(&rules[1]), Some(IntOrString::String("metrics".into())));
        let monitoring = rules[1]
            .from
            .as_ref()
            .and_then(|f| f[0].namespace_selector.as_ref())
            .and_then(|s| s.match_labels.clone());
        assert_eq!(
            monitoring,
            Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "monitoring".to_owned())]))
        );
        let operator = rules[1]
            .from
            .as_ref()
            .and_then(|f| f.get(1))
            .and_then(|p| p.namespace_selector.as_ref())
            .and_then(|s| s.match_labels.clone());
        assert_eq!(
            operator,
            Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "llmproxy-system".to_owned())])),
            "the operator reads the pods' reports there"
        );
    }

    #[test]
    fn without_allow_from_the_metrics_port_still_admits_only_monitoring_and_the_operator() {
        let np = build(&proxy(BASE), &settings(), &granted()).network_policy.spec.unwrap_or_default();
        assert_eq!(np.policy_types, Some(vec!["Ingress".to_owned()]));
        let rules = np.ingress.unwrap_or_default();
        let port = |r: &NetworkPolicyIngressRule| r.ports.as_ref().and_then(|p| p[0].port.clone());
        let ports: Vec<_> = rules.iter().map(port).collect();
        let (http, metrics) = (IntOrString::String("http".into()), IntOrString::String("metrics".into()));
        assert_eq!(ports, [Some(http), Some(metrics)], "no other port is open");
        assert_eq!(rules[0].from, None, "the API port admits anyone");
        let namespaces: Vec<_> = rules[1]
            .from
            .iter()
            .flatten()
            .map(|peer| {
                assert!(peer.pod_selector.is_none() && peer.ip_block.is_none(), "{peer:?}");
                peer.namespace_selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default()
            })
            .collect();
        let ns = |n: &str| BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), n.to_owned())]);
        assert_eq!(namespaces, [ns("monitoring"), ns("llmproxy-system")]);
        // No monitoring namespace configured: only the operator reads it.
        let alone = Settings { metrics_namespace: None, ..settings() };
        let np = build(&proxy(BASE), &alone, &granted()).network_policy.spec.unwrap_or_default();
        let from = np.ingress.unwrap_or_default().get(1).and_then(|r| r.from.clone()).unwrap_or_default();
        assert_eq!(from.len(), 1);
    }

    #[test]
    fn autoscaling_builds_an_hpa_and_leaves_replicas_to_it() {
        let yaml = format!("{BASE}  autoscaling: {{minReplicas: 2, maxReplicas: 6, targetQueueDepth: 20}}\n");
        let c = build(&proxy(&yaml), &settings(), &granted());
        assert_eq!(c.deployment.spec.as_ref().and_then(|s| s.replicas), None);
        let hpa = c.hpa.and_then(|h| h.spec).unwrap_or_default();
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 6));
        let metrics = hpa.metrics.unwrap_or_default();
        assert_eq!(metrics.len(), 1);
        assert_eq!(metrics[0].pods.as_ref().map(|p| p.metric.name.as_str()), Some("llmproxy_queue_depth"));
        assert!(c.pdb.is_some());
    }
}
