//! Shippy under Consul Connect (native), the real binaries over a real Consul dev agent
//! (its built-in Connect CA) with `MICRO_CONSUL_CONNECT=true`: each process takes its leaf
//! certificate from the agent, servers authorize callers by the agent's intentions.
//!
//! With `deny * -> vessel` and `allow consignment -> vessel`: a creation through
//! consignment-cli works; `micro call` on vessel-service (presenting `micro`) is denied
//! with PERMISSION_DENIED naming the denial; a caller with a certificate of another CA for
//! consignment-service's own SPIFFE id is refused at the handshake; and once the allow is
//! replaced by a deny, creations fail naming the denial (polled, within the answer cache).

use std::{sync::Arc, time::Duration};

use e2e::{
    calls::poll_until,
    consul::ConsulAgent,
    discovery::wait_for,
    process::{Process, binary, env_refs},
    require_private_netns,
    shippy::{self, sample_consignment},
    unique_name,
};
use micro_core::{
    Client, Registry,
    config::{ClientConfig, TlsConfig},
    registry::ConsulRegistry,
    tls::{Material, TlsSource, Trust, consul_spiffe_id},
};
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};
use serde_json::{Value, json};

/// Bound on waiting for a changed intention to apply: the servers keep an answer 3 s.
const INTENTION_APPLIES: Duration = Duration::from_secs(30);

/// The environment of a process under Consul Connect on the agent at `address`.
fn connect_env(address: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MICRO_REGISTRY", "consul".into()),
        ("MICRO_REGISTRY_ADDRESS", address.into()),
        ("MICRO_CONSUL_CONNECT", "true".into()),
        ("MICRO_REGISTER_TTL", "2".into()),
        ("MICRO_REGISTER_INTERVAL", "1".into()),
    ]
}

