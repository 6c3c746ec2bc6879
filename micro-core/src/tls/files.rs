//! Material read from PEM files (`MICRO_TLS_CERT`, `MICRO_TLS_KEY`, `MICRO_TLS_CA`) and read
//! again about every second: a certificate renewed on disk applies to the next new
//! connection. Files caught half written (a key that does not match its certificate, a
//! PEM cut short) leave the material in force until they parse.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Material, Renewer, TlsSource, Trust};
use crate::{Error, Result};

/// How often the files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Where the material is: certificate and key files, and the CA file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate (chain) and key files, PEM.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The CA certificates file, PEM.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads every file; errors name the variable that set each path.
    pub fn read(&self) -> Result<Material> {
        let read = |path: &Path, variable: &str| {
            std::fs::read(path).map_err(|err| {
                Error::invalid(format!("{variable}={}", path.display()), format!("cannot read it: {err}"))
            })
        };
        let identity = match &self.identity {
            Some((cert, key)) => Some((read(cert, "MICRO_TLS_CERT")?, read(key, "MICRO_TLS_KEY")?)),
            None => None,
        };
        let ca = self.ca.as_deref().map(|ca| read(ca, "MICRO_TLS_CA")).transpose()?;
        Ok(Material { identity, ca })
    }
}

impl TlsSource {
    /// The material in `files`, read again every [`RELOAD_EVERY`] by a task that stops
    /// with the last clone of the source. Without a tokio runtime, the files are read once.
    pub fn watch_files(files: TlsFiles, trust: Trust) -> Result<TlsSource> {
        let material = files.read()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return TlsSource::fixed(material, trust);
        }
        TlsSource::renewed(material, trust, move |renewer| reread(files, renewer))
    }
}

async fn reread(files: TlsFiles, renewer: Renewer) {
    let mut failing = false;
    while !renewer.is_closed() {
        tokio::time::sleep(RELOAD_EVERY).await;
        match files.read().and_then(|material| renewer.renew(material)) {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(files = ?files, "TLS files parse again");
            }
            Ok(()) => {}
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(files = ?files, error = %crate::error::error_chain(&err), "TLS files not reloaded: the material in force stays");
            }
            Err(_) => {}
        }
    }
}
