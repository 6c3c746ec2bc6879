//! Calling a gRPC method known only at run time, the one copy `micro call` and `micro
//! gateway` share: descriptors from server reflection, JSON to a [`DynamicMessage`] and
//! back (proto3 JSON mapping), and a unary call through a [`NamedChannel`].
//!
//! Reflection is asked as `grpc.reflection.v1`, then, when the server does not implement
//! it, as `grpc.reflection.v1alpha` (what most servers deployed before 2023 serve, grpc-go
//! and Python's grpcio among them); the two have the same messages.
//!
//! Streaming methods go through [`streaming`], whichever side streams.
//!
//! # Examples
//! ```ignore
//! let pool = dynamic::descriptors(channel.clone(), &["vessel.VesselService".into()]).await?;
//! let method = pool.get_service_by_name("vessel.VesselService").unwrap().methods().next().unwrap();
//! let request = dynamic::request_from_json(&method, br#"{"capacity": 3}"#)?;
//! let reply = dynamic::unary(channel, &method, tonic::Request::new(request)).await?;
//! println!("{}", dynamic::to_json(reply.get_ref()));
//! ```

use std::collections::BTreeMap;

use bytes::Buf;
use futures::StreamExt;
use micro_core::NamedChannel;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::exit::Failure;

/// What a server must do to be callable by `micro call`, `micro gateway` and grpcurl.
pub const REFLECTION_HINT: &str = "the server offers no reflection for it: give the server its descriptors, \
     `.file_descriptor_set(FILE_DESCRIPTOR_SET)` (the encoded set your proto build writes) on \
     `Server::builder` or on `micro_core::service(..)`";
/// What a server that is not this SDK's must do when its `v1alpha` reflection lacks a service.
pub const V1ALPHA_HINT: &str = "the server's reflection (grpc.reflection.v1alpha) does not describe it: \
     register that service's descriptors with the server's reflection (grpc-go: the service's \
     generated package imported into the server; Python: its full name in \
     `reflection.enable_server_reflection`)";
/// What a server without any reflection must do.
pub const NO_REFLECTION_HINT: &str = "the server serves neither grpc.reflection.v1 nor v1alpha: \
     enable server reflection (grpc-go: `reflection.Register(server)`; Python: \
     `grpc_reflection.v1alpha.reflection.enable_server_reflection`; a micro service serves it \
     always, and describes its services given `.file_descriptor_set(FILE_DESCRIPTOR_SET)`)";

/// Which reflection service answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reflection {
    V1,
    V1Alpha,
}

impl Reflection {
    /// The advice for a service this reflection does not describe.
    fn hint(self) -> &'static str {
        match self {
            Reflection::V1 => REFLECTION_HINT,
            Reflection::V1Alpha => V1ALPHA_HINT,
        }
    }
}

/// The most services one server's reflection may list that are fetched.
pub const MAX_REFLECTED_SERVICES: usize = 64;

/// The gRPC services `channel`'s server lists through reflection, the reflection and
/// health services left out.
pub async fn list_services(channel: NamedChannel) -> Result<Vec<String>, Failure> {
    let request = MessageRequest::ListServices(String::new());
    let reply = reflect(channel, vec![request]).await?.0.into_iter().next();
    match reply {
        Some(MessageResponse::ListServicesResponse(list)) => Ok(list
            .service
            .into_iter()
            .map(|s| s.name)
            .filter(|name| !name.starts_with("grpc.reflection.") && !name.starts_with("grpc.health."))
            .take(MAX_REFLECTED_SERVICES)
            .collect()),
        _ => Err(Failure::Other("reflection did not list services".into())),
    }
}

/// The descriptors of `symbols` (service names) and everything they depend on, from
/// `channel`'s server reflection.
pub async fn descriptors(channel: NamedChannel, symbols: &[String]) -> Result<DescriptorPool, Failure> {
    let name = channel.name().to_owned();
    let requests = symbols.iter().map(|s| MessageRequest::FileContainingSymbol(s.clone())).collect();
    let mut files = BTreeMap::new();
    let (replies, answered) = reflect(channel, requests).await?;
    for reply in replies {
        let protos = match reply {
            MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto,
            MessageResponse::ErrorResponse(err) => {
                let code = tonic::Code::from_i32(err.error_code);
                let hint = if code == tonic::Code::NotFound {
                    format!("; {}", answered.hint())
                } else {
                    String::new()
                };
                return Err(Failure::CallFailed {
                    code,
                    message: format!("server reflection on {name}: {}{hint}", err.error_message),
                });
            }
            _ => return Err(Failure::Other(format!("{name} gave an unexpected reflection answer"))),
        };
        for file in protos {
            let file = prost_types::FileDescriptorProto::decode(file.as_slice())
                .map_err(|e| Failure::Other(format!("descriptors from {name}: {e}")))?;
            files.entry(file.name().to_owned()).or_insert(file);
        }
    }
    let set = prost_types::FileDescriptorSet { file: files.into_values().collect() };
    DescriptorPool::from_file_descriptor_set(set)
        .map_err(|err| Failure::Other(format!("descriptors from {name}: {err}")))
}

