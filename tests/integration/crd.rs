//! The LlmProxy CRD on a real API server: it installs, defaults, validates and versions.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use llmproxy_api::LlmProxy;
use serde_json::{Value, json};

use crate::support::{self, KubeEnv, MANAGER};

fn example(rel: &str) -> Value {
    let text = std::fs::read_to_string(support::repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

async fn env_with_crd(prefix: &str) -> (KubeEnv, Api<LlmProxy>) {
    let env = KubeEnv::start().await;
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = env.namespace(&client, prefix).await;
    (env, Api::namespaced(client, &ns))
}

fn strict_apply() -> PatchParams {
    PatchParams::apply(MANAGER).validation_strict()
}

#[test]
fn committed_crd_matches_generated() {
    let path = support::repo_path("crds/llmproxy.io_llmproxies.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == llmproxy_api::crd_yaml(),
        "{} is stale: regenerate it with `cargo run -- crd > crds/llmproxy.io_llmproxies.yaml`",
        path.display()
    );
}

#[test]
fn committed_quota_crd_matches_generated() {
    let path = support::repo_path("crds/llmproxy.io_llmquotas.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == llmproxy_api::quota_crd_yaml(),
        "{} is stale: regenerate it with `cargo run -- crd llmquota > crds/llmproxy.io_llmquotas.yaml`",
        path.display()
    );
}

#[test]
fn examples_pass_and_fail_the_standalone_check_like_the_server() {
    let read = |rel: &str| std::fs::read_to_string(support::repo_path(rel)).unwrap_or_default();
    let (_, policy) = llmproxy_api::from_yaml(&read("examples/openai.yaml")).unwrap();
    assert_eq!(policy.limits.requests_per_minute, 3500);
    let (_, claude) = llmproxy_api::from_yaml(&read("examples/anthropic.yaml")).unwrap();
    assert_eq!(claude.upstreams[0].provider, llmproxy_api::Provider::Anthropic);
    let sonnet = &claude.limits.models["claude-sonnet-4-5"];
    assert_eq!(
        (sonnet.input_tokens_per_minute, sonnet.output_tokens_per_minute),
        (Some(450_000), Some(90_000))
    );
    let (_, azure) = llmproxy_api::from_yaml(&read("examples/azure.yaml")).unwrap();
    assert_eq!(azure.upstreams[0].provider, llmproxy_api::Provider::Azure);
    assert!(azure.upstreams[0].allowed_paths.iter().all(|r| r.root() == "openai"));
    let (_, gemini) = llmproxy_api::from_yaml(&read("examples/gemini.yaml")).unwrap();
    assert_eq!(gemini.limits.models["gemini-2.5-pro"].requests_per_day, Some(1000));
    let err = llmproxy_api::from_yaml(&read("examples/invalid/backoff-exceeds-max.yaml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("spec.limits.requestsPerMinute: must be > 0"), "{err}");
    assert!(err.contains("spec.retry.initialBackoff: must not exceed maxBackoff"), "{err}");
}

#[test]
fn the_org_quota_example_resolves_standalone_with_its_quota() {
    let text = std::fs::read_to_string(support::repo_path("examples/org-quota.yaml")).unwrap_or_default();
    let (proxy, policy) = llmproxy_api::from_yaml(&text).unwrap();
    assert_eq!(proxy.metadata.name.as_deref(), Some("team-a-openai"));
    let quota = policy.quota.expect("the LlmQuota of the file");
    assert_eq!(
        (quota.name.as_str(), quota.requests_per_minute, quota.weight, quota.guaranteed),
        ("org-openai", 10_000, 2, 30)
    );
    assert_eq!(
        policy.shared.map(|s| s.url),
        Some("redis://redis.llmproxy-system.svc:6379/0".to_owned()),
        "the team's buckets share the quota's Redis"
    );
    let missing = text.replace("name: org-openai\nspec", "name: another\nspec");
    let err = llmproxy_api::from_yaml(&missing).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("spec.quotaRef.name: no LlmQuota named \"org-openai\""), "{err}");
    // The shares are the owner's: asking for more gets what the LlmQuota sets, asking for less
    // gets less, and guarantees over 100 % are refused.
    let share = |text: &str| {
        let q = llmproxy_api::from_yaml(text).unwrap().1.quota;
        q.map(|q| (q.weight, q.guaranteed))
    };
    let reference = "quotaRef: {name: org-openai}";
    let greedy = text.replace(reference, "quotaRef: {name: org-openai, weight: 1000, guaranteed: 100}");
    assert_eq!(share(&greedy), Some((2, 30)));
    let modest = text.replace(reference, "quotaRef: {name: org-openai, weight: 1, guaranteed: 10}");
    assert_eq!(share(&modest), Some((1, 10)));
    let over = text
        .replace("guaranteed: 30}", "guaranteed: 30}\n    - {namespace: team-b, name: x, guaranteed: 80}");
    let err = llmproxy_api::from_yaml(&over).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("the guarantees sum to 110 %"), "{err}");
}

#[tokio::test]
async fn the_teams_example_applies_and_runs_with_its_clients() {
    let (_env, api) = env_with_crd("teams").await;
    let manifest = example("examples/teams.yaml");
    api.patch("shared-openai", &strict_apply(), &Patch::Apply(&manifest))
        .await
        .expect("apply examples/teams.yaml");
    let spec = api.get("shared-openai").await.map(|p| p.spec).unwrap();
    let policy = llmproxy_api::Policy::from_spec(&spec).unwrap();
    let clients = policy.clients.expect("clients");
    assert_eq!(clients.client("web").weight, 3);
    assert_eq!(clients.client("someone-else").weight, 1, "the default");
    let text = std::fs::read_to_string(support::repo_path("examples/teams.yaml")).unwrap_or_default();
    assert!(llmproxy_api::from_yaml(&text).is_ok(), "llmproxy check accepts it too");
}

#[tokio::test]
async fn the_upstreams_example_applies_with_each_endpoint_resolved() {
    let (_env, api) = env_with_crd("upstreams").await;
    let manifest = example("examples/upstreams.yaml");
    api.patch("org-gpt", &strict_apply(), &Patch::Apply(&manifest))
        .await
        .expect("apply examples/upstreams.yaml");
    let spec = api.get("org-gpt").await.map(|p| p.spec).unwrap();
    let policy = llmproxy_api::Policy::from_spec(&spec).unwrap();
    let names: Vec<&str> = policy.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["openai-main", "openai-second", "azure-eastus", "self-hosted"]);
    let azure = policy.endpoint("azure-eastus").expect("azure");
    assert_eq!(azure.key_header, llmproxy_api::KeyHeader::ApiKey);
    assert!(azure.serves(Some("gpt-4o")) && !azure.serves(Some("o3")));
    assert_eq!(policy.limits.models.get("gpt-4o").and_then(|m| m.tokens_per_minute), Some(2_000_000));
    assert_eq!(spec.upstream_key_refs().len(), 3, "three Secrets; the self-hosted one takes no key");
}

#[tokio::test]
async fn crd_installs_and_becomes_established() {
    let env = KubeEnv::start().await;
    let client = env.client().await;
    support::install_crd(&client).await;
    // Served: an empty list, not a 404.
    let list = Api::<LlmProxy>::all(client).list(&Default::default()).await;
    assert!(list.is_ok_and(|l| l.items.is_empty()));
}

#[tokio::test]
async fn openai_example_applies_and_reads_back_with_defaults() {
    let (_env, api) = env_with_crd("example").await;
    let mut manifest = example("examples/openai.yaml");
    // Leave some fields out so the schema has to fill them in.
    let spec = &mut manifest["spec"];
    spec["queue"].as_object_mut().map(|q| q.remove("maxWait"));
    spec["upstream"].as_object_mut().map(|u| u.remove("timeout"));
    spec.as_object_mut().map(|s| s.remove("retry"));
    spec["upstream"]["apiKeySecretRef"].as_object_mut().map(|r| r.remove("key"));

    let applied = api
        .patch("openai", &strict_apply(), &Patch::Apply(&manifest))
        .await
        .expect("apply examples/openai.yaml");
    let back = api.get("openai").await.unwrap();
    assert_eq!(applied.spec, back.spec);
    let s = back.spec;
    assert_eq!(s.limits.requests_per_minute, 3500);
    assert_eq!(s.limits.tokens_per_minute, Some(90_000));
    assert_eq!(s.limits.default_max_tokens, 1024, "limits.defaultMaxTokens default");
    assert_eq!(s.queue.max_wait.as_str(), "30s", "queue.maxWait default");
    let upstream = s.upstream.clone().expect("spec.upstream");
    assert_eq!(upstream.timeout.as_str(), "10m", "upstream.timeout default");
    assert_eq!(upstream.api_key_secret_ref.map(|r| r.key).as_deref(), Some("api-key"));
    assert_eq!(s.retry.max_attempts, 4, "retry defaulted as a whole object");
    assert_eq!(s.retry.initial_backoff.as_str(), "1s");
    assert_eq!(s.retry.max_backoff.as_str(), "30s");
    assert!(s.retry.jitter);
    assert_eq!(s.cache.map(|c| c.ttl.get()), Some(Duration::from_secs(300)));
    // And the defaulted object is a valid runtime policy.
    let spec = api.get("openai").await.map(|p| p.spec).unwrap();
    assert!(llmproxy_api::Policy::from_spec(&spec).is_ok());
}

/// Each case breaks one thing in the valid example; the server must refuse it and say why.
#[tokio::test]
async fn invalid_specs_are_rejected_with_clear_messages() {
    let (_env, api) = env_with_crd("invalid").await;
    type Mutate = fn(&mut Value);
    let cases: Vec<(&str, Mutate, &[&str])> = vec![
        (
            "zero rpm",
            |s| s["limits"]["requestsPerMinute"] = json!(0),
            &["spec.limits.requestsPerMinute", "greater than or equal to 1"],
        ),
        (
            "negative tpm",
            |s| s["limits"]["tokensPerMinute"] = json!(-5),
            &["spec.limits.tokensPerMinute", "greater than or equal to 1"],
        ),
        ("zero maxConcurrent", |s| s["limits"]["maxConcurrent"] = json!(0), &["spec.limits.maxConcurrent"]),
        (
            "burst over rpm",
            |s| s["limits"]["burst"] = json!(5000),
            &["spec.limits.burst", "burst must not exceed requestsPerMinute"],
        ),
        (
            "malformed duration",
            |s| s["queue"]["maxWait"] = json!("30 seconds"),
            &["spec.queue.maxWait", "should match"],
        ),
        ("days are not a Go unit", |s| s["cache"]["ttl"] = json!("1d"), &["spec.cache.ttl"]),
        (
            "not a quantity",
            |s| s["cache"]["maxBytes"] = json!("lots"),
            &["spec.cache.maxBytes", "must be a quantity"],
        ),
        (
            "initialBackoff > maxBackoff",
            |s| s["retry"]["initialBackoff"] = json!("1m"),
            &["spec.retry.initialBackoff", "initialBackoff must not exceed maxBackoff"],
        ),
        (
            "zero timeout",
            |s| s["upstream"]["timeout"] = json!("0s"),
            &["spec.upstream.timeout", "timeout must be greater than 0s"],
        ),
        ("not a URL", |s| s["upstream"]["url"] = json!("api.openai.com"), &["spec.upstream.url"]),
        (
            "plain http to a name that only starts like loopback",
            |s| s["upstream"]["url"] = json!("http://127.0.0.1.1/v1"),
            &["spec.upstream.url", "url must be https://"],
        ),
        (
            "plain http to a loopback look-alike that DNS resolves anywhere",
            |s| s["upstream"]["url"] = json!("http://127.0.0.1.attacker.example/v1"),
            &["spec.upstream.url", "url must be https://"],
        ),
        (
            "a wait beyond a day",
            |s| s["queue"]["maxWait"] = json!("25h"),
            &["spec.queue.maxWait", "must be at most 24h"],
        ),
        (
            "a wait beyond any clock",
            |s| s["queue"]["maxWait"] = json!("6000000000000000h"),
            &["spec.queue.maxWait"],
        ),
        (
            "a timeout beyond an hour",
            |s| s["upstream"]["timeout"] = json!("2h"),
            &["spec.upstream.timeout", "must be at most 1h"],
        ),
        (
            "a back-off beyond an hour",
            |s| s["retry"]["maxBackoff"] = json!("61m"),
            &["spec.retry.maxBackoff", "must be at most 1h"],
        ),
        (
            "a ttl beyond 30 days",
            |s| s["cache"]["ttl"] = json!("721h"),
            &["spec.cache.ttl", "must be at most 720h"],
        ),
        ("multiplier below 1", |s| s["retry"]["multiplier"] = json!(0.5), &["spec.retry.multiplier"]),
        (
            "a client weight of 0",
            |s| s["clients"] = json!({"overrides": [{"name": "web", "weight": 0}]}),
            &["spec.clients.overrides[0].weight", "greater than or equal to 1"],
        ),
        (
            "a client name that cannot be a label",
            |s| s["clients"] = json!({"overrides": [{"name": "team a"}]}),
            &["spec.clients.overrides[0].name", "should match"],
        ),
        (
            "a batch delay beyond a day",
            |s| s["clients"] = json!({"batchMaxDelay": "25h"}),
            &["spec.clients.batchMaxDelay", "must be at most 24h"],
        ),
        (
            "missing limits",
            |s| {
                s.as_object_mut().map(|o| o.remove("limits"));
            },
            &["spec.limits", "Required value"],
        ),
        (
            "both upstream forms",
            |s| s["upstreams"] = json!([{"name": "a", "url": "https://a.example/v1"}]),
            &["set exactly one of upstream (one endpoint) or upstreams (several)"],
        ),
        (
            "no upstream at all",
            |s| {
                s.as_object_mut().map(|o| o.remove("upstream"));
            },
            &["set exactly one of upstream (one endpoint) or upstreams (several)"],
        ),
        (
            "an unknown key header",
            |s| s["upstream"]["keyHeader"] = json!("x-secret"),
            &["spec.upstream.keyHeader", "Unsupported value"],
        ),
    ];
    for (name, mutate, expected) in cases {
        let mut manifest = example("examples/openai.yaml");
        mutate(&mut manifest["spec"]);
        let result = api.patch("openai", &strict_apply(), &Patch::Apply(&manifest)).await;
        let err = match result {
            Ok(_) => panic!("case {name:?}: the server accepted an invalid LlmProxy"),
            Err(kube::Error::Api(status)) => status,
            Err(other) => panic!("case {name:?}: unexpected error {other}"),
        };
        assert!(err.code == 422 || err.code == 400, "case {name:?}: code {} ({})", err.code, err.message);
        for fragment in expected {
            assert!(err.message.contains(fragment), "case {name:?}: {:?} lacks {fragment:?}", err.message);
        }
    }
    // Two upstreams of one name: a create is refused naming the entry (server-side apply
    // cannot even build its patch, and says so with a 500 naming the key, as kube-apiserver does).
    let mut manifest = example("examples/openai.yaml");
    manifest["metadata"]["name"] = json!("twins");
    if let Some(spec) = manifest["spec"].as_object_mut() {
        spec.remove("upstream");
        spec.insert(
            "upstreams".into(),
            json!([{"name": "a", "url": "https://a.example/v1"}, {"name": "a", "url": "https://b.example/v1"}]),
        );
    }
    let twins: LlmProxy = serde_json::from_value(manifest).unwrap();
    match api.create(&kube::api::PostParams::default(), &twins).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{}", status.message);
            assert!(
                status.message.contains("spec.upstreams[1]") && status.message.contains("Duplicate value"),
                "{}",
                status.message
            );
        }
        other => panic!("two upstreams of one name: {other:?}"),
    }
    // Unknown fields: a strict create (what `kubectl create --validate=strict` sends) is a 400
    // naming the field; server-side apply refuses to build a typed patch with it.
    let mut manifest = example("examples/openai.yaml");
    manifest["spec"]["limits"]["requestsPerHour"] = json!(10);
    let ns = api.namespace().unwrap_or_default().to_owned();
    let url = format!("/apis/llmproxy.io/v1alpha1/namespaces/{ns}/llmproxies?fieldValidation=Strict");
    let body = serde_json::to_vec(&manifest).unwrap_or_default();
    let req = http::Request::post(url).header("content-type", "application/json").body(body).unwrap();
    let created: Result<LlmProxy, _> = api.clone().into_client().request(req).await;
    match created {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 400, "{}", s.message);
            assert!(s.message.contains(r#"unknown field "spec.limits.requestsPerHour""#), "{}", s.message);
        }
        other => panic!("strict create with an unknown field: {other:?}"),
    }
    let err = api
        .patch("openai", &strict_apply(), &Patch::Apply(&manifest))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains(".spec.limits.requestsPerHour: field not declared in schema"), "{err}");

    // Nothing invalid was stored.
    assert!(api.get_opt("openai").await.is_ok_and(|o| o.is_none()));

    // The committed invalid example is refused as a whole, with both of its faults named.
    let broken = example("examples/invalid/backoff-exceeds-max.yaml");
    let err = api
        .patch("broken", &strict_apply(), &Patch::Apply(&broken))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("requestsPerMinute") && err.contains("initialBackoff must not exceed maxBackoff"),
        "{err}"
    );
}

