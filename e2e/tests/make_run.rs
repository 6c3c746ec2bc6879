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

/// The demo with zero trust (`make run MICRO_DEMO_SECURE=true` runs `scripts/demo` so), on a
/// host of its own so its fixed names meet no other test's: both consignments (CLI, gateway)
/// are stored and their events booked over mutual TLS, and `micro`, under its own
/// certificate, is refused by vessel-service's policy.
#[test]
fn the_secure_demo_books_both_consignments_and_vessel_service_refuses_micro() {
    e2e::require_private_netns();
    let bins =
        ["vessel-service", "consignment-service", "consignment-cli", "micro"].map(e2e::process::binary);
    let bin_dir = bins[0].parent().expect("the binaries' folder").to_path_buf();
    let network = e2e::hosts::Network::new(1);
    let output = network
        .host(0)
        .command("bash")
        .arg(workspace_root().join("scripts").join("demo"))
        .current_dir(workspace_root())
        .env("MICRO_DEMO_SECURE", "true")
        .env("MICRO_BIN_DIR", &bin_dir)
        .env("MICRO_GATEWAY_ADDRESS", "127.0.0.1:18080")
        .env_remove("MICRO_REGISTRY")
        .env_remove("MICRO_BROKER")
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|err| panic!("bash could not run scripts/demo: {err}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.matches("consignment booked").count(), 2, "both events booked:\n{stdout}\n{stderr}");
    let refusal =
        "PERMISSION_DENIED: spiffe://shippy/svc/micro may not call vessel.VesselService/FindAvailable";
    assert!(stderr.contains(refusal) || stdout.contains(refusal), "micro refused:\n{stdout}\n{stderr}");
}
