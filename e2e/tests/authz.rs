//! Shippy behind mutual TLS and authorization policies, with the real binaries over mDNS:
//! `micro certs` makes the CA and a certificate per service, vessel-service serves only
//! consignment-service, consignment-service serves consignment-cli (creations) and
//! vessel-service (settling reservations). A creation through consignment-cli works end to
//! end; the same CLI identity calling vessel-service directly is denied, naming itself.

use std::path::Path;

use e2e::{
    discovery::{mdns, wait_for},
    process::{Process, binary, env_refs},
    shippy::{self, sample_consignment},
    unique_name,
};

const TRUST_DOMAIN: &str = "shippy.test";

/// The environment that gives a process `name`'s certificate and the CA in `dir`.
fn tls_env(dir: &Path, name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MICRO_TLS_CA", dir.join("ca.pem").display().to_string()),
        ("MICRO_TLS_CERT", dir.join(format!("{name}.pem")).display().to_string()),
        ("MICRO_TLS_KEY", dir.join(format!("{name}-key.pem")).display().to_string()),
    ]
}

fn run_micro(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(binary("micro"))
        .args(args)
        .envs(env.iter().copied())
        .env("MICRO_LOOKUP_TIMEOUT", "3000")
        .output()
        .expect("micro runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn shippy_serves_only_what_its_policies_allow() {
    e2e::require_private_netns();
    let registry = mdns();
    let (vessel, consignment, cli) = (unique_name("vessel"), unique_name("consignment"), unique_name("cli"));
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = run_micro(
        &[
            "certs",
            "--dir",
            &certs.display().to_string(),
            "--trust-domain",
            TRUST_DOMAIN,
            &vessel,
            &consignment,
            &cli,
        ],
        &[],
    );
    assert!(made.status.success(), "micro certs: {}", String::from_utf8_lossy(&made.stderr));
    for name in [&vessel, &consignment, &cli] {
        assert!(
            certs.join(format!("{name}.pem")).is_file() && certs.join(format!("{name}-key.pem")).is_file()
        );
    }
    let id = |name: &str| format!("spiffe://{TRUST_DOMAIN}/svc/{name}");
    let vessel_policy = dir.path().join("vessel-policy.yaml");
    std::fs::write(
        &vessel_policy,
        format!(
            "rules:\n  - callers: [\"{}\"]\n    methods: [\"vessel.VesselService/*\"]\n    effect: allow\n",
            id(&consignment)
        ),
    )
    .unwrap();
    let consignment_policy = dir.path().join("consignment-policy.yaml");
    std::fs::write(
        &consignment_policy,
        format!(
            "rules:\n  - callers: [\"{}\"]\n    methods: [\"consignment.ShippingService/*\"]\n    effect: allow\n  \
             - callers: [\"{}\"]\n    methods: [\"consignment.ShippingService/SettleReservation\"]\n    effect: allow\n",
            id(&cli),
            id(&vessel)
        ),
    )
    .unwrap();

    let mut vessel_env = tls_env(&certs, &vessel);
    vessel_env.push(("MICRO_SERVER_NAME", vessel.clone()));
    vessel_env.push(("MICRO_AUTHZ_POLICY", vessel_policy.display().to_string()));
    let _vessel = Process::start("vessel-service", &[], &env_refs(&vessel_env));
    let mut consignment_env = tls_env(&certs, &consignment);
    consignment_env.push(("MICRO_SERVER_NAME", consignment.clone()));
    consignment_env.push(("VESSEL_SERVICE", vessel.clone()));
    consignment_env.push(("MICRO_AUTHZ_POLICY", consignment_policy.display().to_string()));
    let _consignment =
        Process::start("consignment-service", &["--db", ":memory:"], &env_refs(&consignment_env));
    wait_for(&registry, &vessel, 1).await;
    wait_for(&registry, &consignment, 1).await;

    // The CLI creates through consignment-service, which reserves at vessel-service.
    let cli_env = tls_env(&certs, &cli);
    let run = shippy::run_cli(&consignment, &sample_consignment(), &[], &env_refs(&cli_env)).await;
    assert!(run.success, "creation under the policies: {}\n{}", run.stdout, run.stderr);

    // The CLI's identity calling vessel-service directly: denied, naming the caller.
    let mut env = env_refs(&cli_env);
    env.push(("MICRO_REGISTRY", "mdns"));
    let denied = run_micro(
        &["call", &vessel, "vessel.VesselService/FindAvailable", r#"{"capacity": 1, "max_weight": 1}"#],
        &env,
    );
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success());
    assert!(stderr.contains("PERMISSION_DENIED") || stderr.contains("permission"), "{stderr}");
    assert!(stderr.contains(&id(&cli)), "names the caller: {stderr}");

    // Without a certificate nothing gets through, not even to consignment-service.
    let anonymous = shippy::run_cli(
        &consignment,
        &sample_consignment(),
        &[],
        &[("MICRO_TLS_CA", &certs.join("ca.pem").display().to_string())],
    )
    .await;
    assert!(!anonymous.success, "a caller without a certificate: {}", anonymous.stdout);

    // And `micro authz check` explains both decisions.
    let policy = vessel_policy.display().to_string();
    let check = |caller: &str| {
        run_micro(
            &[
                "authz",
                "check",
                "--policy",
                &policy,
                "--trust-domain",
                TRUST_DOMAIN,
                caller,
                &vessel,
                "vessel.VesselService/Reserve",
            ],
            &[],
        )
    };
    let allowed = check(&consignment);
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("allowed by rule 1"));
    let denied = check(&cli);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("default deny"));
}
