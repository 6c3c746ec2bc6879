//! Trace context across a broker: a publish made while handling a traced call (or inside an
//! exported span) writes the W3C `traceparent`/`tracestate` into the message's headers, and
//! the subscriber's `broker.handle` span continues that trace. Without tracing, messages
//! carry no trace headers.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{Headers, headers};

/// The trace headers of the work in progress (the current span, else the call being
/// handled): empty when nothing is traced. Store them beside an event written now and
/// published later (an outbox) so its subscribers join this trace.
pub fn current_trace_headers() -> Headers {
    let mut trace = Headers::new();
    if let Some(cx) = crate::middleware::outgoing_context(&tracing::Span::current()) {
        TraceContextPropagator::new().inject_context(&cx, &mut MapInjector(&mut trace));
    }
    trace
}

/// Makes the trace `message_headers` carry, if any, the parent of `span`.
pub(crate) fn continue_trace(message_headers: &Headers, span: &tracing::Span) {
    if message_headers.contains_key(headers::TRACEPARENT) {
        let _ = span.set_parent(TraceContextPropagator::new().extract(&MapExtractor(message_headers)));
    }
}

struct MapInjector<'a>(&'a mut Headers);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a Headers);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_traced_call_s_context_goes_into_the_headers_and_nothing_without_one() {
        assert!(current_trace_headers().is_empty(), "nothing traced");
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let mut request = http::HeaderMap::new();
        request.insert("traceparent", format!("00-{trace}-b7ad6b7169203331-01").parse().unwrap());
        let remote = crate::middleware::extract_trace_context(&request);
        let headers = crate::middleware::with_remote_context(remote, async { current_trace_headers() }).await;
        let parent = headers.get(super::headers::TRACEPARENT).expect("traceparent written");
        assert!(parent.starts_with(&format!("00-{trace}-")), "{parent}");
    }
}
