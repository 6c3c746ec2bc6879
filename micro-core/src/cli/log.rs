//! Logging set-up for binaries: libraries only emit `tracing` events; a binary calls
//! [`LogArgs::init`] once at the top of `main`. The same call sets up OpenTelemetry trace
//! export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see [`super::TelemetryArgs`]); then
//! log lines inside a served call carry its `trace_id` and `span_id`.
//!
//! # Examples
//! ```no_run
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     log: micro_core::cli::LogArgs,
//! }
//! Cli::parse().log.init("my_service=info,micro_core=info");
//! ```

use std::{fmt, io::IsTerminal};

use clap::{Args, ValueEnum};
use tracing::field::{Field, Visit};
use tracing_subscriber::{
    EnvFilter, Layer,
    field::RecordFields,
    filter::LevelFilter,
    fmt::{FormatFields, FormattedFields, MakeWriter, format::Writer},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use super::{
    json_fields::AppendingJsonFields,
    telemetry::{self, TelemetryArgs},
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Logging flags shared by every binary. `RUST_LOG` selects what is logged.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "MICRO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Trace export: `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, ….
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl LogArgs {
    /// Installs the global subscriber on stderr: `RUST_LOG` when set, else `default_filter`.
    /// Text lines carry ANSI colour codes only when stderr is a terminal, so log files and
    /// container logs stay plain. Spans are exported (see [`TelemetryArgs`]) under the name
    /// of the running binary; [`LogArgs::init_service`] names the service.
    pub fn init(&self, default_filter: &str) {
        self.init_service(default_filter, &binary_name());
    }

    /// As [`LogArgs::init`], exporting spans as `service_name` unless `OTEL_SERVICE_NAME`
    /// says otherwise. Call [`super::flush_telemetry`] before the process exits (a
    /// server's `run()` does).
    pub fn init_service(&self, default_filter: &str, service_name: &str) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
        let ansi = std::io::stderr().is_terminal();
        let provider = match self.telemetry.provider(service_name) {
            Ok(provider) => provider,
            Err(err) => {
                eprintln!("warning: traces are not exported: {err}");
                None
            }
        };
        let otel = provider.as_ref().map(|provider| {
            // Every span and event at info and above goes to the exporter, whatever
            // RUST_LOG shows on stderr.
            tracing_opentelemetry::layer()
                .with_tracer(telemetry::install(provider))
                .with_filter(LevelFilter::INFO)
        });
        // try_init also forwards the `log` records of dependencies (mdns-sd) to tracing.
        let _ = match otel {
            // RUST_LOG filters the whole subscriber: a span nobody logs is never made, and one
            // that is costs no per-layer filter bookkeeping.
            None => {
                tracing_subscriber::registry().with(filter).with(self.layer(ansi, std::io::stderr)).try_init()
            }
            Some(otel) => tracing_subscriber::registry()
                .with(otel)
                .with(self.layer(ansi, std::io::stderr).with_filter(filter))
                .try_init(),
        };
    }

    /// The log layer [`LogArgs::init`] installs, writing to `writer`, with colours when `ansi`.
    fn layer<S, W>(&self, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let layer = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer);
        match self.log_format {
            LogFormat::Text => layer.fmt_fields(PlainFields).boxed(),
            LogFormat::Json => layer.json().fmt_fields(AppendingJsonFields).boxed(),
        }
    }
}

/// Text-line fields: the message, then `name=value` pairs, leaving out OpenTelemetry
/// attributes (dotted names such as `rpc.method` or `server.address`), which the spans
/// carry to the exporter and JSON lines keep. A line inside a call shows the plain fields
/// of its spans (`request_id`, `trace_id`, `topic`, `message_id`) and its own.
struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }

    /// Fields recorded on a span later (a request id, a status): appended after a space,
    /// unless all of them are left out.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        if !added.is_empty() {
            if !current.fields.is_empty() {
                current.fields.push(' ');
            }
            current.fields.push_str(&added);
        }
        Ok(())
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if name.contains('.') || self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) { "" } else { " " };
        self.result = match name {
            "message" => write!(self.writer, "{separator}{value:?}"),
            _ => write!(self.writer, "{separator}{name}={value:?}"),
        };
    }
}

