//! `micro call NAME METHOD JSON`: a unary call through the registry, with the request and
//! reply types learned from the server's gRPC reflection.

use crate::exit::Failure;
use bytes::Buf;
use futures::StreamExt;
use micro_core::NamedChannel;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// What a server must do to be callable by `micro call` and grpcurl.
const REFLECTION_HINT: &str = "the server offers no reflection for it: give the server its descriptors, \
     `.file_descriptor_set(FILE_DESCRIPTOR_SET)` (the encoded set your proto build writes) on \
     `Server::builder` or on `micro_core::service(..)`";

/// Calls `method` (`package.Service/Method` or `package.Service.Method`) on `channel` with
/// `json` as the request; returns the reply as JSON. Fails with the gRPC code of a failed
/// call or reflection request, [`Failure::Other`] for bad input.
pub async fn call(channel: NamedChannel, method: &str, json: &str) -> Result<String, Failure> {
    let (service, method_name) = method
        .rsplit_once(['/', '.'])
        .filter(|(service, name)| !service.is_empty() && !name.is_empty())
        .ok_or_else(|| Failure::Other(format!("method {method:?}: expected package.Service/Method")))?;
    let service = service.trim_start_matches('/');
    let pool = descriptors_of(channel.clone(), service).await?;
    let descriptor = pool.get_service_by_name(service).ok_or_else(|| Failure::CallFailed {
        code: tonic::Code::NotFound,
        message: format!("{} does not describe {service}; {REFLECTION_HINT}", channel.name()),
    })?;
    let method = descriptor.methods().find(|m| m.name() == method_name).ok_or_else(|| {
        let known: Vec<String> = descriptor.methods().map(|m| m.name().to_owned()).collect();
        Failure::Other(format!("{service} has no method {method_name}; it has {}", known.join(", ")))
    })?;
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err(Failure::Other(format!(
            "{} is a streaming method; micro call makes unary calls",
            method.full_name()
        )));
    }
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let request = DynamicMessage::deserialize(method.input(), &mut deserializer)
        .and_then(|m| deserializer.end().map(|()| m))
        .map_err(|err| Failure::Other(format!("request JSON for {}: {err}", method.input().full_name())))?;
    let reply = unary(channel, &method, request).await?;
    serde_json::to_string_pretty(&reply).map_err(|err| Failure::Other(err.to_string()))
}

async fn unary(
    channel: NamedChannel,
    method: &MethodDescriptor,
    request: DynamicMessage,
) -> Result<DynamicMessage, Failure> {
    let name = channel.name().to_owned();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|err| Failure::Other(err.to_string()))?;
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let path = http::uri::PathAndQuery::try_from(path).map_err(|err| Failure::Other(err.to_string()))?;
    let codec = DynamicCodec { output: method.output() };
    grpc.unary(tonic::Request::new(request), path.clone(), codec)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| failed(&format!("call {name} {path}"), &status))
}

/// A failed call or reflection request: its code decides the exit code.
fn failed(what: &str, status: &tonic::Status) -> Failure {
    Failure::CallFailed {
        code: status.code(),
        message: format!("{what}: {}: {}", micro_core::metrics::code_name(status.code()), status.message()),
    }
}

/// The descriptors of `service` and everything it depends on, from server reflection.
async fn descriptors_of(channel: NamedChannel, service: &str) -> Result<DescriptorPool, Failure> {
    let name = channel.name().to_owned();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(service.to_owned())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unimplemented => Failure::CallFailed {
                code: status.code(),
                message: format!("server reflection on {name}: UNIMPLEMENTED; {REFLECTION_HINT}"),
            },
            _ => failed(&format!("server reflection on {name}"), &status),
        })?
        .into_inner();
    let reply = replies
        .next()
        .await
        .ok_or_else(|| Failure::Other(format!("server reflection on {name} closed without an answer")))?
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => Failure::CallFailed {
                code: status.code(),
                message: format!(
                    "server reflection on {name}: NOT_FOUND: {}; {REFLECTION_HINT}",
                    status.message()
                ),
            },
            _ => failed(&format!("server reflection on {name}"), &status),
        })?;
    let files = match reply.message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto,
        Some(MessageResponse::ErrorResponse(err)) => {
            let code = tonic::Code::from_i32(err.error_code);
            let hint =
                if code == tonic::Code::NotFound { format!("; {REFLECTION_HINT}") } else { String::new() };
            return Err(Failure::CallFailed {
                code,
                message: format!("server reflection on {name}: {}{hint}", err.error_message),
            });
        }
        _ => return Err(Failure::Other(format!("{name} gave an unexpected reflection answer"))),
    };
    let mut set = prost_types::FileDescriptorSet::default();
    for file in files {
        let file = prost_types::FileDescriptorProto::decode(file.as_slice())
            .map_err(|e| Failure::Other(format!("descriptors from {name}: {e}")))?;
        set.file.push(file);
    }
    DescriptorPool::from_file_descriptor_set(set)
        .map_err(|err| Failure::Other(format!("descriptors from {name}: {err}")))
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
