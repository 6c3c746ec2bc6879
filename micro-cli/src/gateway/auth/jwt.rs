//! Bearer JWTs (RFC 7519, JWS compact form): HS256 with a shared secret, RS256 and ES256
//! with the keys of a JWKS file. The algorithm comes from the key, never from the token
//! alone: an HS256 token is checked only against the secret, an RS256 or ES256 one only
//! against JWKS keys of that type, and `none` or any other `alg` is refused. Only after the
//! signature verifies are the claims read: `exp` (required) and `nbf` with a leeway, `iss`
//! and `aud` when configured, and `sub` (required), which becomes the subject `jwt:<sub>`.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::hmac;
use serde::Deserialize;

use super::{MAX_CREDENTIAL_BYTES, Rejection, jwks};

/// The shortest HS256 secret taken, in bytes: the size of the hash (RFC 7518, 3.2).
pub const MIN_SECRET_BYTES: usize = 32;
/// The longest `sub` taken, in bytes.
const MAX_SUBJECT_BYTES: usize = 256;

/// Checks bearer JWTs; see the module docs.
pub struct JwtVerifier {
    secret: Option<hmac::Key>,
    keys: Vec<jwks::PublicKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.secret.is_some())
            .field("public_keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    /// Extensions the token says must be understood; the gateway understands none.
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, wanted: &str) -> bool {
        match self {
            Audience::One(aud) => aud == wanted,
            Audience::Many(auds) => auds.iter().any(|aud| aud == wanted),
        }
    }
}

impl JwtVerifier {
    /// A verifier with an HS256 `secret` (at least [`MIN_SECRET_BYTES`]) and/or the JWKS
    /// `keys`, requiring `issuer` and `audience` when given, with `leeway_secs` of clock skew.
    pub fn new(
        secret: Option<&[u8]>,
        keys: Vec<jwks::PublicKey>,
        issuer: Option<String>,
        audience: Option<String>,
        leeway_secs: u64,
    ) -> Result<JwtVerifier, String> {
        if let Some(secret) = secret
            && secret.len() < MIN_SECRET_BYTES
        {
            return Err(format!(
                "the HS256 secret has {} bytes; at least {MIN_SECRET_BYTES} are needed (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        Ok(JwtVerifier {
            secret: secret.map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret)),
            keys,
            issuer,
            audience,
            leeway_secs,
        })
    }

    /// The subject (`jwt:<sub>`) of `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: f64) -> Result<String, Rejection> {
        if token.len() > MAX_CREDENTIAL_BYTES {
            return Err(Rejection::TooLarge);
        }
        let (signed, signature) = token.rsplit_once('.').ok_or(Rejection::Malformed)?;
        let (header, payload) = signed.split_once('.').ok_or(Rejection::Malformed)?;
        if payload.contains('.') {
            return Err(Rejection::Malformed);
        }
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| Rejection::Malformed);
        let header: Header = serde_json::from_slice(&decode(header)?).map_err(|_| Rejection::Malformed)?;
        if header.crit.is_some() {
            return Err(Rejection::Malformed);
        }
        let signature = decode(signature)?;
        self.check_signature(&header, signed.as_bytes(), &signature)?;
        let claims: Claims = serde_json::from_slice(&decode(payload)?).map_err(|_| Rejection::Claims)?;
        self.check_claims(claims, now)
    }

    fn check_signature(&self, header: &Header, signed: &[u8], signature: &[u8]) -> Result<(), Rejection> {
        let algorithm = match header.alg.as_str() {
            "HS256" => {
                let secret = self.secret.as_ref().ok_or(Rejection::Algorithm)?;
                return hmac::verify(secret, signed, signature).map_err(|_| Rejection::Signature);
            }
            "RS256" => jwks::Algorithm::Rs256,
            "ES256" => jwks::Algorithm::Es256,
            _ => return Err(Rejection::Algorithm),
        };
        let mut candidates = self
            .keys
            .iter()
            .filter(|key| key.algorithm() == algorithm)
            // A key without a kid in the file serves any token of its type.
            .filter(|key| header.kid.is_none() || key.kid.is_none() || key.kid == header.kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(if self.keys.iter().any(|key| key.algorithm() == algorithm) {
                Rejection::UnknownKey
            } else {
                Rejection::Algorithm
            });
        }
        match candidates.any(|key| key.verifies(signed, signature)) {
            true => Ok(()),
            false => Err(Rejection::Signature),
        }
    }

    fn check_claims(&self, claims: Claims, now: f64) -> Result<String, Rejection> {
        let leeway = self.leeway_secs as f64;
        let exp = claims.exp.filter(|exp| exp.is_finite()).ok_or(Rejection::Claims)?;
        if now > exp + leeway {
            return Err(Rejection::Expired);
        }
        if let Some(nbf) = claims.nbf {
            if !nbf.is_finite() {
                return Err(Rejection::Claims);
            }
            if now + leeway < nbf {
                return Err(Rejection::NotYetValid);
            }
        }
        if let Some(issuer) = &self.issuer
            && claims.iss.as_ref() != Some(issuer)
        {
            return Err(Rejection::Issuer);
        }
        if let Some(audience) = &self.audience
            && !claims.aud.as_ref().is_some_and(|aud| aud.names(audience))
        {
            return Err(Rejection::Audience);
        }
        let sub = claims.sub.ok_or(Rejection::Claims)?;
        // It becomes a metadata value and a log field: printable ASCII only, bounded.
        let printable = sub.bytes().all(|b| b.is_ascii_graphic());
        if sub.is_empty() || sub.len() > MAX_SUBJECT_BYTES || !printable {
            return Err(Rejection::Claims);
        }
        Ok(format!("{}{sub}", micro_core::auth::subject::JWT_PREFIX))
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
