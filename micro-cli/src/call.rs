//! `micro call NAME METHOD JSON`: a unary call through the registry, with the request and
//! reply types learned from the server's gRPC reflection (see [`crate::dynamic`]).

use micro_core::NamedChannel;

use crate::{
    dynamic::{self, REFLECTION_HINT},
    exit::Failure,
};

/// Calls `method` (`package.Service/Method` or `package.Service.Method`) on `channel` with
/// `json` as the request; returns the reply as JSON. Fails with the gRPC code of a failed
/// call or reflection request, [`Failure::Other`] for bad input.
pub async fn call(channel: NamedChannel, method: &str, json: &str) -> Result<String, Failure> {
    let (service, method_name) = method
        .rsplit_once(['/', '.'])
        .filter(|(service, name)| !service.is_empty() && !name.is_empty())
        .ok_or_else(|| Failure::Other(format!("method {method:?}: expected package.Service/Method")))?;
    let service = service.trim_start_matches('/');
    let pool = dynamic::descriptors(channel.clone(), &[service.to_owned()]).await?;
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
    let request = dynamic::request_from_json(&method, json.as_bytes())
        .map_err(|err| Failure::Other(format!("request JSON for {}: {err}", method.input().full_name())))?;
    let name = channel.name().to_owned();
    let path = format!("/{}/{}", descriptor.full_name(), method.name());
    let reply = dynamic::unary(channel, &method, tonic::Request::new(request))
        .await
        .map_err(|status| dynamic::failed(&format!("call {name} {path}"), &status))?;
    Ok(dynamic::to_json(reply.get_ref()))
}
