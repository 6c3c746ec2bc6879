//! Who may use the gateway: bearer JWTs (`Authorization: Bearer <JWT>`, see [`jwt`]) and API
//! keys (`X-API-Key: <key>`, see [`api_keys`]), then the authorization policy
//! (`MICRO_AUTHZ_POLICY`) with the subject as the caller.
//!
//! - With any of `--jwt-secret(-file)`, `--jwks-file` or `--api-keys-file`, every route but
//!   `/healthz` and `/metrics` needs credentials: a call, `GET /`, `GET /{service}` and the
//!   dashboard. Refused credentials are answered `401` with `WWW-Authenticate: Bearer ...`
//!   and counted in `micro_gateway_auth_failures_total{reason}` (a fixed set, see
//!   [`Rejection`]).
//! - The subject is `jwt:<sub>` or `apikey:<name>`. With `--authz-policy`, a call the policy
//!   does not allow that subject is answered `403` (counted with `reason="denied"`); without
//!   one, every authenticated subject may call every method.
//! - The subject goes to the service in the call metadata `x-micro-subject`; a header of
//!   that name from the client is dropped on every route.
//! - Without authentication the gateway listens only on loopback, unless `--insecure`.
//!
//! # Examples
//! ```sh
//! printf %s "$(openssl rand -hex 32)" > jwt.secret
//! micro gateway --address 0.0.0.0:8080 --jwt-secret-file jwt.secret --jwt-issuer https://id.example
//! ```

mod api_keys;
mod jwks;
mod jwt;
mod rejection;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{HeaderMap, header};
use micro_core::auth::{AuthzLayer, SUBJECT_HEADER};
use tonic::Code;

use super::{metrics, status::GatewayError};
use crate::exit::Failure;
pub use api_keys::ApiKeys;
pub use jwt::JwtVerifier;
pub use rejection::Rejection;

/// The clock skew allowed on `exp` and `nbf`, in seconds, unless `--jwt-leeway` says otherwise.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 60;
/// The longest credential read, in bytes; a longer one is refused before any parsing.
pub const MAX_CREDENTIAL_BYTES: usize = 8 * 1024;
/// The request header that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The realm named in `WWW-Authenticate`.
pub const REALM: &str = "micro-gateway";
/// The `reason` label of a call the policy denied.
pub const DENIED: &str = "denied";

/// The gateway's authentication flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// File holding the HS256 secret of bearer JWTs (at least 32 bytes; one trailing newline
    /// is dropped).
    #[arg(long, env = "MICRO_GATEWAY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The HS256 secret itself; prefer the variable or --jwt-secret-file, since a flag shows
    /// in the process list.
    #[arg(long, env = "MICRO_GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// JWKS file with the public keys of RS256 and ES256 bearer JWTs.
    #[arg(long, env = "MICRO_GATEWAY_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// The `iss` every JWT must carry; unchecked when unset.
    #[arg(long, env = "MICRO_GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audience every JWT's `aud` must name; unchecked when unset.
    #[arg(long, env = "MICRO_GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on a JWT's `exp` and `nbf`, in seconds.
    #[arg(long, env = "MICRO_GATEWAY_JWT_LEEWAY", default_value_t = DEFAULT_JWT_LEEWAY_SECS)]
    pub jwt_leeway: u64,
    /// File of API keys (`<name> sha256:<hex>` a line), sent as `X-API-Key`.
    #[arg(long, env = "MICRO_GATEWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Authorization policy deciding which subject (`jwt:<sub>`, `apikey:<name>`) may call
    /// which method; unset, every authenticated subject may call every method.
    #[arg(long, env = "MICRO_AUTHZ_POLICY")]
    pub authz_policy: Option<PathBuf>,
    /// Listen beyond loopback without authentication.
    #[arg(long, env = "MICRO_GATEWAY_INSECURE")]
    pub insecure: bool,
}

/// The credentials the gateway takes and the policy it applies.
pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    api_keys: Option<ApiKeys>,
    policy: Option<AuthzLayer>,
}

impl Authenticator {
    /// Reads the secrets, keys and policy `args` name; errors name the flag, variable and file.
    pub fn new(args: &AuthArgs) -> Result<Authenticator, Failure> {
        let secret = match (&args.jwt_secret_file, &args.jwt_secret) {
            (Some(path), _) => Some(read_secret(path)?),
            (None, Some(secret)) => Some(secret.clone().into_bytes()),
            (None, None) => None,
        };
        let keys = match &args.jwks_file {
            Some(path) => jwks::read(path).map_err(Failure::Other)?,
            None => Vec::new(),
        };
        let jwt = if secret.is_some() || !keys.is_empty() {
            let verifier = JwtVerifier::new(
                secret.as_deref(),
                keys,
                args.jwt_issuer.clone(),
                args.jwt_audience.clone(),
                args.jwt_leeway,
            )
            .map_err(|err| Failure::Other(format!("--jwt-secret-file or MICRO_GATEWAY_JWT_SECRET: {err}")))?;
            if args.jwt_issuer.is_none() || args.jwt_audience.is_none() {
                tracing::warn!(
                    "bearer JWTs are taken from any issuer or for any audience: set --jwt-issuer (MICRO_GATEWAY_JWT_ISSUER) and --jwt-audience (MICRO_GATEWAY_JWT_AUDIENCE)"
                );
            }
            Some(verifier)
        } else {
            if args.jwt_issuer.is_some() || args.jwt_audience.is_some() {
                return Err(Failure::Other(
                    "--jwt-issuer or --jwt-audience without a key: set --jwt-secret-file \
                     (MICRO_GATEWAY_JWT_SECRET_FILE) or --jwks-file (MICRO_GATEWAY_JWKS_FILE)"
                        .into(),
                ));
            }
            None
        };
        let api_keys =
            args.api_keys_file.as_deref().map(ApiKeys::read).transpose().map_err(Failure::Other)?;
        let policy = args
            .authz_policy
            .as_deref()
            .map(|path| AuthzLayer::watch("gateway", path, &[]))
            .transpose()
            .map_err(Failure::from)?;
        tracing::info!(
            jwt = ?jwt,
            api_keys = api_keys.as_ref().map_or(0, ApiKeys::len),
            policy = args.authz_policy.is_some(),
            "gateway authentication"
        );
        Ok(Authenticator { jwt, api_keys, policy })
    }

