//! The SDK's own test service, `echo.proto`, and a ready implementation of it.
//!
//! `Echo.Say` is idempotent (`NO_SIDE_EFFECTS`), `Echo.Record` is not; both answer with the
//! text and the label of the instance that answered, after `delay_ms`, or
//! `FAILED_PRECONDITION` when `fail` is set. `Echo.Count` streams replies (idempotent),
//! `Echo.Collect` takes a stream and `Echo.Chat` answers each message of a stream.
//!
//! # Examples
//! ```
//! use test_proto::{Labelled, echo::echo_server::EchoServer};
//! let service = EchoServer::new(Labelled::new("a"));
//! # drop(service);
//! assert_eq!(test_proto::IDEMPOTENT_METHODS, ["/echo.Echo/Say", "/echo.Echo/Count"]);
//! ```

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// `echo.proto`: generated messages, client and server.
#[allow(missing_docs)]
pub mod echo {
    tonic::include_proto!("echo");
}

use echo::{CountRequest, Message, Reply, echo_server::Echo};

/// The encoded `FileDescriptorSet` of `echo.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// The methods `echo.proto` marks safe to retry.
pub const IDEMPOTENT_METHODS: &[&str] = &["/echo.Echo/Say", "/echo.Echo/Count"];

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

/// A stream of replies, as the streaming methods answer.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Echo for Labelled {
    async fn count(&self, request: Request<CountRequest>) -> Result<Response<ReplyStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let CountRequest { count, interval_ms } = request.into_inner();
        let instance = self.label.clone();
        let interval = Duration::from_millis(interval_ms.into());
        let numbers = futures::stream::iter(1u64..)
            .take_while(move |n| std::future::ready(count == 0 || *n <= u64::from(count)));
        let replies = numbers.then(move |n: u64| {
            let instance = instance.clone();
            async move {
                if n > 1 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Ok(Reply { text: n.to_string(), instance })
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn collect(&self, request: Request<Streaming<Message>>) -> Result<Response<Reply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut messages = request.into_inner();
        let mut texts = Vec::new();
        while let Some(message) = messages.message().await? {
            if message.fail {
                return Err(Status::failed_precondition(format!("{} was asked to fail", self.label)));
            }
            texts.push(message.text);
        }
        Ok(Response::new(Reply { text: texts.join(" "), instance: self.label.clone() }))
    }

    async fn chat(&self, request: Request<Streaming<Message>>) -> Result<Response<ReplyStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let instance = self.label.clone();
        let replies = request.into_inner().map(move |message| {
            let message = message?;
            match message.fail {
                true => Err(Status::failed_precondition(format!("{instance} was asked to fail"))),
                false => Ok(Reply { text: message.text, instance: instance.clone() }),
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

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
