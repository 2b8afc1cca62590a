use llmproxy_api::TokenAccounting;
use llmproxy_api::policy::EndpointLimits;

use super::*;
use crate::protocol::ratelimit_headers::QuotaHeaders;
use crate::protocol::tokens::Usage;

/// What an answer that used `tokens` (all output) reported.
fn usage(tokens: u64) -> Option<Usage> {
    Some(Usage { completion: tokens, ..Usage::default() })
}

/// One upstream whose quota is the LlmProxy's, as `spec.upstream` gives.
fn policy(rpm: u64, burst: u64, tpm: Option<u64>, token_burst: u64, max_concurrent: u32) -> Policy {
    let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 60}";
    let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
    let mut p = Policy::from_spec(&spec).unwrap();
    p.limits = LimitsPolicy {
        request_burst: burst,
        token_burst,
        max_concurrent,
        ..LimitsPolicy::per_minute(rpm, tpm)
    };
    // The endpoint keeps a tenth of its burst in hand; these tests are about the total,
    // so its burst is set to come out at the total's.
    let mut own = EndpointLimits::of(&p.limits);
    own.request_burst = before_headroom(burst);
    own.token_burst = before_headroom(token_burst);
    p.upstreams[0].limits = own;
    p
}

/// The smallest burst that, less the tenth kept in hand, is still `b`.
fn before_headroom(b: u64) -> u64 {
    (b..).find(|x| x - x / 10 >= b).unwrap_or(b)
}

fn two(yaml_upstreams: &str) -> Policy {
    let yaml =
        format!("upstreams: {yaml_upstreams}\nlimits: {{requestsPerMinute: 100000, maxConcurrent: 1000}}");
    let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
    Policy::from_spec(&spec).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn wait(at: Instant, limit: Limit) -> Decision {
    Decision::Wait { at, limit, scope: None }
}

fn decide(l: &mut Limiter, now: Instant, ask: &Ask) -> Decision {
    l.decide(now, ask, &Holds::default())
}

/// Decide and, if it may go, admit.
fn go(l: &mut Limiter, now: Instant, ask: &Ask) -> Option<Mark> {
    match decide(l, now, ask) {
        Decision::Go(i) => Some(l.admit(now, ask, i)),
        _ => None,
    }
}

fn model(m: &str) -> Ask {
    Ask { model: Some(Arc::from(m)), ..Ask::default() }
}

#[test]
fn burst_then_paced_at_the_rate() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(600, 3, None, 0, 100), t0); // 10/s, burst 3
    for _ in 0..3 {
        assert!(go(&mut l, t0, &Ask::tokens(0)).is_some());
    }
    assert_eq!(decide(&mut l, t0, &Ask::tokens(0)), wait(t0 + ms(100), Limit::Requests));
    assert_eq!(decide(&mut l, t0 + ms(99), &Ask::tokens(0)), wait(t0 + ms(100), Limit::Requests));
    assert_eq!(decide(&mut l, t0 + ms(100), &Ask::tokens(0)), Decision::Go(0));
}

#[test]
fn a_minute_of_requests_takes_a_minute() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(60, 1, None, 0, 100), t0);
    let mut now = t0;
    for _ in 0..61 {
        match decide(&mut l, now, &Ask::tokens(0)) {
            Decision::Go(_) => {}
            Decision::Wait { at, .. } => now = at,
            other => panic!("{other:?}"),
        }
        l.admit(now, &Ask::tokens(0), 0);
        l.release();
    }
    assert_eq!(now.duration_since(t0), Duration::from_secs(60));
}

#[test]
fn requested_accounting_keeps_the_charge_used_settles_it() {
    let t0 = Instant::now();
    // 6000 TPM = 100 tokens/s, bucket of 100.
    let mut l = Limiter::new(&policy(6000, 100, Some(6000), 100, 100), t0);
    let m = l.admit(t0, &Ask::tokens(80), 0);
    assert_eq!(decide(&mut l, t0, &Ask::tokens(80)), wait(t0 + ms(600), Limit::Tokens));
    l.settle(t0, &m, &None, Cost { tokens: 80, ..Cost::default() }, usage(20));
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(20.0));

    let mut used = policy(6000, 100, Some(6000), 100, 100);
    used.limits.token_accounting = TokenAccounting::Used;
    let mut l = Limiter::new(&used, t0);
    let m = l.admit(t0, &Ask::tokens(80), 0);
    l.settle(t0, &m, &None, Cost { tokens: 80, ..Cost::default() }, usage(20));
    assert_eq!(decide(&mut l, t0, &Ask::tokens(80)), Decision::Go(0), "the unused 60 came back");
    let m = l.admit(t0, &Ask::tokens(80), 0);
    l.settle(t0, &m, &None, Cost { tokens: 80, ..Cost::default() }, usage(100));
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(-20.0), "using more than charged costs more");
    l.settle(t0, &m, &None, Cost { tokens: 80, ..Cost::default() }, None);
    assert_eq!(
        l.tokens_available(t0).map(f64::round),
        Some(-20.0),
        "no usage: the charge stands, never more"
    );
}

