//! Background tasks that must not die silently: a policy source (the file poller, the cluster
//! watcher) runs under a supervisor that logs and counts every end or panic, reports the proxy
//! not ready while the source is down, and starts it again with a growing back-off. The last
//! good policy keeps serving throughout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Proxy;

/// Aborts the task when dropped, so that stopping a task stops the tasks it started.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run the source `start()` makes until the supervisor is dropped (aborted), restarting it
/// whenever it ends or panics.
pub async fn supervise<F, Fut>(proxy: Arc<Proxy>, name: &'static str, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        proxy.set_source_up(true);
        let mut task = AbortOnDrop(tokio::spawn(start()));
        let ended = (&mut task.0).await;
        proxy.set_source_up(false);
        proxy.metrics().source_restarts.inc();
        match ended {
            Ok(()) => {
                tracing::error!(source = name, retry_in = ?backoff, "policy source stopped; restarting it")
            }
            Err(e) if e.is_panic() => {
                tracing::error!(source = name, retry_in = ?backoff, "policy source panicked; restarting it");
            }
            Err(_) => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_source_that_panics_is_restarted_and_reported_meanwhile() {
        let (_, policy) = llmproxy_api::from_yaml(
            "apiVersion: llmproxy.io/v1alpha1\nkind: LlmProxy\nmetadata: {name: p}\nspec:\n  upstream: {url: 'http://127.0.0.1:9'}\n  limits: {requestsPerMinute: 60}\n",
        )
        .unwrap();
        let metrics = crate::Metrics::new(prometheus::Registry::new()).unwrap();
        let proxy = Proxy::new(policy, metrics, crate::Options::default()).unwrap();
        let starts = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&starts);
        let supervisor = tokio::spawn(supervise(Arc::clone(&proxy), "test", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    panic!("source {n} fails");
                }
                std::future::pending::<()>().await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(proxy.not_ready(), Some("the policy source stopped and is being restarted"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3, "restarted after each panic");
        assert_eq!(proxy.not_ready(), None, "up again");
        assert_eq!(proxy.metrics().source_restarts.get(), 2);
        supervisor.abort();
    }
}
