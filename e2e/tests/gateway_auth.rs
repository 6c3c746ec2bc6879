//! `micro gateway` with authentication, as a real process over real HTTP in front of a real
//! service (the fault-server, over mDNS): bearer JWTs signed here (HS256 with a shared
//! secret, RS256 with a key `openssl` makes, ES256 with a key ring makes), API keys, the
//! policy on subjects, the subject reaching the service as `x-micro-subject` (a client's
//! own header of that name dropped), and the refusal to listen beyond loopback without
//! authentication.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use e2e::{
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    process::Process,
    unique_name,
};
use reqwest::StatusCode;
use ring::{
    hmac,
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents},
};
use serde_json::{Value, json};

const ISSUER: &str = "https://id.shippy.test";
const AUDIENCE: &str = "shippy-gateway";
const SECRET: &str = "a-shared-secret-of-at-least-32-bytes-for-hs256";
const API_KEY: &str = "ci-key-0b6f3c1e9a";
/// The response metadata in which the fault-server lists the subjects its call carried.
const SUBJECTS: &str = "fault-subjects";

/// A running gateway and its base URL.
struct Gateway {
    process: Process,
    url: String,
}

/// Starts `micro gateway` with `args` and waits for its address line; the URL is on
/// 127.0.0.1 whatever address it listens on.
async fn start_gateway(args: &[&str]) -> Gateway {
    let mut all = vec!["gateway"];
    all.extend(args);
    let process = Process::start("micro", &all, &[("MICRO_LOOKUP_TIMEOUT", "1500")]);
    let url = poll_until("the gateway's address line", STARTUP, async || {
        let log = process.log();
        let line = log.lines().find(|l| l.starts_with("micro gateway on "))?;
        let url = line.trim_start_matches("micro gateway on ").split(' ').next()?.trim_end_matches('/');
        Some(url.replace("0.0.0.0", "127.0.0.1"))
    })
    .await;
    Gateway { process, url }
}

/// An HTTP answer: status, headers and body.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap_or(""))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|err| panic!("{err}: {}", self.text))
    }

    /// Asserts a 401 whose challenge says `error` (none: no error attribute) and `says`.
    fn assert_unauthorized(&self, error: Option<&str>, says: &str) {
        assert_eq!(self.status, StatusCode::UNAUTHORIZED, "{}", self.text);
        assert_eq!(self.json()["code"], "UNAUTHENTICATED", "{}", self.text);
        let challenge = self.header("www-authenticate");
        assert!(challenge.starts_with("Bearer realm=\"micro-gateway\""), "{challenge:?}");
        match error {
            Some(error) => {
                assert!(challenge.contains(&format!("error=\"{error}\"")), "{challenge:?}");
                assert!(challenge.contains(says), "{challenge:?} should say {says:?}");
            }
            None => assert_eq!(challenge, "Bearer realm=\"micro-gateway\"", "no error without credentials"),
        }
        assert!(self.text.contains(says), "{} should say {says:?}", self.text);
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the gateway answers");
    let (status, headers) = (response.status(), response.headers().clone());
    Answer { status, headers, text: response.text().await.expect("a body") }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

/// Claims for `sub`, valid for an hour, from the issuer for the audience.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 3600})
}

/// A compact JWS of `header` and `claims`, signed by `sign`.
fn jwt(header: Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let signature = sign(signed.as_bytes());
    format!("{signed}.{}", b64(&signature))
}

fn hs256(secret: &str, claims: &Value) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    jwt(json!({"alg": "HS256", "typ": "JWT"}), claims, |m| hmac::sign(&key, m).as_ref().to_vec())
}

/// An RSA key pair made by `openssl` (ring verifies RSA but makes no keys).
fn rsa_key(dir: &Path) -> RsaKeyPair {
    let file = dir.join("rsa.der");
    let made = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-outform", "DER", "-out"])
        .arg(&file)
        .output()
        .expect("openssl runs (scripts/install-test-deps installs it)");
    assert!(made.status.success(), "openssl genpkey: {}", String::from_utf8_lossy(&made.stderr));
    // OpenSSL 3 writes an RSA key in DER as RSAPrivateKey (PKCS#1).
    RsaKeyPair::from_der(&std::fs::read(&file).expect("the key")).expect("a PKCS#1 RSA key")
}