/// Sends `requests` on one reflection stream, `v1` or else `v1alpha`, and returns one
/// answer per request and which reflection gave them.
async fn reflect(
    channel: NamedChannel,
    requests: Vec<MessageRequest>,
) -> Result<(Vec<MessageResponse>, Reflection), Failure> {
    let name = channel.name().to_owned();
    let count = requests.len();
    let wrap = |r| ServerReflectionRequest { host: String::new(), message_request: Some(r) };
    let v1_requests: Vec<_> = requests.into_iter().map(wrap).collect();
    let (replies, answered) = match reflect_v1(channel.clone(), v1_requests.clone()).await {
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            (reflect_v1alpha(channel, v1_requests).await, Reflection::V1Alpha)
        }
        replies => (replies, Reflection::V1),
    };
    let failure = |status: tonic::Status| match (status.code(), answered) {
        (tonic::Code::Unimplemented, _) => Failure::CallFailed {
            code: status.code(),
            message: format!("server reflection on {name}: UNIMPLEMENTED; {NO_REFLECTION_HINT}"),
        },
        (tonic::Code::NotFound, answered) => Failure::CallFailed {
            code: status.code(),
            message: format!(
                "server reflection on {name}: NOT_FOUND: {}; {}",
                status.message(),
                answered.hint()
            ),
        },
        _ => failed(&format!("server reflection on {name}"), &status),
    };
    let mut replies = replies.map_err(failure)?;
    let mut answers = Vec::with_capacity(count);
    while answers.len() < count {
        let reply = replies
            .next()
            .await
            .ok_or_else(|| Failure::Other(format!("server reflection on {name} closed without an answer")))?
            .map_err(failure)?;
        let answer = reply
            .message_response
            .ok_or_else(|| Failure::Other(format!("{name} gave an empty reflection answer")))?;
        answers.push(answer);
    }
    Ok((answers, answered))
}

type Replies = futures::stream::BoxStream<'static, Result<ServerReflectionResponse, tonic::Status>>;

async fn reflect_v1(
    channel: NamedChannel,
    requests: Vec<ServerReflectionRequest>,
) -> Result<Replies, tonic::Status> {
    let mut reflection = ServerReflectionClient::new(channel);
    let replies = reflection.server_reflection_info(futures::stream::iter(requests)).await?.into_inner();
    Ok(replies.boxed())
}

/// The same conversation over `grpc.reflection.v1alpha`, whose messages are `v1`'s field for
/// field: each is re-encoded from one version to the other.
async fn reflect_v1alpha(
    channel: NamedChannel,
    requests: Vec<ServerReflectionRequest>,
) -> Result<Replies, tonic::Status> {
    use tonic_reflection::pb::v1alpha;
    let requests = requests.into_iter().map(|request| {
        v1alpha::ServerReflectionRequest::decode(request.encode_to_vec().as_slice())
            .expect("v1 and v1alpha requests share their encoding")
    });
    let mut reflection = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let replies = reflection.server_reflection_info(futures::stream::iter(requests)).await?.into_inner();
    Ok(replies
        .map(|reply| {
            let reply = reply?;
            ServerReflectionResponse::decode(reply.encode_to_vec().as_slice())
                .map_err(|err| tonic::Status::internal(format!("a v1alpha reflection answer: {err}")))
        })
        .boxed())
}

/// A failed call or reflection request: its code decides the exit code or HTTP status.
pub fn failed(what: &str, status: &tonic::Status) -> Failure {
    Failure::CallFailed {
        code: status.code(),
        message: format!("{what}: {}: {}", micro_core::metrics::code_name(status.code()), status.message()),
    }
}

/// Parses `json` as `method`'s request; the error carries the line and column.
pub fn request_from_json(
    method: &MethodDescriptor,
    json: &[u8],
) -> Result<DynamicMessage, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    DynamicMessage::deserialize(method.input(), &mut deserializer)
        .and_then(|m| deserializer.end().map(|()| m))
}

/// `message` in the proto3 JSON mapping, pretty-printed.
pub fn to_json(message: &DynamicMessage) -> String {
    serde_json::to_string_pretty(message).expect("a dynamic message serializes")
}

/// Calls unary `method` through `channel`.
pub async fn unary(
    channel: NamedChannel,
    method: &MethodDescriptor,
    request: tonic::Request<DynamicMessage>,
) -> Result<tonic::Response<DynamicMessage>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let path =
        http::uri::PathAndQuery::try_from(path).map_err(|err| tonic::Status::internal(err.to_string()))?;
    grpc.unary(request, path, DynamicCodec { output: method.output() }).await
}

/// Calls streaming `method` (client, server or both) through `channel`: the request's
/// messages are sent as its stream yields them, and the replies come as a stream. The
/// SDK's deadline covers the call until the server's response headers only, so a stream
/// may run for as long as both ends keep it open; dropping the reply stream cancels it.
pub async fn streaming<S>(
    channel: NamedChannel,
    method: &MethodDescriptor,
    request: tonic::Request<S>,
) -> Result<tonic::Response<tonic::Streaming<DynamicMessage>>, tonic::Status>
where
    S: futures::Stream<Item = DynamicMessage> + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let path =
        http::uri::PathAndQuery::try_from(path).map_err(|err| tonic::Status::internal(err.to_string()))?;
    grpc.streaming(request, path, DynamicCodec { output: method.output() }).await
}

/// `message` in the proto3 JSON mapping on one line, as streams print it.
pub fn to_json_line(message: &DynamicMessage) -> String {
    serde_json::to_string(message).expect("a dynamic message serializes")
}

/// Encodes any dynamic message; decodes replies of one message type.
struct DynamicCodec {
    output: MessageDescriptor,
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.output.clone())
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        item.encode(dst).map_err(|err| tonic::Status::internal(err.to_string()))
    }
}

struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|err| tonic::Status::internal(err.to_string()))
    }
}
