//! Logging set-up for binaries: libraries only emit `tracing` events; a binary calls
//! [`LogArgs::init`] once at the top of `main`.
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

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt::MakeWriter, util::SubscriberInitExt};

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
}

impl LogArgs {
    /// Installs the global subscriber on stderr: `RUST_LOG` when set, else `default_filter`.
    /// Text lines carry ANSI colour codes only when stderr is a terminal, so log files and
    /// container logs stay plain.
    pub fn init(&self, default_filter: &str) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
        let ansi = std::io::stderr().is_terminal();
        // try_init also forwards the `log` records of dependencies (mdns-sd) to tracing.
        let _ = self.subscriber(filter, ansi, std::io::stderr).try_init();
    }

    /// The subscriber [`LogArgs::init`] installs, writing to `writer`, with colours when `ansi`.
    fn subscriber<W>(
        &self,
        filter: EnvFilter,
        ansi: bool,
        writer: W,
    ) -> Box<dyn tracing::Subscriber + Send + Sync>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer);
        match self.log_format {
            LogFormat::Text => Box::new(builder.finish()),
            LogFormat::Json => Box::new(builder.json().finish()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps what is written.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(ansi: bool) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let args = LogArgs { log_format: LogFormat::Text };
        let subscriber = args.subscriber(EnvFilter::new("info"), ansi, move || sink.clone());
        tracing::subscriber::with_default(subscriber, || tracing::warn!(service = "svc", "heartbeat failed"));
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_carry_colour_codes_only_for_a_terminal() {
        let plain = logged(false);
        assert!(plain.contains("heartbeat failed") && !plain.contains('\x1b'), "{plain:?}");
        assert!(logged(true).contains('\x1b'), "a terminal gets colours");
    }
}
