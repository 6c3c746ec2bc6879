//! `micro call` on streaming methods, as a real process, against the SDK's echo service
//! (`echo.proto`: `Count`, `Collect`, `Chat`) served by this test over real TCP and
//! registered over mDNS (so it runs inside `scripts/netns-run`): replies as JSON lines in
//! order, requests as JSON lines on stdin, a bad line named by its number, and a stream
//! that outlives the 5 s request timeout.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use e2e::{
    discovery::{mdns, wait_for},
    unique_name,
};
use micro_core::{Registry, Server, server::RunningServer};
use serde_json::Value;
use test_proto::{Labelled, echo::echo_server::EchoServer};

const MICRO: &str = env!("CARGO_BIN_EXE_micro");

/// The echo service registered as `name` over mDNS, with its descriptors for reflection.
async fn echo(registry: &Arc<dyn Registry>, name: &str, label: &str) -> RunningServer {
    let server = Server::builder(name)
        .registry(registry.clone())
        .config(micro_core::config::ServerConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .file_descriptor_set(test_proto::FILE_DESCRIPTOR_SET)
        .add_service(EchoServer::new(Labelled::new(label)))
        .start()
        .await
        .expect("the echo server starts");
    wait_for(registry, name, 1).await;
    server
}

fn micro(args: &[&str]) -> Command {
    let mut command = Command::new(MICRO);
    command.args(args).env("MICRO_REGISTRY", "mdns").env_remove("RUST_LOG");
    command
}

/// `micro ARGS` with `input` on stdin; waits for it to exit.
fn micro_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = micro(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("micro runs");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing stdin");
    child.wait_with_output().expect("micro exits")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_lines(output: &Output) -> Vec<Value> {
    text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: a JSON line: {line:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_print_json_lines_and_read_them_from_stdin() {
    let registry = mdns();
    let name = unique_name("echo-streams");
    let _server = echo(&registry, &name, "a").await;

    // Server streaming: exactly N lines, in order, each one JSON object.
    let count = tokio::task::block_in_place(|| {
        micro(&["call", &name, "echo.Echo/Count", r#"{"count": 5}"#]).output().expect("micro runs")
    });
    assert!(count.status.success(), "{}", text(&count.stderr));
    let replies = json_lines(&count);
    let texts: Vec<&str> = replies.iter().map(|r| r["text"].as_str().unwrap_or_default()).collect();
    assert_eq!(texts, ["1", "2", "3", "4", "5"], "{}", text(&count.stdout));
    assert!(replies.iter().all(|r| r["instance"] == "a"), "{}", text(&count.stdout));

    // Client streaming: one request per non-empty line; the reply is one line.
    let input = "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n  \n{\"text\": \"three\"}";
    let collect =
        tokio::task::block_in_place(|| micro_with_stdin(&["call", &name, "echo.Echo/Collect"], input));
    assert!(collect.status.success(), "{}", text(&collect.stderr));
    let replies = json_lines(&collect);
    assert_eq!(replies.len(), 1, "{}", text(&collect.stdout));
    assert_eq!(replies[0]["text"], "one two three", "{}", text(&collect.stdout));

    // Bidirectional: a reply per request line.
    let chat = tokio::task::block_in_place(|| {
        micro_with_stdin(&["call", &name, "echo.Echo/Chat"], "{\"text\": \"hi\"}\n{\"text\": \"there\"}\n")
    });
    assert!(chat.status.success(), "{}", text(&chat.stderr));
    let texts: Vec<Value> = json_lines(&chat).into_iter().map(|r| r["text"].clone()).collect();
    assert_eq!(texts, ["hi", "there"], "{}", text(&chat.stdout));

    // A line that is not a valid echo.Message: exit 1 naming the line; the call is
    // cancelled, so Collect never answers with what came before.
    let bad =
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": 3, \"fail\": \"no\"}\n{\"text\": \"four\"}\n";
    let refused =
        tokio::task::block_in_place(|| micro_with_stdin(&["call", &name, "echo.Echo/Collect"], bad));
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stdin line 3") && stderr.contains("echo.Message"), "{stderr}");
    assert!(stderr.contains("nothing more was sent"), "{stderr}");
    assert_eq!(text(&refused.stdout), "", "no reply for a cancelled input");
    let malformed = tokio::task::block_in_place(|| {
        micro_with_stdin(&["call", &name, "echo.Echo/Collect"], "{not json\n")
    });
    assert_eq!(malformed.status.code(), Some(1), "{}", text(&malformed.stderr));
    assert!(text(&malformed.stderr).contains("stdin line 1"), "{}", text(&malformed.stderr));

    // A JSON argument for a client-streaming method says where its requests come from.
    let argument = tokio::task::block_in_place(|| {
        micro_with_stdin(&["call", &name, "echo.Echo/Collect", r#"{"text": "x"}"#], "")
    });
    assert_eq!(argument.status.code(), Some(1), "{}", text(&argument.stderr));
    assert!(text(&argument.stderr).contains("read from stdin"), "{}", text(&argument.stderr));

    // A failing stream exits with the call's code: FAILED_PRECONDITION is 64 + 9.
    let failed = tokio::task::block_in_place(|| {
        micro_with_stdin(&["call", &name, "echo.Echo/Chat"], "{\"text\": \"ok\"}\n{\"fail\": true}\n")
    });
    assert_eq!(failed.status.code(), Some(73), "{}", text(&failed.stderr));
    assert!(
        text(&failed.stderr).contains(&format!("call {name} echo.Echo/Chat")),
        "{}",
        text(&failed.stderr)
    );

    // Unary calls are unchanged: pretty JSON.
    let say = tokio::task::block_in_place(|| {
        micro(&["call", &name, "echo.Echo/Say", r#"{"text": "plain"}"#]).output().expect("micro runs")
    });
    assert!(say.status.success(), "{}", text(&say.stderr));
    let reply: Value = serde_json::from_slice(&say.stdout).expect("one JSON reply");
    assert_eq!(reply["text"], "plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_request_timeout() {
    let registry = mdns();
    let name = unique_name("echo-forever");
    let _server = echo(&registry, &name, "b").await;

    // A client stream whose input stays open while the server stream below runs: its
    // reply comes after the 5 s request timeout, which does not apply to it.
    let mut collect = micro(&["call", &name, "echo.Echo/Collect"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("micro runs");
    let mut input = collect.stdin.take().expect("stdin");
    input.write_all(b"{\"text\": \"before\"}\n").expect("writing stdin");

    // 400 ms between messages: the 16th comes at least 6 s after the call began, past the
    // 5 s request timeout (a deadline that cut the stream would end it with
    // DEADLINE_EXCEEDED before then).
    let mut child = micro(&["call", &name, "echo.Echo/Count", r#"{"count": 0, "intervalMs": 400}"#])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("micro runs");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().take(16).collect::<Result<Vec<String>, _>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(60), lines)
        .await
        .expect("16 messages within 60 s")
        .expect("the reader")
        .expect("stdout lines");
    child.kill().expect("stopping micro");
    let status = child.wait().expect("micro exits");
    let stderr = child.stderr.take().map(|mut e| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut e, &mut text).ok();
        text
    });
    assert_eq!(lines.len(), 16, "the stream ended early ({status:?}): {stderr:?}");
    let last: Value = serde_json::from_str(&lines[15]).expect("a JSON line");
    assert_eq!(last["text"], "16", "{lines:?}");

    // Failing here (micro gone, stdin closed) shows in the exit status below.
    let _ = input.write_all(b"{\"text\": \"after\"}\n");
    drop(input);
    let collected = tokio::task::block_in_place(|| collect.wait_with_output()).expect("micro exits");
    assert!(collected.status.success(), "{}", text(&collected.stderr));
    assert_eq!(json_lines(&collected)[0]["text"], "before after", "{}", text(&collected.stdout));
}
