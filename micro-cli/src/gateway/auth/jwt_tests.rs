//! The verifier's decisions: claims and leeway, algorithms and keys, malformed input.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use serde_json::{Value, json};

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
const NOW: f64 = 1_900_000_000.0;
const LEEWAY: u64 = 30;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS of `header` and `claims`, signed by `sign` over `header.payload`.
fn token(header: Value, claims: Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let signature = sign(signed.as_bytes());
    format!("{signed}.{}", b64(&signature))
}

fn hmac_with(key: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    move |message| hmac::sign(&key, message).as_ref().to_vec()
}

fn hs256(claims: Value) -> String {
    token(json!({"alg": "HS256", "typ": "JWT"}), claims, hmac_with(SECRET))
}

fn claims() -> Value {
    json!({"sub": "alice", "exp": NOW + 300.0, "iss": "https://id.test", "aud": "shippy"})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn verifier(secret: Option<&[u8]>, keys: Vec<jwks::PublicKey>) -> JwtVerifier {
    JwtVerifier::new(secret, keys, Some("https://id.test".into()), Some("shippy".into()), LEEWAY).unwrap()
}

/// A P-256 key pair and its JWKS document with `kid`.
fn p256(kid: &str) -> (EcdsaKeyPair, String) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                                "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
    (pair, jwks.to_string())
}

fn es256_with(pair: &EcdsaKeyPair) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |message| pair.sign(&SystemRandom::new(), message).unwrap().as_ref().to_vec()
}

#[test]
fn a_valid_hs256_token_names_its_subject() {
    assert_eq!(verifier(Some(SECRET), vec![]).verify(&hs256(claims()), NOW).unwrap(), "jwt:alice");
    let audiences = with(claims(), "aud", json!(["other", "shippy"]));
    assert_eq!(verifier(Some(SECRET), vec![]).verify(&hs256(audiences), NOW).unwrap(), "jwt:alice");
}

#[test]
fn exp_and_nbf_hold_within_the_leeway_only() {
    let verify = |claims: Value| verifier(Some(SECRET), vec![]).verify(&hs256(claims), NOW);
    let leeway = LEEWAY as f64;
    assert!(verify(with(claims(), "exp", json!(NOW - leeway + 1.0))).is_ok(), "expired within the skew");
    assert_eq!(verify(with(claims(), "exp", json!(NOW - leeway - 1.0))), Err(Rejection::Expired));
    assert!(verify(with(claims(), "nbf", json!(NOW + leeway - 1.0))).is_ok(), "early within the skew");
    assert_eq!(verify(with(claims(), "nbf", json!(NOW + leeway + 1.0))), Err(Rejection::NotYetValid));
    assert_eq!(verify(without(claims(), "exp")), Err(Rejection::Claims), "exp is required");
    assert_eq!(verify(with(claims(), "exp", json!("tomorrow"))), Err(Rejection::Claims));
}

#[test]
fn issuer_audience_and_subject_are_checked() {
    let verify = |claims: Value| verifier(Some(SECRET), vec![]).verify(&hs256(claims), NOW);
    assert_eq!(verify(with(claims(), "iss", json!("https://evil.test"))), Err(Rejection::Issuer));
    assert_eq!(verify(without(claims(), "iss")), Err(Rejection::Issuer));
    assert_eq!(verify(with(claims(), "aud", json!("other"))), Err(Rejection::Audience));
    assert_eq!(verify(with(claims(), "aud", json!(["a", "b"]))), Err(Rejection::Audience));
    assert_eq!(verify(without(claims(), "aud")), Err(Rejection::Audience));
    assert_eq!(verify(without(claims(), "sub")), Err(Rejection::Claims));
    for sub in ["", "ali ce", "alice\nx-micro-subject: root", "é", &"a".repeat(257)] {
        assert_eq!(verify(with(claims(), "sub", json!(sub))), Err(Rejection::Claims), "{sub:?}");
    }
    let open = JwtVerifier::new(Some(SECRET), vec![], None, None, LEEWAY).unwrap();
    assert!(
        open.verify(&hs256(without(without(claims(), "iss"), "aud")), NOW).is_ok(),
        "unchecked when unset"
    );
}

