//! Attempts: wait for admission, send once, and decide (purely, in `next_step`) whether and
//! when to try again.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use llmproxy_api::Policy;
use llmproxy_api::policy::RetryPolicy;
use tokio::time::Instant;

use super::intake::Outgoing;
use super::record::RecordGuard;
use super::respond::Answer;
use crate::error::ApiError;
use crate::labels::Outcome;
use crate::retry::{self, RetryReason};
use crate::state::Proxy;
use crate::upstream;

/// An attempt that did not produce an answer to relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Why it failed.
    pub(crate) reason: RetryReason,
    /// How long the upstream asked us to wait, if it said so.
    pub(crate) hint: Option<Duration>,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Try again after `delay`; `pause` holds admission for everyone until then (the upstream's
    /// window is spent).
    Retry { delay: Duration, pause: bool },
    /// No attempt left, or none could start before the deadline.
    GiveUp,
}

/// The decision after failed attempt number `attempt` (1-based) at `now`; `unit` in [0, 1)
/// picks the jitter.
pub(crate) fn next_step(
    failure: Failure,
    attempt: u32,
    retry: &RetryPolicy,
    now: Instant,
    deadline: Instant,
    unit: f64,
) -> Step {
    let delay = failure.hint.unwrap_or_else(|| retry::backoff(retry, attempt, unit));
    let in_time = now.checked_add(delay).is_some_and(|resume| resume < deadline);
    if attempt >= retry.max_attempts || !in_time {
        return Step::GiveUp;
    }
    Step::Retry { delay, pause: failure.reason == RetryReason::RateLimited }
}

/// The result of sending once.
enum Sent {
    /// An answer to relay (2xx, or a status not worth retrying).
    Answer(reqwest::Response),
    /// The upstream refused our own key.
    Unauthorized(reqwest::Response),
    /// A retryable status: the response (to relay if we give up) and what it said.
    Retryable(reqwest::Response, Failure),
    /// No response at all.
    Failed(Failure, String),
}

async fn send_once(proxy: &Proxy, policy: &Policy, out: &Outgoing, record: &mut RecordGuard) -> Sent {
    let headers = upstream::request_headers(&out.headers, proxy.api_key().as_deref());
    let send = proxy.client().request(out.method.clone(), &out.url).headers(headers).body(out.body.clone());
    let sent = Instant::now();
    let result = tokio::time::timeout(policy.upstream.timeout, send.send()).await;
    let latency = sent.elapsed();
    record.get().upstream_latency = Some(latency);
    let metrics = proxy.metrics();
    metrics.upstream_latency.observe(latency.as_secs_f64());
    match result {
        Ok(Ok(resp)) => {
            let status = resp.status();
            metrics.upstream_status(status.as_u16());
            if status == StatusCode::UNAUTHORIZED {
                return Sent::Unauthorized(resp);
            }
            match RetryReason::for_status(status) {
                None => Sent::Answer(resp),
                Some(reason) => {
                    let hint = retry::upstream_delay(status, resp.headers(), SystemTime::now());
                    Sent::Retryable(resp, Failure { reason, hint })
                }
            }
        }
        Ok(Err(e)) => {
            metrics.upstream_failure("connect_error");
            Sent::Failed(Failure { reason: RetryReason::Connect, hint: None }, e.without_url().to_string())
        }
        Err(_) => {
            metrics.upstream_failure("timeout");
            let msg = format!("no response within {:?}", policy.upstream.timeout);
            Sent::Failed(Failure { reason: RetryReason::Timeout, hint: None }, msg)
        }
    }
}

/// Read (and drop) a small error body so the connection can be reused.
async fn drain(resp: reqwest::Response) {
    let _ = tokio::time::timeout(Duration::from_secs(1), resp.bytes()).await;
}

