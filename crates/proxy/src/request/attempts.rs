//! Attempts: wait for admission, send once, and decide (purely, in `next_step`) whether and
//! when to try again.
//!
//! Two kinds of trying again: an upstream 429 means that endpoint's quota window is spent, so
//! the request goes back to its place in line (a requeue) and goes to another endpoint at once
//! or waits for the window, as often as its queue deadline allows; a transient error (5xx,
//! 408, a connection that failed before any answer) is retried, on another endpoint at once
//! where one can take it, else after a back-off, at most `retry.maxAttempts` attempts in all
//! and within the retry budget. An attempt that timed out is not sent to the same endpoint
//! again: it may still be running there, and be billed. An upstream that answered, whatever it
//! answered (say, 413 while the body was still uploading), is answered to the client.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use std::sync::Arc;

use llmproxy_api::Policy;
use llmproxy_api::policy::{RetryPolicy, UpstreamPolicy};
use tokio::time::Instant;

use super::auth::Client;
use super::intake::Intake;
use super::record::Tried;
use super::respond::Answer;
use crate::admission::limiter::{Limit, Verdict};
use crate::admission::queue::{Permit, Rejection, Report};
use crate::admission::retry::{self, RetryReason};
use crate::protocol::provider::{self, TooMany};
use crate::proxy::Proxy;
use crate::request::error::{ApiError, Refusal};
use crate::telemetry::labels::Outcome;
use crate::upstream;

/// An attempt that did not produce an answer to relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Why it failed.
    pub(crate) reason: RetryReason,
    /// How long the upstream asked us to wait, if it said so.
    pub(crate) hint: Option<Duration>,
    /// A 429 whose headers said what remains of the quota: the buckets were corrected, and
    /// they now hold requests back for as long as the window needs.
    pub(crate) window_known: bool,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The quota window is spent: back to the request's place in line. `pause`: hold the
    /// request's model (everything, without a model) that long first.
    Requeue { pause: Option<Duration> },
    /// A transient error: try again after `delay`.
    Retry { delay: Duration },
    /// No attempt left, or none could start before the deadline.
    GiveUp,
}

/// What the rest of the proxy says about trying again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Prospects {
    /// Another endpoint could take the request now.
    pub(crate) elsewhere: bool,
    /// In [0, 1): picks the jitter.
    pub(crate) unit: f64,
}

/// The decision after a failed attempt at `now`: `errors` transient errors so far (this one
/// included), `limited` 429s so far (this one included).
pub(crate) fn next_step(
    failure: Failure,
    errors: u32,
    limited: u32,
    retry: &RetryPolicy,
    now: Instant,
    deadline: Instant,
    prospects: Prospects,
) -> Step {
    let unit = prospects.unit;
    let in_time = |d: Duration| now.checked_add(d).is_some_and(|resume| resume < deadline);
    if failure.reason == RetryReason::RateLimited {
        let pause = match failure.hint {
            Some(hint) => Some(hint),
            None if failure.window_known => None,
            None => Some(retry::backoff(retry, limited, unit)),
        };
        // Another endpoint may take it at once; else it must be able to wait out the pause.
        let fits = prospects.elsewhere || in_time(pause.unwrap_or_default());
        return if fits { Step::Requeue { pause } } else { Step::GiveUp };
    }
    // A timed-out attempt may still be running upstream, and be billed: never send it again to
    // the same endpoint.
    if failure.reason == RetryReason::Timeout && !prospects.elsewhere {
        return Step::GiveUp;
    }
    let delay = if prospects.elsewhere {
        Duration::ZERO
    } else {
        failure.hint.unwrap_or_else(|| retry::backoff(retry, errors, unit))
    };
    if errors >= retry.max_attempts || !in_time(delay) {
        return Step::GiveUp;
    }
    Step::Retry { delay }
}

