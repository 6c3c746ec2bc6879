//! One error style across every binary: a single `error: what: why` line on stderr and
//! exit 1 (micro: its documented code), never anyhow's `Error: …` / `Caused by:` block.

use std::process::Command;

use e2e::process::binary;

/// Runs `name` and fails unless it exits with `code` after one `error:` line naming
/// `names`; returns what it wrote on stderr.
fn fails_in_one_line(name: &str, args: &[&str], env: &[(&str, &str)], code: i32, names: &str) -> String {
    let mut command = Command::new(binary(name));
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap_or_else(|err| panic!("{name}: {err}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{name}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(names), "{name}: {stderr}");
    assert!(!stderr.contains("Caused by") && !stderr.contains("panicked"), "{name}: {stderr}");
    stderr.into_owned()
}

#[test]
fn every_binary_reports_a_failure_in_one_error_line() {
    let missing = "/no/such/dir/file";
    fails_in_one_line("vessel-service", &["--fleet", missing], &[], 1, missing);
    fails_in_one_line("consignment-service", &["--db", missing], &[], 1, missing);
    fails_in_one_line("consignment-cli", &[missing], &[], 1, missing);
    let nowhere = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", "127.0.0.1:1")];
    fails_in_one_line("micro", &["services"], &nowhere, 5, "127.0.0.1:1");
}

/// A registry, a broker or a port that cannot be had is one line that says what happened
/// where (`connection refused`, `could not bind …`), not a dump of the transport's error types.
#[test]
fn unreachable_peers_and_taken_ports_are_summarised_not_dumped() {
    for registry in ["etcd", "consul"] {
        let env = [("MICRO_REGISTRY", registry), ("MICRO_REGISTRY_ADDRESS", "127.0.0.1:1")];
        let stderr = fails_in_one_line("micro", &["services"], &env, 5, "127.0.0.1:1");
        assert!(
            stderr.contains(&format!("{registry} at 127.0.0.1:1: status check: connection refused;")),
            "{stderr}"
        );
        assert_no_dump(&stderr);
    }
    for broker in ["nats", "rabbitmq"] {
        let env = [("MICRO_BROKER", broker), ("MICRO_BROKER_ADDRESS", "127.0.0.1:1")];
        let stderr = fails_in_one_line("micro", &["publish", "orders", "{}"], &env, 6, "127.0.0.1:1");
        assert!(stderr.contains(&format!("broker {broker} at 127.0.0.1:1: connection refused;")), "{stderr}");
        assert_no_dump(&stderr);
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let address = taken.local_addr().expect("held address").to_string();
    let env = [("MICRO_SERVER_ADDRESS", address.as_str()), ("RUST_LOG", "warn")];
    let stderr = fails_in_one_line("vessel-service", &["--db", ":memory:"], &env, 1, &address);
    assert!(stderr.contains(&format!("could not bind {address}")), "{stderr}");
}

/// Fails if `stderr` shows the insides of a transport error.
fn assert_no_dump(stderr: &str) {
    for inside in ["tonic::transport", "ConnectError", "Os {", "os error", "Status {"] {
        assert!(!stderr.contains(inside), "{inside:?} in: {stderr}");
    }
}