#[tokio::test]
async fn server_side_apply_of_a_changed_limit_bumps_generation() {
    let (_env, api) = env_with_crd("generation").await;
    let mut manifest = example("examples/openai.yaml");
    let generation = |p: &LlmProxy| p.metadata.generation.unwrap_or_default();

    let first = api.patch("openai", &strict_apply(), &Patch::Apply(&manifest)).await.unwrap();
    assert_eq!(generation(&first), 1);

    let same = api.patch("openai", &strict_apply(), &Patch::Apply(&manifest)).await.unwrap();
    assert_eq!(generation(&same), 1, "re-applying the same spec is a no-op");

    manifest["spec"]["limits"]["requestsPerMinute"] = json!(5000);
    let changed = api.patch("openai", &strict_apply(), &Patch::Apply(&manifest)).await.unwrap();
    assert_eq!(generation(&changed), 2);
    assert_eq!(changed.spec.limits.requests_per_minute, 5000);

    // Status lives in its own subresource and does not move the generation.
    let status = json!({"apiVersion": "llmproxy.io/v1alpha1", "kind": "LlmProxy", "status": {"observedGeneration": 2, "replicas": 2}});
    let after = api
        .patch_status("openai", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(generation(&after), 2);
    assert_eq!(after.status.and_then(|s| s.observed_generation), Some(2));
}
