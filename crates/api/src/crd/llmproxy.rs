//! The `LlmProxy` custom resource. Field docs become the CRD's schema descriptions.
// clippy reads the repeated `type_ = ...` inside separate `printcolumn(...)`s as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SharedStateSpec;
use super::defaults::*;
use super::llmquota::{GrantedQuota, QuotaRef};
use crate::duration::Duration;

/// The desired LlmProxy: one upstream API, its quota, and how requests over it queue, retry and
/// are cached. The operator turns it into proxy pods that queue clients instead of returning 429s.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmproxy.io",
    version = "v1alpha1",
    kind = "LlmProxy",
    plural = "llmproxies",
    namespaced,
    shortname = "llmp",
    category = "llmproxy",
    status = "LlmProxyStatus",
    doc = "A rate-limited, retrying, caching gateway to one OpenAI-compatible LLM API.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "RPM", type_ = "integer", json_path = ".spec.limits.requestsPerMinute"),
    printcolumn(name = "TPM", type_ = "integer", json_path = ".spec.limits.tokensPerMinute"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Util", type_ = "integer", json_path = ".status.usage.utilizationPercent"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.usage.queueDepth"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.upstream) != has(self.upstreams)",
    "message": "set exactly one of upstream (one endpoint) or upstreams (several)",
}]))]
pub struct LlmProxySpec {
    /// The API the proxy forwards to, and the credentials it uses there. Exactly one of
    /// `upstream` and `upstreams`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,

    /// Several endpoints of the same API (two organisations' keys, Azure deployments in two
    /// regions, a self-hosted fallback). Each request goes to the endpoint, among the healthy
    /// ones that serve its model, that can admit it soonest by its own limits; an endpoint
    /// that answers 429 is paused and the request goes elsewhere at once; one that fails is
    /// taken out for a growing back-off and probed with one request at a time. Exactly one of
    /// `upstream` and `upstreams`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 32),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub upstreams: Option<Vec<EndpointSpec>>,

    /// The quota for this LlmProxy, shared by all its replicas: with one `upstream`, that
    /// upstream's quota; with `upstreams`, the total across them (each endpoint may have its
    /// own `limits` too). The proxy admits requests only as fast as these limits allow and
    /// queues the rest.
    pub limits: LimitsSpec,

    /// How requests over the limits wait for their turn instead of failing.
    #[serde(default)]
    pub queue: QueueSpec,

    /// How transient upstream failures (429, 408, 5xx, connection errors, timeouts) are retried.
    #[serde(default)]
    pub retry: RetrySpec,

    /// Answer identical requests from a short-lived cache instead of spending quota. Absent:
    /// caching is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// Number of proxy pods. The limits above hold for all of them together: without shared
    /// state each pod enforces its share (limits divided by the number of pods).
    /// Ignored when `autoscaling` is set.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Scale the proxy pods with a HorizontalPodAutoscaler instead of a fixed `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// CPU and memory for each proxy container. Absent: requests of 100m CPU and 64Mi memory,
    /// a 256Mi memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Who may use this proxy, and how its quota is shared between them. Absent: anything that
    /// can reach the Service uses the upstream key, as one client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientsSpec>,

    /// Keep the buckets in Redis so that all replicas share the limits exactly (a busy pod may
    /// use what idle ones do not), restarts and scaling never reset them, and upstream 429s
    /// correct them for every pod. Absent: each pod enforces its share (limits / pods), or,
    /// with `quotaRef`, the LlmQuota's Redis is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_state: Option<SharedStateSpec>,

    /// Draw from an organisation-wide `LlmQuota` too: this LlmProxy's `limits` then cap it
    /// within that quota, which all its consumers share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_ref: Option<QuotaRef>,

    /// How the proxy pods log: request records and the log format, as the standalone flags
    /// set them (a change restarts the pods: these are process settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observability: Option<ObservabilitySpec>,
}

/// Logs and request records of the proxy pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservabilitySpec {
    /// Percent of requests that get a request record (a JSON log line); metrics count all.
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub request_records: Option<i32>,

    /// A request header naming the client in records when no client key does (else the
    /// body's `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub client_id_header: Option<String>,

    /// `json` (default: one object per line, for log pipelines) or `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormatSpec>,
}

/// How a pod writes its logs.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatSpec {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// The name of the one endpoint of `spec.upstream`, in metrics and status.
pub(crate) const DEFAULT_ENDPOINT: &str = "default";

