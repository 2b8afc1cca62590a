//! The real `llmproxy proxy` binary: hot reload from its file, graceful shutdown on SIGTERM,
//! secrets kept out of logs, metrics and errors, and the official OpenAI Python SDK as a client.

use std::time::Duration;

use llmproxy_mock::{Fault, MockConfig, load};
use serde_json::json;

use crate::support::eventually;
use crate::support::proxy_env::{ProxyProcess, get_text, manifest, metric, mock, post_json};
use crate::support::python::python_with_sdks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_file_reloads_the_policy_in_place() {
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let queue = "  queue: {maxSize: 100, maxWait: 500ms}\n";
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", queue)).unwrap();
    let proxy = ProxyProcess::start(&file, &[], &[]).await;
    let pid = proxy.pid();
    let client = llmproxy_mock::load::client();
    let metrics_url = format!("http://{}/metrics", proxy.admin);

    let fast = load::burst(&client, &proxy.url("/chat/completions"), None, 5).await;
    assert_eq!(fast.ok, 5, "{fast:?}");

    // Lower the rate to one per second.
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 60}", queue)).unwrap();
    eventually("the new limit to be in force", Duration::from_secs(2), || {
        let url = metrics_url.clone();
        async move { (metric(&get_text(&url).await, "llmproxy_limit_requests_per_minute") == 60.0).then_some(()) }
    })
    .await;
    // One goes at once; the others would wait a second, longer than maxWait allows.
    let slow = load::burst(&client, &proxy.url("/chat/completions"), None, 3).await;
    assert_eq!((slow.ok, slow.rate_limited), (1, 2), "{slow:?}");

    // A broken file is refused with a log line naming the field; the last good policy serves on.
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 0}", queue)).unwrap();
    eventually("the broken policy to be refused", Duration::from_secs(5), || {
        let logs = proxy.logs();
        async move { logs.contains("spec.limits.requestsPerMinute: must be > 0").then_some(()) }
    })
    .await;
    let m = get_text(&metrics_url).await;
    assert_eq!(metric(&m, "llmproxy_limit_requests_per_minute"), 60.0);
    assert_eq!(metric(&m, "llmproxy_policy_reloads_total{result=\"rejected\"}"), 1.0);
    std::fs::write(&file, "limits: [this is not yaml").unwrap();
    eventually("unparseable YAML to be refused", Duration::from_secs(5), || {
        let url = metrics_url.clone();
        async move {
            (metric(&get_text(&url).await, "llmproxy_policy_reloads_total{result=\"rejected\"}") == 2.0)
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // let the 1/s bucket refill once
    let (status, _, _) = post_json(&proxy.url("/chat/completions"), &load::chat_body(99)).await;
    assert_eq!(status, 200, "still serving on the last good policy");
    assert_eq!(proxy.pid(), pid, "same process throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let upstream = mock(MockConfig { latency: Duration::from_millis(1500), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", "")).unwrap();
    let mut proxy = ProxyProcess::start(&file, &["--log-format", "text"], &[]).await;
    let url = proxy.url("/chat/completions");
    let inflight = tokio::spawn(async move { post_json(&url, &load::chat_body(1)).await.0 });
    let mock_state = upstream.mock.clone();
    eventually("the request to reach the upstream", Duration::from_secs(5), || {
        let n = mock_state.seen().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    proxy.terminate();
    assert_eq!(inflight.await.ok(), Some(200), "the in-flight request finished");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0), "exit code; logs:\n{}", proxy.logs());
    assert!(proxy.logs().contains("shutting down"), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_appear_in_logs_metrics_or_error_bodies() {
    const UPSTREAM_KEY: &str = "sk-upstream-SECRET-7f3a";
    const CLIENT_KEY: &str = "sk-client-SECRET-91bc";
    let upstream = mock(MockConfig { api_key: Some(UPSTREAM_KEY.into()), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let spec = "  retry: {maxAttempts: 2, initialBackoff: 10ms}\n";
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", spec)).unwrap();
    let proxy = ProxyProcess::start(
        &file,
        &["--max-request-bytes", "2048"],
        &[("LLMPROXY_UPSTREAM_API_KEY", UPSTREAM_KEY)],
    )
    .await;
    let client = llmproxy_mock::load::client();
    let mut bodies = Vec::new();
    let send = |body: String| {
        client
            .post(proxy.url("/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in [
        load::chat_body(1).to_string(),
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        "{not json".to_owned(),
        "x".repeat(4096),
    ] {
        let resp = send(body).await.unwrap();
        bodies.push(resp.text().await.unwrap_or_default());
    }
    upstream.mock.inject(Fault::Status { status: 503, retry_after_secs: None, code: None }, 2);
    bodies.push(send(load::chat_body(2).to_string()).await.unwrap().text().await.unwrap_or_default());
    upstream.mock.set_api_key(Some("sk-rotated-elsewhere".into()));
    let resp = send(load::chat_body(3).to_string()).await.unwrap();
    assert_eq!(resp.status(), 401);
    bodies.push(resp.text().await.unwrap_or_default());
    upstream.stop();
    bodies.push(send(load::chat_body(4).to_string()).await.unwrap().text().await.unwrap_or_default());

    let metrics = get_text(&format!("http://{}/metrics", proxy.admin)).await;
    eventually("a log line per request", Duration::from_secs(5), || {
        let n = proxy.logs().matches("\"request_id\"").count();
        async move { (n >= 7).then_some(()) }
    })
    .await;
    let logs = proxy.logs();
    for (what, text) in [("logs", &logs), ("metrics", &metrics), ("bodies", &bodies.join("\n"))] {
        for secret in ["SECRET-7f3a", "SECRET-91bc"] {
            assert!(!text.contains(secret), "{secret} leaked into {what}:\n{text}");
        }
    }
    assert!(bodies.iter().any(|b| b.contains("could not be reached")), "{bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works_through_the_proxy() {
    let python = python_with_sdks();
    let upstream = mock(MockConfig { api_key: Some("sk-upstream".into()), ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    let extra = "  cache: {ttl: 5m}\n  clients:\n    keysSecretRef: {name: team-keys}\n";
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", extra)).unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-upstream\n").unwrap();
    let key_arg = key_file.display().to_string();
    let clients_file = dir.path().join("clients.yaml");
    std::fs::write(&clients_file, "notebook: sk-team-notebook\n").unwrap();
    let clients_arg = clients_file.display().to_string();
    let proxy = ProxyProcess::start(
        &file,
        &[
            "--upstream-api-key-file",
            &key_arg,
            "--client-keys-file",
            &clients_arg,
            "--max-request-bytes",
            "16384",
        ],
        &[],
    )
    .await;
    let script = crate::support::repo_path("tests/python/openai_sdk_check.py");
    let base = format!("http://{}/v1", proxy.addr);
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg("sk-team-notebook")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "openai SDK check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai sdk: ok"));
    let metrics = get_text(&format!("http://{}/metrics", proxy.admin)).await;
    assert!(
        metric(&metrics, "llmproxy_requests_total{client=\"notebook\",outcome=\"ok\"}") >= 5.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "llmproxy_requests_total{outcome=\"unauthorized\"}"), 2.0, "{metrics}");
    assert!(
        upstream.mock.seen().iter().all(|s| s.key.as_deref() == Some("sk-upstream")),
        "only the upstream key goes upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_are_refused_by_check_and_by_a_running_proxy() {
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("llmproxy.yaml");
    for (wait, field_message) in [
        ("6000000000000000h", "spec.queue.maxWait: duration \"6000000000000000h\" is too large"),
        ("3000000000000000h", "spec.queue.maxWait: must be at most 24h"),
    ] {
        let queue = format!("  queue: {{maxWait: {wait}}}\n");
        std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", &queue)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "exit code for {wait}: {stderr}");
        assert!(stderr.contains(field_message) && !stderr.contains("panicked"), "{stderr}");
    }

    // A running proxy refuses the same edit, keeps its policy, and keeps watching the file.
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 6000}", "")).unwrap();
    let proxy = ProxyProcess::start(&file, &[], &[]).await;
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    let bad = manifest(&upstream.url(), "{requestsPerMinute: 60}", "  queue: {maxWait: 3000000000000000h}\n");
    std::fs::write(&file, bad).unwrap();
    eventually("the absurd wait to be refused", Duration::from_secs(5), || {
        let url = metrics_url.clone();
        async move {
            (metric(&get_text(&url).await, "llmproxy_policy_reloads_total{result=\"rejected\"}") == 1.0)
                .then_some(())
        }
    })
    .await;
    assert!(proxy.logs().contains("spec.queue.maxWait: must be at most 24h"), "{}", proxy.logs());
    assert_eq!(metric(&get_text(&metrics_url).await, "llmproxy_limit_requests_per_minute"), 6000.0);
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 60}", "")).unwrap();
    eventually("the next good edit to apply", Duration::from_secs(5), || {
        let url = metrics_url.clone();
        async move { (metric(&get_text(&url).await, "llmproxy_limit_requests_per_minute") == 60.0).then_some(()) }
    })
    .await;
    let (status, _, _) = post_json(&proxy.url("/chat/completions"), &load::chat_body(1)).await;
    assert_eq!(status, 200);
    assert_eq!(get_text(&format!("http://{}/readyz", proxy.admin)).await, "ok");
}

#[test]
fn check_prints_the_manifest_with_defaults_and_it_reads_back_to_the_same_policy() {
    for example in
        ["examples/openai.yaml", "examples/upstreams.yaml", "examples/teams.yaml", "examples/org-quota.yaml"]
    {
        let path = crate::support::repo_path(example);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&printed)
            .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{example}: {e}")))
            .collect();
        let yaml = &docs[0];
        assert!(yaml["spec"]["queue"]["maxWait"].is_string(), "{example}: defaults filled in:\n{printed}");
        let original = llmproxy_api::from_yaml(&std::fs::read_to_string(&path).unwrap_or_default()).unwrap();
        let again = llmproxy_api::from_yaml(&printed).unwrap_or_else(|e| panic!("{example}: {e}\n{printed}"));
        assert_eq!(again.1, original.1, "{example}: the same policy");
        assert_eq!(again.0.spec, original.0.spec, "{example}: the same spec");
    }
    let broken = crate::support::repo_path("examples/invalid/backoff-exceeds-max.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .arg("check")
        .arg(&broken)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("The LlmProxy \"broken\" is invalid:")
            && stderr.contains("* spec.limits.requestsPerMinute: must be > 0")
            && stderr.contains("* spec.retry.initialBackoff: must not exceed maxBackoff"),
        "kubectl-like, one line per field: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_is_logged_as_a_redis_password() {
    let redis = crate::support::redis::RedisServer::start(Some("s3cret-redis")).await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("redis-auth")).unwrap();
    std::fs::write(secrets.join("redis-auth").join("password"), "s3cret-redis").unwrap();
    let shared = format!(
        "  sharedState: {{redis: {{url: '{}', passwordSecretRef: {{name: redis-auth}}}}}}\n",
        redis.url()
    );
    let file = dir.path().join("llmproxy.yaml");
    std::fs::write(&file, manifest(&upstream.url(), "{requestsPerMinute: 600}", &shared)).unwrap();
    let secrets = secrets.display().to_string();
    let proxy =
        ProxyProcess::start(&file, &["--secrets-dir", &secrets], &[("LLMPROXY_UPSTREAM_API_KEY", "sk-up")])
            .await;
    // The password works (shared mode), and its log line says what it is.
    let metrics = format!("http://{}/metrics", proxy.admin);
    eventually("shared mode with the password", Duration::from_secs(20), || {
        let metrics = metrics.clone();
        async move {
            (metric(&get_text(&metrics).await, "llmproxy_quota_mode{mode=\"shared\"}") == 1.0).then_some(())
        }
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.contains("Redis password loaded"), "{logs}");
    assert!(!logs.contains("upstream API key loaded"), "the password is not an upstream key: {logs}");
    assert!(!logs.contains("s3cret-redis"), "the password leaked into the logs");
}
