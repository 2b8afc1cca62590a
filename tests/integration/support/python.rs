//! A Python interpreter with the official OpenAI and Anthropic SDKs, for real-client tests. Found or installed
//! (into a virtualenv under the build directory); if neither works, the test fails saying what
//! to run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static PYTHON: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The SDKs the real-client tests drive the proxy with.
const SDKS: [&str; 2] = ["openai", "anthropic"];

fn has_sdks(python: &std::path::Path) -> bool {
    let import = format!("import {}", SDKS.join(", "));
    Command::new(python).args(["-c", &import]).output().is_ok_and(|o| o.status.success())
}

/// `LLMPROXY_TEST_PYTHON`, else `python3` if it imports both SDKs, else a virtualenv with
/// `pip install openai anthropic`.
pub fn python_with_sdks() -> PathBuf {
    let mut cached = PYTHON.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = cached.as_ref() {
        return p.clone();
    }
    let found =
        std::env::var_os("LLMPROXY_TEST_PYTHON").map(PathBuf::from).filter(|p| has_sdks(p)).or_else(|| {
            let system = PathBuf::from("python3");
            has_sdks(&system).then_some(system)
        });
    let python = found.unwrap_or_else(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("py-openai");
        let python = venv.join("bin/python");
        if !has_sdks(&python) {
            let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
            let installed = made.is_ok_and(|s| s.success())
                && Command::new(&python).args(["-m", "pip", "install", "-q"]).args(SDKS).status().is_ok_and(|s| s.success());
            assert!(
                installed && has_sdks(&python),
                "the OpenAI and Anthropic Python SDKs are needed for the real-client tests and could not be \
                 installed into {}: run `pip install openai anthropic` (or set LLMPROXY_TEST_PYTHON to a python \
                 that has them)",
                venv.display()
            );
        }
        python
    });
    *cached = Some(python.clone());
    python
}
