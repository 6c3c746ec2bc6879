//! OpenTelemetry trace export for binaries, set up with logging ([`super::LogArgs::init`]):
//! the SDK's `tracing` spans (`grpc.server`, `grpc.client`, `grpc.attempt`) and the
//! program's own go to an OTLP endpoint when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Unset, nothing is exported and no
//! OpenTelemetry layer is installed.
//!
//! The exporter is micro-core's `otlp` feature (off by default). Without it the flags are
//! still read, and an endpoint that is set stops the program at start, as a bad flag does:
//! `trace export over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) is not compiled in: enable
//! micro-core's "otlp" feature`.
//!
//! Besides the flags below, the OpenTelemetry SDK reads its standard variables itself:
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_EXPORTER_OTLP_COMPRESSION`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`,
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` and their `_TRACES_` forms.
//!
//! # Examples
//! ```no_run
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     log: micro_core::cli::LogArgs,
//! }
//! // OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 exports spans as "my-service".
//! Cli::parse().log.init_service("my_service=info,micro_core=info", "my-service");
//! // … then, before the process exits:
//! micro_core::cli::flush_telemetry();
//! ```

use std::sync::{Mutex, OnceLock};

use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
#[cfg(feature = "otlp")]
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
#[cfg(feature = "otlp")]
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};

/// How spans travel to the OTLP endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[value(name = "grpc")]
    Grpc,
    /// OTLP protobuf over HTTP (port 4318 by convention; `/v1/traces` is appended to the
    /// base endpoint).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// Whether spans are exported at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TracesExporter {
    /// Over OTLP, when an endpoint is set.
    Otlp,
    /// Never.
    None,
}

/// The OpenTelemetry protocol the specification makes the default.
pub const DEFAULT_OTLP_PROTOCOL: OtlpProtocol = OtlpProtocol::HttpProtobuf;

/// The standard OpenTelemetry variables that decide trace export, as flags.
#[derive(Debug, Clone, Default, Args)]
pub struct TelemetryArgs {
    /// OTLP endpoint spans are exported to (e.g. http://localhost:4318); unset: none are.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = endpoint("OTEL_EXPORTER_OTLP_ENDPOINT"))]
    pub otlp_endpoint: Option<String>,
    /// OTLP endpoint for spans only, used as given (with /v1/traces over HTTP); beats --otlp-endpoint.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        value_parser = endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )]
    pub otlp_traces_endpoint: Option<String>,
    /// OTLP transport [default: http/protobuf].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum)]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// OTLP transport for spans; beats --otlp-protocol.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", value_enum)]
    pub otlp_traces_protocol: Option<OtlpProtocol>,
    /// The `service.name` of exported spans [default: the service's name].
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
    /// `none` turns trace export off whatever the endpoint [default: otlp].
    #[arg(long, env = "OTEL_TRACES_EXPORTER", value_enum)]
    pub traces_exporter: Option<TracesExporter>,
}

/// The parser of an endpoint flag: any text with the `otlp` feature; without it, an error
/// naming the feature, unless the value is blank (which means unset).
fn endpoint(variable: &'static str) -> impl Fn(&str) -> Result<String, crate::Error> + Clone {
    move |value: &str| {
        if cfg!(feature = "otlp") || value.trim().is_empty() {
            Ok(value.to_owned())
        } else {
            Err(crate::Error::not_compiled_in(format!("trace export over OTLP ({variable})"), "otlp"))
        }
    }
}

impl TelemetryArgs {
    /// The protocol spans are exported with.
    pub fn protocol(&self) -> OtlpProtocol {
        self.otlp_traces_protocol.or(self.otlp_protocol).unwrap_or(DEFAULT_OTLP_PROTOCOL)
    }

    /// The URL spans are sent to, or `None` when export is off.
    pub fn traces_endpoint(&self) -> Option<String> {
        if self.traces_exporter == Some(TracesExporter::None) {
            return None;
        }
        let set = |value: &Option<String>| value.as_ref().filter(|v| !v.trim().is_empty()).cloned();
        if let Some(endpoint) = set(&self.otlp_traces_endpoint) {
            return Some(endpoint);
        }
        let base = set(&self.otlp_endpoint)?;
        Some(match self.protocol() {
            OtlpProtocol::Grpc => base,
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        })
    }

