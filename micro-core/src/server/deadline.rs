//! The caller's deadline, kept by the server: a call whose handler has not answered when
//! the caller's `grpc-timeout` runs out ends with `DEADLINE_EXCEEDED`, the code gRPC gives
//! an expired deadline, and its handler is dropped. tonic's own timer on the same header
//! would answer `CANCELLED`, which a caller in Go, Java or Python reports as a cancellation
//! when it reaches them before their own timer fires; this timer starts first, so it ends
//! the call first.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Sleep;
use tonic::{Status, body::Body};

use crate::client::requested_timeout;

/// Ends each call at its caller's deadline with `DEADLINE_EXCEEDED`.
#[derive(Clone)]
pub(crate) struct DeadlineLayer {
    service: Arc<str>,
}

impl DeadlineLayer {
    pub(crate) fn new(service: &str) -> Self {
        DeadlineLayer { service: service.into() }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, service: self.service.clone() }
    }
}

/// The service [`DeadlineLayer`] makes.
#[derive(Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
    service: Arc<str>,
}

impl<S> tower::Service<http::Request<Body>> for Deadline<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The timer is made before the inner call, so it is never due after tonic's.
        let timer = requested_timeout(&request)
            .map(|timeout| (tokio::time::sleep(timeout), Expired { service: self.service.clone(), timeout }));
        let (sleep, expired) = timer.unzip();
        DeadlineFuture { inner: self.inner.call(request), sleep, expired }
    }
}

/// What an expired call is told.
struct Expired {
    service: Arc<str>,
    timeout: Duration,
}

pin_project_lite::pin_project! {
    /// The answer of a [`Deadline`]: the inner service's, or `DEADLINE_EXCEEDED` once the
    /// caller's deadline has passed.
    pub(crate) struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        expired: Option<Expired>,
    }
}

impl<F, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let ready @ Poll::Ready(_) = this.inner.poll(cx) {
            return ready;
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => {
                std::task::ready!(sleep.poll(cx));
                let Expired { service, timeout } = this.expired.take().expect("a deadline ends a call once");
                let status = Status::deadline_exceeded(format!(
                    "{service}: the caller's deadline of {timeout:?} passed before the handler answered"
                ));
                Poll::Ready(Ok(status.into_http()))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::{BufMut, Bytes, BytesMut};
    use prost::Message as _;
    use test_proto::{Labelled, echo::echo_server::EchoServer, say};

    use crate::{Server, config::ServerConfig, registry::MemoryRegistry};

    /// A gRPC call to `/echo.Echo/Say` over a bare HTTP/2 connection, which keeps no timer
    /// of its own: the status it ends with is the server's, whenever it comes.
    async fn say_over_bare_http2(
        address: std::net::SocketAddr,
        message: test_proto::echo::Message,
        timeout: &str,
    ) -> http::HeaderMap {
        let tcp = tokio::net::TcpStream::connect(address).await.expect("the server accepts");
        let (client, connection) = h2::client::handshake(tcp).await.expect("an HTTP/2 handshake");
        let connection = tokio::spawn(connection);
        let mut client = client.ready().await.expect("a stream");
        let request = http::Request::post(format!("http://{address}/echo.Echo/Say"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", timeout)
            .body(())
            .unwrap();
        let (response, mut send) = client.send_request(request, false).expect("the request is sent");
        let encoded = message.encode_to_vec();
        let mut frame = BytesMut::with_capacity(5 + encoded.len());
        frame.put_u8(0);
        frame.put_u32(encoded.len() as u32);
        frame.put_slice(&encoded);
        send.send_data(frame.freeze(), true).expect("the message is sent");
        let response = response.await.expect("an answer");
        let (parts, mut body) = response.into_parts();
        let mut status = parts.headers;
        while let Some(data) = body.data().await {
            let _: Bytes = data.expect("the body");
        }
        if let Some(trailers) = body.trailers().await.expect("the trailers") {
            status.extend(trailers);
        }
        connection.abort();
        status
    }

    #[tokio::test]
    async fn a_handler_past_the_callers_deadline_ends_the_call_with_deadline_exceeded() {
        let server = Server::builder("deadline-kept")
            .config(ServerConfig { address: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() })
            .registry(Arc::new(MemoryRegistry::new()))
            .add_service(EchoServer::new(Labelled::new("a")))
            .start()
            .await
            .expect("the server starts");
        let slow = test_proto::echo::Message { delay_ms: 60_000, ..say("slow") };
        let status = say_over_bare_http2(server.local_addr(), slow, "200m").await;
        assert_eq!(status["grpc-status"], "4", "DEADLINE_EXCEEDED: {status:?}");
        let message = status["grpc-message"].to_str().unwrap();
        assert!(message.contains("deadline-kept"), "the message names the service: {message}");

        let quick = say_over_bare_http2(server.local_addr(), say("quick"), "10S").await;
        assert_eq!(quick["grpc-status"], "0", "{quick:?}");
    }
}