    /// Whether any credential is required.
    pub fn authenticates(&self) -> bool {
        self.jwt.is_some() || self.api_keys.is_some()
    }

    /// Refuses to serve `address` beyond loopback without authentication unless `insecure`.
    pub fn check_address(&self, address: SocketAddr, insecure: bool) -> Result<(), Failure> {
        if self.authenticates() || insecure || address.ip().is_loopback() {
            return Ok(());
        }
        Err(Failure::Other(format!(
            "gateway address {address} (--address, MICRO_GATEWAY_ADDRESS) is beyond loopback and no authentication \
             is configured: set --jwt-secret-file (MICRO_GATEWAY_JWT_SECRET_FILE), --jwks-file \
             (MICRO_GATEWAY_JWKS_FILE) or --api-keys-file (MICRO_GATEWAY_API_KEYS_FILE), or pass --insecure \
             (MICRO_GATEWAY_INSECURE=true) to serve anyone who can reach it"
        )))
    }

    /// The subject the credentials in `headers` prove, at `now` (seconds since the epoch).
    pub fn authenticate(&self, headers: &HeaderMap, now: f64) -> Result<String, Rejection> {
        let bearer = headers.get(header::AUTHORIZATION);
        let api_key = headers.get(API_KEY_HEADER);
        let too_large = |value: &http::HeaderValue| value.len() > MAX_CREDENTIAL_BYTES + "Bearer ".len();
        if bearer.is_some_and(too_large) || api_key.is_some_and(too_large) {
            return Err(Rejection::TooLarge);
        }
        match (bearer, api_key) {
            (None, None) => Err(Rejection::Missing),
            (Some(_), Some(_)) => Err(Rejection::Malformed),
            (Some(value), None) => {
                let jwt = self.jwt.as_ref().ok_or(Rejection::Algorithm)?;
                let value = value.to_str().map_err(|_| Rejection::Malformed)?;
                let (scheme, token) = value.split_once(' ').ok_or(Rejection::Malformed)?;
                if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
                    return Err(Rejection::Malformed);
                }
                jwt.verify(token.trim(), now)
            }
            (None, Some(value)) => {
                let keys = self.api_keys.as_ref().ok_or(Rejection::UnknownApiKey)?;
                keys.verify(value.to_str().map_err(|_| Rejection::Malformed)?)
            }
        }
    }

    /// Refuses `subject` (`None` when unauthenticated) a call of `path`
    /// (`package.Service/Method`) the policy does not allow.
    pub fn authorize(&self, subject: Option<&Subject>, path: &str) -> Result<(), GatewayError> {
        let Some(policy) = &self.policy else { return Ok(()) };
        let subject = subject.map(|s| s.0.as_str());
        let decision = policy.policy().decide(subject, &format!("/{path}"));
        if decision.allowed {
            return Ok(());
        }
        metrics::auth_failure(DENIED);
        let shown = subject.unwrap_or("an unauthenticated caller");
        tracing::debug!(subject = shown, method = path, reason = %decision.reason, "call denied by the gateway's policy");
        Err(GatewayError::new(
            Code::PermissionDenied,
            format!("{shown} may not call {path}: {} (the gateway's MICRO_AUTHZ_POLICY)", decision.reason),
        ))
    }
}

/// Reads an HS256 secret file, dropping one trailing newline.
fn read_secret(path: &Path) -> Result<Vec<u8>, Failure> {
    let mut secret = std::fs::read(path).map_err(|err| {
        Failure::Other(format!(
            "--jwt-secret-file {} (MICRO_GATEWAY_JWT_SECRET_FILE): cannot read it: {err}",
            path.display()
        ))
    })?;
    for ending in [&b"\n"[..], b"\r"] {
        if secret.ends_with(ending) {
            secret.pop();
        }
    }
    Ok(secret)
}

/// The subject a request authenticated as (`jwt:<sub>`, `apikey:<name>`), a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(pub String);

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// Drops a client's `x-micro-subject`, then, when credentials are required, answers 401 or
/// passes the request on with its [`Subject`].
pub async fn authenticate(
    State(authenticator): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    request.headers_mut().remove(SUBJECT_HEADER);
    if !authenticator.authenticates() {
        return next.run(request).await;
    }
    match authenticator.authenticate(request.headers(), now()) {
        Ok(subject) => {
            tracing::debug!(%subject, path = request.uri().path(), "authenticated");
            request.extensions_mut().insert(Subject(subject));
            next.run(request).await
        }
        Err(rejection) => {
            metrics::auth_failure(rejection.label());
            tracing::debug!(reason = rejection.label(), path = request.uri().path(), "credentials refused");
            rejection.into_response()
        }
    }
}
