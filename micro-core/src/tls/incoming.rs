//! A server's TLS connections: each accepted TCP connection is handshaken, in a task of its
//! own, with the server configuration in force at that moment, and handed to tonic once
//! the handshake succeeded (a failed handshake is logged at debug and dropped).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::TlsSource;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to take them.
const QUEUE: usize = 64;

/// The TLS connections of a listener, for `serve_with_incoming`. Dropping it stops accepting.
pub struct TlsIncoming {
    connections: mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsIncoming {
    /// Accepts on `listener` with `source`'s server configuration (client certificates
    /// required when `require_client_certificates`). Needs a tokio runtime.
    pub fn new(listener: TcpListener, source: TlsSource, require_client_certificates: bool) -> TlsIncoming {
        let (sender, connections) = mpsc::channel(QUEUE);
        let accept = tokio::spawn(accept(listener, source, require_client_certificates, sender));
        TlsIncoming { connections, accept }
    }
}

async fn accept(
    listener: TcpListener,
    source: TlsSource,
    require_client_certificates: bool,
    sender: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    let mut handshakes = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            Some(_) = handshakes.join_next() => continue,
            () = sender.closed() => return,
        };
        let Some(config) = source.server_config(require_client_certificates) else {
            tracing::error!("TLS without a server identity: connection dropped");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sender = sender.clone();
        handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = sender.send(Ok(tls)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl futures::Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx)
    }
}