#[test]
fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_goes_into_debt() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(6000, 100, Some(6000), 100, 100), t0);
    l.admit(t0, &Ask::tokens(50), 0);
    assert_eq!(decide(&mut l, t0, &Ask::tokens(1000)), wait(t0 + ms(500), Limit::Tokens));
    l.admit(t0 + ms(500), &Ask::tokens(1000), 0);
    // 900 tokens of debt at 100/s: the next small request waits 9 s + its own cost.
    assert_eq!(decide(&mut l, t0 + ms(500), &Ask::tokens(10)), wait(t0 + ms(9600), Limit::Tokens));
}

#[test]
fn concurrency_slots() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(6000, 100, None, 0, 2), t0);
    l.admit(t0, &Ask::tokens(0), 0);
    l.admit(t0, &Ask::tokens(0), 0);
    assert_eq!(decide(&mut l, t0, &Ask::tokens(0)), Decision::WaitForSlot);
    l.release();
    assert_eq!(decide(&mut l, t0, &Ask::tokens(0)), Decision::Go(0));
}

#[test]
fn pauses_hold_their_endpoint_and_model_only_and_never_shorten() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(6000, 100, None, 0, 10), t0);
    let a = go(&mut l, t0, &model("a")).expect("goes");
    l.pause(t0, &a, t0 + Duration::from_secs(2));
    l.pause(t0, &a, t0 + Duration::from_secs(1));
    let held = Decision::Wait {
        at: t0 + Duration::from_secs(2),
        limit: Limit::UpstreamPause,
        scope: Some(Scope::Endpoints(vec![Hold::EndpointModel(0, Arc::from("a"))])),
    };
    assert_eq!(decide(&mut l, t0, &model("a")), held);
    assert_eq!(decide(&mut l, t0, &model("b")), Decision::Go(0));
    assert_eq!(decide(&mut l, t0 + Duration::from_secs(2), &model("a")), Decision::Go(0));
    // Without a model the whole endpoint is paused: everyone waits.
    let any = go(&mut l, t0, &Ask::tokens(0)).expect("goes");
    l.pause(t0, &any, t0 + Duration::from_secs(3));
    assert_eq!(
        decide(&mut l, t0, &model("b")),
        Decision::Wait {
            at: t0 + Duration::from_secs(3),
            limit: Limit::UpstreamPause,
            scope: Some(Scope::Endpoints(vec![Hold::Endpoint(0)])),
        }
    );
}

#[test]
fn a_client_at_its_cap_waits_alone() {
    let t0 = Instant::now();
    let mut p = policy(6000, 100, Some(600_000), 10_000, 100);
    let yaml = "upstream: {url: 'https://x.io'}\nlimits: {requestsPerMinute: 6000}\nclients:\n  overrides: [{name: capped, requestsPerMinute: 60}]\n";
    let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(yaml).unwrap();
    p.clients = Policy::from_spec(&spec).ok().and_then(|p| p.clients);
    let mut l = Limiter::new(&p, t0);
    let of = |c: &str| Ask { tokens: 1, client: Some(Arc::from(c)), ..Ask::default() };
    assert!(go(&mut l, t0, &of("capped")).is_some());
    assert_eq!(
        decide(&mut l, t0, &of("capped")),
        Decision::Wait {
            at: t0 + Duration::from_secs(1),
            limit: Limit::ClientRequests,
            scope: Some(Scope::Client(Some(Arc::from("capped")))),
        }
    );
    assert_eq!(decide(&mut l, t0, &of("free")), Decision::Go(0), "other clients are not held");
}

