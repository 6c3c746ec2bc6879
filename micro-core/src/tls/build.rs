//! rustls configurations from PEM material: servers with their identity and, with a CA,
//! client certificates checked; clients with the CA and the check [`Trust`] asks for.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::{Built, Material, Trust};
use crate::{Error, Result};

/// The protocol both sides speak: gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The SPIFFE id Consul Connect gives the service `name`:
/// `spiffe://<trust-domain>/ns/default/dc/<datacenter>/svc/<name>`.
pub fn consul_spiffe_id(trust_domain: &str, datacenter: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{name}")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(what: &str, err: impl std::fmt::Display) -> Error {
    Error::invalid(what.to_owned(), err.to_string())
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|err| invalid(what, err))?;
    if certificates.is_empty() {
        return Err(invalid(what, "no PEM certificate in it"));
    }
    Ok(certificates)
}

fn roots(ca: &[u8]) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(ca, "MICRO_TLS_CA")? {
        roots.add(certificate).map_err(|err| invalid("MICRO_TLS_CA", err))?;
    }
    Ok(Arc::new(roots))
}

/// Every configuration `material` allows, for `trust`.
pub(super) fn build(material: Material, trust: &Trust) -> Result<Built> {
    let roots = material.ca.as_deref().map(roots).transpose()?;
    let identity = match &material.identity {
        Some((cert, key)) => Some((
            certificates(cert, "MICRO_TLS_CERT")?,
            PrivateKeyDer::from_pem_slice(key).map_err(|err| invalid("MICRO_TLS_KEY", err))?,
        )),
        None => None,
    };
    let server = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>| -> Result<_> {
        let Some((chain, key)) = &identity else { return Ok(None) };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| invalid("TLS", err))?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|err| invalid("MICRO_TLS_CERT/MICRO_TLS_KEY", err))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Some(Arc::new(config)))
    };
    let client_verifier = |optional: bool| -> Result<_> {
        let Some(roots) = &roots else { return Ok(None) };
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        if optional {
            builder = builder.allow_unauthenticated();
        }
        Ok(Some(builder.build().map_err(|err| invalid("MICRO_TLS_CA", err))?))
    };
    let server_optional = server(client_verifier(true)?)?;
    let server_required = if roots.is_some() { server(client_verifier(false)?)? } else { None };
    let client = match &roots {
        Some(roots) => {
            let names = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|err| invalid("MICRO_TLS_CA", err))?;
            let builder = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|err| invalid("TLS", err))?;
            let builder = match trust {
                Trust::ServiceNames => builder.with_webpki_verifier(names),
                Trust::ConsulConnect { trust_domain, datacenter } => {
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                        chain: names,
                        trust_domain: trust_domain.clone(),
                        datacenter: datacenter.clone(),
                    }))
                }
            };
            let mut config = match &identity {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|err| invalid("MICRO_TLS_CERT/MICRO_TLS_KEY", err))?,
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            Some(Arc::new(config))
        }
        None => None,
    };
    Ok(Built { material, server_optional, server_required, client })
}

/// Checks a server's chain against the CA, then that its SPIFFE id is Consul's for the
/// service name called (the server name of the connection), instead of a DNS name.
#[derive(Debug)]
struct SpiffeVerifier {
    chain: Arc<WebPkiServerVerifier>,
    trust_domain: String,
    datacenter: String,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        // The chain is checked before the name: a name error means the chain is good.
        match self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {}
            Err(err) => return Err(err),
        }
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::General("a Connect service is called by its name".into()));
        };
        let expected = consul_spiffe_id(&self.trust_domain, &self.datacenter, name.as_ref());
        match crate::auth::identity::spiffe_id_of(end_entity.as_ref()) {
            Some(id) if id.0 == expected => Ok(ServerCertVerified::assertion()),
            presented => Err(rustls::Error::General(format!(
                "the server presented {}, not {expected}",
                presented.map_or_else(|| "no SPIFFE id".to_owned(), |id| id.0)
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.chain.root_hint_subjects()
    }
}
