//! W3C Trace Context across processes: `traceparent`/`tracestate` read from a request and
//! written onto the calls a handler makes.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, TraceContextExt},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{CALL, TRACEPARENT_HEADER};

/// The trace context `headers` carry (`traceparent`, `tracestate`); an empty context
/// when they carry none or an invalid one.
pub fn extract_trace_context(headers: &HeaderMap) -> opentelemetry::Context {
    if !headers.contains_key(TRACEPARENT_HEADER) {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `traceparent`/`tracestate` for a call made in `span`: `span`'s own context when
/// spans are exported, else the context of the call being handled, passed on unchanged.
pub(crate) fn inject_trace_context(headers: &mut HeaderMap, span: &tracing::Span) {
    if let Some(cx) = outgoing_context(span) {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Whether `span` goes to a trace exporter (an OpenTelemetry layer gave it a context): only
/// then are a call's status fields recorded on it, since a log line names a status itself.
pub(crate) fn is_exported(span: &tracing::Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_valid()
}

/// The context work done in `span` continues: `span`'s own when spans are exported, else the
/// context of the call being handled; `None` when neither is valid.
pub(crate) fn outgoing_context(span: &tracing::Span) -> Option<opentelemetry::Context> {
    if !span.is_disabled() {
        let own = span.context();
        if own.span().span_context().is_valid() {
            return Some(own);
        }
    }
    match CALL.try_with(|call| call.remote.clone()) {
        Ok(remote) if remote.span().span_context().is_valid() => Some(remote),
        _ => None,
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

pub(super) struct HeaderInjector<'a>(pub(super) &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// The span context of `cx`, for tests and logs.
pub fn span_context(cx: &opentelemetry::Context) -> SpanContext {
    cx.span().span_context().clone()
}
