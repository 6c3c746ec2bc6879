//! The `/metrics` page: its two text formats and the endpoint that serves it.

use std::net::SocketAddr;

use super::metrics;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text 0.0.4.
    Prometheus,
}

impl Format {
    /// The format a scraper asks for with its `Accept` header: OpenMetrics when it names
    /// `application/openmetrics-text`, else Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a page in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text as Prometheus text 0.0.4: a counter family is named after its
/// samples (`x_total`), `# UNIT` lines and `# EOF` go.
pub(super) fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut help: Option<&str> = None;
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held until the TYPE line says whether the family is a counter.
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), kind),
                "unknown" => (name.to_owned(), "untyped"),
                _ => (name.to_owned(), kind),
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` on `address` in the background until the returned endpoint is
/// stopped or dropped. A server given a metrics address owns one and stops it with itself.
pub async fn serve(address: SocketAddr) -> std::io::Result<MetricsEndpoint> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|headers: http::HeaderMap| async move {
            let accept = headers.get(http::header::ACCEPT).and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            ([(http::header::CONTENT_TYPE, format.content_type())], metrics().render_as(format))
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::warn!(error = %err, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "metrics at /metrics");
    Ok(MetricsEndpoint { address: bound, task: Some(task) })
}

/// A running `/metrics` endpoint; it stops when [stopped](MetricsEndpoint::stop) or dropped.
#[derive(Debug)]
pub struct MetricsEndpoint {
    address: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// The address the endpoint is bound to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