/// The file name of the running binary, e.g. `vessel-service`.
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| std::path::Path::new(&arg0).file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "service".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_log::Captured;

    /// What the log layer of `format` writes while `emit` runs, colours when `ansi`.
    fn logged_as(format: LogFormat, ansi: bool, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let args = LogArgs { log_format: format, telemetry: TelemetryArgs::default() };
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(args.layer(ansi, move || sink.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        captured.text()
    }

    fn logged(ansi: bool) -> String {
        logged_as(LogFormat::Text, ansi, || tracing::warn!(service = "svc", "heartbeat failed"))
    }

    #[test]
    fn a_line_in_a_call_leaves_the_spans_opentelemetry_attributes_out() {
        let logged = logged_as(LogFormat::Text, false, || {
            let call = tracing::info_span!(
                "grpc.client",
                otel.kind = "client",
                rpc.method = "a.B/C",
                request_id = 7
            );
            let _entered = call.enter();
            tracing::warn!(service = "vessel", code = "Unavailable", "call failed");
        });
        let line = logged;
        assert!(line.contains("grpc.client{request_id=7}:"), "{line}");
        assert!(line.contains(r#"call failed service="vessel" code="Unavailable""#), "{line}");
        assert!(!line.contains("otel.kind") && !line.contains("rpc.method"), "{line}");
    }

    #[test]
    fn a_json_line_in_a_call_carries_the_fields_its_span_recorded_later() {
        let logged = logged_as(LogFormat::Json, false, || {
            let call = tracing::info_span!(
                "grpc.server",
                rpc.method = "a.B/C",
                request_id = tracing::field::Empty,
                code = tracing::field::Empty
            );
            call.record("request_id", "r-1");
            call.record("code", 14);
            let _entered = call.enter();
            tracing::warn!(elapsed = 1.5, "call failed");
        });
        let text = logged;
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        let span = &line["span"];
        assert_eq!(span["name"], "grpc.server", "{line}");
        assert_eq!(span["rpc.method"], "a.B/C", "{line}");
        assert_eq!(span["request_id"], "r-1", "{line}");
        assert_eq!(span["code"], 14, "{line}");
        assert_eq!(line["fields"]["message"], "call failed", "{line}");
    }

    #[test]
    fn json_span_fields_of_every_kind_are_valid_json_with_quotes_and_control_characters_escaped() {
        struct Tricky;
        impl fmt::Debug for Tricky {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("say \"hi\"\\\n\t\u{1}é")
            }
        }
        let logged = logged_as(LogFormat::Json, false, || {
            let span = tracing::info_span!(
                "s",
                otel.kind = "server",
                text = "a \"quoted\" \\ line\nnext",
                debug = ?Tricky,
                count = 7u64,
                delta = -3i64,
                ratio = 0.5,
                nan = f64::NAN,
                yes = true,
                later = tracing::field::Empty,
            );
            span.record("later", "\u{7f}\"");
            let _entered = span.enter();
            tracing::warn!("inside");
        });
        let text = logged;
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        let span = &line["span"];
        let expected = serde_json::json!({
            "name": "s",
            "text": "a \"quoted\" \\ line\nnext",
            "debug": "say \"hi\"\\\n\t\u{1}é",
            "count": 7,
            "delta": -3,
            "ratio": 0.5,
            "nan": null,
            "yes": true,
            "later": "\u{7f}\"",
        });
        assert_eq!(span, &expected, "{text}");
    }

    #[test]
    fn lines_carry_colour_codes_only_for_a_terminal() {
        let plain = logged(false);
        assert!(plain.contains("heartbeat failed") && !plain.contains('\x1b'), "{plain:?}");
        assert!(logged(true).contains('\x1b'), "a terminal gets colours");
    }
}
