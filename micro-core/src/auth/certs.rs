//! A development CA and short-lived certificates that name their service, as `micro certs`
//! writes them: each service certificate carries the service's name as a DNS name (what an
//! SDK client checks when it calls the service by name) and its SPIFFE id as a URI (what a
//! server's policy checks when the service calls), and serves as both server and client
//! certificate.
//!
//! # Examples
//! ```
//! use std::time::Duration;
//! use micro_core::auth::certs::Authority;
//! let ca = Authority::new("shippy", Duration::from_secs(30 * 24 * 3600)).unwrap();
//! let (cert, key) = ca.issue("vessel-service", Duration::from_secs(24 * 3600)).unwrap();
//! assert!(cert.starts_with("-----BEGIN CERTIFICATE-----") && key.contains("PRIVATE KEY"));
//! ```

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::spiffe_id;
use crate::{Error, Result};

/// A certificate authority: its certificate (PEM) and the key that signs with it.
pub struct Authority {
    trust_domain: String,
    certificate: String,
    issuer: Issuer<'static, KeyPair>,
    key: String,
}

fn failed(what: &str, err: impl std::fmt::Display) -> Error {
    Error::invalid(what.to_owned(), err.to_string())
}

/// Now and `valid_for` from now, as a certificate's validity, a minute early for clocks that
/// lag.
fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + valid_for).into();
}

impl Authority {
    /// A new CA for `trust_domain`, valid for `valid_for`.
    pub fn new(trust_domain: &str, valid_for: Duration) -> Result<Authority> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|err| failed("CA", err))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{trust_domain} development CA"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, valid_for);
        let key = KeyPair::generate().map_err(|err| failed("CA key", err))?;
        let certificate = params.self_signed(&key).map_err(|err| failed("CA certificate", err))?.pem();
        let key_pem = key.serialize_pem();
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            certificate,
            issuer: Issuer::new(params, key),
            key: key_pem,
        })
    }

    /// The CA written before: its certificate and key, PEM.
    pub fn load(trust_domain: &str, certificate: &str, key: &str) -> Result<Authority> {
        let signing = KeyPair::from_pem(key).map_err(|err| failed("CA key", err))?;
        let issuer =
            Issuer::from_ca_cert_pem(certificate, signing).map_err(|err| failed("CA certificate", err))?;
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            certificate: certificate.to_owned(),
            issuer,
            key: key.to_owned(),
        })
    }

    /// The CA's certificate, PEM: what servers and clients trust.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate
    }

    /// The CA's key, PEM: keep it private.
    pub fn key_pem(&self) -> &str {
        &self.key
    }

    /// A certificate and key (PEM) for the service `name`, valid for `valid_for`.
    pub fn issue(&self, name: &str, valid_for: Duration) -> Result<(String, String)> {
        let what = format!("certificate for {name}");
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(|err| failed(&what, err))?;
        let id = spiffe_id(&self.trust_domain, name);
        params
            .subject_alt_names
            .push(SanType::URI(id.as_str().try_into().map_err(|err| failed(&what, err))?));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, valid_for);
        let key = KeyPair::generate().map_err(|err| failed(&what, err))?;
        let certificate = params.signed_by(&key, &self.issuer).map_err(|err| failed(&what, err))?;
        Ok((certificate.pem(), key.serialize_pem()))
    }
}