fn calibration(refused: bool) -> Calibration {
    Calibration { refunded: Cost::default(), refused, max_reset: Duration::from_secs(30) }
}

#[test]
fn a_429s_word_lowers_the_bucket_and_a_hostile_reset_is_capped() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(6000, 100, Some(60_000), 1000, 100), t0); // 1000/s
    let mark = l.admit(t0, &Ask::tokens(100), 0);
    let said = QuotaHeaders {
        remaining_tokens: Some(0),
        reset_tokens: Some(Duration::from_secs(2)),
        ..QuotaHeaders::default()
    };
    l.calibrate(t0, &said, &mark, calibration(true));
    // Full again in 2 s at 1000/s: 1000 - 2000 = -1000 now.
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(-1000.0));
    let hostile = QuotaHeaders { reset_tokens: Some(Duration::from_secs(3600)), ..QuotaHeaders::default() };
    let mark = l.admit(t0, &Ask::tokens(0), 0);
    l.calibrate(t0, &hostile, &mark, calibration(true));
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(-29_000.0), "at most one max wait of debt");
}

#[test]
fn after_a_success_the_bucket_goes_down_to_the_most_the_upstream_may_have() {
    let t0 = Instant::now();
    let mut l = Limiter::new(&policy(6000, 100, Some(60_000), 1000, 100), t0);
    let mine = l.admit(t0, &Ask::tokens(100), 0);
    let _other = l.admit(t0, &Ask::tokens(300), 0); // in flight, maybe not yet seen upstream
    // The upstream says 500 remained after mine (others use the key). Whether it had seen
    // the other 300 or not, it has at most 500 now: 100 less than here.
    let said = QuotaHeaders { remaining_tokens: Some(500), ..QuotaHeaders::default() };
    l.calibrate(t0, &said, &mine, calibration(false));
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(500.0));
    // 100 remained, and 200 were charged here after that answer was measured. The
    // upstream may already have counted them (they overtake each other), so a success
    // caps the level at 100, no lower.
    let mark = l.admit(t0, &Ask::tokens(0), 0);
    let _later = l.admit(t0, &Ask::tokens(200), 0);
    let said = QuotaHeaders { remaining_tokens: Some(100), ..QuotaHeaders::default() };
    l.calibrate(t0, &said, &mark, calibration(false));
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(100.0), "capped at what the upstream said");
    // A 429 is decisive: the upstream refused for lack of quota, and what was charged
    // here after it measured comes on top.
    let mark = l.admit(t0, &Ask::tokens(0), 0);
    let _later = l.admit(t0, &Ask::tokens(50), 0);
    l.calibrate(t0, &said, &mark, calibration(true));
    assert_eq!(l.tokens_available(t0).map(f64::round), Some(50.0));
}

#[test]
fn withheld_refunds_return_only_as_far_as_the_upstream_confirms() {
    let t0 = Instant::now();
    let mut used = policy(6000, 100, Some(60_000), 1000, 100);
    used.limits.token_accounting = TokenAccounting::Used;
    let mut l = Limiter::new(&used, t0);
    let endpoint_tokens = |l: &mut Limiter| l.endpoints[0].tokens_level(t0).map(f64::round);
    let first = l.admit(t0, &Ask::tokens(400), 0);
    let seen = QuotaHeaders { remaining_tokens: Some(600), ..QuotaHeaders::default() };
    l.calibrate(t0, &seen, &first, calibration(false));
    // It used 100 of its 400: the 300 wait for the upstream's word.
    l.settle(t0, &first, &None, Cost { tokens: 400, ..Cost::default() }, usage(100));
    assert_eq!(endpoint_tokens(&mut l), Some(600.0));
    let next = l.admit(t0, &Ask::tokens(0), 0);
    let refunded = QuotaHeaders { remaining_tokens: Some(900), ..QuotaHeaders::default() };
    l.calibrate(t0, &refunded, &next, calibration(false));
    assert_eq!(endpoint_tokens(&mut l), Some(900.0), "the upstream refunded them");
    // An upstream that keeps what it charged never says so: nothing more comes back.
    let third = l.admit(t0, &Ask::tokens(400), 0);
    l.settle(t0, &third, &None, Cost { tokens: 400, ..Cost::default() }, usage(100));
    let kept = QuotaHeaders { remaining_tokens: Some(500), ..QuotaHeaders::default() };
    let after = l.admit(t0, &Ask::tokens(0), 0);
    l.calibrate(t0, &kept, &after, calibration(false));
    l.answered(&third);
    assert_eq!(endpoint_tokens(&mut l), Some(500.0));
}

