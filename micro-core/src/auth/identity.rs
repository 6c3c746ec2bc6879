//! Who is calling: the SPIFFE id in the client certificate a caller presented.
//!
//! # Examples
//! ```
//! assert_eq!(micro_core::auth::spiffe_id("shippy", "vessel-service"), "spiffe://shippy/svc/vessel-service");
//! ```

use std::fmt;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The URI scheme of a SPIFFE id.
const SPIFFE_SCHEME: &str = "spiffe://";

/// A caller's identity: the SPIFFE id of its certificate (`spiffe://<trust-domain>/svc/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(pub String);

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Identity {
    /// The service name in the id: what follows `/svc/`, if the id has that form.
    pub fn service(&self) -> Option<&str> {
        self.0.strip_prefix(SPIFFE_SCHEME)?.split_once("/svc/").map(|(_, name)| name)
    }
}

/// The SPIFFE id of the service `name` in `trust_domain`.
pub fn spiffe_id(trust_domain: &str, name: &str) -> String {
    format!("{SPIFFE_SCHEME}{trust_domain}/svc/{name}")
}

/// The identity of the caller of `request`, when it presented a certificate over TLS that
/// carries a SPIFFE id. For handlers: `micro_core::auth::caller(&request)`.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<Identity> {
    identity_in(request.extensions())
}

/// The identity of the caller of an HTTP-level `request`, as a server layer sees it.
pub fn caller_of<B>(request: &http::Request<B>) -> Option<Identity> {
    identity_in(request.extensions())
}

fn identity_in(extensions: &http::Extensions) -> Option<Identity> {
    let certs = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    spiffe_id_of(certs.first()?.as_ref())
}

/// The first SPIFFE URI subject alternative name of a DER certificate.
pub fn spiffe_id_of(der: &[u8]) -> Option<Identity> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = certificate.subject_alternative_name().ok()??;
    names.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with(SPIFFE_SCHEME) => {
            Some(Identity((*uri).to_owned()))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_is_read_back_from_an_id() {
        assert_eq!(Identity(spiffe_id("td", "vessel")).service(), Some("vessel"));
        assert_eq!(Identity("spiffe://td/other/x".into()).service(), None);
    }

    #[test]
    fn a_certificate_without_a_spiffe_id_names_nobody() {
        assert_eq!(spiffe_id_of(b"not a certificate"), None);
        let (cert, _) = crate::auth::certs::Authority::new("td", std::time::Duration::from_secs(60))
            .unwrap()
            .issue("vessel", std::time::Duration::from_secs(60))
            .unwrap();
        let der = rustls_pemfile_der(&cert);
        assert_eq!(spiffe_id_of(&der), Some(Identity(spiffe_id("td", "vessel"))));
    }

    /// The DER of the first PEM block.
    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }
}