impl LlmProxySpec {
    /// Each endpoint's upstream settings with its name and the path of its field: the one of
    /// `upstream` (named `default`), or each of `upstreams`.
    pub fn endpoints(&self) -> Vec<(String, String, &UpstreamSpec)> {
        let single =
            self.upstream.iter().map(|u| (DEFAULT_ENDPOINT.to_owned(), "spec.upstream".to_owned(), u));
        let several = self
            .upstreams
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), format!("spec.upstreams[{i}]"), &e.upstream));
        single.chain(several).collect()
    }

    /// The Secret keys the proxies read for their upstream keys, each once.
    pub fn upstream_key_refs(&self) -> Vec<SecretKeyRef> {
        let mut refs: Vec<SecretKeyRef> = Vec::new();
        for (_, _, u) in self.endpoints() {
            if let Some(r) = &u.api_key_secret_ref
                && !refs.contains(r)
            {
                refs.push(r.clone());
            }
        }
        refs
    }
}

/// Client identity and fairness.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientsSpec {
    /// A Secret whose data entries are `<client name>: <client key>` (or `sha256:<hex>` of the
    /// key, so the Secret need not hold it). Clients send their key as `Authorization: Bearer`
    /// (OpenAI SDKs), `api-key` (Azure SDKs) or `x-api-key`; an unknown or missing key gets a
    /// 401 before anything is read or queued. Rotated keys work on the next request. Its owner
    /// lets proxies read it with the label `llmproxy.io/client-keys: "true"`. Absent: no client
    /// keys (the status says `ClientAuthDisabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret_ref: Option<SecretNameRef>,

    /// Settings of every client without an override.
    #[serde(default)]
    pub default: ClientSettings,

    /// Settings of named clients; unset fields come from `default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub overrides: Vec<ClientOverride>,

    /// The longest interactive traffic may hold a `batch` request back: older than this, it
    /// goes ahead of interactive requests, so batch work always progresses. At most 24h.
    #[serde(default = "default_batch_max_delay")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('24h')",
        "message": "must be at most 24h",
    }]))]
    pub batch_max_delay: Duration,

    /// Who may reach the proxies' API port: NetworkPolicy peers (namespace and pod
    /// selectors). Set, the operator's NetworkPolicy admits only them to the API port; absent,
    /// anyone. Either way only the monitoring namespace and the operator's reach the metrics
    /// port, which names clients and their usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<Vec<NetworkPolicyPeer>>,
}

/// A Secret in the LlmProxy's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretNameRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
}

/// How one client (or every client, as `default`) shares the quota.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSettings {
    /// Share of the quota under contention, against other clients' weights (default 1). Unused
    /// capacity of idle clients goes to busy ones whatever the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: Option<i32>,

    /// `interactive` (default) goes before `batch`; a batch request held back longer than
    /// `batchMaxDelay` goes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<ClientPriority>,

    /// A cap on this client's requests per minute (within the LlmProxy's own limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub requests_per_minute: Option<i64>,

    /// A cap on this client's tokens per minute (within the LlmProxy's own limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub tokens_per_minute: Option<i64>,

    /// Longest this client's requests wait (default `queue.maxWait`). At most 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('24h')",
        "message": "must be at most 24h",
    }]))]
    pub max_wait: Option<Duration>,

    /// Most of this client's requests waiting at once (default `queue.maxSize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_queued: Option<i32>,
}

/// Settings for one named client.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientOverride {
    /// The client's name, as in the keys Secret.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub name: String,

    /// Its settings.
    #[serde(flatten)]
    pub settings: ClientSettings,
}

/// Scheduling class of a client's requests.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClientPriority {
    /// Waits only behind other interactive requests.
    #[default]
    Interactive,
    /// Uses what interactive traffic leaves; never held back longer than `batchMaxDelay`.
    Batch,
}

/// Horizontal autoscaling of the proxy pods (autoscaling/v2).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not exceed maxReplicas",
    "fieldPath": ".minReplicas",
}]))]
pub struct AutoscalingSpec {
    /// Fewest proxy pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,

    /// Most proxy pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Average CPU utilisation (percent of the request) to keep each pod at. Absent and no
    /// other target: 70.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: Option<i32>,

