//! A Secret's consent is per use and may pin where an upstream key goes: the operator against a
//! real API server, and a real `llmproxy proxy --resource` process acting as the proxies'
//! ServiceAccount (impersonated, so the Role the operator wrote decides what it may read). An
//! LlmProxy editor who cannot read Secrets tries to send one somewhere of theirs.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::Role;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use llmproxy_api::LlmProxy;
use llmproxy_mock::{MockConfig, MockServer, load};
use serde_json::{Value, json};

use crate::operator::{Operator, WAIT, apply, condition, llmproxy, secret, setup, wait_for};
use crate::support::proxy_env::{ProxyProcess, get_text, metric, mock};
use crate::support::redis::RedisServer;
use crate::support::{KubeEnv, MANAGER, eventually};

/// Create or replace a Secret from its JSON (labels, annotations, `stringData`).
async fn put_secret(client: &Client, ns: &str, s: Value) {
    let name = s["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&s))
        .await
        .unwrap_or_else(|e| panic!("secret {name}: {e}"));
}

/// Alice's client key, in a Secret its owner gave for client keys only.
async fn team_keys(client: &Client, ns: &str) {
    put_secret(
        client,
        ns,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-keys",
               "labels": {llmproxy_api::CLIENT_KEYS_LABEL: "true"}}, "stringData": {"alice": "sk-alice"}}),
    )
    .await;
}

