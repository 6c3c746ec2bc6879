//! Figure 12: what zero trust costs. `authz_check_ns`: one decision of an authorization
//! policy with shippy's rules among others, against a hash map that already holds every
//! answer (a perfect cache). `unary_latency_p50_mtls`: FindAvailable through the SDK's named
//! client over mutual TLS (certificates from `micro_core::auth::certs`), against a raw tonic
//! channel with the same certificates and server name to the same release vessel-service.

use std::{collections::HashMap, hint::black_box, sync::Arc, time::Duration};

use micro_core::{Client, Registry, auth::certs::Authority, auth::policy::Policy, config::TlsConfig};
use proto::vessel::vessel_service_client::VesselServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    load::sequential,
    procs::Service,
    report::{Figure, emit, median, quantile},
    wait_pickable,
};

const ROUNDS: usize = 5;
const DECISIONS: usize = 1_000_000;
const SEQUENTIAL_CALLS: usize = 2_000;
const WARM_UP_CALLS: usize = 500;
const TRUST_DOMAIN: &str = "bench.micro";

/// Shippy's rules, after 20 rules of other services, so a decision scans a realistic list.
fn policy_yaml() -> String {
    let mut yaml = String::from("rules:\n");
    for i in 0..20 {
        yaml.push_str(&format!(
            "  - callers: [\"spiffe://{TRUST_DOMAIN}/svc/team-{i}\"]\n    methods: [\"team{i}.Service/*\"]\n    effect: allow\n"
        ));
    }
    yaml.push_str(&format!(
        "  - callers: [\"spiffe://{TRUST_DOMAIN}/svc/consignment-service\"]\n    methods: [\"vessel.VesselService/*\"]\n    effect: allow\n\
         \x20 - callers: [\"spiffe://{TRUST_DOMAIN}/svc/consignment-cli\", \"spiffe://{TRUST_DOMAIN}/svc/gateway\"]\n    methods: [\"consignment.ShippingService/CreateConsignment\"]\n    effect: allow\n\
         \x20 - callers: [\"*\"]\n    methods: [\"vessel.VesselService/Reserve\"]\n    effect: deny\n"
    ));
    yaml
}

/// The (caller, path) pairs decided in turn: allowed, denied, and matched by no rule.
fn questions() -> Vec<(Option<String>, String)> {
    let svc = |name: &str| Some(format!("spiffe://{TRUST_DOMAIN}/svc/{name}"));
    vec![
        (svc("consignment-service"), "/vessel.VesselService/FindAvailable".to_owned()),
        (svc("consignment-service"), "/vessel.VesselService/Reserve".to_owned()),
        (svc("consignment-cli"), "/consignment.ShippingService/CreateConsignment".to_owned()),
        (svc("team-7"), "/team7.Service/Get".to_owned()),
        (svc("stranger"), "/vessel.VesselService/FindAvailable".to_owned()),
        (None, "/consignment.ShippingService/GetConsignments".to_owned()),
    ]
}

/// Nanoseconds per decision of `decide` over [`DECISIONS`] questions in turn.
fn per_decision(
    questions: &[(Option<String>, String)],
    mut decide: impl FnMut(Option<&str>, &str) -> bool,
) -> f64 {
    let started = std::time::Instant::now();
    let mut allowed = 0usize;
    for i in 0..DECISIONS {
        let (caller, path) = &questions[i % questions.len()];
        allowed += usize::from(decide(black_box(caller.as_deref()), black_box(path)));
    }
    black_box(allowed);
    started.elapsed().as_nanos() as f64 / DECISIONS as f64
}

/// `authz_check_ns`: a policy decision against a perfect cache's look-up.
pub fn run_authz() -> anyhow::Result<()> {
    let policy = Policy::from_yaml(&policy_yaml())?;
    let questions = questions();
    let answers: HashMap<(Option<String>, String), bool> = questions
        .iter()
        .map(|(c, p)| ((c.clone(), p.clone()), policy.decide(c.as_deref(), p).allowed))
        .collect();
    let (mut decided, mut cached) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        eprintln!("[12 security] policy decisions, round {}/{ROUNDS}", r + 1);
        decided.push(per_decision(&questions, |caller, path| policy.decide(caller, path).allowed));
        cached.push(per_decision(&questions, |caller, path| {
            answers.get(&(caller.map(str::to_owned), path.to_owned())).copied().unwrap_or(false)
        }));
    }
    let figure = Figure::new("authz_check_ns", median(&decided), median(&cached), "ns")
        .baseline_is("a HashMap holding every answer, keyed by caller and path");
    let met = figure.sdk < 1_000.0;
    emit(figure.target("under 1 µs", met));
    Ok(())
}