/// The result of sending once.
enum Sent {
    /// An answer to relay (2xx, or a status not worth retrying).
    Answer(upstream::Response),
    /// The upstream refused our own key.
    Unauthorized(upstream::Response),
    /// A 429 about the quota window, read whole (it is small).
    RateLimited { headers: HeaderMap, body: Bytes, hint: Option<Duration> },
    /// A 429 that waiting cannot fix (the account is out of credit), read whole.
    OutOfQuota { headers: HeaderMap, body: Bytes, exhaustion: provider::Exhaustion },
    /// A transient error status: the response (to relay if we give up) and what it said.
    Transient(upstream::Response, Failure),
    /// No response at all; `unsent` when no connection was made, so the upstream never saw it.
    Failed { failure: Failure, message: String, unsent: bool },
}

/// The largest 429 body read to see what it is about.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Read a small error body, within a second and a bound.
async fn read_small(resp: upstream::Response) -> Bytes {
    let mut buf = BytesMut::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), upstream::read_into(resp, &mut buf, MAX_ERROR_BODY))
        .await;
    buf.freeze()
}

async fn send_once(
    proxy: &Proxy,
    policy: &Policy,
    endpoint: &UpstreamPolicy,
    intake: &Intake,
    tried: &mut Tried,
) -> Sent {
    let out = &intake.out;
    let key = proxy.key_for(policy, endpoint);
    let headers = upstream::for_endpoint(out.headers.clone(), endpoint, key.as_deref());
    let failure = |reason| Failure { reason, hint: None, window_known: false };
    let uri = match http::Uri::try_from(format!("{}{}", endpoint.url, out.rest)) {
        Ok(uri) => uri,
        Err(e) => {
            let message = format!("the request path does not make a valid upstream URL: {e}");
            return Sent::Failed { failure: failure(RetryReason::Connect), message, unsent: true };
        }
    };
    let mut req = upstream::Request::new(http_body_util::Full::new(out.body.clone()));
    *req.method_mut() = out.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let sent = Instant::now();
    let result = tokio::time::timeout(
        endpoint.timeout,
        crate::upstream::pool::send(
            proxy.pool(),
            endpoint.protocol,
            endpoint.max_streams_per_connection,
            req,
        ),
    )
    .await;
    let latency = sent.elapsed();
    tried.upstream_latency = Some(latency);
    let metrics = proxy.metrics();
    metrics.upstream_latency.observe(latency.as_secs_f64());
    match result {
        Ok(Ok(resp)) => {
            let status = resp.status();
            metrics.upstream_status(&endpoint.name, status.as_u16());
            if status == StatusCode::UNAUTHORIZED {
                return Sent::Unauthorized(resp);
            }
            let hint = retry::upstream_delay(status, resp.headers(), SystemTime::now());
            match RetryReason::for_status(status) {
                None => Sent::Answer(resp),
                Some(RetryReason::RateLimited) => {
                    let headers = resp.headers().clone();
                    let body = read_small(resp).await;
                    match provider::too_many(endpoint.provider, &body, SystemTime::now()) {
                        TooMany::Exhausted(exhaustion) => Sent::OutOfQuota { headers, body, exhaustion },
                        TooMany::Wait(asked) => Sent::RateLimited { headers, body, hint: hint.or(asked) },
                    }
                }
                Some(reason) => Sent::Transient(resp, Failure { hint, ..failure(reason) }),
            }
        }
        Ok(Err(e)) => {
            metrics.upstream_failure(&endpoint.name, RetryReason::Connect);
            let unsent = e.is_connect();
            Sent::Failed {
                failure: failure(RetryReason::Connect),
                message: upstream::error_message(&e),
                unsent,
            }
        }
        Err(_) => {
            metrics.upstream_failure(&endpoint.name, RetryReason::Timeout);
            let message = format!("no response within {:?}", endpoint.timeout);
            Sent::Failed { failure: failure(RetryReason::Timeout), message, unsent: false }
        }
    }
}

/// Read (and drop) a small error body so the connection can be reused. Boxed: the reading
/// future is large, and the request's future should not carry it while it waits in line.
async fn drain(resp: upstream::Response) {
    let mut sink = BytesMut::new();
    let read = upstream::read_into(resp, &mut sink, MAX_ERROR_BODY);
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), read)).await;
}

