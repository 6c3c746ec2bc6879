//! Streams through a named channel: server, client and bidirectional streams of echo.proto
//! against real servers on loopback; a stream outlives the call deadline, a dead instance
//! costs a stream nothing before its headers, the idle deadline ends a silent stream, a
//! stopping server ends its open streams with UNAVAILABLE so they reopen elsewhere, and the
//! server counts each stream's messages both ways.

use std::{sync::Arc, time::Duration};

use e2e::calls::poll_until;
use micro_core::{
    Client, Registry, RunningServer, Server,
    config::{ClientConfig, Hedge, ServerConfig},
    metrics::{StreamLabels, metrics},
    registry::{MemoryRegistry, Node},
};
use test_proto::{
    Labelled,
    echo::{CountRequest, Message, echo_client::EchoClient, echo_server::EchoServer},
};
use tonic::Code;

fn server_config() -> ServerConfig {
    ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        drain_delay: Duration::ZERO,
        shutdown_grace: Duration::from_millis(500),
        ..ServerConfig::default()
    }
}

async fn start(registry: &MemoryRegistry, name: &str, label: &str) -> RunningServer {
    Server::builder(name)
        .config(server_config())
        .registry(Arc::new(registry.clone()))
        .file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
        .add_service(EchoServer::new(Labelled::new(label)))
        .start()
        .await
        .expect("echo server starts")
}

fn client(registry: &MemoryRegistry, config: ClientConfig) -> Client {
    Client::new(Arc::new(registry.clone())).config(config).idempotent_methods(test_proto::IDEMPOTENT_METHODS)
}

fn count(count: u32, interval_ms: u32) -> CountRequest {
    CountRequest { count, interval_ms }
}

fn text(text: &str) -> Message {
    Message { text: text.into(), ..Message::default() }
}

#[tokio::test]
async fn a_server_stream_runs_past_the_call_deadline_and_counts_its_messages() {
    let registry = MemoryRegistry::new();
    let _server = start(&registry, "stream-long", "a").await;
    // The deadline covers the call to its headers; the stream then runs for about 2 s.
    let config = ClientConfig { request_timeout: Duration::from_millis(500), ..ClientConfig::default() };
    let mut echo = EchoClient::new(client(&registry, config).channel("stream-long"));
    let mut replies = echo.count(count(20, 100)).await.expect("the stream opens").into_inner();
    let mut texts = Vec::new();
    while let Some(reply) = replies.message().await.expect("no error mid-stream") {
        texts.push(reply.text);
    }
    let expected: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    assert_eq!(texts, expected);
    let sent = StreamLabels { method: "/echo.Echo/Count".into(), direction: "sent".into() };
    assert!(metrics().server_stream_messages.get_or_create(&sent).get() >= 20, "sent messages counted");
}

#[tokio::test]
async fn client_and_bidirectional_streams_go_through_a_named_channel() {
    let registry = MemoryRegistry::new();
    let _server = start(&registry, "stream-both", "a").await;
    let mut echo = EchoClient::new(client(&registry, ClientConfig::default()).channel("stream-both"));
    let words = ["one", "two", "three"];
    let collected = echo
        .collect(tokio_stream::iter(words.map(text)))
        .await
        .expect("the client stream is answered")
        .into_inner();
    assert_eq!(collected.text, "one two three");
    let received = StreamLabels { method: "/echo.Echo/Collect".into(), direction: "received".into() };
    assert!(
        metrics().server_stream_messages.get_or_create(&received).get() >= 3,
        "received messages counted"
    );

    // Both ways at once: each message is answered before the next is sent.
    let (sender, outgoing) = tokio::sync::mpsc::channel(1);
    let mut replies = echo
        .chat(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("chat opens")
        .into_inner();
    for word in words {
        sender.send(text(word)).await.unwrap();
        let reply = replies.message().await.expect("a reply").expect("the chat is open");
        assert_eq!(reply.text, word);
    }
    drop(sender);
    assert!(replies.message().await.expect("the chat ends cleanly").is_none());
}

#[tokio::test]
async fn a_dead_instance_costs_a_stream_nothing_before_its_headers() {
    let registry = MemoryRegistry::new();
    let _server = start(&registry, "stream-dead", "alive").await;
    // Registered, but nothing listens there: a refused connection, before anything was sent.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    registry.register(&Node::new("stream-dead", dead), Duration::from_secs(60)).await.unwrap();
    let config = ClientConfig { hedge: Hedge::Off, ..ClientConfig::default() };
    let mut echo = EchoClient::new(client(&registry, config).channel("stream-dead"));
    for _ in 0..10 {
        let mut replies = echo.count(count(3, 0)).await.expect("the stream opens elsewhere").into_inner();
        let mut answered = 0;
        while let Some(reply) = replies.message().await.expect("no error mid-stream") {
            assert_eq!(reply.instance, "alive");
            answered += 1;
        }
        assert_eq!(answered, 3);
    }
}

#[tokio::test]
async fn the_idle_deadline_ends_a_silent_stream_with_deadline_exceeded() {
    let registry = MemoryRegistry::new();
    let _server = start(&registry, "stream-idle", "a").await;
    let config = ClientConfig { stream_idle_timeout: Duration::from_millis(300), ..ClientConfig::default() };
    let mut echo = EchoClient::new(client(&registry, config).channel("stream-idle"));
    // Messages every 50 ms keep it alive; then one every minute does not.
    let mut lively = echo.count(count(10, 50)).await.unwrap().into_inner();
    let mut seen = 0;
    while lively.message().await.expect("a lively stream is not cut").is_some() {
        seen += 1;
    }
    assert_eq!(seen, 10);
    let mut silent = echo.count(count(2, 60_000)).await.unwrap().into_inner();
    assert_eq!(silent.message().await.unwrap().unwrap().text, "1");
    let status = silent.message().await.expect_err("the silent stream is ended");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("MICRO_CLIENT_STREAM_IDLE_TIMEOUT"), "{status:?}");
}

#[tokio::test]
async fn a_stopping_server_ends_its_streams_with_unavailable_and_they_reopen_elsewhere() {
    let registry = MemoryRegistry::new();
    let first = start(&registry, "stream-drain", "first").await;
    let mut echo = EchoClient::new(client(&registry, ClientConfig::default()).channel("stream-drain"));
    // Only `first` is registered: the stream opens there.
    let mut replies = echo.count(count(0, 20)).await.unwrap().into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().instance, "first");
    let _second = start(&registry, "stream-drain", "second").await;

    let stopping = tokio::spawn(first.stop());
    let status = loop {
        match replies.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    stopping.await.unwrap().expect("the server stops");

    poll_until("the stream reopening on the other instance", Duration::from_secs(10), async || {
        let mut reopened = echo.count(count(2, 0)).await.ok()?.into_inner();
        let reply = reopened.message().await.ok()??;
        (reply.instance == "second").then_some(())
    })
    .await;
}
