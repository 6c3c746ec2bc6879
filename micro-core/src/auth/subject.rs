//! Who the end user is, as the gateway vouches for it: the subject it authenticated (a
//! bearer JWT's `sub` or an API key's name), sent to services in the call metadata
//! [`SUBJECT_HEADER`] as `jwt:<sub>` or `apikey:<name>`. The gateway drops any header of
//! that name a client sends, so a service behind it reads only what the gateway set; a
//! policy rule trusts it only from the callers it names (see [`crate::auth::policy`]).
//!
//! # Examples
//! ```
//! use micro_core::auth::{SUBJECT_HEADER, subject};
//! let mut request = tonic::Request::new(());
//! request.metadata_mut().insert(SUBJECT_HEADER, "jwt:alice".parse().unwrap());
//! assert_eq!(subject(&request), Some("jwt:alice"));
//! ```

/// The call metadata that carries the subject the gateway authenticated.
pub const SUBJECT_HEADER: &str = "x-micro-subject";
/// The subject prefix of a bearer JWT's `sub` claim.
pub const JWT_PREFIX: &str = "jwt:";
/// The subject prefix of an API key's name.
pub const API_KEY_PREFIX: &str = "apikey:";

/// The subject the gateway authenticated for `request`, when it set one.
pub fn subject<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.metadata().get(SUBJECT_HEADER)?.to_str().ok()
}

/// The subject of an HTTP-level `request`, as a server layer sees it.
pub fn subject_of<B>(request: &http::Request<B>) -> Option<&str> {
    request.headers().get(SUBJECT_HEADER)?.to_str().ok()
}

/// Whether `text` has the form of a subject: a known prefix, then a name.
pub fn is_subject(text: &str) -> bool {
    [JWT_PREFIX, API_KEY_PREFIX]
        .iter()
        .any(|prefix| text.strip_prefix(prefix).is_some_and(|name| !name.is_empty()))
}
