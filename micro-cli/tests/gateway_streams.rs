//! `micro gateway` serving server-streaming methods, as a real process in front of the SDK's
//! echo service (`echo.proto`'s `Count`), which this test serves over real TCP and registers
//! over mDNS (so it runs inside `scripts/netns-run`); read with curl and with headless
//! Chromium: server-sent events and NDJSON in order with their end and error, a stream past
//! the 5 s request timeout that is dropped once its client leaves, the refusals (406, 501,
//! 405), and the dashboard's live feed.
//!
//! These live beside the `micro` tests rather than in `e2e/tests/gateway.rs` because the
//! echo service (`test-proto`) is a dependency of this package's tests, not of e2e's.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;

use e2e::{
    browser::{chromium_run, percent_encoded},
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    process::Process,
    unique_name,
};
use micro_core::{Registry, Server, server::RunningServer};
use serde_json::Value;
use test_proto::{
    Labelled, ReplyStream,
    echo::{
        CountRequest,
        echo_server::{Echo, EchoServer},
    },
};

const MICRO: &str = env!("CARGO_BIN_EXE_micro");

/// The echo service registered as `name` over mDNS, with its descriptors for reflection.
async fn echo(registry: &Arc<dyn Registry>, name: &str) -> RunningServer {
    serve(registry, name, EchoServer::new(Labelled::new("streamer"))).await
}

