//! A real Kubernetes API server for tests: etcd plus kube-apiserver-lite (the upstream apiserver
//! libraries, see ../shared/kube-test-env) or, with `KUBEBUILDER_ASSETS`, the official
//! kube-apiserver. Each `KubeEnv` owns its processes, ports and temp dir and kills them on drop.

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// How to get the server binaries; printed when none is found.
const HOW_TO_PROVIDE: &str = "no Kubernetes API server for the integration tests. Provide one of:\n  \
    1. kube-apiserver-lite: check out the shared kube-test-env beside this repository (../shared/kube-test-env) \
    or set LLMPROXY_KUBE_TEST_ENV=/path/to/kube-test-env;\n  \
    2. envtest's convention: KUBEBUILDER_ASSETS=/dir/with/kube-apiserver-and-etcd \
    (for example `setup-envtest use -p path 1.33.x`).";

enum Server {
    /// kube-apiserver-lite: serves its own self-signed certificate, static tokens.
    Lite(PathBuf),
    /// The official kube-apiserver from an envtest assets directory.
    Official(PathBuf),
}

/// A running etcd + API server pair; dropped = killed.
pub struct KubeEnv {
    dir: tempfile::TempDir,
    children: Vec<(&'static str, Child)>,
    kubeconfig: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

fn find_server() -> (Server, PathBuf) {
    if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let assets = PathBuf::from(assets);
        let (api, etcd) = (assets.join("kube-apiserver"), assets.join("etcd"));
        assert!(
            api.is_file() && etcd.is_file(),
            "KUBEBUILDER_ASSETS={} lacks kube-apiserver or etcd\n{HOW_TO_PROVIDE}",
            assets.display()
        );
        return (Server::Official(api), etcd);
    }
    let env_dir = std::env::var_os("LLMPROXY_KUBE_TEST_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kube-test-env"));
    let gz = env_dir.join("bin/kube-apiserver-lite.gz");
    assert!(gz.is_file(), "{} not found: {HOW_TO_PROVIDE}", gz.display());
    let etcd = etcd_bin_vendored::etcd_bin_path().expect("etcd-bin-vendored").to_path_buf();
    (Server::Lite(unpack_lite(&gz)), etcd)
}

