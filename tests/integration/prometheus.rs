//! The dashboard and the alerts against a real Prometheus (Debian's `prometheus` and
//! `promtool`): every panel and alert expression is evaluated over real scrapes of a running
//! proxy and operator metrics, and the alerts' promtool unit tests run on the rendered rules.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;
use llmproxy_mock::{Fault, MockConfig, load};
use serde_json::Value;

use crate::support::proxy_env::{TestProxy, free_addr, get_text, mock};
use crate::support::{eventually, helm, repo_path};

fn tool(name: &str, env: &str) -> String {
    crate::support::tools::require(name, env, "prometheus")
}

/// The chart's PrometheusRule, rendered with `values` (`--set-json prometheusRule=...`), as a
/// Prometheus rule file.
fn rendered_rules(values: &str) -> String {
    let chart = repo_path("charts/llmproxy").display().to_string();
    let set = format!("prometheusRule={values}");
    let out = helm::ok(&[
        "template",
        "x",
        &chart,
        "--set-json",
        &set,
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let rule: Value = serde_yaml::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    serde_yaml::to_string(&serde_json::json!({"groups": rule["spec"]["groups"]})).unwrap_or_default()
}

fn alert_exprs(rules: &str) -> Vec<(String, String)> {
    let v: Value = serde_yaml::from_str(rules).unwrap_or_default();
    v["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["alert"].as_str().unwrap_or_default().to_owned(),
                r["expr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn promtool_checks_the_rendered_alerts_and_each_fires_only_where_meant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yml"), rendered_rules(r#"{"enabled": true}"#)).unwrap();
    std::fs::copy(repo_path("tests/prometheus/alerts_test.yml"), dir.path().join("alerts_test.yml")).unwrap();
    let promtool = tool("promtool", "LLMPROXY_PROMTOOL");
    for args in [["check", "rules", "rules.yml"], ["test", "rules", "alerts_test.yml"]] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{promtool} (install Debian's prometheus): {e}"));
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let addr = free_addr();
        let child = Command::new(tool("prometheus", "LLMPROXY_PROMETHEUS"))
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (install Debian's prometheus)");
        let p = Self { child, addr, _dir: dir };
        let ready = format!("http://{addr}/-/ready");
        eventually("prometheus to be ready", Duration::from_secs(30), || {
            let ready = ready.clone();
            async move { get_text(&ready).await.contains("Ready").then_some(()) }
        })
        .await;
        p
    }

    /// The result of an instant query; `Err` with Prometheus' error when it does not parse.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let resp = load::client()
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("query={}", urlencode(expr)))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_str(&resp.text().await.unwrap_or_default()).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(v["error"].as_str().unwrap_or("no error text").to_owned());
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Serve the operator's metrics the way its admin port does.
async fn serve_operator_metrics(metrics: llmproxy_operator::Metrics) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { m.render() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn dashboard_exprs(path: &Path) -> Vec<(String, String)> {
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default();
    d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or_default().to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_evaluates_every_panel_and_alert_over_real_scrapes() {
    // A proxy with a live endpoint and a dead one, the cache on, a small queue.
    let upstream = mock(MockConfig {
        requests_per_minute: Some(100_000),
        tokens_per_minute: Some(10_000_000),
        ..MockConfig::default()
    })
    .await;
    // And one for a model only it serves, whose account is out of credit.
    let broke = mock(MockConfig::default()).await;
    broke.mock.set_out_of_credit(true);
    let manifest = format!(
        "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {{name: team}}\nspec:\n  upstreams:\n    - {{name: live, url: '{}', models: [gpt-4o-mini]}}\n    - {{name: dead, url: 'http://127.0.0.1:9/v1', models: [gpt-4o-mini]}}\n    - {{name: broke, url: '{}', models: [credit-test]}}\n  limits: {{requestsPerMinute: 6000, tokensPerMinute: 100000, maxConcurrent: 2}}\n  queue: {{maxSize: 10, maxWait: 60s}}\n  retry: {{initialBackoff: 10ms}}\n  cache: {{ttl: 5m}}\n",
        upstream.url(),
        broke.url()
    );
    let proxy = TestProxy::start(&manifest, None).await;
    let operator = llmproxy_operator::Metrics::new(prometheus::Registry::new()).unwrap();
    operator.reconciles.with_label_values(&["ok"]).inc();
    operator.failures.with_label_values(&["conflict"]).inc();
    let operator_addr = serve_operator_metrics(operator.clone()).await;
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: llmproxy\n    static_configs:\n      - targets: ['{}']\n        labels: {{namespace: team, service: team}}\n  - job_name: operator\n    static_configs:\n      - targets: ['{operator_addr}']\n        labels: {{namespace: llmproxy-system}}\n",
        proxy.admin
    );
    let prom = Prometheus::start(&config).await;
    // Traffic only once Prometheus scrapes, so that every rate sees it happen.
    eventually("the first scrapes", Duration::from_secs(30), || async {
        let up = prom.query("min(up) == 1 and count(up) == 2").await.ok()?;
        (!up.is_empty()).then_some(())
    })
    .await;
    let client = load::client();
    let url = proxy.url("/chat/completions");
    // Traffic of every kind: a dead endpoint taken out, a 503 retried, an upstream 429, a
    // cache hit, and finally a queue full of held requests with the overflow refused.
    for i in 0..6 {
        let _ = load::shoot(&client, &url, None, &load::chat_body(i)).await;
    }
    upstream.mock.inject(Fault::Status { status: 503, retry_after_secs: None, code: None }, 1);
    let _ = load::shoot(&client, &url, None, &load::chat_body(10)).await;
    upstream.mock.inject(Fault::Status { status: 429, retry_after_secs: None, code: None }, 1);
    let _ = load::shoot(&client, &url, None, &load::chat_body(11)).await;
    let _ = load::shoot(&client, &url, None, &load::chat_body(11)).await;
    let credit = serde_json::json!({"model": "credit-test", "messages": [{"role": "user", "content": "hi"}]});
    let _ = load::shoot(&client, &url, None, &credit).await;
    upstream.mock.hold();
    let held = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            join_all((0..20).map(|i| {
                let (client, url) = (client.clone(), url.clone());
                async move { load::shoot(&client, &url, None, &load::chat_body(100 + i)).await.status }
            }))
            .await
        }
    });

    // Enough scrapes for rates, with the queue full and the operator failing meanwhile.
    eventually("a few scrapes of both", Duration::from_secs(60), || async {
        operator.failures.with_label_values(&["conflict"]).inc();
        let up = prom.query("min(count_over_time(up[1m])) >= 5 and min(up) == 1").await.ok()?;
        (!up.is_empty()).then_some(())
    })
    .await;

    let mut failures = Vec::new();
    let substitute = |e: &str| {
        e.replace("$__rate_interval", "1m")
            .replace("$namespace", ".*")
            .replace("$proxy", ".*")
            .replace("$client", ".*")
    };
    let panels = dashboard_exprs(&repo_path("charts/llmproxy/files/grafana-dashboard.json"));
    assert!(panels.len() >= 20, "{panels:?}");
    for (title, expr) in &panels {
        match prom.query(&substitute(expr)).await {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("panel {title:?}: no series for {expr}")),
            Err(e) => failures.push(format!("panel {title:?}: {e} in {expr}")),
        }
    }
    // The alerts with thresholds this traffic crosses: each expression must select real series.
    let rules = rendered_rules(
        r#"{"enabled": true, "throttledPerSecond": 0, "queueFullRatio": 0.01, "upstreamErrorRatio": 0.001, "tokensNearLimitRatio": 0.0001}"#,
    );
    let alerts = alert_exprs(&rules);
    assert_eq!(alerts.len(), 7, "{rules}");
    for (alert, expr) in &alerts {
        match prom.query(expr).await {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("alert {alert}: no series for {expr}")),
            Err(e) => failures.push(format!("alert {alert}: {e} in {expr}")),
        }
    }
    upstream.mock.release();
    let statuses = held.await.unwrap_or_default();
    assert!(statuses.contains(&Some(429)) && statuses.contains(&Some(200)), "{statuses:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
