//! Connections to instances: lazily connected tonic channels with a connect timeout and
//! HTTP/2 keepalive pings as gRFC A8 has them: pings only while calls are in flight, so a
//! peer that vanished under a call is known within about `keepalive_interval +
//! keepalive_timeout`, and never on an idle connection, which gRPC's own servers (C-core,
//! Go, Java) punish with a GOAWAY `too_many_pings` once a ping comes more often than every
//! 5 minutes without a call. A call to an idle connection whose peer vanished is covered
//! by hedging (idempotent calls), the deadline, and the connect timeout of the connection
//! that replaces it.

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{BoxError, config::ClientConfig, registry::Node};

/// A lazily connected channel to `node` with `config`'s connect timeout, keepalive and TLS:
/// over TLS when the config has a CA, checking that the server's certificate names the
/// service (not its address).
pub fn connect_lazily(node: &Node, config: &ClientConfig) -> Result<Channel, BoxError> {
    let tls = config.tls.as_ref().and_then(|tls| Some((tls, tls.ca.as_ref()?)));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", node.address))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    if !config.keepalive_interval.is_zero() {
        endpoint = endpoint
            .http2_keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout)
            .keep_alive_while_idle(false);
    }
    if let Some((tls, ca)) = tls {
        let mut tls_config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(node.name.clone());
        if let Some((cert, key)) = &tls.identity {
            tls_config = tls_config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls_config)?;
    }
    Ok(endpoint.connect_lazy())
}
