//! TLS material: this process's identity and the CAs it trusts, and where newer material
//! comes from.

use std::path::Path;

use crate::{
    Result,
    tls::{Material, TlsFiles, TlsSource, Trust},
};

/// TLS material, loaded.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// This process's certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The CA certificates to trust, PEM.
    pub ca: Option<Vec<u8>>,
    /// Where newer material comes from (files read again, Consul Connect); when set, its
    /// material is the one in force and the two fields above are what it had at start.
    /// Default: none, the material above stays.
    pub source: Option<TlsSource>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .field("source", &self.source)
            .finish()
    }
}

impl TlsConfig {
    /// Reads PEM files: `identity` (certificate, key) and `ca`; `None` when neither is given.
    /// Errors name the variable that set each path (`MICRO_TLS_CERT`, `MICRO_TLS_KEY`,
    /// `MICRO_TLS_CA`). Within a tokio runtime the files are read again about every second
    /// (see [`crate::tls::TlsFiles`]), by a task that stops with the last clone.
    pub fn from_files(identity: Option<(&Path, &Path)>, ca: Option<&Path>) -> Result<Option<TlsConfig>> {
        if identity.is_none() && ca.is_none() {
            return Ok(None);
        }
        let files = TlsFiles {
            identity: identity.map(|(cert, key)| (cert.to_owned(), key.to_owned())),
            ca: ca.map(Path::to_owned),
        };
        Ok(Some(TlsConfig::from_source(TlsSource::watch_files(files, Trust::ServiceNames)?)))
    }

    /// The material `source` has now, and the source, which keeps it current.
    pub fn from_source(source: TlsSource) -> TlsConfig {
        let Material { identity, ca } = source.material();
        TlsConfig { identity, ca, source: Some(source) }
    }

    /// The material in force.
    pub fn material(&self) -> Material {
        match &self.source {
            Some(source) => source.material(),
            None => Material { identity: self.identity.clone(), ca: self.ca.clone() },
        }
    }

    /// The source of the material: `source`, or the two fields, fixed, checking servers by
    /// service name. Fails when fixed material does not parse.
    pub fn source(&self) -> Result<TlsSource> {
        match &self.source {
            Some(source) => Ok(source.clone()),
            None => TlsSource::fixed(self.material(), Trust::ServiceNames),
        }
    }
}