    /// Average `llmproxy_queue_depth` per pod to scale at. Needs a custom metrics adapter
    /// (for example prometheus-adapter) that serves the proxy's Prometheus metric as a pods
    /// metric. Queues also grow when the upstream quota itself is the bottleneck, which more
    /// pods cannot fix; pair this with a sensible `maxReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub target_queue_depth: Option<i32>,

    /// Average `llmproxy_saturation` per pod to scale at, in percent (in-flight requests, and
    /// those waiting for a slot while all are taken, over `maxConcurrent`). It rises only when
    /// the pods themselves are the bottleneck, never while requests wait for the upstream
    /// quota. Needs prometheus-adapter (the chart's `prometheusAdapter` rules serve it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub target_saturation: Option<i32>,

    /// Scale with KEDA instead of a HorizontalPodAutoscaler: a `ScaledObject` (keda.sh/v1alpha1)
    /// with a Prometheus trigger on the pods' `llmproxy_saturation`. Needs KEDA installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keda: Option<KedaSpec>,
}

/// KEDA scaling on the proxy's own saturation.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KedaSpec {
    /// The Prometheus that scrapes the proxies, e.g. `http://prometheus.monitoring.svc:9090`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub prometheus_address: String,

    /// `llmproxy_saturation` per pod to keep, in percent (default 80).
    #[serde(default = "default_target_saturation")]
    #[schemars(range(min = 1, max = 1000))]
    pub target_saturation: i32,
}

/// The upstream API and how to reach it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.timeout) > duration('0s')",
    "message": "timeout must be greater than 0s",
    "fieldPath": ".timeout",
}, {
    "rule": "self.url.startsWith('https://') || (has(self.allowInsecure) && self.allowInsecure) || self.url.matches('^http://(localhost|127(\\\\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}|\\\\[::1\\\\])(:[0-9]+)?(/.*)?$')",
    "message": "url must be https:// (http:// only to a loopback address, or with allowInsecure: true)",
    "fieldPath": ".url",
}, {
    "rule": "!has(self.keyHeader) || !has(self.provider) || self.provider == 'openai'",
    "message": "keyHeader applies only to provider openai (anthropic takes its key in x-api-key)",
    "fieldPath": ".keyHeader",
}]))]
pub struct UpstreamSpec {
    /// Base URL of the API including its version prefix, for example
    /// `https://api.openai.com/v1`, `https://api.anthropic.com/v1` or
    /// `https://generativelanguage.googleapis.com/v1beta/openai`. A client request to
    /// `/v1/<path>` is sent to `<url>/<path>`; for `azure`, the URL is the resource
    /// (`https://RESOURCE.openai.azure.com`) and `/openai/<path>` is sent to
    /// `<url>/openai/<path>`. No user info, query or fragment; `http://` only to
    /// a loopback address or with `allowInsecure`.
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s@?#]+$"))]
    pub url: String,

    /// The API the upstream speaks, which decides the paths passed, how the key is sent, how a
    /// request is charged against the limits and which headers and errors mean what: `openai`
    /// (OpenAI and compatible APIs), `anthropic` (Anthropic's Messages API: the key goes in
    /// `x-api-key`, input and output tokens are charged separately, for
    /// `inputTokensPerMinute` and `outputTokensPerMinute`), `azure` (Azure OpenAI's deployment
    /// paths: the key goes in `api-key`, the deployment is the model, a burst stays within one
    /// 10-second slice) or `gemini` (Gemini's OpenAI-compatible API: limits learned from its
    /// 429 bodies, `requestsPerDay` for its daily quota).
    #[serde(default, skip_serializing_if = "Provider::is_default")]
    pub provider: Provider,

    /// Allow a plain `http://` URL to a host other than loopback (the key then crosses the
    /// network in clear text).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure: bool,

    /// The requests this proxy passes upstream, as `METHOD /v1/path` rules: a path segment is a
    /// name, `*` for any one segment, or `**` (last) for the rest; method `*` for any. Anything
    /// else gets a 403 and never reaches the upstream. Absent, for `openai`: the inference
    /// endpoints (chat completions, completions, embeddings, moderations, responses,
    /// images/generations, audio speech, transcriptions and translations) and `GET /v1/models`,
    /// `GET /v1/models/*`; for `anthropic`: `POST /v1/messages`, `POST /v1/messages/count_tokens`
    /// and the model list; for `gemini`: chat completions, embeddings and the model list; for
    /// `azure` (whose rules start with `/openai/`): `POST /openai/deployments/*/chat/completions`,
    /// `.../completions` and `.../embeddings`, and the same with `responses` and the model
    /// list under `/openai/v1/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100), inner(length(min = 8, max = 256)))]
    pub allowed_paths: Option<Vec<String>>,