/// `service` registered as `name` over mDNS, with echo's descriptors for reflection.
async fn serve<S: Echo>(registry: &Arc<dyn Registry>, name: &str, service: EchoServer<S>) -> RunningServer {
    let server = Server::builder(name)
        .registry(registry.clone())
        .config(micro_core::config::ServerConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
        .add_service(service)
        .start()
        .await
        .expect("the echo server starts");
    wait_for(registry, name, 1).await;
    server
}

/// A running `micro gateway` and its base URL.
struct Gateway {
    process: Process,
    url: String,
}

impl Gateway {
    /// Starts the gateway on a port the system picks and waits until it lists `name`.
    async fn start(name: &str) -> Gateway {
        Gateway::start_with(name, &[], &[]).await
    }

    /// As [`Gateway::start`], with extra `args`; `headers` go with its listing requests.
    async fn start_with(name: &str, args: &[&str], headers: &[(&str, &str)]) -> Gateway {
        let mut all = vec!["gateway", "--address", "127.0.0.1:0"];
        all.extend(args);
        let process = Process::spawn(
            "micro-gateway",
            Command::new(MICRO),
            &all,
            &[("MICRO_REGISTRY", "mdns"), ("MICRO_LOOKUP_TIMEOUT", "1500")],
        );
        let url = e2e::gateway::url_of(&process).await;
        let http = reqwest::Client::new();
        poll_until(format!("the gateway listing {name}"), STARTUP, async || {
            let mut listing = http.get(format!("{url}/"));
            for (header, value) in headers {
                listing = listing.header(*header, *value);
            }
            let listed: Value = listing.send().await.ok()?.json().await.ok()?;
            listed["services"].as_array()?.iter().any(|l| l == name).then_some(())
        })
        .await;
        Gateway { process, url }
    }

    /// `micro_gateway_open_streams` on the gateway's metrics page.
    async fn open_streams(&self) -> Option<f64> {
        let page = reqwest::get(format!("{}/metrics", self.url)).await.ok()?.text().await.ok()?;
        page.lines()
            .find_map(|l| l.strip_prefix("micro_gateway_open_streams "))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// curl with `args`, waited for; its stdout, and its exit status must be success.
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl").arg("-sS").args(args).output().expect("curl runs");
    assert!(output.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `(event, data)` pairs of a server-sent event stream; `message` for events without a name.
fn sse_events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
        .map(|block| {
            let mut event = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = name.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value.to_owned();
                }
            }
            (event, data)
        })
        .collect()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_as_sse_and_ndjson() {
    let registry = mdns();
    let name = unique_name("echo-gateway");
    let _server = echo(&registry, &name).await;
    let gateway = Gateway::start(&name).await;
    let count = format!("{}/{name}/echo.Echo/Count", gateway.url);

    // SSE: N data events in order, then the end event with the gRPC status.
    let sse = tokio::task::block_in_place(|| {
        curl(&[
            "-N",
            "-H",
            "Accept: text/event-stream",
            "-H",
            "x-request-id: sse-1",
            "-D",
            "-",
            "-d",
            r#"{"count": 5}"#,
            &count,
        ])
    });
    let (head, body) = sse.split_once("\r\n\r\n").expect("headers, then the stream");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("x-request-id: sse-1"), "the request id comes back: {head}");
    let events = sse_events(body);
    assert_eq!(events.len(), 6, "{body}");
    for (i, (event, data)) in events[..5].iter().enumerate() {
        assert_eq!(event, "message", "{body}");
        assert_eq!(json(data)["text"], (i + 1).to_string(), "{body}");
        assert_eq!(json(data)["instance"], "streamer", "{body}");
    }
    assert_eq!(events[5].0, "end", "{body}");
    assert_eq!(json(&events[5].1)["code"], "OK", "{body}");

    // NDJSON: one object per line, nothing after the last.
    let ndjson = tokio::task::block_in_place(|| {
        curl(&["-N", "-H", "Accept: application/x-ndjson", "-d", r#"{"count": 4}"#, &count])
    });
    let texts: Vec<Value> = ndjson.lines().map(|l| json(l)["text"].clone()).collect();
    assert_eq!(texts, ["1", "2", "3", "4"], "{ndjson}");
    // No Accept at all (curl's `*/*`): NDJSON too.
    let plain = tokio::task::block_in_place(|| curl(&["-d", r#"{"count": 2}"#, &count]));
    assert_eq!(plain.lines().count(), 2, "{plain}");

    // A stream that fails: X-Timeout bounds the whole stream; SSE ends with the error
    // event, NDJSON with an error line, each with the gRPC status.
    let endless = r#"{"count": 0, "intervalMs": 50}"#;
    let sse = tokio::task::block_in_place(|| {
        curl(&["-N", "-H", "Accept: text/event-stream", "-H", "X-Timeout: 1s", "-d", endless, &count])
    });
    let events = sse_events(&sse);
    let (last, messages) = events.split_last().expect("events");
    assert!(!messages.is_empty() && messages.iter().all(|(e, _)| e == "message"), "{sse}");
    assert_eq!(last.0, "error", "{sse}");
    assert_eq!(json(&last.1)["code"], "DEADLINE_EXCEEDED", "{sse}");
    assert!(
        json(&last.1)["message"].as_str().unwrap_or_default().contains(&name),
        "names the service: {sse}"
    );
    let ndjson = tokio::task::block_in_place(|| {
        curl(&["-N", "-H", "Accept: application/x-ndjson", "-H", "X-Timeout: 1s", "-d", endless, &count])
    });
    let last = json(ndjson.lines().last().expect("lines"));
    assert_eq!(last["error"]["code"], "DEADLINE_EXCEEDED", "{ndjson}");
    assert!(ndjson.lines().count() > 1, "{ndjson}");

    // GET, as EventSource asks: the request in ?body=.
    let get = tokio::task::block_in_place(|| {
        curl(&["-N", "-H", "Accept: text/event-stream", &format!("{count}?body=%7B%22count%22%3A3%7D")])
    });
    assert_eq!(sse_events(&get).iter().filter(|(e, _)| e == "message").count(), 3, "{get}");

    // Refusals, each saying what to do.
    let http = reqwest::Client::new();
    let refused = http.post(&count).header("accept", "application/json").body("{}").send().await.unwrap();
    assert_eq!(refused.status(), 406);
    let text = refused.text().await.unwrap();
    assert!(text.contains("text/event-stream") && text.contains("application/x-ndjson"), "{text}");
    let collect = format!("{}/{name}/echo.Echo/Collect", gateway.url);
    let refused = http.post(&collect).body(r#"{"text": "a"}"#).send().await.unwrap();
    assert_eq!(refused.status(), 501);
    let text = refused.text().await.unwrap();
    assert!(text.contains("client-streaming") && text.contains("micro call"), "{text}");
    let say = format!("{}/{name}/echo.Echo/Say", gateway.url);
    let refused = http.get(&say).send().await.unwrap();
    assert_eq!(refused.status(), 405, "a unary method is still POST only");
    let reply: Value =
        http.post(&say).body(r#"{"text": "unary"}"#).send().await.unwrap().json().await.unwrap();
    assert_eq!(reply["text"], "unary");
    let bad = http.post(&count).body(r#"{"count": "many"}"#).send().await.unwrap();
    assert_eq!(bad.status(), 400, "bad JSON is refused before any stream");

    // SIGTERM with a stream open: the stream ends with UNAVAILABLE, and the gateway stops.
    let mut curl = Command::new("curl")
        .args(["-sSN", "-H", "Accept: text/event-stream", "-d", r#"{"count": 0, "intervalMs": 100}"#, &count])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl runs");
    let mut lines = BufReader::new(curl.stdout.take().expect("stdout")).lines();
    let first = tokio::task::block_in_place(|| lines.next()).expect("a first event").expect("a line");
    assert!(first.starts_with("data: "), "{first}");
    let mut gateway = gateway;
    gateway.process.signal("TERM");
    let rest =
        tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let rest = tokio::time::timeout(Duration::from_secs(30), rest).await.expect("the stream ends").unwrap();
    let (event, data) = sse_events(&rest).pop().expect("a last event");
    assert_eq!(event, "error", "{rest}");
    assert_eq!(json(&data)["code"], "UNAVAILABLE", "{rest}");
    let status = gateway.process.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "the gateway stops cleanly with a stream open: {status:?}");
    let _ = curl.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_unary_timeout_and_ends_when_its_client_leaves() {
    let registry = mdns();
    let name = unique_name("echo-long");
    let _server = echo(&registry, &name).await;
    let gateway = Gateway::start(&name).await;
    let count = format!("{}/{name}/echo.Echo/Count", gateway.url);

    // 400 ms between messages: the 16th comes at least 6 s after the first, past the 5 s
    // request timeout, which would otherwise end the stream.
    let mut curl = Command::new("curl")
        .args(["-sSN", "-H", "Accept: text/event-stream", "-d", r#"{"count": 0, "intervalMs": 400}"#, &count])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl runs");
    let stdout = curl.stdout.take().expect("stdout");
    let data = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter(|line| !line.is_empty())
            .take(16)
            .collect::<Vec<String>>()
    });
    let data =
        tokio::time::timeout(Duration::from_secs(60), data).await.expect("16 events within 60 s").unwrap();
    assert_eq!(data.len(), 16, "the stream ended early: {data:?}");
    assert!(data.iter().all(|l| l.starts_with("data: ")), "only messages, no end or error: {data:?}");
    assert_eq!(json(data[15].trim_start_matches("data: "))["text"], "16", "{data:?}");
    assert_eq!(gateway.open_streams().await, Some(1.0), "the stream is open");

    // The client leaves: the gateway drops the stream, and with it the upstream call.
    curl.kill().expect("stopping curl");
    curl.wait().expect("curl exits");
    poll_until("the gateway closing the stream its client left", STARTUP, async || {
        (gateway.open_streams().await? == 0.0).then_some(())
    })
    .await;

    // So does an idle one (a minute between replies), as NDJSON, which sends nothing while idle.
    let mut curl = Command::new("curl")
        .args([
            "-sSN",
            "-H",
            "Accept: application/x-ndjson",
            "-d",
            r#"{"count": 0, "intervalMs": 60000}"#,
            &count,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl runs");
    let mut lines = BufReader::new(curl.stdout.take().expect("stdout")).lines();
    let first = tokio::task::block_in_place(|| lines.next()).expect("a first reply").expect("a line");
    assert_eq!(json(&first)["text"], "1", "{first}");
    assert_eq!(gateway.open_streams().await, Some(1.0), "the idle stream is open");
    curl.kill().expect("stopping curl");
    curl.wait().expect("curl exits");
    poll_until("the gateway closing the idle stream its client left", STARTUP, async || {
        (gateway.open_streams().await? == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_live_feed_in_a_real_browser() {
    let registry = mdns();
    let name = unique_name("echo-feed");
    let _server = echo(&registry, &name).await;
    let gateway = Gateway::start(&name).await;

    // 150 replies: the page keeps the last 100, newest first, and says the stream ended.
    let url = format!(
        "{}/ui?feed={}&feed_body={}",
        gateway.url,
        percent_encoded(&format!("{name}/echo.Echo/Count")),
        percent_encoded(r#"{"count": 150}"#)
    );
    let dom = chromium_run(&["--dump-dom"], &url).await;

    assert!(dom.contains(&format!(r#"data-feed="{name}/echo.Echo/Count""#)), "Count is listed:\n{dom}");
    assert!(!dom.contains(&format!(r#"data-feed="{name}/echo.Echo/Say""#)), "unary methods are not:\n{dom}");
    assert!(!dom.contains(&format!(r#"data-feed="{name}/echo.Echo/Chat""#)), "nor client streams:\n{dom}");
    let status = dom.split(r#"id="feed-status""#).nth(1).expect("the feed status");
    assert!(status.starts_with(r#" data-state="ended""#), "the stream ended:\n{status}");
    let feed = dom.split(r#"id="feed""#).nth(1).expect("the feed").split("</ol>").next().unwrap_or_default();
    let texts: Vec<String> = feed
        .split("<li ")
        .skip(1)
        .map(|item| {
            let data = item.split_once("<code>").map(|(_, rest)| rest).unwrap_or_default();
            let data = data.split("</code>").next().unwrap_or_default().replace("&quot;", "\"");
            json(&data)["text"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(texts.len(), 100, "the last 100 are kept:\n{feed}");
    assert_eq!(texts.first().map(String::as_str), Some("150"), "newest first:\n{feed}");
    assert_eq!(texts.last().map(String::as_str), Some("51"), "{feed}");

    // A screenshot for people, kept with the test logs, out of the repository.
    let screenshot = e2e::process::workspace_root().join("target").join("e2e-logs").join("live-feed.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium_run(&[&format!("--screenshot={}", screenshot.display()), "--window-size=1200,1000"], &url).await;
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "chromium wrote a screenshot to {}", screenshot.display());
}

/// Echo's `Count` that counts the replies the stream has produced, i.e. those its caller
/// (the gateway) took.
struct CountingCount {
    inner: Labelled,
    produced: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Echo for CountingCount {
    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let replies = self.inner.count(request).await?.into_inner();
        let produced = self.produced.clone();
        let counted = replies.inspect(move |_| {
            produced.fetch_add(1, Ordering::SeqCst);
        });
        Ok(tonic::Response::new(Box::pin(counted)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_holds_the_stream_back() {
    let registry = mdns();
    let name = unique_name("echo-slow-reader");
    let produced = Arc::new(AtomicU64::new(0));
    let service = CountingCount { inner: Labelled::new("counted"), produced: produced.clone() };
    let _server = serve(&registry, &name, EchoServer::new(service)).await;
    let gateway = Gateway::start(&name).await;

    // An endless stream as fast as the service can make it, asked by a client that reads
    // the first bytes and then nothing more.
    let address = gateway.url.trim_start_matches("http://").to_owned();
    let mut reader = tokio::net::TcpStream::connect(&address).await.expect("the gateway accepts");
    let body = r#"{"count": 0}"#;
    let request = format!(
        "POST /{name}/echo.Echo/Count HTTP/1.1\r\nhost: {address}\r\naccept: application/x-ndjson\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    reader.write_all(request.as_bytes()).await.expect("sending the request");
    let mut first = vec![0; 4096];
    let read = reader.read(&mut first).await.expect("the first bytes");
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"), "{:?}", &first[..read]);

    // The service stops producing once the buffers between it and the reader are full: the
    // count settles (unchanged over 40 polls), far below what an endless stream would reach.
    let mut last = (0, 0);
    let settled = poll_until("the stalled stream's replies settling", Duration::from_secs(60), async || {
        let now = produced.load(Ordering::SeqCst);
        last = if now == last.0 { (now, last.1 + 1) } else { (now, 0) };
        (last.1 >= 40).then_some(now)
    })
    .await;
    eprintln!("{settled} replies produced for a reader that stopped after {read} bytes");
    assert!(settled > 0 && settled < 2_000_000, "{settled} replies held for a reader that does not read");
    assert_eq!(gateway.open_streams().await, Some(1.0));

    // The reader goes: the stream is dropped.
    drop(reader);
    poll_until("the gateway closing the stalled stream", STARTUP, async || {
        (gateway.open_streams().await? == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_go_through_authentication_rate_limits_and_metrics() {
    let registry = mdns();
    let name = unique_name("echo-guarded");
    let _server = echo(&registry, &name).await;
    let key = "a-key-for-the-stream-tests-0123456789";
    let hash: String = ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = tempfile::NamedTempFile::new().expect("a key file");
    std::fs::write(keys.path(), format!("streams sha256:{hash}\n")).expect("writing the key file");
    let keys_path = keys.path().to_str().expect("a UTF-8 path").to_owned();
    let gateway = Gateway::start_with(
        &name,
        &["--api-keys-file", &keys_path, "--rate-limit", "0.01", "--rate-burst", "2"],
        &[("x-api-key", key)],
    )
    .await;
    let count = format!("{}/{name}/echo.Echo/Count", gateway.url);
    let http = reqwest::Client::new();
    let sse = |request: reqwest::RequestBuilder| {
        request.header("accept", "text/event-stream").body(r#"{"count": 2}"#)
    };

    // Two calls in a burst, refused credentials counting: no key is 401.
    let refused = sse(http.post(&count)).send().await.unwrap();
    assert_eq!(refused.status(), 401, "{}", refused.text().await.unwrap_or_default());
    // With the key: the stream, to its end.
    let streamed = sse(http.post(&count).header("x-api-key", key)).send().await.unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.iter().filter(|(e, _)| e == "message").count(), 2, "{text}");
    assert_eq!(events.last().map(|(e, _)| e.as_str()), Some("end"), "{text}");
    // The burst is spent: 429 with Retry-After, before any stream.
    let limited = sse(http.post(&count).header("x-api-key", key)).send().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));

    // The stream that ended is counted with its method once it ended.
    let line = format!(
        r#"micro_gateway_requests_total{{service="{name}",method="echo.Echo/Count",status="200"}} 1"#
    );
    let page = reqwest::get(format!("{}/metrics", gateway.url)).await.unwrap().text().await.unwrap();
    assert!(page.contains(&line), "{line} in:\n{page}");
}
