//! A client's TLS connections: each new connection to an instance is handshaken with the
//! client configuration in force at that moment, checking the server's certificate against
//! the service name called (not the instance's address).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::TlsSource;
use crate::BoxError;

/// Connects to the URI's `host:port` over TLS, for `Endpoint::connect_with_connector_lazy`.
#[derive(Clone)]
pub struct TlsConnector {
    source: TlsSource,
    server_name: ServerName<'static>,
}

impl TlsConnector {
    /// Connections that check the server's certificate names `service`. Fails when the
    /// name cannot be a TLS server name.
    pub fn new(source: TlsSource, service: &str) -> Result<TlsConnector, BoxError> {
        Ok(TlsConnector { source, server_name: ServerName::try_from(service.to_owned())? })
    }
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.source.client_config();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let config = config.ok_or("TLS without a CA to check servers against")?;
            let host = uri.host().ok_or("an instance address without a host")?;
            let port = uri.port_u16().ok_or("an instance address without a port")?;
            let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
