//! The SDK's own test service, `echo.proto`, and a ready implementation of it.
//!
//! `Echo.Say` is idempotent (`NO_SIDE_EFFECTS`), `Echo.Record` is not; both answer with the
//! text and the label of the instance that answered, after `delay_ms`, or
//! `FAILED_PRECONDITION` when `fail` is set.
//!
//! # Examples
//! ```
//! use test_proto::{Labelled, echo::echo_server::EchoServer};
//! let service = EchoServer::new(Labelled::new("a"));
//! # drop(service);
//! assert_eq!(test_proto::IDEMPOTENT_METHODS, ["/echo.Echo/Say"]);
//! ```

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tonic::{Request, Response, Status};

/// `echo.proto`: generated messages, client and server.
#[allow(missing_docs)]
pub mod echo {
    tonic::include_proto!("echo");
}

use echo::{Message, Reply, echo_server::Echo};

/// The encoded `FileDescriptorSet` of `echo.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// The methods `echo.proto` marks safe to retry.
pub const IDEMPOTENT_METHODS: &[&str] = &["/echo.Echo/Say"];

/// The service name `echo.proto` declares, as health checks name it.
pub const SERVICE_NAME: &str = "echo.Echo";

/// An `Echo` implementation that answers with its label and counts its calls.
#[derive(Debug, Clone)]
pub struct Labelled {
    label: String,
    calls: Arc<AtomicUsize>,
}

impl Labelled {
    /// An instance that answers with `label`.
    pub fn new(label: impl Into<String>) -> Self {
        Labelled { label: label.into(), calls: Arc::default() }
    }

    /// Calls answered or refused so far (shared by clones).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn answer(&self, request: Request<Message>) -> Result<Response<Reply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let message = request.into_inner();
        if message.delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(message.delay_ms.into())).await;
        }
        if message.fail {
            return Err(Status::failed_precondition(format!("{} was asked to fail", self.label)));
        }
        Ok(Response::new(Reply { text: message.text, instance: self.label.clone() }))
    }
}

#[tonic::async_trait]
impl Echo for Labelled {
    async fn say(&self, request: Request<Message>) -> Result<Response<Reply>, Status> {
        self.answer(request).await
    }

    async fn record(&self, request: Request<Message>) -> Result<Response<Reply>, Status> {
        self.answer(request).await
    }
}

/// A `Say` request with `text`.
pub fn say(text: &str) -> Message {
    Message { text: text.into(), ..Message::default() }
}