fn p256_key() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("a key");
    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("a key")
}

/// The JWKS document of both public keys.
fn jwks(rsa: &RsaKeyPair, ec: &EcdsaKeyPair) -> String {
    let components = RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
    let point = ec.public_key().as_ref();
    json!({"keys": [
        {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256", "n": b64(&components.n), "e": b64(&components.e)},
        {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])},
    ]})
    .to_string()
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn jwts_and_api_keys_are_checked_and_the_subject_reaches_the_service() {
    let registry = mdns();
    let name = unique_name("guarded");
    let _server = Process::start("fault-server", &[], &[("FAULT_NAME", &name)]);
    wait_for(&registry, &name, 1).await;

    let dir = tempfile::tempdir().expect("a folder");
    let write = |file: &str, text: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let (rsa, ec) = (rsa_key(dir.path()), p256_key());
    let secret_file = write("jwt.secret", &format!("{SECRET}\n"));
    let jwks_file = write("jwks.json", &jwks(&rsa, &ec));
    let keys_file = write("api-keys", &format!("# the CI's key\nci sha256:{}\n", sha256_hex(API_KEY)));
    let policy = write(
        "policy.yaml",
        "rules:\n  - callers: [\"jwt:alice\", \"jwt:erin\", \"apikey:ci\"]\n    methods: [\"vessel.VesselService/FindAvailable\"]\n    effect: allow\n",
    );
    // Beyond loopback, since authentication is configured.
    let gateway = start_gateway(&[
        "--address",
        "0.0.0.0:0",
        "--jwt-secret-file",
        &secret_file,
        "--jwks-file",
        &jwks_file,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--api-keys-file",
        &keys_file,
        "--authz-policy",
        &policy,
        "--route-rate-limits",
        &format!("{name}/vessel.VesselService/Confirm=0.01"),
    ])
    .await;
    let http = reqwest::Client::new();
    let find = format!("{}/{name}/vessel.VesselService/FindAvailable", gateway.url);
    let call = |credentials: Option<(&str, String)>| {
        let request = http.post(&find).body("{}");
        match credentials {
            Some((header, value)) => request.header(header, value),
            None => request,
        }
    };
    let bearer = |token: String| Some(("authorization", format!("Bearer {token}")));
    poll_until(format!("the gateway listing {name}"), STARTUP, async || {
        let listed = send(http.get(format!("{}/", gateway.url)).header("x-api-key", API_KEY)).await;
        listed.text.contains(&name).then_some(())
    })
    .await;

    // Allowed: HS256, RS256 and ES256 tokens and the API key, each subject reaching the
    // service, a spoofed x-micro-subject dropped.
    let allowed = [
        ("jwt:alice", bearer(hs256(SECRET, &claims("alice")))),
        (
            "jwt:erin",
            bearer(jwt(json!({"alg": "RS256", "kid": "rsa-1"}), &claims("erin"), |m| {
                let mut signature = vec![0; rsa.public().modulus_len()];
                rsa.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), m, &mut signature)
                    .expect("signed");
                signature
            })),
        ),
        (
            "jwt:alice",
            bearer(jwt(json!({"alg": "ES256", "kid": "ec-1"}), &claims("alice"), |m| {
                ec.sign(&SystemRandom::new(), m).expect("signed").as_ref().to_vec()
            })),
        ),
        ("apikey:ci", Some(("x-api-key", API_KEY.to_owned()))),
    ];
    for (subject, credentials) in allowed {
        let answer = send(call(credentials).header("x-micro-subject", "jwt:root")).await;
        assert_eq!(answer.status, StatusCode::OK, "{subject}: {}", answer.text);
        assert_eq!(answer.json()["vessel"]["id"], "fault", "{}", answer.text);
        assert_eq!(answer.header(SUBJECTS), subject, "only the authenticated subject reaches the service");
    }

    // Refused credentials: 401 with a challenge that echoes nothing presented.
    send(call(None)).await.assert_unauthorized(None, "no credentials");
    let spoofed_only = send(call(None).header("x-micro-subject", "jwt:alice")).await;
    spoofed_only.assert_unauthorized(None, "no credentials");
    let forged = hs256("another-secret-that-is-also-32-bytes-long!", &claims("alice"));
    send(call(bearer(forged))).await.assert_unauthorized(Some("invalid_token"), "signature");
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    send(call(bearer(hs256(SECRET, &expired)))).await.assert_unauthorized(Some("invalid_token"), "expired");
    let mut elsewhere = claims("alice");
    elsewhere["iss"] = json!("https://id.elsewhere.test");
    send(call(bearer(hs256(SECRET, &elsewhere)))).await.assert_unauthorized(Some("invalid_token"), "issuer");
    let mut other_audience = claims("alice");
    other_audience["aud"] = json!("another-api");
    send(call(bearer(hs256(SECRET, &other_audience))))
        .await
        .assert_unauthorized(Some("invalid_token"), "audience");
    let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(claims("alice").to_string().as_bytes()));
    send(call(bearer(none.clone()))).await.assert_unauthorized(Some("invalid_token"), "algorithm");
    for malformed in ["not-a-jwt".to_owned(), "a.b.c".to_owned(), "é".repeat(10)] {
        let answer = send(call(Some(("authorization", format!("Bearer {malformed}"))))).await;
        answer.assert_unauthorized(Some("invalid_request"), "malformed");
    }
    send(call(Some(("authorization", "Basic YWxpY2U6cHc=".into()))))
        .await
        .assert_unauthorized(Some("invalid_request"), "malformed");
    let large = format!("{}.{}.{}", b64(br#"{"alg":"HS256"}"#), "A".repeat(64 * 1024), "A".repeat(43));
    let too_large = send(call(bearer(large.clone()))).await;
    too_large.assert_unauthorized(Some("invalid_request"), "too large");
    assert!(too_large.text.len() < 1024 && !too_large.text.contains(&large[..100]), "nothing echoed");
    // A megabyte of header is past what the HTTP server reads at all (about 400 KB): it
    // answers 431 itself, and the gateway serves on.
    let megabyte = format!("{}.{}.x", b64(br#"{"alg":"HS256"}"#), "A".repeat(1024 * 1024));
    let huge = send(call(bearer(megabyte))).await;
    assert_eq!(huge.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{}", huge.text);
    send(call(Some(("x-api-key", "guessed-key".into()))))
        .await
        .assert_unauthorized(Some("invalid_token"), "unknown API key");
    let both = call(Some(("x-api-key", API_KEY.into())))
        .header("authorization", format!("Bearer {}", hs256(SECRET, &claims("alice"))));
    send(both).await.assert_unauthorized(Some("invalid_request"), "malformed");

    // The rate limit comes before authentication: refused credentials use up calls too
    // (one call per 100 s on this route).
    let confirm = format!("{}/{name}/vessel.VesselService/Confirm", gateway.url);
    send(http.post(&confirm).body("{}")).await.assert_unauthorized(None, "no credentials");
    let limited = send(http.post(&confirm).body("{}")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.text);

    // Valid but not allowed by the policy: 403 naming the subject and the method.
    let bob = send(call(bearer(hs256(SECRET, &claims("bob"))))).await;
    assert_eq!(bob.status, StatusCode::FORBIDDEN, "{}", bob.text);
    assert_eq!(bob.json()["code"], "PERMISSION_DENIED");
    let message = bob.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains("jwt:bob") && message.contains("vessel.VesselService/FindAvailable"),
        "{message}"
    );
    let reserve = format!("{}/{name}/vessel.VesselService/Reserve", gateway.url);
    let key = ("x-api-key", API_KEY);
    let not_listed = send(http.post(&reserve).body("{}").header(key.0, key.1)).await;
    assert_eq!(not_listed.status, StatusCode::FORBIDDEN, "{}", not_listed.text);

    // `micro authz check` explains the gateway's decisions on subjects.
    let check = |subject: &str| {
        let args =
            ["authz", "check", "--policy", &policy, subject, "gateway", "vessel.VesselService/FindAvailable"];
        std::process::Command::new(e2e::process::binary("micro")).args(args).output().expect("micro runs")
    };
    let ci = check("apikey:ci");
    assert!(String::from_utf8_lossy(&ci.stdout).contains("allowed by rule 1"), "{ci:?}");
    let bob = check("jwt:bob");
    assert!(
        !bob.status.success() && String::from_utf8_lossy(&bob.stderr).contains("jwt:bob may not call"),
        "{bob:?}"
    );

    // Listing and describing need credentials; health and metrics do not.
    let list = send(http.get(format!("{}/", gateway.url))).await;
    list.assert_unauthorized(None, "no credentials");
    send(http.get(format!("{}/{name}", gateway.url))).await.assert_unauthorized(None, "no credentials");
    send(http.get(format!("{}/ui/state", gateway.url))).await.assert_unauthorized(None, "no credentials");
    let health = send(http.get(format!("{}/healthz", gateway.url))).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);
    let metrics = send(http.get(format!("{}/metrics", gateway.url))).await;
    assert_eq!(metrics.status, StatusCode::OK);
    for reason in [
        "missing",
        "signature",
        "expired",
        "issuer",
        "audience",
        "algorithm",
        "malformed",
        "too_large",
        "unknown_api_key",
        "denied",
    ] {
        let line = format!("micro_gateway_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(metrics.text.contains(&line), "{line} in:\n{}", metrics.text);
    }
    assert!(!metrics.text.contains(SECRET) && !metrics.text.contains(API_KEY));
    let log = gateway.process.log();
    assert!(!log.contains(SECRET) && !log.contains(API_KEY) && !log.contains(&none), "no secret is logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_loopback_without_authentication_needs_insecure() {
    e2e::require_private_netns();
    let mut refused = Process::start("micro", &["gateway", "--address", "0.0.0.0:0"], &[]);
    let status = refused.wait(STARTUP).await;
    assert!(!status.success(), "refused: {status:?}");
    let log = refused.log();
    for named in [
        "0.0.0.0:0",
        "MICRO_GATEWAY_ADDRESS",
        "--jwt-secret-file",
        "--api-keys-file",
        "--insecure",
        "MICRO_GATEWAY_INSECURE",
    ] {
        assert!(log.contains(named), "the refusal names {named}: {log}");
    }
    assert!(!log.contains("micro gateway on"), "{log}");

    let insecure = start_gateway(&["--address", "0.0.0.0:0", "--insecure"]).await;
    let health = send(reqwest::Client::new().get(format!("{}/healthz", insecure.url))).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);
    let listed = send(reqwest::Client::new().get(format!("{}/", insecure.url))).await;
    assert_eq!(listed.status, StatusCode::OK, "no credentials needed with --insecure: {}", listed.text);

    let by_env = Process::start(
        "micro",
        &["gateway", "--address", "0.0.0.0:0"],
        &[("MICRO_GATEWAY_INSECURE", "true")],
    );
    poll_until("the gateway started with MICRO_GATEWAY_INSECURE=true", STARTUP, async || {
        by_env.log().contains("micro gateway on ").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_key_file_stops_the_gateway_naming_it() {
    let dir = tempfile::tempdir().expect("a folder");
    let short = dir.path().join("short.secret");
    std::fs::write(&short, "too-short").expect("write");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "ci plain-text-key\n").expect("write");
    for (args, says) in [
        (vec!["--jwt-secret-file", short.to_str().unwrap()], vec!["MICRO_GATEWAY_JWT_SECRET", "at least 32"]),
        (
            vec!["--api-keys-file", keys.to_str().unwrap()],
            vec!["MICRO_GATEWAY_API_KEYS_FILE", "line 1", "sha256"],
        ),
        (vec!["--jwks-file", "/no/such/jwks.json"], vec!["MICRO_GATEWAY_JWKS_FILE", "/no/such/jwks.json"]),
    ] {
        let mut all = vec!["gateway", "--address", "127.0.0.1:0"];
        all.extend(args);
        let mut process = Process::start("micro", &all, &[]);
        let status = process.wait(STARTUP).await;
        assert!(!status.success(), "{all:?}: {status:?}");
        let log = process.log();
        for part in says {
            assert!(log.contains(part), "{all:?} should say {part:?}: {log}");
        }
        assert!(!log.contains("plain-text-key"), "the key is not echoed: {log}");
    }
}
