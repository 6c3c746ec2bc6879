//! The `micro` command against running services over mDNS, and on the memory registry.

use e2e::{
    discovery::{mdns, wait_for},
    process::{Process, binary},
    unique_name,
};

fn micro(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = std::process::Command::new(binary("micro"));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("micro runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn services_describe_health_call_and_why_over_mdns() {
    let registry = mdns();
    let name = unique_name("vessel");
    let _vessel = Process::start(
        "vessel-service",
        &[],
        &[("MICRO_SERVER_NAME", &name), ("MICRO_SERVER_METADATA", "zone=test")],
    );
    let node = wait_for(&registry, &name, 1).await.remove(0);

    let (ok, out, err) = micro(&["services"], &[]);
    assert!(ok && out.lines().any(|l| l == name), "{out}{err}");

    let (ok, out, err) = micro(&["describe", &name, "--output", "json"], &[]);
    assert!(ok, "{err}");
    let described: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(described[0]["id"], node.id.as_str());
    assert_eq!(described[0]["address"], node.address.to_string());
    assert_eq!(described[0]["metadata"]["zone"], "test");
    assert!(described[0]["metadata"]["metrics"].is_string(), "the metrics address is announced: {out}");
    assert_eq!(described[0]["health"], "SERVING", "{out}");

    let (ok, out, err) = micro(&["health", &name], &[]);
    assert!(ok && out.contains("SERVING") && out.contains(&node.id), "{out}{err}");

    let (ok, out, err) = micro(
        &["call", &name, "vessel.VesselService/FindAvailable", r#"{"capacity": 3, "max_weight": 55000}"#],
        &[],
    );
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["vessel"]["id"], "vessel001", "{out}");

    let (ok, _, err) = micro(
        &["call", &name, "vessel.VesselService/FindAvailable", r#"{"capacity": 9999, "max_weight": 1}"#],
        &[],
    );
    assert!(!ok && err.contains("FAILED_PRECONDITION"), "{err}");

    let (ok, out, err) = micro(&["why", &name, "--version", "0.0.0-other", "--output", "json"], &[]);
    assert!(!ok && err.contains("none is pickable"), "nothing is pickable under that filter: {err}");
    let why: serde_json::Value = serde_json::from_str(&out).unwrap();
    let verdict = why["instances"][0]["verdict"].as_str().unwrap();
    assert!(verdict.starts_with("filtered out: version"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn why_suggests_a_near_name_that_is_registered() {
    let registry = mdns();
    let name = unique_name("vessel");
    let _vessel = Process::start("vessel-service", &[], &[("MICRO_SERVER_NAME", &name)]);
    wait_for(&registry, &name, 1).await;
    let typo = name.replacen("vessel", "vesel", 1);
    let (ok, out, err) = micro(&["why", &typo, "--lookup-timeout", "500"], &[]);
    assert!(!ok, "nothing is pickable under the typo: {out}{err}");
    assert!(out.contains(&format!("no instance of {typo} in registry mdns")), "{out}");
    assert!(out.contains("similar names registered") && out.contains(&name), "{out}");
    // Every command that takes a name suggests it, over mDNS too.
    for command in ["describe", "health", "call"] {
        let (ok, _, err) = micro(
            &[command, &typo, "greeter.Greeter/SayHello"][..if command == "call" { 3 } else { 2 }],
            &[],
        );
        assert!(!ok && err.contains(&format!("did you mean {name}?")), "{command}: {err}");
    }
}

#[test]
fn on_the_memory_registry_micro_sees_only_its_own_process() {
    let (ok, out, err) = micro(&["services"], &[("MICRO_REGISTRY", "memory")]);
    assert!(ok && out.trim().is_empty(), "{out}{err}");
    assert!(err.contains("no services registered in registry memory"), "{err}");
    let (ok, _, err) = micro(
        &["describe", "vessel-service"],
        &[("MICRO_REGISTRY", "memory"), ("MICRO_LOOKUP_TIMEOUT", "100")],
    );
    assert!(!ok && err.contains("no instance of vessel-service in registry memory"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn why_names_the_configured_strategy_and_shows_what_the_client_measured() {
    let registry = mdns();
    let name = unique_name("vessel");
    let _a = Process::start("vessel-service", &[], &[("MICRO_SERVER_NAME", &name)]);
    let _b = Process::start("vessel-service", &[], &[("MICRO_SERVER_NAME", &name)]);
    wait_for(&registry, &name, 2).await;

    let (ok, out, err) = micro(&["why", &name, "--output", "json"], &[]);
    assert!(ok, "{out}{err}");
    let why: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(why["strategy"], "peak-ewma", "{out}");
    assert_eq!(why["next_picks"].as_array().map(Vec::len), Some(4), "{out}");
    for instance in why["instances"].as_array().unwrap() {
        assert!(instance["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "each instance measured: {out}");
        assert!(instance["ejected"].is_null(), "{out}");
    }

    let (ok, out, err) = micro(&["why", &name], &[("MICRO_CLIENT_SELECTOR", "round-robin")]);
    assert!(ok && out.contains("next picks (round-robin"), "{out}{err}");
    assert!(out.contains("latency ") && out.contains(" ms"), "{out}");
}