#[test]
fn reload_keeps_state_unless_limits_change() {
    let t0 = Instant::now();
    let base = policy(60, 1, Some(600), 10, 10);
    let mut l = Limiter::new(&base, t0);
    l.admit(t0, &Ask::tokens(10), 0);
    assert!(!l.reconfigure(&base.clone(), t0), "same limits: nothing changes");
    assert_eq!(decide(&mut l, t0, &Ask::tokens(1)), wait(t0 + Duration::from_secs(1), Limit::Requests));
    // Lowering the rate slows admission at once; the spent burst stays spent.
    assert!(l.reconfigure(&policy(30, 1, Some(600), 10, 10), t0));
    assert_eq!(decide(&mut l, t0, &Ask::tokens(1)), wait(t0 + Duration::from_secs(2), Limit::Requests));
    // Dropping the token limit removes that bucket.
    assert!(l.reconfigure(&policy(30, 1, None, 0, 10), t0));
    assert_eq!(l.tokens_available(t0), None);
}

#[test]
fn each_request_goes_where_it_can_be_admitted_soonest() {
    let t0 = Instant::now();
    // a: 60/s burst 60; b: 30/s burst 30; each keeps a tenth of its burst in hand.
    let p = two(
        "[{name: a, url: 'https://a.example', limits: {requestsPerMinute: 3600}}, {name: b, url: 'https://b.example', limits: {requestsPerMinute: 1800}}]",
    );
    let mut l = Limiter::new(&p, t0);
    let mut sent = [0u32; 2];
    let mut now = t0;
    // Three seconds of back-to-back requests: each endpoint takes its burst and its rate.
    while now < t0 + Duration::from_secs(3) {
        match decide(&mut l, now, &Ask::tokens(0)) {
            Decision::Go(i) => {
                l.admit(now, &Ask::tokens(0), i);
                l.release();
                sent[i] += 1;
            }
            Decision::Wait { at, limit, .. } => {
                assert_eq!(limit, Limit::UpstreamRequests);
                now = at;
            }
            other => panic!("{other:?}"),
        }
    }
    // Bursts less the tenth kept in hand: 54 + 3 s x 60 = 234 less the last instant's,
    // and 27 + 90 = 117.
    assert!((232..=234).contains(&sent[0]) && (115..=117).contains(&sent[1]), "{sent:?}");
}

#[test]
fn ties_go_by_weight_and_models_pick_their_endpoints() {
    let t0 = Instant::now();
    let p = two(
        "[{name: a, url: 'https://a.example', weight: 3}, {name: b, url: 'https://b.example'}, {name: c, url: 'https://c.example', models: [small]}]",
    );
    let mut l = Limiter::new(&p, t0);
    let mut sent = [0u32; 3];
    for _ in 0..400 {
        let Decision::Go(i) = decide(&mut l, t0, &model("big")) else { panic!("unlimited") };
        sent[i] += 1;
    }
    assert_eq!(sent, [300, 100, 0], "c does not serve the model");
    let only_c = Ask { endpoints: Some(Arc::from(vec![Arc::from("c")])), ..model("small") };
    assert_eq!(decide(&mut l, t0, &only_c), Decision::Go(2));
    let nowhere = Ask { endpoints: Some(Arc::from(vec![Arc::from("c")])), ..model("big") };
    assert!(matches!(decide(&mut l, t0, &nowhere), Decision::Wait { limit: Limit::UpstreamUnavailable, .. }));
}

