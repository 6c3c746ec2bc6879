//! `make run` checks its variables before it builds or starts anything: a registry or broker
//! the demo cannot run on stops it at once, saying which ones it can.

use std::process::Command;

use e2e::process::workspace_root;

/// `make run VARS` with cargo replaced by `false`, so a check that let a bad value through
/// would fail at the build, not start a service: (exit code, stderr).
fn make_run(vars: &[&str]) -> (Option<i32>, String) {
    let output = Command::new("make")
        .arg("--no-print-directory")
        .arg("run")
        .args(vars)
        .arg("CARGO=false")
        .current_dir(workspace_root())
        .env_remove("MICRO_REGISTRY")
        .env_remove("MICRO_BROKER")
        .output()
        .unwrap_or_else(|err| panic!("make could not run ({err}): apt-get install make"));
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn an_unknown_registry_or_broker_stops_make_run_before_the_build() {
    let cases = [
        ("MICRO_REGISTRY=zookeeper", "mdns (the default, no server), consul or etcd"),
        ("MICRO_REGISTRY=memory", "never find each other"),
        ("MICRO_BROKER=kafka", "registry (the default, no server), nats or rabbitmq"),
        ("MICRO_DEMO_CONSUL_PORT=eighty", "a port number"),
    ];
    for (var, says) in cases {
        let (code, stderr) = make_run(&[var]);
        assert_ne!(code, Some(0), "{var}: {stderr}");
        assert!(stderr.contains(&format!("make run: {var}")) && stderr.contains(says), "{var}: {stderr}");
        assert!(!stderr.contains("build"), "{var}: stopped before the build: {stderr}");
    }
}
