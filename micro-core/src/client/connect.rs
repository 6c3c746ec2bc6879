//! Connections to instances: lazily connected tonic channels with a connect timeout and
//! HTTP/2 keepalive pings as gRFC A8 has them: pings only while calls are in flight, so a
//! peer that vanished under a call is known within about `keepalive_interval +
//! keepalive_timeout`, and never on an idle connection, which gRPC's own servers (C-core,
//! Go, Java) punish with a GOAWAY `too_many_pings` once a ping comes more often than every
//! 5 minutes without a call. A call to an idle connection whose peer vanished is covered
//! by hedging (idempotent calls), the deadline, and the connect timeout of the connection
//! that replaces it.

use tonic::transport::{Channel, Endpoint};

use crate::{BoxError, config::ClientConfig, registry::Node, tls::TlsConnector};

/// A lazily connected channel to `node` with `config`'s connect timeout, keepalive and TLS:
/// over TLS when the config has a CA, checking that the server's certificate names the
/// service (not its address), or the name its `tls-name` label gives. Each new connection uses the TLS material in force then, so
/// certificates renewed on disk (or by Consul Connect) apply without a new channel.
pub fn connect_lazily(node: &Node, config: &ClientConfig) -> Result<Channel, BoxError> {
    // The scheme stays `http`: TLS is the connector's, with the material of the moment.
    let mut endpoint = Endpoint::from_shared(format!("http://{}", node.address))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    if !config.keepalive_interval.is_zero() {
        endpoint = endpoint
            .http2_keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout)
            .keep_alive_while_idle(false);
    }
    let tls = match &config.tls {
        Some(tls) if tls.material().ca.is_some() => Some(tls.source()?),
        _ => None,
    };
    Ok(match tls {
        Some(source) => {
            // The name its certificate carries: the registered one, unless the node says
            // otherwise (a broker subscriber serving with its process's certificate).
            let certified = node.metadata.get(crate::labels::TLS_NAME).unwrap_or(&node.name);
            endpoint.connect_with_connector_lazy(TlsConnector::new(source, certified)?)
        }
        None => endpoint.connect_lazy(),
    })
}
