//! TLS that follows its material: a [`TlsSource`] holds the certificate, key and CAs in
//! force and the rustls configurations built from them, and may be kept current by a task
//! (files re-read when they change, see [`TlsSource::watch_files`]; Consul Connect
//! certificates renewed by the agent). A server accepts, and a client connects, each new
//! connection with the configuration in force at that moment, so renewed material applies
//! without a restart while the connections already open keep theirs.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::tls::{Material, TlsSource, Trust};
//! let material = Material { identity: None, ca: Some(std::fs::read("ca.pem").unwrap()) };
//! let source = TlsSource::fixed(material, Trust::ServiceNames)?;
//! assert!(source.client_config().is_some());
//! # Ok(()) }
//! ```

use std::sync::Arc;

use tokio::sync::watch;

use crate::Result;

mod build;
mod connector;
mod files;
mod incoming;

pub use build::consul_spiffe_id;
pub use connector::TlsConnector;
pub use files::{RELOAD_EVERY, TlsFiles};
pub use incoming::TlsIncoming;

/// TLS material as PEM: this process's certificate chain and key, and the CAs it trusts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Material {
    /// This process's certificate (chain) and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The CA certificates to trust, PEM.
    pub ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

/// What a client checks in a server's certificate, besides its CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// A DNS name equal to the service name called (certificates of `micro certs`).
    ServiceNames,
    /// The Consul Connect SPIFFE id of the service name called, in this trust domain and
    /// datacenter (see [`consul_spiffe_id`]).
    ConsulConnect {
        /// The trust domain, e.g. `7f5b...consul`.
        trust_domain: String,
        /// The datacenter, e.g. `dc1`.
        datacenter: String,
    },
}

/// The rustls configurations built from one version of the material.
pub(crate) struct Built {
    material: Material,
    /// With an identity: client certificates checked when presented.
    server_optional: Option<Arc<rustls::ServerConfig>>,
    /// With an identity and a CA: client certificates required.
    server_required: Option<Arc<rustls::ServerConfig>>,
    /// With a CA.
    client: Option<Arc<rustls::ClientConfig>>,
}

/// Stops the task that keeps a source current when the last clone of the source is dropped.
struct Owner(tokio::task::JoinHandle<()>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The TLS material in force and its rustls configurations. Cheap to clone: clones share
/// the material, and the task that keeps it current stops with the last clone.
#[derive(Clone)]
pub struct TlsSource {
    current: watch::Receiver<Arc<Built>>,
    trust: Trust,
    owner: Option<Arc<Owner>>,
    authorize: Option<Arc<dyn crate::auth::Authorize>>,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource")
            .field("material", &self.current.borrow().material)
            .field("trust", &self.trust)
            .field("renewed", &self.owner.is_some())
            .field("authorizes", &self.authorize.is_some())
            .finish()
    }
}

impl TlsSource {
    /// Material that never changes. Fails when it does not parse.
    pub fn fixed(material: Material, trust: Trust) -> Result<TlsSource> {
        let built = build::build(material, &trust)?;
        let (_, current) = watch::channel(Arc::new(built));
        Ok(TlsSource { current, trust, owner: None, authorize: None })
    }

    /// Material that `renew` keeps current: it is given a [`Renewer`] and runs as a task
    /// that stops with the last clone of the source. Needs a tokio runtime.
    pub(crate) fn renewed<F, Fut>(material: Material, trust: Trust, renew: F) -> Result<TlsSource>
    where
        F: FnOnce(Renewer) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let built = build::build(material, &trust)?;
        let (sender, current) = watch::channel(Arc::new(built));
        let task = tokio::spawn(renew(Renewer { sender, trust: trust.clone() }));
        Ok(TlsSource { current, trust, owner: Some(Arc::new(Owner(task))), authorize: None })
    }

    /// Servers with this material ask `authorize` about each caller (see
    /// [`crate::auth::authorize`]) and require client certificates. Default: none.
    pub fn authorize(mut self, authorize: Arc<dyn crate::auth::Authorize>) -> TlsSource {
        self.authorize = Some(authorize);
        self
    }

    /// What servers with this material ask about each caller, if anything.
    pub fn authorizer(&self) -> Option<Arc<dyn crate::auth::Authorize>> {
        self.authorize.clone()
    }

    /// The material in force.
    pub fn material(&self) -> Material {
        self.current.borrow().material.clone()
    }

    /// What a client checks in a server's certificate.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Whether the material is kept current by a task.
    pub fn is_renewed(&self) -> bool {
        self.owner.is_some()
    }

    /// The server configuration in force for a new connection; `None` without an identity
    /// or, when `require_client_certificates`, without a CA to check them against.
    pub fn server_config(&self, require_client_certificates: bool) -> Option<Arc<rustls::ServerConfig>> {
        let built = self.current.borrow();
        if require_client_certificates {
            built.server_required.clone()
        } else {
            built.server_optional.clone()
        }
    }

    /// The client configuration in force for a new connection; `None` without a CA.
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.current.borrow().client.clone()
    }

    /// Waits until the material changes (for tests and logs); `false` when it never will.
    pub async fn changed(&mut self) -> bool {
        self.current.changed().await.is_ok()
    }
}

/// What a renewal task gives newer material to.
pub(crate) struct Renewer {
    sender: watch::Sender<Arc<Built>>,
    trust: Trust,
}

impl Renewer {
    /// Puts `material` in force for new connections, unless it does not parse (the
    /// material in force then stays, and the error is returned).
    pub(crate) fn renew(&self, material: Material) -> Result<()> {
        if self.sender.borrow().material == material {
            return Ok(());
        }
        let built = build::build(material, &self.trust)?;
        self.sender.send_replace(Arc::new(built));
        tracing::info!("TLS material renewed: new connections use it");
        Ok(())
    }

    /// Whether nobody holds the source any more.
    pub(crate) fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}
