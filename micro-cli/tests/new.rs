//! `micro new` as a newcomer uses it: the crate it writes in a temporary folder builds and
//! passes its own test (`cargo build`, `cargo test`), its server runs as a real process over
//! mDNS, and `micro call` and the crate's client reach it by name. The crate builds in the
//! workspace's target folder (`CARGO_TARGET_DIR`), so what the workspace already compiled
//! is reused, and offline, from the crates cargo already has.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use e2e::{
    discovery::{mdns, wait_for},
    process::{Process, workspace_root},
};

const MICRO: &str = env!("CARGO_BIN_EXE_micro");

/// The scaffolded service: one name, so rebuilds reuse its artifacts; nothing else
/// registers it.
const NAME: &str = "newcomer";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The target folder the workspace builds into.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// `cargo ARGS` in the scaffolded crate, offline, in the workspace's target folder.
fn cargo(dir: &Path, args: &[&str]) -> Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(&cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("CARGO_NET_OFFLINE", "true")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap_or_else(|err| panic!("{cargo} could not run ({err}): install Rust with rustup"));
    assert!(
        output.status.success(),
        "cargo {args:?} in {} failed:\n{}{}",
        dir.display(),
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

fn micro(args: &[&str]) -> Output {
    Command::new(MICRO)
        .args(args)
        .env("MICRO_REGISTRY", "mdns")
        .env_remove("RUST_LOG")
        .output()
        .expect("micro runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_service_builds_tests_runs_and_answers_micro_call_and_its_client() {
    let temp = tempfile::tempdir().expect("a temporary folder");
    let dir = temp.path().join(NAME);
    let dir_arg = dir.to_str().expect("a UTF-8 path");
    let made = micro(&["new", NAME, "--path", dir_arg, "--subscriber", "newcomer.greeted"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let said = text(&made.stdout);
    assert!(said.contains("micro call newcomer newcomer.Newcomer/Hello"), "{said}");
    assert!(said.contains("it is not on crates.io yet"), "{said}");
    for file in ["Cargo.toml", "build.rs", "proto/newcomer.proto", "src/main.rs", "README.md"] {
        assert!(dir.join(file).is_file(), "{file} missing: {said}");
    }
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let micro_core = workspace_root().join("micro-core").canonicalize().unwrap();
    assert!(manifest.contains(&format!("path = {:?}", micro_core.display().to_string())), "{manifest}");

    cargo(&dir, &["build", "--bins"]);
    backends_left_out_name_their_feature(&target_dir().join("debug").join(NAME));
    let tested = cargo(&dir, &["test"]);
    let summary = text(&tested.stdout);
    assert!(summary.contains("test answers_a_call_by_name ... ok"), "{summary}");
    assert!(summary.contains("test handles_an_event ... ok"), "{summary}");

    // `cargo run` runs this binary: a real process, on mDNS in the private namespace.
    let registry = mdns();
    let server_bin = target_dir().join("debug").join(NAME);
    let server = Process::spawn(
        NAME,
        Command::new(&server_bin),
        &[],
        &[("MICRO_REGISTRY", "mdns"), ("MICRO_BROKER", "registry")],
    );
    wait_for(&registry, NAME, 1).await;
    assert!(server.log().contains("subscribed"), "subscribed before it registered: {}", server.log());

    let call = micro(&["call", NAME, "newcomer.Newcomer/Hello", r#"{"name": "you"}"#]);
    assert!(call.status.success(), "{}", text(&call.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&call.stdout).expect("JSON");
    assert_eq!(reply["message"], "Hello, you!");

    // Without the package, `micro call` names the method meant, as the gateway does.
    let short = micro(&["call", NAME, "Newcomer/Hello", r#"{"name": "you"}"#]);
    let stderr = text(&short.stderr);
    assert_eq!(short.status.code(), Some(64 + 5), "{stderr}");
    assert!(stderr.contains("did you mean newcomer.Newcomer/Hello?"), "{stderr}");
    assert_eq!(stderr.matches("call newcomer").count(), 1, "said once: {stderr}");

    // The method's name alone is enough when one service has it; a name none has is answered
    // with the methods there are.
    let bare = micro(&["call", NAME, "Hello", r#"{"name": "you"}"#]);
    assert!(bare.status.success(), "{}", text(&bare.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&bare.stdout).expect("JSON");
    assert_eq!(reply["message"], "Hello, you!");
    let unknown = micro(&["call", NAME, "Add", "{}"]);
    let stderr = text(&unknown.stderr);
    assert!(!unknown.status.success(), "{stderr}");
    assert!(stderr.contains("newcomer.Newcomer/Hello"), "the methods there are: {stderr}");

    let client_bin = target_dir().join("debug").join(format!("{NAME}-client"));
    let client = Command::new(client_bin)
        .arg("you")
        .env("MICRO_REGISTRY", "mdns")
        .env("MICRO_BROKER", "registry")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(text(&client.stdout), "Hello, you!\n", "{}", text(&client.stderr));
    assert!(client.status.success(), "{}", text(&client.stderr));
    drop(server);
}

/// The scaffolded crate builds micro-core with `cli` and `mdns` only, as a first service
/// would: a backend asked for through the environment that this build leaves out stops the
/// server at start with the micro-core feature to enable. (`make test` builds micro-core with
/// every feature everywhere else, so this is where a build without them is checked.)
fn backends_left_out_name_their_feature(server_bin: &Path) {
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("MICRO_REGISTRY", "etcd")],
            r#"registry etcd is not compiled in: enable micro-core's "etcd" feature"#,
        ),
        (
            &[("MICRO_REGISTRY", "dns")],
            r#"registry dns is not compiled in: enable micro-core's "dns" feature"#,
        ),
        (
            &[("MICRO_BROKER", "nats")],
            r#"broker nats is not compiled in: enable micro-core's "nats" feature"#,
        ),
        (
            &[("MICRO_BROKER", "rabbitmq")],
            r#"broker rabbitmq is not compiled in: enable micro-core's "rabbitmq" feature"#,
        ),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")],
            r#"trace export over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) is not compiled in: enable micro-core's "otlp" feature"#,
        ),
    ];
    for (env, expected) in cases {
        let mut command = Command::new(server_bin);
        command
            .env("MICRO_REGISTRY", "memory")
            .env("MICRO_BROKER", "registry")
            .env("MICRO_SERVER_ADDRESS", "127.0.0.1:0")
            .env("MICRO_METRICS_ADDRESS", "off")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("RUST_LOG");
        command.envs(env.iter().copied());
        let output = command.output().expect("the scaffolded server runs");
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{env:?} should stop it at start: {stderr}");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
    }
}

#[test]
fn micro_new_refuses_a_folder_in_use_and_a_name_it_cannot_use() {
    let temp = tempfile::tempdir().expect("a temporary folder");
    std::fs::write(temp.path().join("keep.txt"), "mine").unwrap();
    let dir = temp.path().to_str().unwrap();
    let output = micro(&["new", "counter", "--path", dir]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("exists and is not empty"), "{}", text(&output.stderr));
    assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 1, "nothing written");

    let output = micro(&["new", "My_Service", "--path", dir]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("lowercase letters"), "{}", text(&output.stderr));

    let output = micro(&["new", "counter", "--path", dir, "--micro-core", "/nonexistent/micro-core"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("--micro-core"), "{}", text(&output.stderr));
}

/// The commands of the README's quick start, in order: each line of its `sh` blocks, with
/// comments and blank lines dropped.
fn quick_start_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("the README");
    let section = readme
        .split("\n## Quick start")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has a `## Quick start` section");
    let mut commands = Vec::new();
    let mut inside = false;
    for line in section.lines() {
        if line.starts_with("```") {
            inside = !inside && line == "```sh";
            continue;
        }
        if inside {
            let command = line.split(" # ").next().unwrap_or_default().trim();
            if !command.is_empty() {
                commands.push(command.to_owned());
            }
        }
    }
    commands
}

/// Every command of the README's quick start, run as a newcomer would, in a temporary
/// folder standing for the clone's parent: `../counter` is made there, built, tested and
/// run; the client and `micro call` reach it. A command this test does not know fails it,
/// so the README cannot show a quick start nobody ran.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_quick_start_runs_as_written() {
    let temp = tempfile::tempdir().expect("a temporary folder");
    let crate_dir = temp.path().join("counter");
    let crate_arg = crate_dir.to_str().expect("a UTF-8 path").to_owned();
    let registry = mdns();
    let mut server = None;
    let commands = quick_start_commands();
    assert!(commands.len() >= 5, "the quick start's commands: {commands:?}");
    let mut dir = workspace_root();
    for command in &commands {
        match command.as_str() {
            // The test harness built it: this is the binary MICRO names.
            "cargo build -p micro-cli" => assert!(Path::new(MICRO).is_file()),
            "target/debug/micro new counter --path ../counter" => {
                let made = micro(&["new", "counter", "--path", &crate_arg]);
                assert!(made.status.success(), "{command}: {}", text(&made.stderr));
            }
            "cd ../counter" => dir = crate_dir.clone(),
            "cargo test" => {
                let tested = cargo(&dir, &["test"]);
                assert!(text(&tested.stdout).contains("test answers_a_call_by_name ... ok"), "{command}");
            }
            "cargo run" => {
                cargo(&dir, &["build", "--bins"]);
                let binary = target_dir().join("debug").join("counter");
                let env = [("MICRO_REGISTRY", "mdns")];
                server = Some(Process::spawn("counter", Command::new(binary), &[], &env));
                wait_for(&registry, "counter", 1).await;
            }
            "cargo run --bin counter-client -- you" => {
                let client = Command::new(target_dir().join("debug").join("counter-client"))
                    .arg("you")
                    .env("MICRO_REGISTRY", "mdns")
                    .env_remove("RUST_LOG")
                    .output()
                    .unwrap();
                assert_eq!(text(&client.stdout), "Hello, you!\n", "{command}: {}", text(&client.stderr));
            }
            r#"../micro/target/debug/micro call counter counter.Counter/Hello '{"name": "you"}'"# => {
                let call = micro(&["call", "counter", "counter.Counter/Hello", r#"{"name": "you"}"#]);
                assert!(call.status.success(), "{command}: {}", text(&call.stderr));
                let reply: serde_json::Value = serde_json::from_slice(&call.stdout).expect("JSON");
                assert_eq!(reply["message"], "Hello, you!");
            }
            other => panic!(
                "the README's quick start runs {other:?}, which this test does not know: run it here too"
            ),
        }
    }
    assert!(server.is_some(), "the quick start runs the service: {commands:?}");
}
