//! A real `redis-server` (Debian's, installed by `scripts/test`) on a free port, without persistence,
//! killed on drop; it can be killed and started again on the same port (an outage, then a
//! Redis that lost its data).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::eventually;
use super::proxy_env::free_addr;

/// One `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    password: Option<String>,
}

fn binary() -> String {
    super::tools::require("redis-server", "LLMPROXY_REDIS_SERVER", "redis-server")
}

impl RedisServer {
    /// Start one (with `requirepass` when a password is given); waits until it answers.
    pub async fn start(password: Option<&str>) -> Self {
        let mut r = Self { child: None, addr: free_addr(), password: password.map(str::to_owned) };
        r.restart().await;
        r
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kill it at once (SIGKILL, paused or not): connections are refused until it is restarted.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop it without closing anything (SIGSTOP): a Redis that hangs rather than refuses.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused Redis go on (SIGCONT), with its data.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill").args([signal, &c.id().to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "kill {signal} redis-server");
        }
    }

    /// Start it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let mut cmd = Command::new(binary());
        cmd.args([
            "--port",
            &self.addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} (install Debian's redis-server): {e}", binary()));
        self.child = Some(child);
        let addr = self.addr;
        eventually("redis-server to answer", Duration::from_secs(20), || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
            c.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).await.ok()?;
            // +PONG, or -NOAUTH when a password is required: either way it is up.
            (n > 0).then_some(())
        })
        .await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