    /// Client headers that choose the upstream account (`openai-organization`,
    /// `openai-project`), passed through only when named here; otherwise they are dropped, so
    /// a client cannot bill another organisation or project of the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$")))]
    pub allowed_client_headers: Vec<String>,

    /// Secret key holding the upstream API key, sent (see `keyHeader`) in place of whatever
    /// the client sent. Absent: no key is sent (for upstreams that need none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// How the key is sent to an `openai` upstream: `bearer` (`Authorization: Bearer <key>`:
    /// OpenAI and most compatible APIs) or `api-key` (the `api-key` header Azure OpenAI takes,
    /// e.g. at `https://RESOURCE.openai.azure.com/openai/v1`). Other providers take the key
    /// their own way and refuse this field.
    #[serde(default, skip_serializing_if = "KeyHeader::is_default")]
    pub key_header: KeyHeader,

    /// How long the upstream may take to start answering (response headers), and the longest
    /// silence between two chunks of an answer after that. A long generation that keeps
    /// streaming is never cut; an attempt that times out before its headers is not sent to the
    /// same upstream again (it may still be running, and billed). At most 1h.
    #[serde(default = "default_upstream_timeout")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('1h')",
        "message": "must be at most 1h",
    }]))]
    pub timeout: Duration,

    /// The HTTP version spoken to the upstream: `auto` (HTTP/2 where TLS negotiates it, as the
    /// hosted APIs do, else HTTP/1.1), `http1` (HTTP/1.1 only: a connection per request in
    /// flight) or `http2` (HTTP/2 only; to a plain `http://` URL without negotiation, which the
    /// upstream must accept: an h2c server).
    #[serde(default, skip_serializing_if = "Protocol::is_default")]
    pub protocol: Protocol,

    /// The most requests in flight on one HTTP/2 connection to this upstream; past it the proxy
    /// opens another connection, where they would otherwise wait unseen behind the server's
    /// own limit. Default 100, the least RFC 9113 advises a server to allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_streams_per_connection: Option<i32>,
}

/// The API an upstream speaks.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Provider {
    /// OpenAI's API and the APIs compatible with it.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Azure OpenAI: deployment paths, the `api-key` header, remaining-only quota headers.
    #[serde(rename = "azure")]
    Azure,
    /// Gemini's OpenAI-compatible API: no quota headers, its quota in its 429 bodies.
    #[serde(rename = "gemini")]
    Gemini,
}

impl Provider {
    fn is_default(&self) -> bool {
        *self == Provider::OpenAi
    }

    /// Its name in the spec, in metrics and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Azure => "azure",
            Provider::Gemini => "gemini",
        }
    }
}

/// The HTTP version spoken to an upstream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Protocol {
    /// HTTP/2 where TLS negotiates it (ALPN), else HTTP/1.1.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// HTTP/1.1 only.
    #[serde(rename = "http1")]
    Http1,
    /// HTTP/2 only (with prior knowledge on `http://`).
    #[serde(rename = "http2")]
    Http2,
}

impl Protocol {
    fn is_default(&self) -> bool {
        *self == Protocol::Auto
    }
}

/// How an endpoint takes its key.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>`.
    #[default]
    #[serde(rename = "bearer")]
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    #[serde(rename = "api-key")]
    ApiKey,
}

impl KeyHeader {
    fn is_default(&self) -> bool {
        *self == KeyHeader::Bearer
    }
}

/// One of several endpoints (`spec.upstreams`): where it is, how to authenticate, which
/// models it serves and its own quota.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// The endpoint's name, in metrics (`upstream` label) and in `status.upstreams`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// Where it is and how to reach it, as in `upstream`.
    #[serde(flatten)]
    pub upstream: UpstreamSpec,

    /// Share of requests among endpoints that could take a request equally soon (default 1).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,

    /// The models this endpoint serves (the request body's `model`). Absent: all of them.
    /// A request for a model no endpoint serves gets a 404 `model_not_found`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 256)))]
    pub models: Option<Vec<String>>,

    /// This endpoint's own quota (its key's limits there). Absent: limited only by the
    /// LlmProxy's total until the endpoint's `x-ratelimit-limit-*` headers tell its real limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<EndpointLimitsSpec>,
}

