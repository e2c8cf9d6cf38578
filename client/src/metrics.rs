//! Serving a Prometheus registry at `/metrics` (OpenMetrics text), for
//! coordinators and workers alike.

use std::net::SocketAddr;

use bytes::Bytes;
use http::StatusCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::web::{self, error_response, respond, HttpResponse};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry as OpenMetrics text.
pub fn encode_registry(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, registry);
    text
}

/// Serves `/metrics` (plain HTTP: the port is for scrapers, kept off the
/// public network by NetworkPolicy) until `shutdown`; `render` makes the
/// text on each scrape.
pub async fn serve_registry<R>(
    listen: SocketAddr,
    render: R,
    shutdown: CancellationToken,
) -> Result<()>
where
    R: Fn() -> String + Clone + Send + Sync + 'static,
{
    let listener = web::bind(listen, "metrics").await?;
    tracing::info!(listen = %listener.local_addr().unwrap_or(listen), "metrics at /metrics");
    let handler = move |request: http::request::Parts| {
        let render = render.clone();
        async move { answer(&request, render) }
    };
    tokio::spawn(web::serve(listener, None, handler, shutdown));
    Ok(())
}

fn answer(request: &http::request::Parts, render: impl Fn() -> String) -> HttpResponse {
    match request.uri.path() {
        "/metrics" => respond(StatusCode::OK, OPENMETRICS, Bytes::from(render())),
        _ => error_response(StatusCode::NOT_FOUND, "only /metrics is served here"),
    }
}