async fn consul(address: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let url = format!("http://{address}{path}");
    let mut request = reqwest::Client::new().request(method, &url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap_or_else(|err| panic!("{url}: {err}"));
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Creates the intention `source -> destination` (Consul 1.8's API) and returns its id.
async fn intention(address: &str, source: &str, destination: &str, action: &str) -> String {
    let body = json!({"SourceName": source, "DestinationName": destination, "Action": action});
    let created = consul(address, reqwest::Method::POST, "/v1/connect/intentions", Some(body)).await;
    created["ID"].as_str().expect("an intention id").to_owned()
}

/// Changes the action of the intention `id`.
async fn change_intention(address: &str, id: &str, source: &str, destination: &str, action: &str) {
    let body = json!({"SourceName": source, "DestinationName": destination, "Action": action});
    consul(address, reqwest::Method::PUT, &format!("/v1/connect/intentions/{id}"), Some(body)).await;
}

fn run_micro(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(binary("micro"))
        .args(args)
        .envs(env.iter().copied())
        .env("MICRO_LOOKUP_TIMEOUT", "3000")
        .output()
        .expect("micro runs")
}

/// A certificate and key of a CA of its own (not Consul's) carrying `spiffe_id`.
fn foreign_identity(spiffe_id: &str, name: &str) -> (Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec![name.to_owned()]).unwrap();
    leaf.subject_alt_names.push(SanType::URI(spiffe_id.try_into().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn shippy_under_connect_serves_what_the_intentions_allow() {
    require_private_netns();
    let agent = ConsulAgent::start_async().await;
    let address = agent.http_address();
    let (vessel, consignment) = (unique_name("vessel"), unique_name("consignment"));
    intention(&address, "*", &vessel, "deny").await;
    let allow = intention(&address, &consignment, &vessel, "allow").await;

    let env = connect_env(&address);
    let mut vessel_env = env.clone();
    vessel_env.push(("MICRO_SERVER_NAME", vessel.clone()));
    // Roomy, so the creations made while the changed intention takes effect never fill it.
    let dir = tempfile::tempdir().expect("a temporary folder");
    let fleet = shippy::fleet_file(dir.path(), "connect").display().to_string();
    let _vessel = Process::start("vessel-service", &["--fleet", &fleet], &env_refs(&vessel_env));
    let mut consignment_env = env.clone();
    consignment_env.push(("MICRO_SERVER_NAME", consignment.clone()));
    consignment_env.push(("VESSEL_SERVICE", vessel.clone()));
    let _consignment =
        Process::start("consignment-service", &["--db", ":memory:"], &env_refs(&consignment_env));
    let registry: Arc<dyn Registry> = Arc::new(ConsulRegistry::builder().address(&address).build().unwrap());
    let vessel_node = wait_for(&registry, &vessel, 1).await.remove(0);
    wait_for(&registry, &consignment, 1).await;
    let registered =
        consul(&address, reqwest::Method::GET, &format!("/v1/agent/service/{}", vessel_node.id), None).await;
    assert_eq!(registered["Connect"]["Native"], true, "{registered}");

    // consignment-cli -> consignment-service -> vessel-service, every hop over Connect.
    let created = shippy::run_cli(&consignment, &sample_consignment(), &[], &env_refs(&env)).await;
    assert!(created.success, "creation under the intentions: {}\n{}", created.stdout, created.stderr);
    assert!(created.stdout.contains("created consignment"), "{}", created.stdout);

    // `micro` presents its own leaf (name `micro`): `deny *` applies.
    let roots = consul(&address, reqwest::Method::GET, "/v1/agent/connect/ca/roots", None).await;
    let trust_domain = roots["TrustDomain"].as_str().expect("a trust domain").to_owned();
    let datacenter =
        consul(&address, reqwest::Method::GET, "/v1/agent/self", None).await["Config"]["Datacenter"]
            .as_str()
            .expect("a datacenter")
            .to_owned();
    let denied = run_micro(
        &["call", &vessel, "vessel.VesselService/FindAvailable", r#"{"capacity": 1, "max_weight": 1}"#],
        &env_refs(&env),
    );
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success(), "{}", String::from_utf8_lossy(&denied.stdout));
    assert!(stderr.contains("PERMISSION_DENIED") || stderr.contains("permission"), "{stderr}");
    assert!(
        stderr.contains(&consul_spiffe_id(&trust_domain, &datacenter, "micro")),
        "names the caller: {stderr}"
    );
    assert!(stderr.contains("intention"), "names the denial: {stderr}");
    eprintln!("micro call, denied: {}", stderr.trim());

    // consignment-service's own SPIFFE id, but a certificate of another CA: refused at the
    // handshake, before any intention is asked.
    let ca: String = roots["Roots"]
        .as_array()
        .expect("roots")
        .iter()
        .map(|root| format!("{}\n", root["RootCert"].as_str().expect("a PEM").trim_end()))
        .collect();
    let forged = Material {
        identity: Some(foreign_identity(
            &consul_spiffe_id(&trust_domain, &datacenter, &consignment),
            &consignment,
        )),
        ca: Some(ca.into_bytes()),
    };
    let trust = Trust::ConsulConnect { trust_domain: trust_domain.clone(), datacenter: datacenter.clone() };
    let tls = TlsConfig::from_source(TlsSource::fixed(forged, trust).unwrap());
    let config = ClientConfig { tls: Some(tls), retries: 0, ..ClientConfig::default() };
    let forger = Client::new(registry.clone()).config(config);
    let refused = VesselServiceClient::new(forger.channel(&vessel))
        .find_available(Specification { capacity: 1, max_weight: 1 })
        .await
        .expect_err("a certificate of another CA");
    assert_ne!(
        refused.code(),
        tonic::Code::PermissionDenied,
        "refused at the handshake, not by an intention: {refused:?}"
    );
    assert_ne!(refused.code(), tonic::Code::Ok);
    eprintln!("another CA: {refused:?}");

    // The allow replaced by a deny: creations stop, naming the denial.
    change_intention(&address, &allow, &consignment, &vessel, "deny").await;
    let failed = poll_until("a creation denied by the changed intention", INTENTION_APPLIES, async || {
        let run = shippy::run_cli(&consignment, &sample_consignment(), &[], &env_refs(&env)).await;
        (!run.success).then_some(run)
    })
    .await;
    eprintln!("creation after the change: {}", failed.stderr.trim());
    assert!(failed.stderr.contains("may not call"), "names the denial: {}", failed.stderr);
    assert!(
        failed.stderr.contains(&consul_spiffe_id(&trust_domain, &datacenter, &consignment)),
        "names the caller: {}",
        failed.stderr
    );
}
