//! HTTP/JSON to a gRPC request and back: the body (bounded, parsed as the method's input
//! by [`crate::dynamic`], errors naming line and column), the headers that become call
//! metadata and a deadline, the reply's metadata as response headers, and message schemas
//! for discovery.

use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor};
use serde_json::{Value, json};
use tonic::{Code, metadata::MetadataMap};

use super::status::GatewayError;
use crate::dynamic;

/// Request headers passed on to the call as metadata, unchanged.
pub const FORWARDED_HEADERS: [&str; 3] =
    [micro_core::client::IDEMPOTENCY_KEY_HEADER, "traceparent", "x-request-id"];
/// The request header that sets the call's deadline, e.g. `2s`, `500ms` (bare numbers are seconds).
pub const TIMEOUT_HEADER: &str = "x-timeout";
/// Reply metadata never copied to response headers: HTTP/2 and gRPC framing.
const NOT_COPIED: [&str; 6] =
    ["content-type", "content-length", "date", "te", "trailer", "transfer-encoding"];
/// How much of a body over the limit is read and dropped before the 413.
pub const DRAIN_BYTES: usize = 16 * 1024 * 1024;
/// How long a body over the limit is read and dropped before the 413.
pub const DRAIN_TIME: Duration = Duration::from_secs(2);
/// How deep a schema describes nested messages.
const SCHEMA_DEPTH: usize = 6;

/// Reads `body`, failing with 413 past `limit` bytes. The rest of a body over the limit is
/// read and dropped (up to [`DRAIN_BYTES`] more, for at most [`DRAIN_TIME`]), so a client
/// still sending it reads the 413 instead of a broken connection.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    let mut read = BytesMut::new();
    let mut over = declared.is_some_and(|length| length > limit as u64);
    while !over {
        match body.frame().await {
            None => return Ok(read.freeze()),
            Some(Err(err)) => {
                return Err(GatewayError::new(
                    Code::InvalidArgument,
                    format!("reading the request body: {err}"),
                ));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    over = read.len() + data.len() > limit;
                    read.extend_from_slice(&data);
                }
            }
        }
    }
    let drain = async {
        let mut dropped = 0;
        while dropped < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => dropped += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    Err(GatewayError::too_large(limit))
}

/// The request message for `method` from a JSON `body`; an empty body is `{}`. A syntax
/// error or a field that does not fit is 400 naming the line and column.
pub fn request(method: &MethodDescriptor, body: &[u8]) -> Result<DynamicMessage, GatewayError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    dynamic::request_from_json(method, body).map_err(|err| {
        let what = if err.is_syntax() || err.is_eof() { "malformed JSON" } else { "request JSON" };
        let reason = err.to_string();
        let reason = reason.rsplit_once(" at line ").map_or(reason.as_str(), |(r, _)| r);
        GatewayError::new(
            Code::InvalidArgument,
            format!(
                "{what} for {} at line {} column {}: {reason}",
                method.input().full_name(),
                err.line(),
                err.column()
            ),
        )
    })
}

/// The call for `message` with the forwarded headers as metadata and the deadline from
/// [`TIMEOUT_HEADER`].
pub fn call_request(
    headers: &HeaderMap,
    subject: Option<&str>,
    message: DynamicMessage,
) -> Result<tonic::Request<DynamicMessage>, GatewayError> {
    let mut request = tonic::Request::new(message);
    // Only the subject the gateway authenticated: a client's header of that name never passes.
    if let Some(subject) = subject
        && let Ok(value) = tonic::metadata::MetadataValue::try_from(subject)
    {
        request.metadata_mut().insert(micro_core::auth::SUBJECT_HEADER, value);
    }
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(name)
            && let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_bytes())
        {
            request.metadata_mut().insert(name, value);
        }
    }
    if let Some(timeout) = timeout(headers)? {
        request.set_timeout(timeout);
    }
    Ok(request)
}

/// The deadline a request asks for in [`TIMEOUT_HEADER`], if any.
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, GatewayError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else { return Ok(None) };
    let invalid = |why: String| GatewayError::new(Code::InvalidArgument, format!("X-Timeout: {why}"));
    let text = value.to_str().map_err(|_| invalid("not ASCII".into()))?;
    let parsed: micro_core::cli::Seconds = text.parse().map_err(invalid)?;
    let timeout = Duration::from(parsed);
    if timeout.is_zero() {
        return Err(invalid("must be above zero".into()));
    }
    Ok(Some(timeout))
}

/// The ASCII entries of `metadata` as HTTP headers, framing headers left out.
pub fn headers_of(metadata: &MetadataMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in metadata.clone().into_headers() {
        let Some(name) = name else { continue };
        if NOT_COPIED.contains(&name.as_str()) || name.as_str().starts_with("grpc-") {
            continue;
        }
        headers.append(name, value);
    }
    headers
}

