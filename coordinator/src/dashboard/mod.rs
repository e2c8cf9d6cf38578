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
//! kept for [`CACHE_FOR`] per token and path, so many browsers polling
//! the same page cost the leader one call per second.

mod importance;
mod views;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{header, Method, StatusCode};
use ringleader_security::Token;
use serde_json::Value;
use tokio::sync::Mutex as AsyncMutex;
use tonic::transport::Channel;

use crate::client::{authorized, find_leader_channel, Connection, LeaderClient};
use crate::error::{Error, Result};
use crate::status;
use crate::sweep::client::{get_from, list_from};
use crate::web::{error_response, json_body, respond, HttpResponse};

/// How long an answer is reused for the same token and path.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// Most answers kept.
const CACHE_ENTRIES: usize = 256;
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

/// A bad path or query, as the HTTP status and message to answer with.
type Refusal = (StatusCode, String);

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

    async fn forget(&self) {
        *self.leader.lock().await = None;
    }

    async fn call(&self, call: &ApiCall, token: Option<&Token>) -> Result<Value> {
        let (address, mut client) = self.client(token).await?;
        let timeout = self.connection.timeout;
        match call {
            ApiCall::Cluster => status::fetch_from(&address, &mut client, timeout)
                .await
                .map(|s| status::to_json(&s)),
            ApiCall::Sweeps => list_from(&mut client)
                .await
                .map(|(records, unreadable)| views::sweeps(&records, &unreadable)),
            ApiCall::Sweep(id) => get_from(&mut client, id).await.map(|v| views::sweep(&v)),
            ApiCall::Curves(id, metric) => get_from(&mut client, id)
                .await
                .map(|v| views::curves(&v, metric.as_deref())),
            ApiCall::Trial(id, number) => views::trial(&get_from(&mut client, id).await?, *number),
        }
    }
}

/// Whether the channel we hold no longer reaches a leader.
fn leader_moved(error: &Error) -> bool {
    match error {
        Error::Unreachable { .. } | Error::NoLeader { .. } => true,
        Error::FailedPrecondition(message) => message.contains("not the leader"),
        _ => false,
    }
}

/// One coordinator's dashboard.
pub struct Dashboard {
    upstream: Upstream,
    cache: Mutex<HashMap<(String, String), (Instant, Bytes)>>,
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
            cache: Mutex::new(HashMap::new()),
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
        let authorization = match request.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => match bearer(value) {
                Ok(token) => Some(token),
                Err(message) => return error_response(StatusCode::UNAUTHORIZED, message),
            },
        };
        let key = (
            authorization
                .as_ref()
                .map(|t| t.reveal().to_string())
                .unwrap_or_default(),
            format!("{route}?{}", request.uri.query().unwrap_or_default()),
        );
        if let Some(body) = self.cached(&key) {
            return json_body(StatusCode::OK, body);
        }
        let token = authorization.as_ref();
        let mut answer = self.upstream.call(&call, token).await;
        if answer.as_ref().is_err_and(leader_moved) {
            self.upstream.forget().await;
            answer = self.upstream.call(&call, token).await;
        }
        match answer {
            Ok(value) => {
                let body = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
                self.remember(key, body.clone());
                json_body(StatusCode::OK, body)
            }
            Err(error) => error_response(http_status(&error), error.to_string()),
        }
    }

    fn cached(&self, key: &(String, String)) -> Option<Bytes> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, body)| body.clone())
    }

    fn remember(&self, key: (String, String), body: Bytes) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), body));
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
