//! A Python interpreter with the official OpenAI SDK, for real-client tests. Found or installed
//! (into a virtualenv under the build directory); if neither works, the test fails saying what
//! to run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static PYTHON: Mutex<Option<PathBuf>> = Mutex::new(None);

fn has_openai(python: &std::path::Path) -> bool {
    Command::new(python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success())
}

/// `LLMPROXY_TEST_PYTHON`, else `python3` if it imports `openai`, else a virtualenv with
/// `pip install openai`.
pub fn python_with_openai() -> PathBuf {
    let mut cached = PYTHON.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = cached.as_ref() {
        return p.clone();
    }
    let found =
        std::env::var_os("LLMPROXY_TEST_PYTHON").map(PathBuf::from).filter(|p| has_openai(p)).or_else(|| {
            let system = PathBuf::from("python3");
            has_openai(&system).then_some(system)
        });
    let python = found.unwrap_or_else(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("py-openai");
        let python = venv.join("bin/python");
        if !has_openai(&python) {
            let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
            let installed = made.is_ok_and(|s| s.success())
                && Command::new(&python).args(["-m", "pip", "install", "-q", "openai"]).status().is_ok_and(|s| s.success());
            assert!(
                installed && has_openai(&python),
                "the OpenAI Python SDK is needed for the real-client tests and could not be installed into {}: \
                 run `pip install openai` (or set LLMPROXY_TEST_PYTHON to a python that has it)",
                venv.display()
            );
        }
        python
    });
    *cached = Some(python.clone());
    python
}
