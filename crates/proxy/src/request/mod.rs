//! The request path, top-down: intake -> cached -> attempts -> respond. Each step is a module
//! of its own; this one only strings them together.

mod attempts;
pub(crate) mod auth;
mod cached;
pub(crate) mod error;
mod intake;
mod path;
pub(crate) mod record;
mod respond;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use http::HeaderValue;

use self::cached::Cached;
use self::error::Refusal;
use self::intake::Facts;
use self::record::{RecordGuard, RequestRecord};
use self::respond::Answer;
use crate::proxy::Proxy;
use crate::telemetry::labels::Outcome;

/// axum handler for `/v1/{*rest}`.
pub(crate) async fn handle(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let request_id = client_request_id(&parts.headers).map_or_else(|| proxy.request_id(), str::to_owned);
    let header_id = HeaderValue::from_str(&request_id).ok();
    let record = RequestRecord::new(parts.method.clone(), parts.uri.path(), request_id);
    // Boxed: the connection's task then holds only this small future, and the request's own
    // state exists only while the request runs, not for as long as the connection lives (a
    // streaming answer is a body of its own by then).
    let guard = RecordGuard::new(record, Arc::clone(proxy.metrics()));
    let mut resp = Box::pin(pipeline(&proxy, parts, body, guard)).await;
    if let Some(id) = header_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}

async fn pipeline(
    proxy: &Proxy,
    parts: http::request::Parts,
    body: axum::body::Body,
    mut record: RecordGuard,
) -> Response {
    // One policy snapshot for the whole request, even if a reload lands half way.
    let policy = proxy.policy();
    let client = match auth::identify(proxy, &policy, &parts.headers) {
        Ok(client) => client,
        Err(err) => {
            return respond::respond(Answer::Refused(Refusal::new(err, Outcome::Unauthorized)), record, None);
        }
    };
    // A withdrawn quota grant admits nothing, not even from the cache, until it is back.
    if let Some(reason) = proxy.withheld() {
        let err = crate::request::error::ApiError::quota_withdrawn(&reason);
        return respond::respond(Answer::Refused(Refusal::new(err, Outcome::QuotaWithdrawn)), record, None);
    }
    record.set_client(Arc::clone(&client.party.metrics));
    // The phases that hold large futures (reading, sending) are boxed, so that a request
    // waiting in line carries only the small state it waits in.
    let (facts, intake) = Box::pin(intake::read(proxy, &policy, &client, parts, body)).await;
    learned(record.get(), facts);
    let intake = match intake {
        Ok(intake) => intake,
        Err(refusal) => return respond::respond(Answer::Refused(refusal), record, None),
    };
    let started = record.get().started;
    let fill = match intake.cache_key {
        None => None,
        Some(key) => {
            let wants_usage = !intake.out.strip_usage_event;
            let lookup = cached::lookup(proxy, &policy, started, key, &intake.out.headers, wants_usage);
            let (how, cached) = Box::pin(lookup).await;
            record.get().cache = how;
            match cached {
                Cached::Answered(served) => {
                    record.get().saved_tokens = served.saved_tokens;
                    record.finish(served.status, served.outcome);
                    return served.response;
                }
                Cached::Fill(fill) => Some(fill),
                Cached::Skip => None,
                Cached::Refused(refusal) => {
                    return respond::respond(Answer::Refused(refusal), record, None);
                }
            }
        }
    };
    let answer = attempts::run(proxy, &policy, &client, &intake, started, record.tried()).await;
    respond::respond(answer, record, fill)
}

/// Put what intake learned into the record.
fn learned(rec: &mut RequestRecord, facts: Facts) {
    let Facts { logged, client, model, stream, estimate, prompt_hash } = facts;
    if let Some(logged) = logged {
        rec.logged = logged;
    }
    rec.client = client;
    rec.model = model;
    rec.stream = stream;
    rec.estimate = estimate;
    rec.prompt_hash = prompt_hash;
}

/// The client's `x-request-id`, if it is a sane one to echo and log.
fn client_request_id(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
}