    /// A tracer provider exporting to the endpoint, when one is set; spans are named after
    /// `service_name` unless `OTEL_SERVICE_NAME` says otherwise. Without the `otlp` feature,
    /// an error naming it when an endpoint is set.
    #[cfg(not(feature = "otlp"))]
    pub(crate) fn provider(&self, _service_name: &str) -> Result<Option<SdkTracerProvider>, String> {
        match self.traces_endpoint() {
            None => Ok(None),
            Some(_) => Err(crate::Error::not_compiled_in("trace export over OTLP", "otlp").to_string()),
        }
    }

    /// A tracer provider exporting to the endpoint, when one is set; spans are named after
    /// `service_name` unless `OTEL_SERVICE_NAME` says otherwise.
    #[cfg(feature = "otlp")]
    pub(crate) fn provider(&self, service_name: &str) -> Result<Option<SdkTracerProvider>, String> {
        let Some(endpoint) = self.traces_endpoint() else { return Ok(None) };
        let exporter = match self.protocol() {
            OtlpProtocol::Grpc => SpanExporter::builder().with_tonic().with_endpoint(&endpoint).build(),
            OtlpProtocol::HttpProtobuf => {
                SpanExporter::builder().with_http().with_endpoint(&endpoint).build()
            }
        }
        .map_err(|err| format!("OTLP exporter for {endpoint}: {err}"))?;
        let name = self.otel_service_name.clone().unwrap_or_else(|| service_name.to_owned());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(name).build())
            .build();
        Ok(Some(provider))
    }
}

/// The provider installed by [`super::LogArgs::init`], kept to be flushed at exit.
static PROVIDER: OnceLock<Mutex<Option<SdkTracerProvider>>> = OnceLock::new();

/// Installs `provider` as the process's: the global one for code using the OpenTelemetry
/// API directly, with W3C Trace Context as the global propagator.
pub(crate) fn install(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::Tracer {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = PROVIDER.get_or_init(|| Mutex::new(Some(provider.clone())));
    provider.tracer("micro")
}

/// Sends the spans not exported yet and stops exporting. Servers' `run()` and
/// `micro_core::service(..)` call it when they stop; a program that only makes calls calls
/// it before it exits. Does nothing when no exporter was installed. Blocks up to the
/// exporter's timeout, so call it outside latency-sensitive code.
pub fn flush_telemetry() {
    let provider = PROVIDER.get().and_then(|slot| slot.lock().ok()?.take());
    if let Some(provider) = provider
        && let Err(err) = provider.shutdown()
    {
        tracing::warn!(error = %err, "could not export the last spans");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_decides_export_and_http_gets_the_traces_path() {
        assert_eq!(TelemetryArgs::default().traces_endpoint(), None);
        let base =
            TelemetryArgs { otlp_endpoint: Some("http://collector:4318/".into()), ..Default::default() };
        assert_eq!(base.traces_endpoint().as_deref(), Some("http://collector:4318/v1/traces"));
        let grpc = TelemetryArgs { otlp_protocol: Some(OtlpProtocol::Grpc), ..base.clone() };
        assert_eq!(grpc.traces_endpoint().as_deref(), Some("http://collector:4318/"));
        let traces = TelemetryArgs {
            otlp_traces_endpoint: Some("http://other:4318/v1/traces".into()),
            ..base.clone()
        };
        assert_eq!(traces.traces_endpoint().as_deref(), Some("http://other:4318/v1/traces"));
        let off = TelemetryArgs { traces_exporter: Some(TracesExporter::None), ..base };
        assert_eq!(off.traces_endpoint(), None);
    }

    /// Without the `otlp` feature an endpoint stops the parse with the feature's name; a
    /// blank one means unset. (`make test` builds micro-core with every feature, so
    /// micro-cli's tests/new.rs checks the same message from a scaffolded crate built
    /// without it.)
    #[cfg(not(feature = "otlp"))]
    #[test]
    fn an_endpoint_without_the_otlp_feature_names_the_feature() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            telemetry: TelemetryArgs,
        }
        let err =
            Cli::try_parse_from(["t", "--otlp-endpoint", "http://collector:4318"]).err().expect("refused");
        assert!(err.to_string().contains(r#"enable micro-core's "otlp" feature"#), "{err}");
        let blank = Cli::try_parse_from(["t", "--otlp-endpoint", ""]).expect("blank is unset");
        assert_eq!(blank.telemetry.traces_endpoint(), None);
    }
}