/// Run attempts until one gives an answer to relay or no attempt is left.
pub(crate) async fn run(proxy: &Proxy, policy: &Policy, out: &Outgoing, record: &mut RecordGuard) -> Answer {
    let started = record.get().started;
    let deadline = started.checked_add(policy.queue.max_wait).unwrap_or(started);
    let reserve = record.get().estimate.total();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        // A retry was admitted once already: the queue bound is for new arrivals, not for it.
        let max_queue = if attempt == 1 { policy.queue.max_size } else { usize::MAX };
        let mut permit = match proxy.admission().admit(reserve, deadline, max_queue).await {
            Ok(p) => p,
            Err(rejection) => {
                let outcome = if rejection.queue_full { Outcome::QueueFull } else { Outcome::QueueTimeout };
                return Answer::Refused(ApiError::throttled(&rejection, policy.queue.max_wait), outcome);
            }
        };
        let rec = record.get();
        rec.attempts = attempt;
        rec.queue_wait += permit.waited;

        let relay = |response, permit| Answer::Upstream {
            response,
            permit,
            idle_timeout: policy.upstream.timeout,
            strip_usage_event: out.strip_usage_event,
        };
        let (failure, last) = match send_once(proxy, policy, out, record).await {
            Sent::Answer(resp) => return relay(resp, permit),
            Sent::Unauthorized(resp) => {
                // The upstream refused the proxy's key, not the client's: say so, and never
                // relay its body (OpenAI's quotes part of the key).
                permit.settle(0);
                drain(resp).await;
                return Answer::Refused(ApiError::upstream_auth(), Outcome::UpstreamError);
            }
            Sent::Retryable(resp, failure) => (failure, Ok(resp)),
            Sent::Failed(failure, message) => (failure, Err(message)),
        };
        // A refused attempt generated nothing: give its tokens back, keep the request counted.
        // A timed-out one may have been worked on upstream, so its reservation stays spent.
        if failure.reason != RetryReason::Timeout {
            permit.settle(0);
        }
        let now = Instant::now();
        let (delay, pause) = match next_step(failure, attempt, &policy.retry, now, deadline, fastrand::f64())
        {
            Step::Retry { delay, pause } => (delay, pause),
            Step::GiveUp => {
                return match last {
                    Ok(resp) => relay(resp, permit),
                    Err(message) => {
                        let (status, what) = match failure.reason {
                            RetryReason::Timeout => (StatusCode::GATEWAY_TIMEOUT, "did not answer in time"),
                            _ => (StatusCode::BAD_GATEWAY, "could not be reached"),
                        };
                        let text = format!("the upstream API {what} after {attempt} attempt(s): {message}");
                        Answer::Refused(ApiError::upstream(status, text), Outcome::UpstreamError)
                    }
                };
            }
        };
        if pause && let Some(until) = now.checked_add(delay) {
            // The upstream's window is spent for everyone: hold the whole queue, not just us.
            proxy.admission().pause_until(until);
        }
        drop(permit);
        if let Ok(resp) = last {
            drain(resp).await;
        }
        proxy.metrics().retry(failure.reason);
        record.get().retry_reasons.push(failure.reason);
        if !pause {
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            multiplier: 2.0,
            jitter: false,
        }
    }

    fn failure(reason: RetryReason, hint: Option<u64>) -> Failure {
        Failure { reason, hint: hint.map(Duration::from_secs) }
    }

    #[test]
    fn backs_off_until_attempts_run_out() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let f = failure(RetryReason::ServerError, None);
        let steps: Vec<Step> = (1..=4).map(|n| next_step(f, n, &policy(4), now, deadline, 0.0)).collect();
        let secs = |s| Step::Retry { delay: Duration::from_secs(s), pause: false };
        assert_eq!(steps, [secs(1), secs(2), secs(4), Step::GiveUp]);
    }

    #[test]
    fn the_upstreams_word_wins_and_a_429_pauses_everyone() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let step = next_step(failure(RetryReason::RateLimited, Some(7)), 1, &policy(4), now, deadline, 0.0);
        assert_eq!(step, Step::Retry { delay: Duration::from_secs(7), pause: true });
    }

    #[test]
    fn no_retry_that_could_not_start_before_the_deadline() {
        let now = Instant::now();
        let f = failure(RetryReason::RateLimited, Some(5));
        assert_eq!(next_step(f, 1, &policy(4), now, now + Duration::from_secs(5), 0.0), Step::GiveUp);
        assert_eq!(next_step(f, 1, &policy(1), now, now + Duration::from_secs(60), 0.0), Step::GiveUp);
    }
}
