//! Bad input fails before any network use, with a one-line reason that says what to fix.

use assert_cmd::cargo::cargo_bin_cmd;

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn malformed_json_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    std::fs::write(
        &path,
        "{\n  \"weight\": 55000,\n  \"containers\": [ {\"origin\": \"Derby\"} ]\n  \"description\": \"x\"\n}",
    )
    .unwrap();
    let output = cargo_bin_cmd!("consignment-cli").arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains(&format!("{}:4:3", path.display())), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn an_empty_file_is_reported_at_line_1_column_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.json");
    std::fs::write(&path, "").unwrap();
    let output = cargo_bin_cmd!("consignment-cli").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(
        stderr.starts_with(&format!("error: {}:1:1: ", path.display())) && stderr.contains("empty"),
        "{stderr}"
    );
    // An error at the start of a later line is at column 1 too, not 0.
    std::fs::write(&path, "{\"weight\": 1,\n").unwrap();
    let stderr = stderr_of(&cargo_bin_cmd!("consignment-cli").arg(&path).output().unwrap());
    assert!(!stderr.contains(":0: "), "{stderr}");
}

#[test]
fn misspelt_field_is_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.json");
    std::fs::write(&path, r#"{"wieght": 55000, "containers": []}"#).unwrap();
    let output = cargo_bin_cmd!("consignment-cli").arg(&path).output().unwrap();
    assert!(!output.status.success());
    assert!(stderr_of(&output).contains("unknown field `wieght`"), "{}", stderr_of(&output));
}

#[test]
fn missing_file_names_the_path() {
    let output = cargo_bin_cmd!("consignment-cli").arg("/no/such/consignment.json").output().unwrap();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("/no/such/consignment.json") && stderr.contains("No such file"), "{stderr}");
}

#[test]
fn unknown_registry_lists_the_valid_ones() {
    let output = cargo_bin_cmd!("consignment-cli").env("MICRO_REGISTRY", "zookeeper").output().unwrap();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("'zookeeper'") && stderr.contains("mdns, consul, memory, etcd, dns"), "{stderr}");
}

#[test]
fn default_file_is_consignment_json_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let output = cargo_bin_cmd!("consignment-cli").current_dir(dir.path()).output().unwrap();
    assert!(stderr_of(&output).contains("consignment.json"), "{}", stderr_of(&output));
}

#[test]
fn unusable_request_id_is_refused_before_any_call() {
    for (id, reason) in [("has space", "printable ASCII"), (&*"k".repeat(129), "1 to 128 bytes")] {
        let output = cargo_bin_cmd!("consignment-cli").args(["--request-id", id]).output().unwrap();
        assert!(!output.status.success());
        let stderr = stderr_of(&output);
        assert!(stderr.contains("--request-id") && stderr.contains(reason), "{stderr}");
    }
}