#[test]
fn a_paused_or_failing_endpoint_sends_requests_to_the_other() {
    let t0 = Instant::now();
    let p = two("[{name: a, url: 'https://a.example'}, {name: b, url: 'https://b.example'}]");
    let mut l = Limiter::new(&p, t0);
    let first = l.admit(t0, &model("m"), 0);
    l.pause(t0, &first, t0 + Duration::from_secs(10));
    for _ in 0..5 {
        assert_eq!(decide(&mut l, t0, &model("m")), Decision::Go(1), "a is paused for m");
    }
    assert_eq!(decide(&mut l, t0, &model("n")), Decision::Go(0), "a still serves n");
    // b refuses connections: taken out at once, since a is still in.
    let at_b = l.admit(t0, &model("n"), 1);
    assert!(l.verdict(t0, &at_b, &Verdict::NoAnswer("connection refused".into())));
    assert!(!l.alternative(t0, &model("m"), "a"), "b is out and a is the one to avoid");
    let retry = Ask { avoid: Some(Arc::from("b")), ..model("n") };
    assert_eq!(decide(&mut l, t0, &retry), Decision::Go(0));
    // Model m: a paused, b out; it waits for the sooner of the two.
    let Decision::Wait { at, limit, .. } = decide(&mut l, t0, &model("m")) else { panic!("waits") };
    assert_eq!((at, limit), (t0 + Duration::from_secs(1), Limit::UpstreamUnavailable));
    // a fails too, but it is the last one in: it stays in.
    assert!(!l.verdict(t0, &first, &Verdict::NoAnswer("reset".into())));
    let reports = l.reports(t0);
    assert_eq!(
        reports.iter().map(|r| (r.name.as_str(), r.healthy)).collect::<Vec<_>>(),
        [("a", true), ("b", false)]
    );
    assert_eq!(reports[1].last_error.as_deref(), Some("connection refused"));
}

#[test]
fn an_earlier_waiter_keeps_its_endpoint_from_later_ones() {
    let t0 = Instant::now();
    let p = two(
        "[{name: a, url: 'https://a.example', limits: {tokensPerMinute: 6000}}, {name: b, url: 'https://b.example', models: [other]}]",
    );
    let mut l = Limiter::new(&p, t0);
    let big = Ask { tokens: 100, ..model("m") };
    let _ = l.admit(t0, &big, 0);
    // The big one waits for a's tokens; a small one behind it must not take them first.
    let mut holds = Holds::default();
    let Decision::Wait { scope: Some(scope), .. } = l.decide(t0, &big, &holds) else { panic!("waits") };
    holds.add(scope);
    let small = Ask { tokens: 1, ..model("m") };
    assert_eq!(l.decide(t0, &small, &holds), Decision::Held);
    // A request for a model b serves still goes there.
    assert_eq!(l.decide(t0, &Ask { tokens: 1, ..model("other") }, &holds), Decision::Go(1));
}

/// A policy whose model `m` is limited to `output` tokens per minute (and nothing else but a
/// generous request rate).
fn output_limited(output: u64) -> Policy {
    let yaml = format!(
        "upstream: {{url: 'https://x.io', provider: anthropic}}\nlimits: {{requestsPerMinute: 6000, models: {{m: {{outputTokensPerMinute: {output}}}}}}}"
    );
    let spec: llmproxy_api::LlmProxySpec = serde_yaml::from_str(&yaml).unwrap();
    Policy::from_spec(&spec).unwrap()
}

fn message(input: u64, output: u64) -> Ask {
    Ask { tokens: input + output, input, output, ..model("m") }
}

#[test]
fn output_is_charged_max_tokens_then_settled_to_what_the_answer_used() {
    let t0 = Instant::now();
    // 30,000 output tokens a minute: 500/s, a bucket of one second's worth.
    let mut l = Limiter::new(&output_limited(30_000), t0);
    let first = go(&mut l, t0, &message(10, 500)).expect("a full bucket takes it");
    // The next waits for room for its max_tokens, held by the model's output limit.
    match decide(&mut l, t0, &message(10, 500)) {
        Decision::Wait { limit, at, .. } => {
            assert_eq!(limit, Limit::ModelOutputTokens);
            assert!(at >= t0 + ms(900), "{at:?}");
        }
        d => panic!("{d:?}"),
    }
    // The answer used 40: the other 460 come back at once, and the next goes about 0.1 s later
    // instead of a whole second.
    l.settle(t0, &first, &None, first_cost(), Some(Usage { prompt: 10, completion: 40, ..Usage::default() }));
    match decide(&mut l, t0, &message(10, 500)) {
        Decision::Wait { at, .. } => assert!(at <= t0 + ms(250), "{:?}", at - t0),
        Decision::Go(_) => {}
        d => panic!("{d:?}"),
    }
}

fn first_cost() -> Cost {
    Cost { tokens: 510, input: 10, output: 500 }
}

