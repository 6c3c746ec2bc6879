//! The gateway's one error type: a gRPC code and a message, answered as HTTP with the
//! status Google's API design guide gives the code and the body `{"code", "message"}`.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use micro_core::metrics::code_name;
use tonic::Code;

use crate::exit::Failure;

/// The HTTP status for a gRPC status code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed gateway request.
#[derive(Debug)]
pub struct GatewayError {
    /// The gRPC code, which decides the HTTP status unless [`GatewayError::status`] is set.
    pub code: Code,
    /// What failed, for people.
    pub message: String,
    /// An HTTP status of its own, for failures before any call (413).
    pub status: Option<StatusCode>,
    /// Headers to send with the error (the call's response metadata).
    pub headers: Box<HeaderMap>,
}

impl GatewayError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        GatewayError { code, message: message.into(), status: None, headers: Box::default() }
    }

    /// A request body over the limit: 413, code `RESOURCE_EXHAUSTED`.
    pub fn too_large(limit: usize) -> Self {
        GatewayError {
            status: Some(StatusCode::PAYLOAD_TOO_LARGE),
            ..GatewayError::new(
                Code::ResourceExhausted,
                format!("request body over the limit of {limit} bytes"),
            )
        }
    }

    /// The HTTP status this error is answered with.
    pub fn http_status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| http_status(self.code))
    }
}

impl From<Failure> for GatewayError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::CallFailed { code, message } => GatewayError::new(code, message),
            Failure::NotFound(message) => GatewayError::new(Code::NotFound, message),
            Failure::NotServing(message)
            | Failure::RegistryUnreachable(message)
            | Failure::BrokerUnreachable(message) => GatewayError::new(Code::Unavailable, message),
            Failure::TimedOut(message) => GatewayError::new(Code::DeadlineExceeded, message),
            Failure::Other(message) => GatewayError::new(Code::Internal, message),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let body = serde_json::json!({ "code": code_name(self.code), "message": self.message });
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        response.headers_mut().extend(*self.headers);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_as_the_api_design_guide_says() {
        let table = [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::Unauthenticated, 401),
            (Code::ResourceExhausted, 429),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
            (Code::DataLoss, 500),
        ];
        for (code, status) in table {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
        assert_eq!(GatewayError::too_large(10).http_status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
