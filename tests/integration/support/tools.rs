//! The system programs some integration tests start (Debian's `redis-server`, `prometheus`,
//! `promtool`): found by an environment variable or on PATH, or the test fails at once with the
//! command that installs them instead of an opaque spawn error.

use std::path::Path;

/// The program `env` names, else `name` from PATH; panics with the install command for
/// Debian's `package` when neither is there.
pub fn require(name: &str, env: &str, package: &str) -> String {
    let program = std::env::var(env).unwrap_or_else(|_| name.to_owned());
    let found = if program.contains('/') {
        Path::new(&program).is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(&program).is_file()))
    };
    assert!(
        found,
        "`{program}` is needed by this test and is not installed (set {env} or put `{name}` on PATH). \
         Install it with `sudo apt-get install -y {package}`, or run `scripts/test`, which installs \
         what the tests need; `scripts/test --fast` runs the tests that need nothing beyond cargo"
    );
    program
}