#[test]
fn a_spent_quota_sends_requests_elsewhere_refuses_them_with_none_left_and_is_probed_once_a_minute() {
    use crate::protocol::provider::{Exhaustion, Reason};
    let t0 = Instant::now();
    let p = two("[{name: a, url: 'https://a.example'}, {name: b, url: 'https://b.example', models: [m]}]");
    let mut l = Limiter::new(&p, t0);
    let credit = Exhaustion { reason: Reason::InsufficientQuota, model_only: false, reset: None };
    let first = l.admit(t0, &model("m"), 0);
    l.verdict(t0, &first, &Verdict::Exhausted(credit.clone()));
    // m goes to b; n, which only a serves, is refused until a's next probe.
    for _ in 0..3 {
        assert_eq!(decide(&mut l, t0, &model("m")), Decision::Go(1));
    }
    assert!(!l.alternative(t0, &model("n"), "b"), "a is spent for everything");
    let Decision::Wait { at, limit, .. } = decide(&mut l, t0, &model("n")) else { panic!("refused") };
    assert_eq!((at, limit), (t0 + Duration::from_secs(60), Limit::UpstreamExhausted));
    let reports = l.reports(t0);
    let credit_status =
        llmproxy_api::ExhaustedStatus { model: None, reason: "insufficient_quota".into(), until: None };
    assert_eq!(reports[0].exhausted, [credit_status]);
    // A request sent before the quota was spent proves nothing when it succeeds.
    l.verdict(t0, &first, &Verdict::Answered);
    assert!(matches!(
        decide(&mut l, t0, &model("n")),
        Decision::Wait { limit: Limit::UpstreamExhausted, .. }
    ));
    // A minute on, one probe goes; the next waits for the probe after it.
    let t1 = t0 + Duration::from_secs(60);
    assert_eq!(decide(&mut l, t1, &model("n")), Decision::Go(0));
    let probe = l.admit(t1, &model("n"), 0);
    assert!(matches!(
        decide(&mut l, t1, &model("n")),
        Decision::Wait { limit: Limit::UpstreamExhausted, .. }
    ));
    // Its success brings a back.
    l.verdict(t1, &probe, &Verdict::Answered);
    assert_eq!(decide(&mut l, t1, &model("n")), Decision::Go(0));
    assert!(l.reports(t1)[0].exhausted.is_empty());
    // A daily quota of one model, with its reset known: only that model, until the reset.
    let now = std::time::SystemTime::now();
    let day = Exhaustion {
        reason: Reason::RequestsPerDay,
        model_only: true,
        reset: Some(now + Duration::from_secs(30)),
    };
    let at_a = l.admit(t1, &model("n"), 0);
    l.verdict(t1, &at_a, &Verdict::Exhausted(day));
    let Decision::Wait { at, limit, .. } = decide(&mut l, t1, &model("n")) else { panic!("refused") };
    assert_eq!(limit, Limit::UpstreamExhausted);
    assert!(at > t1 + Duration::from_secs(29) && at <= t1 + Duration::from_secs(30), "its reset");
    assert_eq!(decide(&mut l, t1, &model("o")), Decision::Go(0), "other models still go");
    let t2 = t1 + Duration::from_secs(31);
    assert_eq!(decide(&mut l, t2, &model("n")), Decision::Go(0), "the reset passed");
}

#[test]
fn requests_per_day_are_counted_until_the_day_ends() {
    let t0 = Instant::now();
    let p = two(
        "[{name: a, url: 'https://a.example', limits: {requestsPerDay: 2}}, {name: b, url: 'https://b.example', limits: {models: {m: {requestsPerDay: 1}}}}]",
    );
    let mut l = Limiter::new(&p, t0);
    let mut went = Vec::new();
    for _ in 0..3 {
        let Some(mark) = go(&mut l, t0, &model("m")) else { break };
        went.push(mark.endpoint.name.clone());
        l.answered(&mark);
        l.release();
    }
    went.sort();
    assert_eq!(went, ["a", "a", "b"]);
    let Decision::Wait { at, limit, .. } = decide(&mut l, t0, &model("m")) else { panic!("spent") };
    assert!(matches!(limit, Limit::UpstreamRequestsPerDay | Limit::ModelRequestsPerDay), "{limit:?}");
    let left = at - t0;
    assert!(left > Duration::ZERO && left <= Duration::from_secs(25 * 3600), "{left:?}");
    // Another model at b still has b's day.
    assert!(go(&mut l, t0, &model("n")).is_some());
    // The next day, the count starts again.
    assert!(go(&mut l, at, &model("m")).is_some());
}