/// The request ID to echo back, when the request has one.
pub fn request_id(headers: &HeaderMap) -> Option<(HeaderName, HeaderValue)> {
    headers.get("x-request-id").map(|v| (HeaderName::from_static("x-request-id"), v.clone()))
}

/// A method for discovery: its path, its message schemas and an example request.
pub fn describe_method(method: &MethodDescriptor) -> Value {
    json!({
        "name": method.name(),
        "path": format!("{}/{}", method.parent_service().full_name(), method.name()),
        "client_streaming": method.is_client_streaming(),
        "server_streaming": method.is_server_streaming(),
        "request": schema(&method.input(), SCHEMA_DEPTH),
        "response": schema(&method.output(), SCHEMA_DEPTH),
        "example": example(&method.input(), SCHEMA_DEPTH),
    })
}

/// A message's fields by their JSON names, with their types.
fn schema(message: &MessageDescriptor, depth: usize) -> Value {
    let fields: Vec<Value> = message.fields().map(|field| field_schema(&field, depth)).collect();
    json!({ "type": message.full_name(), "fields": fields })
}

fn field_schema(field: &FieldDescriptor, depth: usize) -> Value {
    let mut described = json!({
        "name": field.json_name(),
        "type": kind_name(&field.kind()),
        "repeated": field.is_list(),
        "map": field.is_map(),
    });
    if let Kind::Message(message) = field.kind()
        && depth > 0
        && !field.is_map()
    {
        described["message"] = schema(&message, depth - 1);
    }
    if let Kind::Enum(values) = field.kind() {
        described["values"] = values.values().map(|v| Value::from(v.name())).collect();
    }
    described
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
    }
}

/// A request with every field present at its zero value, one element per list: what a
/// form starts from.
fn example(message: &MessageDescriptor, depth: usize) -> Value {
    let mut object = serde_json::Map::new();
    for field in message.fields() {
        let value = match field.kind() {
            _ if field.is_map() => json!({}),
            Kind::Message(m) if m.full_name().starts_with("google.protobuf.") => Value::Null,
            Kind::Message(m) if depth > 0 => example(&m, depth - 1),
            Kind::Message(_) => json!({}),
            Kind::Enum(e) => e.default_value().name().into(),
            Kind::Bool => false.into(),
            Kind::String | Kind::Bytes => "".into(),
            Kind::Int64 | Kind::Uint64 | Kind::Sint64 | Kind::Fixed64 | Kind::Sfixed64 => "0".into(),
            _ => 0.into(),
        };
        let value = if field.is_list() { Value::Array(vec![value]) } else { value };
        object.insert(field.json_name().to_owned(), value);
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_take_units_and_bare_seconds() {
        let with = |v: &str| {
            HeaderMap::from_iter([(
                HeaderName::from_static(TIMEOUT_HEADER),
                HeaderValue::from_str(v).unwrap(),
            )])
        };
        assert_eq!(timeout(&with("2s")).unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(timeout(&with("250ms")).unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(timeout(&with("3")).unwrap(), Some(Duration::from_secs(3)));
        assert_eq!(timeout(&HeaderMap::new()).unwrap(), None);
        assert_eq!(timeout(&with("soon")).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(timeout(&with("0s")).unwrap_err().code, Code::InvalidArgument);
    }

    fn find_available() -> MethodDescriptor {
        let pool = prost_reflect::DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        pool.get_service_by_name("vessel.VesselService").unwrap().methods().next().unwrap()
    }

    #[test]
    fn json_errors_name_line_and_column() {
        let method = find_available();
        let err = request(&method, b"{\n  \"capacity\": 3,\n  \"maxWeight\" 1\n}").unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(
            err.message.starts_with("malformed JSON for vessel.Specification at line 3 column"),
            "{}",
            err.message
        );
        let err = request(&method, br#"{"capacity": "lots"}"#).unwrap_err();
        assert!(
            err.message.starts_with("request JSON for vessel.Specification at line 1 column"),
            "{}",
            err.message
        );
        assert!(request(&method, b"  ").is_ok(), "an empty body is the empty message");
        assert!(request(&method, br#"{"max_weight": 1}"#).is_ok(), "proto field names are accepted too");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413() {
        let body = || Body::from(vec![b' '; 2048]);
        let err = read_body(&HeaderMap::new(), body(), 1024).await.unwrap_err();
        assert_eq!(err.http_status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(read_body(&HeaderMap::new(), body(), 4096).await.unwrap().len(), 2048);
    }

    #[test]
    fn framing_metadata_stays_behind() {
        let mut metadata = MetadataMap::new();
        metadata.insert("idempotent-replayed", "true".parse().unwrap());
        metadata.insert("grpc-status", "0".parse().unwrap());
        metadata.insert("content-type", "application/grpc".parse().unwrap());
        let headers = headers_of(&metadata);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["idempotent-replayed"], "true");
    }
}
