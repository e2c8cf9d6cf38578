//! The web dashboard every coordinator serves: embedded pages, and the
//! JSON API behind them (docs/DASHBOARD.md).
//!
//! ```text
//!   browser ──HTTPS, Bearer token──▶ any coordinator's dashboard
//!                                      │ relays the browser's token
//!                                      ▼ (mutual TLS, its own certificate)
//!                                    the leader's gRPC API ── roles, owners
//! ```
//!
//! The dashboard holds no state of its own and decides nothing about who
//! may see what: it asks the leader with the browser's token, exactly as
//! the CLI would, so a viewer sees what `ringleader sweep list` shows that
//! viewer, and a standby's dashboard shows the leader's view. Answers are
//! shared between browsers ([`Dashboard`] says how), so many browsers on
//! one page cost the leader about one call per second.

mod importance;
mod memo;
mod views;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, Method, StatusCode};
use ringleader_security::Token;
use serde_json::Value;
use tokio::sync::Mutex as AsyncMutex;

use self::memo::{Memo, Refusal};
use tonic::transport::Channel;

use crate::client::{authorized, find_leader_channel, Connection, LeaderClient};
use crate::error::{Error, Result};
use crate::status;
use crate::sweep::client::SweepView;
use crate::sweep::SweepRecord;
use crate::web::{error_response, json_body, respond, HttpResponse};
use ringleader_client::sweeps;

/// How long what may change (a running sweep, the cluster, what a token
/// may see) is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// What a browser without a token is told.
const SIGN_IN: &str = "sign in with a token: `ringleader token create` makes one, and \
     `ringleader local` prints a dashboard link that carries the admin's";

/// Tokens whose answers are kept, and sweeps whose trials are.
const TOKENS_KEPT: usize = 256;
const SWEEPS_KEPT: usize = 32;
/// Longest sweep id a path may hold.
const MAX_ID_BYTES: usize = 64;

const INDEX_HTML: &[u8] = include_bytes!("../../dashboard/index.html");
const APP_JS: &[u8] = include_bytes!("../../dashboard/app.js");
const APP_CSS: &[u8] = include_bytes!("../../dashboard/app.css");
const UPLOT_JS: &[u8] = include_bytes!("../../dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &[u8] = include_bytes!("../../dashboard/vendor/uPlot.min.css");

/// What a browser asked the API for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ApiCall {
    Cluster,
    Sweeps,
    Sweep(String),
    Curves(String, Option<String>),
    Trial(String, u64),
}

impl ApiCall {
    /// Parses the path after `/api/v1/` and the query string.
    fn parse(route: &str, query: Option<&str>) -> std::result::Result<Self, Refusal> {
        let segments: Vec<&str> = route.split('/').collect();
        let call = match segments.as_slice() {
            ["cluster"] => ApiCall::Cluster,
            ["sweeps"] => ApiCall::Sweeps,
            ["sweeps", id] => ApiCall::Sweep(sweep_id(id)?),
            ["sweeps", id, "curves"] => ApiCall::Curves(sweep_id(id)?, None),
            ["sweeps", id, "trials", number] => {
                let number = number.parse().map_err(|_| {
                    (
                        StatusCode::BAD_REQUEST,
                        "a trial number is a whole number from 0".to_string(),
                    )
                })?;
                ApiCall::Trial(sweep_id(id)?, number)
            }
            _ => {
                return Err((
                    StatusCode::NOT_FOUND,
                    "no such API path (docs/DASHBOARD.md lists them)".into(),
                ))
            }
        };
        let Some(query) = query.filter(|q| !q.is_empty()) else {
            return Ok(call);
        };
        let mut call = call;
        for pair in query.split('&') {
            match (&mut call, pair.split_once('=')) {
                (ApiCall::Curves(_, metric), Some(("metric", name))) => {
                    if !views::valid_metric_name(name) {
                        return Err((
                            StatusCode::BAD_REQUEST,
                            "metric: letters, digits, '_', '-' and '.', at most 64".into(),
                        ));
                    }
                    *metric = Some(name.to_string());
                }
                _ => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "unknown query parameter (only /curves takes one: metric=NAME)".into(),
                    ))
                }
            }
        }
        Ok(call)
    }
}