/// An endpoint's own quota.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointLimitsSpec {
    /// Requests per minute this endpoint allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub requests_per_minute: Option<i64>,

    /// Tokens per minute this endpoint allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub tokens_per_minute: Option<i64>,

    /// Input tokens per minute this endpoint allows (Anthropic's ITPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub input_tokens_per_minute: Option<i64>,

    /// Output tokens per minute this endpoint allows (Anthropic's OTPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub output_tokens_per_minute: Option<i64>,

    /// Requests per day this endpoint allows (Gemini's RPD), as `limits.requestsPerDay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub requests_per_day: Option<i64>,

    /// Per-model limits at this endpoint (providers limit each model separately).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub models: std::collections::BTreeMap<String, ModelLimitsSpec>,
}

/// One model's limits (providers limit each model, or each class of models, separately).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelLimitsSpec {
    /// Requests per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub requests_per_minute: Option<i64>,

    /// Tokens per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub tokens_per_minute: Option<i64>,

    /// Input tokens per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub input_tokens_per_minute: Option<i64>,

    /// Output tokens per minute for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub output_tokens_per_minute: Option<i64>,

    /// Requests per day for this model, as `limits.requestsPerDay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub requests_per_day: Option<i64>,
}

/// A key in a Secret in the LlmProxy's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,

    /// Key within the Secret's data.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The upstream quota, as the provider states it (per minute), for all replicas together.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.burst) || self.burst <= self.requestsPerMinute",
    "message": "burst must not exceed requestsPerMinute",
    "fieldPath": ".burst",
}]))]
pub struct LimitsSpec {
    /// Requests per minute the upstream allows (OpenAI's RPM).
    #[schemars(range(min = 1, max = 100_000_000))]
    pub requests_per_minute: i64,

    /// Tokens per minute the upstream allows (OpenAI's TPM), prompt and completion together.
    /// Each request is charged before it is sent, the way the provider's own limiter counts
    /// it: the prompt estimate (characters / 4 over the request's text, one token per number
    /// of pre-tokenised input) plus its completion budget (`max_completion_tokens`,
    /// `max_tokens` or `max_output_tokens`, else `defaultMaxTokens`, times `n`). A request
    /// whose charge exceeds this limit can never run and is refused at once with a 400.
    /// Absent: tokens are not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub tokens_per_minute: Option<i64>,

    /// Input tokens per minute the upstream allows, counted apart from output (Anthropic's
    /// ITPM). A request is charged its prompt estimate (characters / 4 over the system prompt,
    /// the messages' text and the tool definitions; a flat estimate per image or document) at
    /// admission, settled to the answer's `input_tokens + cache_creation_input_tokens` (cache
    /// reads do not count, as at Anthropic). Absent: input tokens are not limited apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub input_tokens_per_minute: Option<i64>,

    /// Output tokens per minute the upstream allows (Anthropic's OTPM). A request is charged
    /// its `max_tokens` at admission and settled to the answer's real output when it ends, as
    /// Anthropic does. Absent: output tokens are not limited apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub output_tokens_per_minute: Option<i64>,

    /// Requests per day the upstream allows (Gemini's RPD). The day starts at midnight US
    /// Pacific time, as Gemini's does; once it is spent a request is answered at once with a
    /// 429 until the next day (no queue can wait that out), or sent to another endpoint that
    /// serves its model. Absent: requests are not counted by the day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub requests_per_day: Option<i64>,

    /// How many requests may start back to back before pacing sets in. Providers enforce
    /// per-minute limits at sub-minute granularity (60,000 RPM acts like 1,000 per second), so
    /// a whole minute's worth at once is refused. Absent: one second's worth of
    /// requestsPerMinute (at least 1); the token bucket likewise holds one second's worth of
    /// tokensPerMinute, and a single request larger than that waits until the bucket is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<i64>,

    /// Upper bound on requests in flight to the upstream at once, across streaming and
    /// non-streaming requests, per proxy replica.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_concurrent: i32,

    /// Completion tokens charged for a request that sets neither `max_tokens` nor
    /// `max_completion_tokens`.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub default_max_tokens: i32,