/// A raw tonic channel to `address` with `tls`'s certificates, checking the server's
/// certificate names `server_name`, as the SDK's client does.
async fn raw_tls_channel(
    address: std::net::SocketAddr,
    tls: &TlsConfig,
    server_name: &str,
) -> anyhow::Result<Channel> {
    let ca = tls.ca.as_ref().ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let (cert, key) = tls.identity.as_ref().ok_or_else(|| anyhow::anyhow!("no identity"))?;
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(server_name);
    Ok(Endpoint::from_shared(format!("https://{address}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .tls_config(config)?
        .connect()
        .await?)
}

/// `unary_latency_p50_mtls`: the SDK's client against raw tonic, both over mutual TLS.
pub async fn run_mtls(registry: Arc<dyn Registry>) -> anyhow::Result<()> {
    let name = format!("vessel-bench-mtls-{}", std::process::id());
    let authority = Authority::new(TRUST_DOMAIN, Duration::from_secs(3600))?;
    let dir = tempfile::tempdir()?;
    let write = |file: &str, pem: &str| -> anyhow::Result<String> {
        let path = dir.path().join(file);
        std::fs::write(&path, pem)?;
        Ok(path.display().to_string())
    };
    let ca = write("ca.pem", authority.certificate_pem())?;
    let (server_cert, server_key) = authority.issue(&name, Duration::from_secs(3600))?;
    let (cert, key) = (write("server.pem", &server_cert)?, write("server-key.pem", &server_key)?);
    let mut server = Service::start(
        "vessel-service",
        &[
            ("MICRO_SERVER_NAME", &name),
            ("MICRO_TLS_CA", &ca),
            ("MICRO_TLS_CERT", &cert),
            ("MICRO_TLS_KEY", &key),
        ],
    )?;
    let (_, address) = server.ready(Duration::from_secs(10)).await?;
    let (client_cert, client_key) = authority.issue("bench-client", Duration::from_secs(3600))?;
    let tls = TlsConfig {
        identity: Some((client_cert.into_bytes(), client_key.into_bytes())),
        ca: Some(authority.certificate_pem().as_bytes().to_vec()),
        source: None,
    };
    let client = Client::new(registry).tls(Some(tls.clone())).idempotent_methods(proto::IDEMPOTENT_METHODS);
    let channel = client.channel(&name);
    wait_pickable(&channel, 1).await?;
    let mut sdk = VesselServiceClient::new(channel);
    let mut raw = VesselServiceClient::new(raw_tls_channel(address, &tls, &name).await?);
    sequential(&mut sdk, WARM_UP_CALLS).await?;
    sequential(&mut raw, WARM_UP_CALLS).await?;
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        eprintln!("[12 security] mutual TLS calls, round {}/{ROUNDS}", r + 1);
        for turn in 0..2 {
            let (caller_p50, side): (Vec<f64>, &mut Vec<f64>) = if (r + turn) % 2 == 0 {
                (sequential(&mut sdk, SEQUENTIAL_CALLS).await?, &mut s)
            } else {
                (sequential(&mut raw, SEQUENTIAL_CALLS).await?, &mut b)
            };
            let mut latencies = caller_p50;
            latencies.sort_by(f64::total_cmp);
            side.push(quantile(&latencies, 0.50));
        }
    }
    server.kill().await;
    let figure = Figure::new("unary_latency_p50_mtls", median(&s), median(&b), "us")
        .baseline_is("raw tonic Channel with the same certificates and server name to the same instance");
    let met = figure.sdk <= figure.baseline * 1.05;
    emit(figure.target("within 5% of raw", met));
    Ok(())
}