/// The proxy of LlmProxy `p` as its pods run it: as the ServiceAccount the operator made.
async fn proxy_as_its_service_account(env: &KubeEnv, ns: &str) -> ProxyProcess {
    let kubeconfig = env.service_account_kubeconfig(ns, "p-proxy").display().to_string();
    ProxyProcess::start_with_args(
        &["proxy", "--resource", &format!("{ns}/p")],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .await
}

/// Wait until the proxy has refused a policy (`llmproxy_policy_reloads_total{result="rejected"}`).
async fn refused_by_the_proxy(proxy: &ProxyProcess) {
    let metrics = format!("http://{}/metrics", proxy.admin);
    eventually("the proxy to refuse the spec", WAIT, || {
        let url = metrics.clone();
        async move {
            (metric(&get_text(&url).await, "llmproxy_policy_reloads_total{result=\"rejected\"}") >= 1.0)
                .then_some(())
        }
    })
    .await;
}

fn degraded_message(p: &LlmProxy) -> String {
    llmproxy_operator::condition_status(p.status.as_ref(), "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

async fn granted_secrets(client: &Client, ns: &str) -> Vec<String> {
    let role = wait_for(&Api::<Role>::namespaced(client.clone(), ns), "p-proxy").await;
    let mut names: Vec<String> = role
        .rules
        .iter()
        .flatten()
        .filter(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
        .filter_map(|r| r.resource_names.clone())
        .flatten()
        .collect();
    names.sort();
    names
}

/// `n` requests with Alice's client key, each answered 200.
async fn alice_gets_answers(proxy: &ProxyProcess, n: usize) {
    let http = load::client();
    for i in 0..n {
        let shot =
            load::shoot(&http, &proxy.url("/chat/completions"), Some("sk-alice"), &load::chat_body(i)).await;
        assert_eq!(shot.status, Some(200), "request {i}; the proxy logged:\n{}", proxy.logs());
    }
}

fn keys_seen(upstream: &MockServer) -> Vec<Option<String>> {
    upstream.mock.seen().into_iter().map(|s| s.key).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keys_secret_never_becomes_an_upstream_key() {
    let (env, client, ns, api) = setup("consent-use").await;
    let org = mock(MockConfig { api_key: Some("sk-org".into()), ..MockConfig::default() }).await;
    let attacker = mock(MockConfig::default()).await;
    secret(&client, &ns, "sk-org").await;
    team_keys(&client, &ns).await;
    // A Redis password Secret, properly labelled, that no spec has named yet.
    put_secret(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-auth",
               "labels": {llmproxy_api::REDIS_PASSWORD_LABEL: "true"}}, "stringData": {"password": "pw"}}),
    )
    .await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let clients = json!({"keysSecretRef": {"name": "team-keys"}});
    apply(
        &api,
        &llmproxy("p", &org.url(), json!({"clients": clients, "limits": {"requestsPerMinute": 6000}})),
    )
    .await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    let proxy = proxy_as_its_service_account(&env, &ns).await;
    alice_gets_answers(&proxy, 1).await;

    // The editor points the upstream at their host and names Alice's entry as its key (the
    // Secret is granted to the proxies, for client keys), and names a new Secret beside it.
    let hostile = json!({
        "upstream": {"url": attacker.url(), "apiKeySecretRef": {"name": "team-keys", "key": "alice"}},
        "clients": clients,
        "limits": {"requestsPerMinute": 6000},
        "sharedState": {"redis": {"url": "redis://127.0.0.1:1/0", "passwordSecretRef": {"name": "redis-auth"}}},
    });
    apply(&api, &llmproxy("p", &attacker.url(), hostile)).await;
    let p = condition(&api, "p", "Degraded", "True", "SecretNotAllowed").await;
    let message = degraded_message(&p);
    assert!(
        message.contains("team-keys")
            && message.contains("apiKeySecretRef")
            && message.contains(llmproxy_api::SECRET_OPT_IN_LABEL),
        "{message}"
    );
    refused_by_the_proxy(&proxy).await;
    alice_gets_answers(&proxy, 3).await;
    assert!(
        attacker.mock.seen().is_empty(),
        "the refused spec reached its upstream: {:?}",
        keys_seen(&attacker)
    );
    assert!(keys_seen(&org).iter().all(|k| k.as_deref() == Some("sk-org")), "the last good policy serves");
    assert_eq!(
        granted_secrets(&client, &ns).await,
        ["team-keys", "upstream-key"],
        "a refused spec widens no access (redis-auth would be granted for its use otherwise)"
    );

    // The owner withdraws the client keys' consent: the proxy stops accepting them at once (the
    // next version of the Secret is checked before use), and the Role stops naming it.
    put_secret(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-keys", "labels": {}},
               "stringData": {"alice": "sk-alice"}}),
    )
    .await;
    let url = proxy.url("/chat/completions");
    eventually("Alice's key to be refused", WAIT, || async {
        let shot = load::shoot(&load::client(), &url, Some("sk-alice"), &load::chat_body(7)).await;
        (shot.status == Some(503)).then_some(())
    })
    .await;
    eventually("the Role to stop naming team-keys", WAIT, || async {
        (granted_secrets(&client, &ns).await == ["upstream-key"]).then_some(())
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.contains("team-keys") && !logs.contains("sk-alice") && !logs.contains("sk-org"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_comes_only_from_a_secret_labelled_for_it() {
    let (env, client, ns, api) = setup("consent-redis").await;
    let org = mock(MockConfig { api_key: Some("sk-org".into()), ..MockConfig::default() }).await;
    // A Redis that takes Alice's client key as its password: whoever runs it learns the key
    // from the AUTH, and it records the buckets of any proxy that logged in.
    let redis = RedisServer::start(Some("sk-alice")).await;
    let redis_conn = || async {
        let url = format!("redis://:sk-alice@{}/0", redis.addr);
        let c = redis::Client::open(url).unwrap();
        c.get_multiplexed_async_connection().await.unwrap()
    };
    let keys_in_redis = || async {
        let mut c = redis_conn().await;
        redis::cmd("DBSIZE").query_async::<i64>(&mut c).await.unwrap()
    };
    secret(&client, &ns, "sk-org").await;
    team_keys(&client, &ns).await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let spec = |password_secret: &str, password_key: &str| {
        json!({
            "clients": {"keysSecretRef": {"name": "team-keys"}},
            "limits": {"requestsPerMinute": 6000},
            "queue": {"maxWait": "10s"},
            "sharedState": {"redis": {"url": redis.url(),
                                      "passwordSecretRef": {"name": password_secret, "key": password_key}}},
        })
    };
    apply(&api, &llmproxy("p", &org.url(), json!({"clients": {"keysSecretRef": {"name": "team-keys"}}})))
        .await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    let proxy = proxy_as_its_service_account(&env, &ns).await;
    alice_gets_answers(&proxy, 1).await;

    // Alice's entry named as the Redis password.
    apply(&api, &llmproxy("p", &org.url(), spec("team-keys", "alice"))).await;
    let p = condition(&api, "p", "Degraded", "True", "SecretNotAllowed").await;
    let message = degraded_message(&p);
    assert!(
        message.contains("spec.sharedState.redis.passwordSecretRef")
            && message.contains(llmproxy_api::REDIS_PASSWORD_LABEL),
        "{message}"
    );
    refused_by_the_proxy(&proxy).await;
    alice_gets_answers(&proxy, 3).await;
    assert_eq!(keys_in_redis().await, 0, "the proxy logged in to the Redis with the client's key");

    // The same Redis with a Secret given for this use: now the proxies use it (so the zero above
    // meant something).
    put_secret(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-auth",
               "labels": {llmproxy_api::REDIS_PASSWORD_LABEL: "true"}}, "stringData": {"password": "sk-alice"}}),
    )
    .await;
    apply(&api, &llmproxy("p", &org.url(), spec("redis-auth", "password"))).await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    eventually("the buckets in the Redis", WAIT, || async {
        let url = proxy.url("/chat/completions");
        load::shoot(&load::client(), &url, Some("sk-alice"), &load::chat_body(9)).await;
        (keys_in_redis().await > 0).then_some(())
    })
    .await;
    let logs = proxy.logs();
    assert!(!logs.contains("sk-alice"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_upstream_key_goes_only_to_its_hosts() {
    let (env, client, ns, api) = setup("consent-pin").await;
    let org = mock(MockConfig { api_key: Some("sk-org".into()), ..MockConfig::default() }).await;
    let elsewhere = mock(MockConfig::default()).await;
    // The same loopback mock, by another name: a host the pin does not list.
    let elsewhere_url = elsewhere.url().replace("127.0.0.1", "localhost");
    let pinned = |hosts: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "upstream-key",
               "labels": {llmproxy_api::SECRET_OPT_IN_LABEL: "true"},
               "annotations": {llmproxy_api::ALLOWED_UPSTREAM_HOSTS: hosts}},
               "stringData": {"api-key": "sk-org"}})
    };
    put_secret(&client, &ns, pinned("127.0.0.1")).await;
    team_keys(&client, &ns).await;
    let _op = Operator::start(&client, &ns, "op-1", false);
    let extra =
        json!({"clients": {"keysSecretRef": {"name": "team-keys"}}, "limits": {"requestsPerMinute": 6000}});
    apply(&api, &llmproxy("p", &org.url(), extra.clone())).await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    let proxy = proxy_as_its_service_account(&env, &ns).await;
    alice_gets_answers(&proxy, 1).await;

    apply(&api, &llmproxy("p", &elsewhere_url, extra.clone())).await;
    let p = condition(&api, "p", "Degraded", "True", "SecretNotAllowed").await;
    let message = degraded_message(&p);
    assert!(
        message.contains("\"localhost\"") && message.contains(llmproxy_api::ALLOWED_UPSTREAM_HOSTS),
        "{message}"
    );
    refused_by_the_proxy(&proxy).await;
    alice_gets_answers(&proxy, 3).await;
    assert!(elsewhere.mock.seen().is_empty(), "the key went elsewhere: {:?}", keys_seen(&elsewhere));
    assert_eq!(org.mock.seen().len(), 4, "the last good policy serves");

    // The owner allows that host too: the same spec now rolls out, without an edit of it.
    put_secret(&client, &ns, pinned("127.0.0.1, localhost")).await;
    condition(&api, "p", "Degraded", "False", "AsExpected").await;
    eventually("the spec to be taken up", WAIT, || async {
        alice_gets_answers(&proxy, 1).await;
        (!elsewhere.mock.seen().is_empty()).then_some(())
    })
    .await;
    assert_eq!(keys_seen(&elsewhere).last().cloned().flatten().as_deref(), Some("sk-org"));
}
