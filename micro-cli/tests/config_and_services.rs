//! The `micro` command as a child process: configuration precedence and listing services.

use assert_cmd::cargo::cargo_bin_cmd;

fn settings(cmd: &mut assert_cmd::Command) -> serde_json::Value {
    let output = cmd.args(["config", "--output", "json"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn flag_beats_environment_beats_default() {
    let defaults =
        settings(cargo_bin_cmd!("micro").env_remove("MICRO_REGISTRY").env_remove("MICRO_LOOKUP_TIMEOUT"));
    assert_eq!(defaults["registry"]["value"], "mdns");
    assert_eq!(defaults["registry"]["source"], "default");

    let from_env =
        settings(cargo_bin_cmd!("micro").env("MICRO_REGISTRY", "memory").env("MICRO_LOOKUP_TIMEOUT", "750"));
    assert_eq!(from_env["registry"]["value"], "memory");
    assert_eq!(from_env["registry"]["source"], "env MICRO_REGISTRY");
    assert_eq!(from_env["lookup_timeout"]["value"], "750");

    let from_flag =
        settings(cargo_bin_cmd!("micro").env("MICRO_REGISTRY", "memory").args(["--registry", "consul"]));
    assert_eq!(from_flag["registry"]["value"], "consul");
    assert_eq!(from_flag["registry"]["source"], "flag");
}

#[test]
fn unknown_registry_in_the_environment_lists_the_valid_ones() {
    let output = cargo_bin_cmd!("micro").env("MICRO_REGISTRY", "zookeeper").arg("services").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("'zookeeper'") && stderr.contains("mdns, consul, memory"), "{stderr}");
}