    /// How the upstream counts tokens against tokensPerMinute, so that the proxy's count
    /// matches the provider's. `requested` (OpenAI, Azure OpenAI): the charge at admission
    /// (prompt estimate + completion budget) stands, whatever the answer used. `used`
    /// (providers that adjust at the end, such as Anthropic's output-token limit): the charge
    /// is settled to the answer's real `usage`, and unused tokens return to the bucket. Either
    /// way an attempt the upstream refused with 429, or that never reached it, is not charged.
    #[serde(default, skip_serializing_if = "TokenAccounting::is_default")]
    pub token_accounting: TokenAccounting,

    /// Per-model limits for the whole LlmProxy, within the totals above (providers limit each
    /// model separately): `{gpt-4o: {requestsPerMinute: 500, tokensPerMinute: 30000}}`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub models: std::collections::BTreeMap<String, ModelLimitsSpec>,
}

/// How the upstream counts a request's tokens; see `limits.tokenAccounting`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TokenAccounting {
    /// Charged at admission as prompt estimate + completion budget, never refunded.
    #[default]
    Requested,
    /// Settled to the real usage when the answer ends.
    Used,
}

impl TokenAccounting {
    fn is_default(&self) -> bool {
        *self == TokenAccounting::Requested
    }
}

/// The admission queue in front of the limiter.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Requests that may wait at once per replica; one more gets an immediate 429.
    /// 0: no queue, requests over the limit fail at once.
    #[serde(default = "default_queue_size")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_size: i32,

    /// Longest a request waits for admission, including retries' back-off and upstream 429
    /// windows; past it the client gets a 429 with a Retry-After header. At most 24h.
    #[serde(default = "default_max_wait")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('24h')",
        "message": "must be at most 24h",
    }]))]
    pub max_wait: Duration,

    /// Memory the request bodies of waiting and in-flight requests may take at once per replica
    /// (a quantity such as `64Mi`). A request that would go over it gets a 429 (or a 413 when
    /// its body alone is larger), so many large bodies cannot exhaust the pod's memory. The
    /// default fits the default 256Mi pod memory limit.
    #[serde(default = "default_queue_bytes")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "type(self) == int || isQuantity(self)",
        "message": "maxBytes must be a quantity such as 64Mi or 1Gi",
    }]))]
    pub max_bytes: Quantity,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            max_size: default_queue_size(),
            max_wait: default_max_wait(),
            max_bytes: default_queue_bytes(),
        }
    }
}

/// Retry with exponential back-off: attempt n waits `initialBackoff * multiplier^(n-1)`, at
/// most `maxBackoff`. An upstream `Retry-After`, `retry-after-ms` or `x-ratelimit-reset-*`
/// header takes precedence over the computed delay.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.initialBackoff) <= duration(self.maxBackoff)",
    "message": "initialBackoff must not exceed maxBackoff",
    "fieldPath": ".initialBackoff",
}]))]
pub struct RetrySpec {
    /// Attempts in all, the first one included; 1 disables retries.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: i32,

    /// Wait before the first retry. At most 1h.
    #[serde(default = "default_initial_backoff")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('1h')",
        "message": "must be at most 1h",
    }]))]
    pub initial_backoff: Duration,

    /// Longest wait between two attempts. At most 1h.
    #[serde(default = "default_max_backoff")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('1h')",
        "message": "must be at most 1h",
    }]))]
    pub max_backoff: Duration,

    /// Factor by which the wait grows after each retry.
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,

    /// Randomise each wait ("full jitter" between half and all of it) so that many clients
    /// retrying at once do not arrive together.
    #[serde(default = "default_true")]
    pub jitter: bool,

    /// Retries after errors (not waits for a 429's window) stay within this share of first
    /// attempts, so an upstream outage is not multiplied by `maxAttempts`.
    #[serde(default)]
    pub budget: RetryBudgetSpec,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            multiplier: default_multiplier(),
            jitter: true,
            budget: RetryBudgetSpec::default(),
        }
    }
}

/// The retry budget: over the last 10 seconds, retries may be at most `percent` of first
/// attempts plus `minRetriesPerSecond` per second. A request whose retry the budget refuses
/// gets the upstream's last answer.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Retries as a percentage of first attempts (default 20).
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 1000))]
    pub percent: i32,

    /// Retries allowed per second whatever the traffic (default 1), so a quiet proxy still
    /// retries.
    #[serde(default = "default_budget_floor")]
    #[schemars(range(min = 0, max = 10_000))]
    pub min_retries_per_second: i32,
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self { percent: default_budget_percent(), min_retries_per_second: default_budget_floor() }
    }
}

