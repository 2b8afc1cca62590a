//! A real `redis-server` (Debian's, installed by `scripts/test`) on a free port, without persistence,
//! killed on drop; it can be killed and started again on the same port (an outage, then a
//! Redis that lost its data).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
        // The free port may be taken before redis-server binds it (it then exits): another.
        for _ in 0..5 {
            if r.run().await {
                return r;
            }
            r.addr = free_addr();
        }
        panic!("redis-server did not start on any of five free ports");
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
        assert!(self.run().await, "redis-server did not start again on {}", self.addr);
    }

    /// Start it on its port and wait until it answers; false if it exited first (the port was
    /// taken).
    async fn run(&mut self) -> bool {
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
        let addr = self.addr;
        let mut child = child;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if answers(addr, self.password.as_deref(), child.id()).await {
                self.child = Some(child);
                return true;
            }
            assert!(std::time::Instant::now() < deadline, "redis-server on {addr} did not answer in 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether the redis-server on `addr` is process `pid` (not another test's that holds the port).
async fn answers(addr: SocketAddr, password: Option<&str>, pid: u32) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://{addr}/0")) else { return false };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return false };
    if let Some(pw) = password
        && redis::cmd("AUTH").arg(pw).query_async::<()>(&mut c).await.is_err()
    {
        return false;
    }
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await.unwrap_or_default();
    info.lines().any(|l| l.trim() == format!("process_id:{pid}"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