/// What the last failed attempt left to answer with, if the request gives up.
enum Last {
    Response(upstream::Response),
    Buffered(StatusCode, HeaderMap, Bytes),
    Error(String),
}

/// Run attempts until one gives an answer to relay or none is left, for a request that
/// arrived at `started`; `tried` keeps what they did, for the record.
pub(crate) async fn run(
    proxy: &Proxy,
    policy: &Policy,
    client: &Client,
    intake: &Intake,
    started: Instant,
    tried: &mut Tried,
) -> Answer {
    let admission = proxy.admission();
    let deadline = started.checked_add(client.max_wait).unwrap_or(started);
    let mut place = admission.place();
    let mut ask = intake.ask.clone();
    let (mut sends, mut errors, mut limited) = (0u32, 0u32, 0u32);
    loop {
        // A request admitted once already is not a new arrival: the queue bound is not for it.
        let max_queue = if sends == 0 { policy.queue.max_size } else { usize::MAX };
        let permit = match admission.admit(&mut place, &ask, &client.party, deadline, max_queue).await {
            Ok(p) => p,
            Err(rejection) if rejection.limit == Limit::UpstreamExhausted => {
                let why = admission.exhausted_for(&ask);
                let error = ApiError::exhausted(&rejection, &why);
                return Answer::Refused(Refusal::new(error, Outcome::UpstreamError));
            }
            Err(rejection) => return throttled(&rejection, client.max_wait),
        };
        if sends == 0 {
            admission.first_attempt();
        }
        sends += 1;
        tried.attempts = sends;
        tried.queue_wait += permit.waited;
        let endpoint = Arc::clone(permit.endpoint());
        tried.upstream = Some(endpoint.name.clone());

        let sent = Box::pin(send_once(proxy, policy, &endpoint, intake, tried)).await;
        let (failure, last, permit) = match settle(sent, permit, &endpoint, policy, intake).await {
            Attempted::Done(answer) => return answer,
            Attempted::Failed(failure, last, permit) => (failure, last, permit),
            Attempted::Exhausted(answer) => {
                // Not a failure to retry: that endpoint (or model there) is now marked spent,
                // so admission sends the request to another that serves it, if any.
                if admission.alternative(&ask, &endpoint.name) {
                    continue;
                }
                return answer;
            }
        };
        if failure.reason == RetryReason::RateLimited {
            limited += 1;
        } else {
            errors += 1;
        }
        let now = Instant::now();
        let elsewhere = admission.alternative(&ask, &endpoint.name);
        let prospects = Prospects { elsewhere, unit: fastrand::f64() };
        let mut step = next_step(failure, errors, limited, &policy.retry, now, deadline, prospects);
        // Retries after errors spend the retry budget; waiting out a 429 does not.
        if matches!(step, Step::Retry { .. }) && !admission.retry_allowed() {
            step = Step::GiveUp;
        }
        if step == Step::GiveUp {
            return give_up(last, permit, failure, sends, intake, endpoint.timeout);
        }
        match pause_until(step, now, policy.queue.max_wait) {
            Some(until) => permit.pause(until),
            None => drop(permit),
        }
        if let Last::Response(resp) = last {
            drain(resp).await;
        }
        proxy.metrics().retry(failure.reason);
        tried.retry_reasons.push(failure.reason);
        if let Step::Retry { delay } = step {
            // Not to the endpoint that just failed, while another can take it.
            ask.avoid = Some(Arc::from(endpoint.name.as_str()));
            if !delay.is_zero() {
                // Still waiting, though not in line: it counts against the queue bound.
                let _held = admission.hold(usize::MAX);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The answer to a request admission refused (its queue was full, or its deadline would pass).
fn throttled(rejection: &Rejection, max_wait: Duration) -> Answer {
    let outcome = if rejection.queue_full { Outcome::QueueFull } else { Outcome::QueueTimeout };
    Answer::Refused(Refusal::new(ApiError::throttled(rejection, max_wait), outcome))
}

/// Until when to hold what a 429 was about (that endpoint, that model) before a requeue: at
/// most one queue wait at a time.
fn pause_until(step: Step, now: Instant, max_wait: Duration) -> Option<Instant> {
    match step {
        Step::Requeue { pause: Some(pause) } => now.checked_add(pause.min(max_wait)),
        _ => None,
    }
}

/// What one attempt came to: the answer to give, or a failure to retry or give up on (with
/// the permit, which the retry decision still needs).
enum Attempted {
    Done(Answer),
    Failed(Failure, Last, Permit),
    /// The upstream said a quota no wait fixes is spent: its own answer, unless another
    /// endpoint can take the request.
    Exhausted(Answer),
}

/// Tell the admission gate what the upstream said of one attempt (its verdict, a refund, the
/// upstream's own quota figures), in one report, and sort the attempt into an answer or a
/// failure.
async fn settle(
    sent: Sent,
    mut permit: Permit,
    endpoint: &UpstreamPolicy,
    policy: &Policy,
    intake: &Intake,
) -> Attempted {
    let max_reset = policy.queue.max_wait;
    let report = |verdict, refund, quota, refused| Report { verdict, refund, quota, refused, max_reset };
    match sent {
        Sent::Answer(resp) => {
            let quota = provider::quota_headers(endpoint.provider, resp.headers(), SystemTime::now());
            permit.report(&report(Verdict::Answered, false, quota.as_ref(), false));
            Attempted::Done(Answer::Upstream {
                response: resp,
                permit: Box::new(permit),
                idle_timeout: endpoint.timeout,
                strip_usage_event: intake.out.strip_usage_event,
            })
        }
        Sent::Unauthorized(resp) => {
            // The upstream refused the proxy's key, not the client's: say so, and never
            // relay its body (OpenAI's quotes part of the key).
            permit.report(&report(Verdict::Answered, true, None, false));
            drop(permit);
            drain(resp).await;
            Attempted::Done(Answer::Refused(Refusal::new(
                ApiError::upstream_auth(&endpoint.name),
                Outcome::UpstreamError,
            )))
        }
        Sent::OutOfQuota { headers, body, exhaustion } => {
            permit.report(&report(Verdict::Exhausted(exhaustion), true, None, false));
            Attempted::Exhausted(Answer::Buffered { status: StatusCode::TOO_MANY_REQUESTS, headers, body })
        }
        Sent::RateLimited { headers, body, hint } => {
            // Not counted upstream: refund, then take the upstream's word for what remains.
            let quota = provider::quota_headers(endpoint.provider, &headers, SystemTime::now());
            let window_known = quota.is_some_and(|q| q.says_remaining());
            permit.report(&report(Verdict::Answered, true, quota.as_ref(), true));
            let failure = Failure { reason: RetryReason::RateLimited, hint, window_known };
            Attempted::Failed(failure, Last::Buffered(StatusCode::TOO_MANY_REQUESTS, headers, body), permit)
        }
        Sent::Transient(resp, failure) => {
            // The upstream may have worked on it (and counted it): the charge stands.
            let verdict = Verdict::ServerError(format!("status {}", resp.status().as_u16()));
            let quota = provider::quota_headers(endpoint.provider, resp.headers(), SystemTime::now());
            permit.report(&report(verdict, false, quota.as_ref(), false));
            Attempted::Failed(failure, Last::Response(resp), permit)
        }
        Sent::Failed { failure, message, unsent } => {
            permit.report(&report(Verdict::NoAnswer(message.clone()), unsent, None, false));
            Attempted::Failed(failure, Last::Error(message), permit)
        }
    }
}

/// The answer when no attempt is left: the upstream's own last answer where there is one.
fn give_up(
    last: Last,
    permit: Permit,
    failure: Failure,
    sends: u32,
    intake: &Intake,
    idle_timeout: Duration,
) -> Answer {
    match last {
        Last::Response(response) => Answer::Upstream {
            response,
            permit: Box::new(permit),
            idle_timeout,
            strip_usage_event: intake.out.strip_usage_event,
        },
        Last::Buffered(status, headers, body) => Answer::Buffered { status, headers, body },
        Last::Error(message) => {
            let (status, what) = match failure.reason {
                RetryReason::Timeout => (StatusCode::GATEWAY_TIMEOUT, "did not answer in time"),
                _ => (StatusCode::BAD_GATEWAY, "could not be reached"),
            };
            let text = format!("the upstream API {what} after {sends} attempt(s): {message}");
            Answer::Refused(Refusal::new(ApiError::upstream(status, text), Outcome::UpstreamError))
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
            budget_ratio: 0.2,
            budget_min_per_second: 1,
        }
    }

    /// No other endpoint to go to.
    const HERE: Prospects = Prospects { elsewhere: false, unit: 0.0 };

    #[test]
    fn another_endpoint_is_tried_at_once_even_after_a_timeout() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let elsewhere = Prospects { elsewhere: true, unit: 0.0 };
        let e = failure(RetryReason::ServerError, None, false);
        assert_eq!(
            next_step(e, 1, 0, &policy(4), now, deadline, elsewhere),
            Step::Retry { delay: Duration::ZERO }
        );
        let t = failure(RetryReason::Timeout, None, false);
        assert_eq!(
            next_step(t, 1, 0, &policy(4), now, deadline, elsewhere),
            Step::Retry { delay: Duration::ZERO }
        );
        assert_eq!(
            next_step(t, 4, 0, &policy(4), now, deadline, elsewhere),
            Step::GiveUp,
            "attempts still count"
        );
        // A pause longer than the wait left holds only that endpoint: the request goes elsewhere.
        let long = failure(RetryReason::RateLimited, Some(3600), false);
        assert_eq!(
            next_step(long, 0, 1, &policy(4), now, deadline, elsewhere),
            Step::Requeue { pause: Some(Duration::from_secs(3600)) }
        );
    }

    fn failure(reason: RetryReason, hint: Option<u64>, window_known: bool) -> Failure {
        Failure { reason, hint: hint.map(Duration::from_secs), window_known }
    }

    #[test]
    fn errors_back_off_until_attempts_run_out() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let f = failure(RetryReason::ServerError, None, false);
        let steps: Vec<Step> = (1..=4).map(|n| next_step(f, n, 0, &policy(4), now, deadline, HERE)).collect();
        let secs = |s| Step::Retry { delay: Duration::from_secs(s) };
        assert_eq!(steps, [secs(1), secs(2), secs(4), Step::GiveUp]);
    }

    #[test]
    fn a_429_is_a_requeue_not_an_attempt() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        // However many 429s came before, and with attempts spent, the request waits its turn.
        let hinted = failure(RetryReason::RateLimited, Some(7), true);
        assert_eq!(
            next_step(hinted, 4, 30, &policy(4), now, deadline, HERE),
            Step::Requeue { pause: Some(Duration::from_secs(7)) }
        );
        // Headers corrected the buckets and no Retry-After: the buckets do the waiting.
        let known = failure(RetryReason::RateLimited, None, true);
        assert_eq!(next_step(known, 0, 1, &policy(4), now, deadline, HERE), Step::Requeue { pause: None });
        // Nothing said at all: back off, growing with the 429s.
        let blind = failure(RetryReason::RateLimited, None, false);
        assert_eq!(
            next_step(blind, 0, 3, &policy(4), now, deadline, HERE),
            Step::Requeue { pause: Some(Duration::from_secs(4)) }
        );
    }

    #[test]
    fn nothing_that_could_not_start_before_the_deadline() {
        let now = Instant::now();
        let f = failure(RetryReason::RateLimited, Some(5), false);
        assert_eq!(next_step(f, 0, 1, &policy(4), now, now + Duration::from_secs(5), HERE), Step::GiveUp);
        let e = failure(RetryReason::ServerError, Some(5), false);
        assert_eq!(next_step(e, 1, 0, &policy(1), now, now + Duration::from_secs(60), HERE), Step::GiveUp);
        let t = failure(RetryReason::Timeout, None, false);
        assert_eq!(next_step(t, 1, 0, &policy(4), now, now + Duration::from_secs(60), HERE), Step::GiveUp);
        assert_eq!(next_step(e, 1, 0, &policy(4), now, now + Duration::from_secs(5), HERE), Step::GiveUp);
    }
}