/// The exact-match response cache.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// How long a successful response is served from the cache. `0s` turns caching off.
    /// Requests to chat/completions, completions, embeddings and moderations are cached, keyed
    /// by upstream, path and the JSON body with key order and whitespace ignored; `user` and
    /// `stream_options` are left out of the key, `stream` is part of it. Clients opt out with
    /// `Cache-Control: no-cache` (fetch fresh) or `no-store` (fetch fresh, keep nothing). At most
    /// 720h (30 days).
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('720h')",
        "message": "must be at most 720h",
    }]))]
    pub ttl: Duration,

    /// Most responses held at once per replica; the least recently used leave first.
    #[serde(default = "default_cache_entries")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_entries: i64,

    /// Memory the cached responses may take per replica (a quantity such as `64Mi` or `1Gi`).
    /// Each entry is weighed by its size but at least `maxBytes / maxEntries`, so both bounds hold.
    #[serde(default = "default_cache_bytes")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "type(self) == int || isQuantity(self)",
        "message": "maxBytes must be a quantity such as 64Mi or 1Gi",
    }]))]
    pub max_bytes: Quantity,

    /// Who shares entries and coalesced requests (see [`CacheScope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<CacheScope>,
}

/// Who shares the cache's entries and coalesced requests: `shared` (every client) or `client`
/// (each client key its own, so that no client learns from `x-llmproxy-cache` or `Age` what
/// another asked). Absent: `client` when client keys are configured, `shared` otherwise.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CacheScope {
    /// Every client: an answer stored for one serves all.
    Shared,
    /// Each client key: one client's answers serve only that client.
    Client,
}

/// What the operator and the proxies report about an LlmProxy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmProxyStatus {
    /// `Ready`, `Progressing` and `Degraded`, with reasons a person can act on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Proxy pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Proxy pods ready to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Base URL clients use, e.g. `http://openai.team-a.svc:8080/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Each upstream endpoint as the proxy pods see it: the limits its headers report, whether
    /// it is taking requests, and its last error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub upstreams: Vec<UpstreamStatus>,

    /// The LlmQuota of `spec.quotaRef` as the operator granted it, once it checked the
    /// reference; what the proxies draw from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<GrantedQuota>,

    /// What all pods together did in the last minute, as they report it (refreshed every
    /// status interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
}

/// Live usage of an LlmProxy, all pods together.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// Requests sent upstream in the last minute.
    pub requests_last_minute: i64,
    /// Tokens charged in the last minute.
    pub tokens_last_minute: i64,
    /// The larger of requests and tokens in the last minute as a percentage of the limits.
    pub utilization_percent: i64,
    /// Requests waiting in the queues now.
    pub queue_depth: i64,
    /// The highest of the pods' 99th percentile queue waits over the last minute, seconds.
    pub queue_wait_p99_seconds: f64,
    /// Upstream 429s in the last minute.
    pub upstream429s_last_minute: i64,
    /// Upstream 5xx, connection errors and timeouts in the last minute.
    pub upstream_errors_last_minute: i64,
}

/// One upstream endpoint, as its proxies report it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    /// The endpoint (`default` for the single `upstream`).
    pub name: String,

    /// The limits the endpoint's `x-ratelimit-limit-*` headers report (per minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_limits: Option<ObservedLimits>,

    /// Taking requests (false while taken out after failures).
    pub healthy: bool,

    /// The latest failure (status or connection error), without any key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// What the upstream reported spent for longer than a queue can wait (its account's credit,
    /// a spend limit, a daily quota): no request goes there for it until its reset, or until a
    /// probe (at most one a minute) succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exhausted: Vec<ExhaustedStatus>,
}

/// One quota an upstream reported spent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExhaustedStatus {
    /// The model it is spent for; absent when the whole endpoint is (an account's credit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,

    /// Why: `insufficient_quota`, `billing`, `spend_limit`, `requests_per_day`.
    pub reason: String,

    /// When the upstream's window resets (RFC 3339), where it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// Limits an upstream reported.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedLimits {
    /// `x-ratelimit-limit-requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<i64>,
    /// `x-ratelimit-limit-tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<i64>,
}
