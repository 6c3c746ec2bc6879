//! The shippy pieces tests share: running consignment-cli, fleet files, asking for a vessel,
//! the sample consignment.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};

use crate::process::{binary, workspace_root};

/// What a consignment-cli run printed, and whether it succeeded.
pub struct CliRun {
    /// Exit status 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliRun {
    /// The id in the "created consignment ID on vessel ..." line; panics without one.
    pub fn created_id(&self) -> String {
        self.stdout
            .lines()
            .find_map(|line| line.strip_prefix("created consignment "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no created line in: {}", self.stdout))
            .to_owned()
    }
}

/// Runs consignment-cli on `file` against the consignment service registered as
/// `consignment_name`, with extra `args` and `env`; fails the test if it takes over 20 s.
pub async fn run_cli(consignment_name: &str, file: &Path, args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let output = tokio::process::Command::new(binary("consignment-cli"))
        .arg(file)
        .args(args)
        .env("CONSIGNMENT_SERVICE", consignment_name)
        .env("MICRO_CLIENT_REQUEST_TIMEOUT", "8000")
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .expect("the CLI must not hang")
        .expect("CLI runs");
    CliRun {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Asks vessel-service (any instance the channel picks) for a vessel that carries 1 unit,
/// and returns the vessel id: in tests, the label of the instance that answered (see
/// [`fleet_file`]).
pub async fn find_vessel(
    vessels: &mut VesselServiceClient<micro_core::NamedChannel>,
) -> Result<String, tonic::Status> {
    let reply = vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await?;
    Ok(reply.into_inner().vessel.unwrap_or_default().id)
}

/// The shipped `consignment-cli/consignment.json`.
pub fn sample_consignment() -> PathBuf {
    workspace_root().join("consignment-cli").join("consignment.json")
}

/// A fleet file in `dir` with one vessel whose id (the label replies carry) is `label`,
/// roomy enough that the bookings of any test's creations never fill it.
pub fn fleet_file(dir: &Path, label: &str) -> PathBuf {
    let path = dir.join(format!("{label}.json"));
    let json = format!(
        r#"[{{"id": "{label}", "name": "{label}", "capacity": 1000000, "max_weight": 2000000000, "available": true}}]"#
    );
    std::fs::write(&path, json).expect("fleet file");
    path
}