/// Unpack and checksum kube-apiserver-lite once per build directory: one test thread at a time
/// in this process (the temp name is per process), and an atomic rename so that other test
/// processes never run a half-written file.
fn unpack_lite(gz: &Path) -> PathBuf {
    static UNPACK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UNPACK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let sum = fs::read_to_string(gz.with_file_name("kube-apiserver-lite.sha256"))
        .unwrap_or_else(|e| panic!("reading the checksum beside {}: {e}", gz.display()));
    let sum = sum.trim();
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kube-apiserver-lite-{}", &sum[..12]));
    if bin.is_file() {
        return bin;
    }
    let tmp = bin.with_extension(format!("tmp{}", std::process::id()));
    let out = fs::File::create(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    let status = Command::new("gunzip").arg("-c").arg(gz).stdout(out).status();
    assert!(status.is_ok_and(|s| s.success()), "gunzip {} failed", gz.display());
    let check = Command::new("sha256sum").arg(&tmp).output().expect("sha256sum");
    let got = String::from_utf8_lossy(&check.stdout);
    assert!(got.starts_with(sum), "checksum mismatch for {}: {got}", gz.display());
    let status = Command::new("chmod").arg("+x").arg(&tmp).status();
    assert!(status.is_ok_and(|s| s.success()), "chmod failed");
    fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    bin
}

impl KubeEnv {
    /// Start etcd and the API server on free ports and wait until `/readyz` answers. A port
    /// picked as free can be taken by a parallel test before the server binds it; such a start
    /// is retried on new ports.
    pub async fn start() -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(env) => return env,
                Err(e) => last = e,
            }
        }
        panic!("could not start the API server three times; last failure:\n{last}");
    }

    async fn try_start() -> Result<Self, String> {
        let (server, etcd_bin) = find_server();
        let dir = tempfile::Builder::new().prefix("llmproxy-kube-").tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let mut env = KubeEnv { kubeconfig: d.join("kubeconfig"), children: Vec::new(), dir };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        env.spawn(
            "etcd",
            Command::new(&etcd_bin).args([
                "--data-dir",
                &d.join("etcd").display().to_string(),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("default={peer_url}"),
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ]),
        );

        let token = format!("{:08x}{:08x}{:08x}", rand_u32(), rand_u32(), rand_u32());
        fs::write(d.join("tokens.csv"), format!("{token},admin,admin,system:masters\n")).unwrap();
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
        ];
        let api_bin = match server {
            Server::Lite(bin) => bin,
            Server::Official(bin) => {
                let key = d.join("sa.key");
                let ok = Command::new("openssl")
                    .args(["genrsa", "-out"])
                    .arg(&key)
                    .arg("2048")
                    .stderr(Stdio::null())
                    .status();
                assert!(
                    ok.is_ok_and(|s| s.success()),
                    "openssl genrsa failed: the official kube-apiserver needs a service-account key"
                );
                args.extend([
                    "--advertise-address=127.0.0.1".to_owned(),
                    "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
                    "--authorization-mode=RBAC".to_owned(),
                    "--allow-privileged=true".to_owned(),
                    format!("--service-account-issuer=https://127.0.0.1:{api_port}"),
                    format!("--service-account-key-file={}", key.display()),
                    format!("--service-account-signing-key-file={}", key.display()),
                    "--disable-admission-plugins=ServiceAccount".to_owned(),
                ]);
                bin
            }
        };
        env.spawn("kube-apiserver", Command::new(api_bin).args(&args));

        fs::write(&env.kubeconfig, format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: test, cluster: {{server: \"https://127.0.0.1:{api_port}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: admin, user: {{token: \"{token}\"}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: admin, namespace: default}}}}]\n\
             current-context: test\n"
        )).unwrap();
        env.wait_ready().await?;
        Ok(env)
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let err = log.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.children.push((name, child));
    }

    /// The last lines a server wrote, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text = fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = self.children.iter_mut().find_map(|(name, child)| {
                child.try_wait().ok().flatten().map(|status| format!("{name} exited early ({status})"))
            });
            if let Some(exited) = exited {
                return Err(format!("{exited}:\n{}", self.logs()));
            }
            if let Ok(client) = self.try_client().await {
                let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
                if client.request_text(req).await.is_ok_and(|body| body.trim() == "ok") {
                    return Ok(());
                }
            }
            assert!(Instant::now() < deadline, "API server not ready within 60 s:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_client(&self) -> Result<Client, String> {
        let kc = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| e.to_string())?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Client::try_from(config).map_err(|e| e.to_string())
    }

    /// A client for this server (make one per tokio runtime).
    pub async fn client(&self) -> Client {
        self.try_client().await.expect("client")
    }

    /// Path of an admin kubeconfig, for processes (`llmproxy`, `kubectl`, `helm`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig (for processes) acting as ServiceAccount `namespace/name`: the admin
    /// credentials impersonate it, so the API server's RBAC decides what it may do.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{namespace}-{name}"));
        let admin = fs::read_to_string(&self.kubeconfig).unwrap();
        let groups = service_account_groups(namespace);
        let as_user = format!(
            ", as: \"system:serviceaccount:{namespace}:{name}\", as-groups: [{}]",
            groups.iter().map(|g| format!("\"{g}\"")).collect::<Vec<_>>().join(", ")
        );
        // The admin user line ends `{token: "..."}}]`: add the impersonation beside the token.
        let text = admin.replace("\"}}]\n", &format!("\"{as_user}}}}}]\n"));
        fs::write(&path, text).unwrap();
        path
    }

    /// A client acting as ServiceAccount `namespace/name` (see `service_account_kubeconfig`).
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Client {
        let path = self.service_account_kubeconfig(namespace, name);
        let kc = Kubeconfig::read_from(&path).unwrap();
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
        Client::try_from(config).unwrap()
    }

    /// A fresh namespace for one test.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let name = format!("{prefix}-{:06x}", rand_u32() & 0xff_ffff);
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        name
    }
}

/// The groups Kubernetes puts a ServiceAccount in.
fn service_account_groups(namespace: &str) -> Vec<String> {
    vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_owned(),
    ]
}

fn rand_u32() -> u32 {
    let mut buf = [0u8; 4];
    let ok = fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf));
    if ok.is_err() {
        return std::process::id();
    }
    u32::from_le_bytes(buf)
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        // apiserver first, so it does not log etcd connection errors on the way out.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "{}", self.logs());
        }
    }
}
