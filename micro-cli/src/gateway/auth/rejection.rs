//! Why a request's credentials were refused: a fixed set of reasons, each a metric label,
//! an OAuth error code for `WWW-Authenticate` and a message that echoes nothing presented.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use tonic::Code;

use super::REALM;
use crate::gateway::status::GatewayError;

/// Why credentials were refused; every one is answered 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// No `Authorization: Bearer` and no API key header.
    Missing,
    /// The credential is longer than the gateway reads.
    TooLarge,
    /// Not a bearer token, not three base64url parts, or a header that is not JSON.
    Malformed,
    /// An `alg` the gateway does not take for this key (`none`, or one with no key configured).
    Algorithm,
    /// No configured key has the token's `kid` and algorithm.
    UnknownKey,
    /// The signature does not verify.
    Signature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// `iss` is not the configured issuer.
    Issuer,
    /// `aud` does not name the configured audience.
    Audience,
    /// The claims are not JSON, or `sub` or `exp` is missing or ill-formed.
    Claims,
    /// No configured API key matches.
    UnknownApiKey,
}

impl Rejection {
    /// Every reason.
    #[cfg(test)]
    pub const ALL: [Rejection; 12] = [
        Rejection::Missing,
        Rejection::TooLarge,
        Rejection::Malformed,
        Rejection::Algorithm,
        Rejection::UnknownKey,
        Rejection::Signature,
        Rejection::Expired,
        Rejection::NotYetValid,
        Rejection::Issuer,
        Rejection::Audience,
        Rejection::Claims,
        Rejection::UnknownApiKey,
    ];

    /// The `reason` label of `micro_gateway_auth_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::TooLarge => "too_large",
            Rejection::Malformed => "malformed",
            Rejection::Algorithm => "algorithm",
            Rejection::UnknownKey => "unknown_key",
            Rejection::Signature => "signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::Issuer => "issuer",
            Rejection::Audience => "audience",
            Rejection::Claims => "claims",
            Rejection::UnknownApiKey => "unknown_api_key",
        }
    }

    /// The RFC 6750 error code; none when no credentials came at all.
    fn error_code(self) -> Option<&'static str> {
        match self {
            Rejection::Missing => None,
            Rejection::TooLarge | Rejection::Malformed => Some("invalid_request"),
            Rejection::Algorithm
            | Rejection::UnknownKey
            | Rejection::Signature
            | Rejection::Expired
            | Rejection::NotYetValid
            | Rejection::Issuer
            | Rejection::Audience
            | Rejection::Claims
            | Rejection::UnknownApiKey => Some("invalid_token"),
        }
    }

    /// What is wrong, in words fit for the `WWW-Authenticate` header (no quotes).
    fn description(self) -> &'static str {
        match self {
            Rejection::Missing => "no credentials",
            Rejection::TooLarge => "the credential is too large",
            Rejection::Malformed => "the credential is malformed",
            Rejection::Algorithm => "the token's algorithm is not accepted",
            Rejection::UnknownKey => "no key is configured for the token's kid and algorithm",
            Rejection::Signature => "the token's signature does not verify",
            Rejection::Expired => "the token has expired",
            Rejection::NotYetValid => "the token is not valid yet",
            Rejection::Issuer => "the token's issuer is not accepted",
            Rejection::Audience => "the token is not meant for this audience",
            Rejection::Claims => "the token's claims lack sub or exp, or are ill-formed",
            Rejection::UnknownApiKey => "unknown API key",
        }
    }

    /// The `WWW-Authenticate` challenge.
    pub fn challenge(self) -> HeaderValue {
        let value = match self.error_code() {
            None => format!("Bearer realm=\"{REALM}\""),
            Some(code) => {
                format!(
                    "Bearer realm=\"{REALM}\", error=\"{code}\", error_description=\"{}\"",
                    self.description()
                )
            }
        };
        HeaderValue::from_str(&value).expect("fixed ASCII text")
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let message = format!(
            "{}: send Authorization: Bearer <JWT> or X-API-Key: <key> (see docs/gateway.md, Authentication)",
            self.description()
        );
        let mut response = GatewayError::new(Code::Unauthenticated, message).into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, self.challenge());
        response
    }
}