#[test]
fn a_bad_signature_or_another_secret_is_refused() {
    let mut tampered = hs256(claims());
    tampered.pop();
    tampered.push(if tampered.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(verifier(Some(SECRET), vec![]).verify(&tampered, NOW), Err(Rejection::Signature));
    let other = token(json!({"alg": "HS256"}), claims(), hmac_with(b"another secret of thirty-two bytes!!"));
    assert_eq!(verifier(Some(SECRET), vec![]).verify(&other, NOW), Err(Rejection::Signature));
    let forged_claims = {
        let good = hs256(claims());
        let parts: Vec<&str> = good.split('.').collect();
        let admin = b64(with(claims(), "sub", json!("admin")).to_string().as_bytes());
        format!("{}.{admin}.{}", parts[0], parts[2])
    };
    assert_eq!(verifier(Some(SECRET), vec![]).verify(&forged_claims, NOW), Err(Rejection::Signature));
}

#[test]
fn a_short_secret_is_refused_at_start() {
    let err = JwtVerifier::new(Some(b"short"), vec![], None, None, LEEWAY).unwrap_err();
    assert!(err.contains("at least 32"), "{err}");
}

#[test]
fn es256_tokens_verify_against_the_jwks_key_with_their_kid() {
    let (pair, document) = p256("k1");
    let keys = jwks::parse(&document).unwrap();
    let verifier = verifier(None, keys);
    let good = token(json!({"alg": "ES256", "kid": "k1"}), claims(), es256_with(&pair));
    assert_eq!(verifier.verify(&good, NOW).unwrap(), "jwt:alice");
    let no_kid = token(json!({"alg": "ES256"}), claims(), es256_with(&pair));
    assert_eq!(verifier.verify(&no_kid, NOW).unwrap(), "jwt:alice", "without kid, every key of the type");
    let other_kid = token(json!({"alg": "ES256", "kid": "k2"}), claims(), es256_with(&pair));
    assert_eq!(verifier.verify(&other_kid, NOW), Err(Rejection::UnknownKey));
    let mut kidless: Value = serde_json::from_str(&document).unwrap();
    kidless["keys"][0].as_object_mut().unwrap().remove("kid");
    let any_kid =
        JwtVerifier::new(None, jwks::parse(&kidless.to_string()).unwrap(), None, None, LEEWAY).unwrap();
    assert_eq!(any_kid.verify(&other_kid, NOW).unwrap(), "jwt:alice", "a key without kid serves any");
    let (stranger, _) = p256("k1");
    let forged = token(json!({"alg": "ES256", "kid": "k1"}), claims(), es256_with(&stranger));
    assert_eq!(verifier.verify(&forged, NOW), Err(Rejection::Signature));
    let rs256 = token(json!({"alg": "RS256", "kid": "k1"}), claims(), es256_with(&pair));
    assert_eq!(verifier.verify(&rs256, NOW), Err(Rejection::Algorithm), "no RSA key is configured");
}

#[test]
fn alg_none_and_hs256_keyed_with_a_public_key_are_refused() {
    let (pair, document) = p256("k1");
    let point = pair.public_key().as_ref().to_vec();
    // An RSA key too, whose public modulus an attacker knows.
    let modulus: Vec<u8> = std::iter::once(0xC5).chain((1..256).map(|i| (i * 7) as u8)).collect();
    let rsa = json!({"kty": "RSA", "kid": "r1", "n": b64(&modulus), "e": "AQAB"});
    let mut set: Value = serde_json::from_str(&document).unwrap();
    set["keys"].as_array_mut().unwrap().push(rsa);
    let keys = jwks::parse(&set.to_string()).unwrap();
    assert_eq!(keys.len(), 2);
    let public_only = verifier(None, keys.clone());
    let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(claims().to_string().as_bytes()));
    assert_eq!(public_only.verify(&none, NOW), Err(Rejection::Algorithm));
    let none_signed = token(json!({"alg": "none", "kid": "k1"}), claims(), es256_with(&pair));
    assert_eq!(public_only.verify(&none_signed, NOW), Err(Rejection::Algorithm));
    for (kid, public) in [("k1", point.as_slice()), ("r1", modulus.as_slice()), ("k1", document.as_bytes())] {
        let confused = token(json!({"alg": "HS256", "kid": kid}), claims(), hmac_with(public));
        assert_eq!(public_only.verify(&confused, NOW), Err(Rejection::Algorithm), "HS256 keyed with {kid}");
    }
    // With a secret as well, such a token still has to match the secret.
    let both = verifier(Some(SECRET), keys);
    let confused = token(json!({"alg": "HS256", "kid": "r1"}), claims(), hmac_with(&modulus));
    assert_eq!(both.verify(&confused, NOW), Err(Rejection::Signature));
    let rs256 = token(json!({"alg": "RS256", "kid": "r1"}), claims(), hmac_with(&modulus));
    assert_eq!(both.verify(&rs256, NOW), Err(Rejection::Signature));
    for alg in ["HS512", "PS256", "ES384", "hs256", ""] {
        let other = token(json!({"alg": alg}), claims(), hmac_with(SECRET));
        assert_eq!(both.verify(&other, NOW), Err(Rejection::Algorithm), "{alg:?}");
    }
}

