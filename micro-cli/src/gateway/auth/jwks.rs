//! Public keys for RS256 and ES256 tokens, read from a JWKS file (RFC 7517): `{"keys":
//! [...]}` with RSA keys (`kty: RSA`, `n`, `e`, at least 2048 bits) and P-256 keys (`kty:
//! EC`, `crv: P-256`, `x`, `y`). Keys for other algorithms or for encryption are skipped
//! with a warning; a file with no usable key is an error.

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// The smallest RSA modulus taken, in bytes (2048 bits).
const MIN_RSA_BYTES: usize = 256;
/// The size of a P-256 coordinate, in bytes.
const P256_COORDINATE_BYTES: usize = 32;

/// The signature algorithms of public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA on P-256 with SHA-256, the signature as `r || s`.
    Es256,
}

impl Algorithm {
    /// The JOSE name (`alg`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
        }
    }
}

/// One verifying key.
#[derive(Debug, Clone)]
pub struct PublicKey {
    /// The key id tokens name in their `kid`, if the file gives one.
    pub kid: Option<String>,
    key: Key,
}

#[derive(Debug, Clone)]
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point: `0x04 || x || y`.
    P256(Vec<u8>),
}

impl PublicKey {
    /// The algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        match self.key {
            Key::Rsa { .. } => Algorithm::Rs256,
            Key::P256(_) => Algorithm::Es256,
        }
    }

    /// Whether `signature` signs `message` with this key.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            Key::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Key::P256(point) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok(),
        }
    }
}

#[derive(Deserialize)]
struct KeySet {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Reads the JWKS file at `path`; errors name the file and the key.
pub fn read(path: &Path) -> Result<Vec<PublicKey>, String> {
    let what = format!("--jwks-file {} (MICRO_GATEWAY_JWKS_FILE)", path.display());
    let text = std::fs::read_to_string(path).map_err(|err| format!("{what}: cannot read it: {err}"))?;
    parse(&text).map_err(|err| format!("{what}: {err}"))
}

/// Parses a JWKS document; see the module docs.
pub fn parse(text: &str) -> Result<Vec<PublicKey>, String> {
    let set: KeySet = serde_json::from_str(text)
        .map_err(|err| format!("not a JWKS document ({{\"keys\": [...]}}): {err}"))?;
    let mut keys = Vec::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let name =
            jwk.kid.as_deref().map_or_else(|| format!("key {}", index + 1), |kid| format!("key {kid:?}"));
        match key_of(jwk) {
            Ok(Some(key)) => keys.push(PublicKey { kid: jwk.kid.clone(), key }),
            Ok(None) => {
                tracing::warn!(key = %name, kty = %jwk.kty, alg = ?jwk.alg, "JWKS key skipped: the gateway verifies RS256 and ES256 signatures only")
            }
            Err(err) => return Err(format!("{name}: {err}")),
        }
    }
    if keys.is_empty() {
        return Err("no RS256 (kty RSA) or ES256 (kty EC, crv P-256) signing key in it".into());
    }
    Ok(keys)
}

/// The key of `jwk`, `None` when it is for another use or algorithm.
fn key_of(jwk: &Jwk) -> Result<Option<Key>, String> {
    if jwk.usage.as_deref().is_some_and(|usage| usage != "sig") {
        return Ok(None);
    }
    let wanted = |alg: Algorithm| jwk.alg.as_deref().is_none_or(|given| given == alg.name());
    match jwk.kty.as_str() {
        "RSA" if wanted(Algorithm::Rs256) => {
            let n = strip_zeros(decode("n", jwk.n.as_deref())?);
            let e = strip_zeros(decode("e", jwk.e.as_deref())?);
            if n.len() < MIN_RSA_BYTES {
                return Err(format!("an RSA modulus of {} bits; at least 2048 are needed", n.len() * 8));
            }
            Ok(Some(Key::Rsa { n, e }))
        }
        "EC" if wanted(Algorithm::Es256) && jwk.crv.as_deref() == Some("P-256") => {
            let (x, y) = (decode("x", jwk.x.as_deref())?, decode("y", jwk.y.as_deref())?);
            if x.len() != P256_COORDINATE_BYTES || y.len() != P256_COORDINATE_BYTES {
                return Err("a P-256 key needs x and y of 32 bytes each".into());
            }
            Ok(Some(Key::P256([&[0x04][..], &x, &y].concat())))
        }
        _ => Ok(None),
    }
}

fn decode(field: &str, value: Option<&str>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("no {field:?}"))?;
    URL_SAFE_NO_PAD.decode(value).map_err(|err| format!("{field:?} is not base64url: {err}"))
}

fn strip_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}
