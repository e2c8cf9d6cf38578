//! A small HTTP/1.1 server for the dashboard and for `/metrics`.
//!
//! Everything it serves is a GET answered from a request's head: bodies
//! are never read, the head is bounded ([`MAX_HEAD_BYTES`]; more is a 431),
//! so are connections ([`MAX_CONNECTIONS`]; more are closed at once), the
//! time to send a head and the TLS handshake. A slow or hostile browser
//! costs a task and a few KiB, never the leader's attention.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{ClientError as Error, Result};

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// Most connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to finish the TLS handshake, and to send a head.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type HttpResponse = Response<Full<Bytes>>;

/// Binds `address`, failing with a message that names it.
pub async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen for {what} on {address}: {e}")))
}

/// Serves `handler` on `listener` (over TLS when `tls` is given) until
/// `shutdown`.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(Parts) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "http: accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "http: connection limit reached; closed");
            continue;
        };
        let (handler, tls, shutdown) = (handler.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match tls {
                None => connection(stream, handler, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, handler, shutdown).await,
                        Ok(Err(error)) => debug!(%peer, %error, "http: TLS handshake failed"),
                        Err(_) => debug!(%peer, "http: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn connection<S, H, F>(stream: S, handler: H, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Parts) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        async move {
            // Only heads matter; an unread body closes the connection
            // after the answer.
            let (parts, _) = request.into_parts();
            Ok::<_, Infallible>(handler(parts).await)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(error) = result {
                debug!(%error, "http: connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), served).await;
        }
    }
}

/// A response with the headers every answer carries: nothing may frame
/// it, sniff it or learn where the user came from.
pub fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> HttpResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    response
}

/// A JSON answer that is never cached by the browser.
pub fn json_response(status: StatusCode, value: &Value) -> HttpResponse {
    json_body(
        status,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

/// [`json_response`] of JSON already encoded.
pub fn json_body(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut response = respond(status, "application/json", body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    json_response(status, &json!({ "error": message.into() }))
}