#[test]
fn malformed_and_huge_tokens_are_refused_before_any_work() {
    let verifier = verifier(Some(SECRET), vec![]);
    let claims_part = b64(claims().to_string().as_bytes());
    let header = b64(br#"{"alg":"HS256"}"#);
    for bad in [
        String::new(),
        "abc".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        format!("{header}.{claims_part}.!!"),
        format!("{}.{claims_part}.", b64(b"not json")),
        format!("{}.{claims_part}.", b64(br#"{"alg":"HS256","crit":["exp"]}"#)),
        format!("{header}=.{claims_part}."),
    ] {
        assert_eq!(verifier.verify(&bad, NOW), Err(Rejection::Malformed), "{bad:?}");
    }
    let not_json = token(json!({"alg": "HS256"}), json!("just a string"), hmac_with(SECRET));
    assert_eq!(verifier.verify(&not_json, NOW), Err(Rejection::Claims));
    let huge = format!("{header}.{}.x", "A".repeat(1024 * 1024));
    assert_eq!(verifier.verify(&huge, NOW), Err(Rejection::TooLarge));
}

#[test]
fn jwks_files_with_weak_or_broken_keys_are_refused() {
    let short = json!({"keys": [{"kty": "RSA", "n": b64(&[0xC5; 128]), "e": "AQAB"}]});
    assert!(jwks::parse(&short.to_string()).unwrap_err().contains("1024 bits"));
    let broken = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": "!!", "y": "AA"}]});
    assert!(jwks::parse(&broken.to_string()).unwrap_err().contains("key \"k\""));
    let only_others =
        json!({"keys": [{"kty": "oct", "k": "AA"}, {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]});
    assert!(jwks::parse(&only_others.to_string()).unwrap_err().contains("no RS256"));
    assert!(jwks::parse("[]").unwrap_err().contains("JWKS"));
}

#[test]
fn challenges_name_the_error_and_echo_nothing() {
    assert_eq!(Rejection::Missing.challenge(), "Bearer realm=\"micro-gateway\"");
    let expired = Rejection::Expired.challenge();
    assert!(expired.to_str().unwrap().contains("error=\"invalid_token\""), "{expired:?}");
    assert!(Rejection::Malformed.challenge().to_str().unwrap().contains("error=\"invalid_request\""));
    let labels: std::collections::HashSet<_> = Rejection::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), Rejection::ALL.len(), "one label each");
}
