//! The metrics page: no caller can grow it, Prometheus' own linter accepts it, its content
//! type matches its format, and the announced scrape address is one peers can reach.
//!
//! One test per binary that floods: the metrics are per process, so a test running beside
//! it would add series of its own.

use std::{path::PathBuf, process::Stdio, str::FromStr, sync::Arc, time::Duration};

use http::uri::PathAndQuery;
use micro_core::{Client, Server, config::ServerConfig, labels, registry::MemoryRegistry};
use test_proto::{
    Labelled,
    echo::{Message, Reply, echo_client::EchoClient, echo_server::EchoServer},
};
use tokio::io::AsyncWriteExt;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Sample lines of a page (one per series).
fn series(page: &str) -> Vec<&str> {
    page.lines().filter(|line| !line.is_empty() && !line.starts_with('#')).collect()
}

async fn scrape(address: &str, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("http://{address}/metrics"));
    if let Some(accept) = accept {
        request = request.header(http::header::ACCEPT, accept);
    }
    let response = request.send().await.expect("scrape");
    let content_type = response.headers()[http::header::CONTENT_TYPE].to_str().unwrap().to_owned();
    (content_type, response.text().await.unwrap())
}

/// Calls `path` on `channel` as a unary call with echo's messages; returns the status code.
async fn call_path<C>(channel: C, path: &str) -> tonic::Code
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return tonic::Code::Unavailable;
    }
    let codec = tonic_prost::ProstCodec::<Message, Reply>::default();
    let path = PathAndQuery::from_str(path).unwrap();
    match grpc.unary(tonic::Request::new(Message::default()), path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// Where `scripts/install-prometheus` puts promtool (Prometheus 2.42, Debian's package).
fn promtool() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/prometheus/usr/bin/promtool");
    assert!(
        path.exists(),
        "promtool not found at {}: run scripts/install-prometheus (or make test-deps), which unpacks \
         Debian's prometheus 2.42 package into .tools/prometheus",
        path.display()
    );
    path
}

async fn promtool_check(page: &str) -> (bool, String) {
    let mut child = tokio::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(page.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("promtool must not hang")
        .unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), said)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_made_up_paths_adds_no_series_and_promtool_accepts_the_page() {
    let registry = MemoryRegistry::new();
    let server = Server::builder("flooded")
        .config(ServerConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            metrics_address: Some("127.0.0.1:0".parse().unwrap()),
            ..ServerConfig::default()
        })
        .registry(Arc::new(registry.clone()))
        .file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
        .add_service(EchoServer::new(Labelled::new("a")))
        .start()
        .await
        .unwrap();
    let metrics = server.node().metadata[labels::METRICS].clone();
    let client = Client::new(Arc::new(registry)).idempotent_methods(test_proto::IDEMPOTENT_METHODS);
    let named = client.channel("flooded");
    let raw = tonic::transport::Endpoint::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Every kind of outcome once, through the SDK's client and a raw one, so that every
    // series a flood could touch exists before the first count.
    let mut echo = EchoClient::new(named.clone());
    echo.say(Message { text: "hi".into(), ..Message::default() }).await.unwrap();
    let failed = echo.say(Message { fail: true, ..Message::default() }).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition);
    for path in ["/evil.Warmup/M", "/echo.Echo/Warmup"] {
        assert_eq!(call_path(raw.clone(), path).await, tonic::Code::Unimplemented);
        assert_eq!(call_path(named.clone(), path).await, tonic::Code::Unimplemented);
    }
    let (_, before) = scrape(&metrics, None).await;
    assert!(
        before.contains(r#"micro_server_requests_total{method="/echo.Echo/Say",code="OK"} 1"#),
        "{before}"
    );
    assert!(before.contains(r#"method="unknown""#), "made-up paths count as unknown: {before}");
    assert!(
        before.contains(
            r#"micro_client_requests_total{service="flooded",method="/echo.Echo/Say",code="OK"} 1"#
        ),
        "client RED metrics: {before}"
    );

    // 3,000 made-up paths: new services, and new methods of the served service.
    for i in 0..1_500 {
        let path = if i % 2 == 0 { format!("/evil.Svc{i}/M{i}") } else { format!("/echo.Echo/Made{i}") };
        assert_eq!(call_path(raw.clone(), &path).await, tonic::Code::Unimplemented);
        assert_eq!(call_path(named.clone(), &path).await, tonic::Code::Unimplemented);
    }
    let (content_type, after) = scrape(&metrics, None).await;
    assert_eq!(
        series(&before).len(),
        series(&after).len(),
        "the flood added series:\n{}",
        series(&after)
            .iter()
            .filter(|s| !before.contains(**s))
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        after.contains(r#"micro_server_requests_total{method="unknown",code="UNIMPLEMENTED"} 3004"#),
        "{after}"
    );

    // Prometheus text unless OpenMetrics is asked for, and promtool accepts it.
    assert_eq!(content_type, PROMETHEUS_TEXT);
    assert!(!after.contains("# EOF"), "no OpenMetrics terminator in Prometheus text");
    assert!(after.contains("# HELP micro_server_requests_total "), "{after}");
    assert!(after.contains("# TYPE micro_server_requests_total counter"), "{after}");
    let (ok, said) = promtool_check(&after).await;
    assert!(ok, "promtool check metrics failed:\n{said}\npage:\n{after}");

    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, open) = scrape(&metrics, Some(prometheus_accept)).await;
    assert_eq!(content_type, OPENMETRICS);
    assert!(open.ends_with("# EOF\n"), "{open}");
    let (content_type, _) = scrape(&metrics, Some("text/plain")).await;
    assert_eq!(content_type, PROMETHEUS_TEXT);

    // Every family has help text, in both formats.
    for page in [&after, &open] {
        for line in page.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(page.contains(&format!("# HELP {name} ")), "no help for {name}");
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_announced_metrics_address_is_the_advertised_one_on_a_wildcard_bind() {
    let server = Server::builder("announced")
        .config(ServerConfig {
            address: "0.0.0.0:0".parse().unwrap(),
            advertise: Some("192.0.2.7".into()),
            metrics_address: Some("0.0.0.0:0".parse().unwrap()),
            ..ServerConfig::default()
        })
        .registry(Arc::new(MemoryRegistry::new()))
        .add_service(EchoServer::new(Labelled::new("a")))
        .start()
        .await
        .unwrap();
    let port = server.metrics_addr().expect("metrics served").port();
    assert_eq!(server.node().metadata[labels::METRICS], format!("192.0.2.7:{port}"));
    drop(server);
}
