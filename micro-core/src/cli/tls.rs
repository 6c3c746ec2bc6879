//! TLS flags: `--tls-cert`, `--tls-key`, `--tls-ca` and their `MICRO_TLS_*` variables.

use clap::Args;

use crate::{
    Result,
    config::{RegistryConfig, TlsConfig},
};

/// TLS flags: this process's certificate and key, and the CA it trusts. Unset: plaintext.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process: servers serve TLS with it, clients present
    /// it to servers that ask. Its name should be the service name, e.g. `vessel-service`.
    #[arg(long, global = true, env = "MICRO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, global = true, env = "MICRO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) to trust: clients then use TLS and check that a server's
    /// certificate names the service called; servers check client certificates presented.
    #[arg(long, global = true, env = "MICRO_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// Reads the files; `None` when no TLS flag is set.
    pub fn load(&self) -> Result<Option<TlsConfig>> {
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        TlsConfig::from_files(identity, self.tls_ca.as_deref())
    }

    /// Consul Connect's TLS when `registry` turns it on (`MICRO_CONSUL_CONNECT`), presenting
    /// `name` unless `MICRO_CONSUL_CONNECT_NAME` gives another; else the files, as
    /// [`TlsArgs::load`]. Inside a tokio runtime.
    pub async fn load_for(&self, registry: &RegistryConfig, name: &str) -> Result<Option<TlsConfig>> {
        match registry.connect_tls(name).await? {
            Some(tls) => {
                if self.tls_cert.is_some() || self.tls_ca.is_some() {
                    tracing::warn!("MICRO_CONSUL_CONNECT is on: MICRO_TLS_* files are not used");
                }
                Ok(Some(tls))
            }
            None => self.load(),
        }
    }
}
