//! One error style across every binary: a single `error: what: why` line on stderr and
//! exit 1 (micro: its documented code), never anyhow's `Error: …` / `Caused by:` block.

use std::process::Command;

use e2e::process::binary;

fn fails_in_one_line(name: &str, args: &[&str], env: &[(&str, &str)], code: i32, names: &str) {
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
