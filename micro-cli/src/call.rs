//! `micro call NAME METHOD [JSON]`: a call through the registry, with the request and reply
//! types learned from the server's gRPC reflection (see [`crate::dynamic`]). This file
//! resolves the method and makes unary calls; streaming methods are `call_stream.rs`'s.

use micro_core::NamedChannel;
use prost_reflect::MethodDescriptor;

use crate::{
    dynamic::{self, REFLECTION_HINT},
    exit::Failure,
};

/// The descriptor of `method` (`package.Service/Method`, `package.Service.Method`, or a bare
/// `Method` that one listed service has) from `channel`'s server reflection. Fails with the
/// gRPC code of a failed reflection request, [`Failure::Other`] for a bad method name.
pub async fn resolve(channel: NamedChannel, method: &str) -> Result<MethodDescriptor, Failure> {
    let resolved;
    let method = if method.contains(['/', '.']) {
        method
    } else {
        resolved = bare_method(channel.clone(), method).await?;
        &resolved
    };
    let (service, method_name) = method
        .rsplit_once(['/', '.'])
        .filter(|(service, name)| !service.is_empty() && !name.is_empty())
        .ok_or_else(|| Failure::Other(format!("method {method:?}: expected package.Service/Method")))?;
    let service = service.trim_start_matches('/');
    let pool = match dynamic::descriptors(channel.clone(), &[service.to_owned()]).await {
        Ok(pool) => pool,
        Err(failure @ Failure::CallFailed { code: tonic::Code::NotFound, .. }) => {
            return Err(unknown_service(channel, service, method_name).await.unwrap_or(failure));
        }
        Err(failure) => return Err(failure),
    };
    let descriptor = pool.get_service_by_name(service).ok_or_else(|| Failure::CallFailed {
        code: tonic::Code::NotFound,
        message: format!("{} does not describe {service}; {REFLECTION_HINT}", channel.name()),
    })?;
    descriptor.methods().find(|m| m.name() == method_name).ok_or_else(|| {
        let known: Vec<String> = descriptor.methods().map(|m| m.name().to_owned()).collect();
        Failure::Other(format!("{service} has no method {method_name}; it has {}", known.join(", ")))
    })
}

/// Calls unary `method` on `channel` with `json` as the request; returns the reply as JSON.
/// Fails with the gRPC code of a failed call, [`Failure::Other`] for bad input.
pub async fn call(channel: NamedChannel, method: &MethodDescriptor, json: &str) -> Result<String, Failure> {
    let request = dynamic::request_from_json(method, json.as_bytes())
        .map_err(|err| Failure::Other(format!("request JSON for {}: {err}", method.input().full_name())))?;
    // The caller names the call ("call NAME METHOD: …"); the status says how it failed.
    let reply = dynamic::unary(channel, method, tonic::Request::new(request)).await.map_err(|status| {
        Failure::CallFailed {
            code: status.code(),
            message: format!("{}: {}", micro_core::metrics::code_name(status.code()), status.message()),
        }
    })?;
    Ok(dynamic::to_json(reply.get_ref()))
}

/// Every method reflection lists (`package.Service/Method`); `None` when it lists no service.
async fn listed_methods(channel: NamedChannel) -> Option<Vec<String>> {
    let listed = dynamic::list_services(channel.clone()).await.ok().filter(|l| !l.is_empty())?;
    let pool = dynamic::descriptors(channel, &listed).await.ok()?;
    Some(
        pool.services()
            .filter(|s| listed.iter().any(|l| l == s.full_name()))
            .flat_map(|s| s.methods().map(|m| format!("{}/{}", s.full_name(), m.name())).collect::<Vec<_>>())
            .collect(),
    )
}

/// The full path of a method given by its name alone (`Hello`), when exactly one of the
/// listed services has it; otherwise what to write instead.
async fn bare_method(channel: NamedChannel, name: &str) -> Result<String, Failure> {
    let expected = || format!("method {name:?}: expected package.Service/Method");
    let Some(methods) = listed_methods(channel.clone()).await else {
        return Err(Failure::Other(format!("{}; {REFLECTION_HINT}", expected())));
    };
    let matching: Vec<&String> =
        methods.iter().filter(|path| path.rsplit_once('/').is_some_and(|(_, m)| m == name)).collect();
    match matching.as_slice() {
        [only] => Ok((*only).clone()),
        [] => Err(Failure::Other(format!("{}; {} has: {}", expected(), channel.name(), methods.join(", ")))),
        several => Err(Failure::Other(format!(
            "{}; several services of {} have it: {}",
            expected(),
            channel.name(),
            several.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// When reflection does not know `service` but lists others: NOT_FOUND naming the methods it
/// does know (`counter.Counter/Add, …`), with the one meant when only the package was left
/// out, as the gateway answers. `None` when it lists nothing (no reflection for any), so the
/// caller's own failure, with its hint, stands.
async fn unknown_service(channel: NamedChannel, service: &str, method: &str) -> Option<Failure> {
    let methods = listed_methods(channel.clone()).await?;
    let meant = methods.iter().find(|path| {
        path.rsplit_once('/').is_some_and(|(full, name)| {
            name == method && full.rsplit('.').next() == Some(service.rsplit('.').next().unwrap_or(service))
        })
    });
    let hint = meant.map(|path| format!("did you mean {path}? ")).unwrap_or_default();
    let known = if methods.is_empty() { "none".to_owned() } else { methods.join(", ") };
    Some(Failure::CallFailed {
        code: tonic::Code::NotFound,
        message: format!(
            "{} has no service {service}; {hint}its methods: {known} (a service served without its \
             descriptors is not listed: {REFLECTION_HINT})",
            channel.name()
        ),
    })
}