/// A sweep or job id as ids are made (`sweep-12`, `job-3`); anything else
/// is refused without being echoed.
fn sweep_id(text: &str) -> std::result::Result<String, Refusal> {
    let plain = !text.is_empty()
        && text.len() <= MAX_ID_BYTES
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain {
        Ok(text.to_string())
    } else {
        Err((
            StatusCode::BAD_REQUEST,
            format!("a sweep id is 1 to {MAX_ID_BYTES} letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// The leader, dialled once and re-found when it stops answering as one.
struct Upstream {
    connection: Connection,
    leader: AsyncMutex<Option<(String, Channel)>>,
}

impl Upstream {
    async fn client(&self, token: Option<&Token>) -> Result<(String, LeaderClient)> {
        let mut leader = self.leader.lock().await;
        if leader.is_none() {
            *leader = Some(find_leader_channel(&self.connection).await?);
        }
        let (address, channel) = leader.clone().expect("set above");
        Ok((address, authorized(channel, token)))
    }

    /// `call` on the leader as `token`, bounded by the connection's
    /// timeout; once more on a freshly found leader if ours moved.
    async fn ask<T, F, Fut>(&self, token: Option<&Token>, call: F) -> Result<T, Refusal>
    where
        F: Fn(String, LeaderClient) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let timeout = self.connection.timeout;
        let once = || async {
            let (address, client) = self.client(token).await?;
            tokio::time::timeout(timeout, call(address.clone(), client))
                .await
                .map_err(|_| Error::Unreachable {
                    address,
                    reason: format!("no answer within {timeout:?}"),
                })?
        };
        let mut answer = once().await;
        if answer.as_ref().is_err_and(leader_moved) {
            *self.leader.lock().await = None;
            answer = once().await;
        }
        answer.map_err(|error| (http_status(&error), error.to_string()))
    }

    async fn cluster(&self, token: Option<&Token>) -> Result<Bytes, Refusal> {
        let timeout = self.connection.timeout;
        self.ask(token, |address, mut client| async move {
            let status = status::fetch_from(&address, &mut client, timeout).await?;
            Ok(encode(&status::to_json(&status)))
        })
        .await
    }

    async fn visible(&self, token: Option<&Token>) -> Result<Arc<Visible>, Refusal> {
        self.ask(token, |_, mut client| async move {
            let (records, unreadable) = sweeps::list(&mut client).await?;
            Ok(Arc::new(Visible {
                records,
                unreadable,
            }))
        })
        .await
    }

    async fn sweep(&self, id: &str, token: Option<&Token>) -> Result<Arc<SweepView>, Refusal> {
        self.ask(token, |_, mut client| async move {
            Ok(Arc::new(sweeps::get(&mut client, id).await?))
        })
        .await
    }
}

/// The sweep records a token may see.
struct Visible {
    records: Vec<SweepRecord>,
    unreadable: Vec<String>,
}

/// Whether the channel we hold no longer reaches a leader.
fn leader_moved(error: &Error) -> bool {
    match error {
        Error::Unreachable { .. } | Error::NoLeader { .. } => true,
        Error::FailedPrecondition(message) => message.contains("not the leader"),
        _ => false,
    }
}

fn encode(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// One coordinator's dashboard.
///
/// Who may see what is the leader's decision, asked with each browser's
/// token: the sweeps a token may see are its `ListSweeps` answer (kept
/// for [`CACHE_FOR`] per token), and a sweep's trials are fetched once
/// for every token allowed to see it (the leader answers `GetSweep` the
/// same to all of them), kept for [`CACHE_FOR`] while the sweep runs and
/// for as long as there is room once it has finished (it no longer
/// changes).
pub struct Dashboard {
    upstream: Upstream,
    clusters: Memo<Bytes>,
    visible: Memo<Arc<Visible>>,
    sweeps: Memo<Arc<SweepView>>,
}

impl Dashboard {
    /// A dashboard that reaches the leader through `connection` (its
    /// coordinator's own address and certificate; no token of its own).
    pub fn new(connection: Connection) -> Arc<Self> {
        Arc::new(Self {
            upstream: Upstream {
                connection,
                leader: AsyncMutex::new(None),
            },
            clusters: Memo::new(TOKENS_KEPT),
            visible: Memo::new(TOKENS_KEPT),
            sweeps: Memo::new(SWEEPS_KEPT),
        })
    }

    pub async fn handle(self: Arc<Self>, request: Parts) -> HttpResponse {
        if request.method != Method::GET && request.method != Method::HEAD {
            let mut response =
                error_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here");
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let asset = |kind, body: &'static [u8]| respond(StatusCode::OK, kind, Bytes::from(body));
        match request.uri.path() {
            "/" | "/index.html" => asset("text/html; charset=utf-8", INDEX_HTML),
            "/assets/app.js" => asset("text/javascript; charset=utf-8", APP_JS),
            "/assets/app.css" => asset("text/css; charset=utf-8", APP_CSS),
            "/assets/uPlot.iife.min.js" => asset("text/javascript; charset=utf-8", UPLOT_JS),
            "/assets/uPlot.min.css" => asset("text/css; charset=utf-8", UPLOT_CSS),
            // No icon: answer at once rather than with a 404 in the console.
            "/favicon.ico" => respond(StatusCode::NO_CONTENT, "image/x-icon", Bytes::new()),
            path => match path.strip_prefix("/api/v1/") {
                Some(route) => self.api(route, &request).await,
                None => error_response(StatusCode::NOT_FOUND, "no such page"),
            },
        }
    }

    async fn api(&self, route: &str, request: &Parts) -> HttpResponse {
        let call = match ApiCall::parse(route, request.uri.query()) {
            Ok(call) => call,
            Err((status, message)) => return error_response(status, message),
        };
        let token = match request.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => match bearer(value) {
                Ok(token) => Some(token),
                Err(message) => return error_response(StatusCode::UNAUTHORIZED, message),
            },
        };
        match self.answer(&call, token.as_ref()).await {
            Ok(body) => json_body(StatusCode::OK, body),
            // The leader's words are for the CLI (`--token`); a browser
            // signs in.
            Err((StatusCode::UNAUTHORIZED, _)) if token.is_none() => {
                error_response(StatusCode::UNAUTHORIZED, SIGN_IN)
            }
            Err((status, message)) => error_response(status, message),
        }
    }

    async fn answer(&self, call: &ApiCall, token: Option<&Token>) -> Result<Bytes, Refusal> {
        let young = |_: &_, age: Duration| age < CACHE_FOR;
        let key = token.map(Token::reveal).unwrap_or_default();
        match call {
            ApiCall::Cluster => {
                self.clusters
                    .get(&key, young, || self.upstream.cluster(token))
                    .await
            }
            ApiCall::Sweeps => {
                let visible = self.visible(&key, token).await?;
                Ok(encode(&views::sweeps(
                    &visible.records,
                    &visible.unreadable,
                )))
            }
            ApiCall::Sweep(id) => Ok(encode(&views::sweep(&*self.sweep(id, &key, token).await?))),
            ApiCall::Curves(id, metric) => {
                let view = self.sweep(id, &key, token).await?;
                Ok(encode(&views::curves(&view, metric.as_deref())))
            }
            ApiCall::Trial(id, number) => {
                let view = self.sweep(id, &key, token).await?;
                views::trial(&view, *number)
                    .map(|value| encode(&value))
                    .map_err(|error| (http_status(&error), error.to_string()))
            }
        }
    }

    async fn visible(&self, key: &str, token: Option<&Token>) -> Result<Arc<Visible>, Refusal> {
        self.visible
            .get(
                key,
                |_, age| age < CACHE_FOR,
                || self.upstream.visible(token),
            )
            .await
    }

    /// Sweep `id` with its trials, if `token` may see it.
    async fn sweep(
        &self,
        id: &str,
        key: &str,
        token: Option<&Token>,
    ) -> Result<Arc<SweepView>, Refusal> {
        let visible = self.visible(key, token).await?;
        if !visible.records.iter().any(|r| r.id == id) {
            // Not (yet) among what it may see: the leader's own answer
            // says why (no such sweep, or another user's), or has it if
            // it was submitted since.
            return self.upstream.sweep(id, token).await;
        }
        self.sweeps
            .get(
                id,
                |view, age| view.record.state.is_terminal() || age < CACHE_FOR,
                || self.upstream.sweep(id, token),
            )
            .await
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(value: &header::HeaderValue) -> std::result::Result<Token, String> {
    let text = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("the Authorization header must read \"Bearer <token>\"")?;
    Token::parse(text.trim()).map_err(|e| e.to_string())
}

/// The HTTP status for what the leader answered.
fn http_status(error: &Error) -> StatusCode {
    match error {
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Unreachable { .. } | Error::NoLeader { .. } | Error::FailedPrecondition(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_and_queries_parse_or_are_refused() {
        assert_eq!(ApiCall::parse("cluster", None), Ok(ApiCall::Cluster));
        assert_eq!(ApiCall::parse("sweeps", Some("")), Ok(ApiCall::Sweeps));
        assert_eq!(
            ApiCall::parse("sweeps/sweep-3", None),
            Ok(ApiCall::Sweep("sweep-3".into()))
        );
        assert_eq!(
            ApiCall::parse("sweeps/job-1/curves", Some("metric=train_loss")),
            Ok(ApiCall::Curves("job-1".into(), Some("train_loss".into())))
        );
        assert_eq!(
            ApiCall::parse("sweeps/job-1/trials/0", None),
            Ok(ApiCall::Trial("job-1".into(), 0))
        );
        let refused = |route: &str, query: Option<&str>| ApiCall::parse(route, query).unwrap_err();
        assert_eq!(refused("nope", None).0, StatusCode::NOT_FOUND);
        assert_eq!(refused("sweeps/a/b/c/d", None).0, StatusCode::NOT_FOUND);
        assert_eq!(
            refused("sweeps/x/trials/-1", None).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused("sweeps/%3Cscript%3E", None).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(&format!("sweeps/{}", "a".repeat(65)), None).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused("sweeps", Some("%%%&&==")).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused("sweeps/s-1/curves", Some("metric=a%20b")).0,
            StatusCode::BAD_REQUEST
        );
        // Nothing the client sent is echoed back.
        let (_, message) = refused("sweeps/%3Cscript%3E", None);
        assert!(!message.contains("script"), "{message}");
    }

    #[test]
    fn leader_errors_become_the_matching_http_status() {
        assert_eq!(
            http_status(&Error::Unauthenticated("no token".into())),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            http_status(&Error::PermissionDenied("x".into())),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            http_status(&Error::NotFound("x".into())),
            StatusCode::NOT_FOUND
        );
        assert!(leader_moved(&Error::FailedPrecondition(
            "not the leader".into()
        )));
        assert!(!leader_moved(&Error::NotFound("x".into())));
    }
}
