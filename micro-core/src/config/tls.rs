//! TLS material: this process's identity and the CAs it trusts.

use std::path::Path;

use crate::{Error, Result};

/// TLS material, loaded.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// This process's certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The CA certificates to trust, PEM.
    pub ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// Reads PEM files: `identity` (certificate, key) and `ca`; `None` when neither is given.
    /// Errors name the variable that set each path (`MICRO_TLS_CERT`, `MICRO_TLS_KEY`,
    /// `MICRO_TLS_CA`).
    pub fn from_files(identity: Option<(&Path, &Path)>, ca: Option<&Path>) -> Result<Option<TlsConfig>> {
        let read = |path: &Path, variable: &str| {
            std::fs::read(path).map_err(|err| {
                Error::invalid(format!("{variable}={}", path.display()), format!("cannot read it: {err}"))
            })
        };
        let identity = match identity {
            Some((cert, key)) => Some((read(cert, "MICRO_TLS_CERT")?, read(key, "MICRO_TLS_KEY")?)),
            None => None,
        };
        let ca = ca.map(|ca| read(ca, "MICRO_TLS_CA")).transpose()?;
        Ok((identity.is_some() || ca.is_some()).then_some(TlsConfig { identity, ca }))
    }
}
