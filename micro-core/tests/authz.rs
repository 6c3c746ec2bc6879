//! Identity and authorization over real mutual TLS on loopback: certificates from
//! `micro_core::auth::certs` (what `micro certs` writes), a server given a policy file.
//! A caller without a certificate is refused at the handshake, a caller with another
//! service's valid certificate gets `PERMISSION_DENIED` naming the method and itself, the
//! allowed caller is served, and a policy edited on disk applies without a restart. A rule
//! with `subjects` takes the `x-micro-subject` only from the caller it names (the gateway).

use std::{path::Path, sync::Arc, time::Duration};

use micro_core::{
    Client, RunningServer, Server,
    auth::{certs::Authority, spiffe_id},
    config::{ClientConfig, ServerConfig, TlsConfig},
    registry::MemoryRegistry,
};
use test_proto::{
    Labelled,
    echo::{echo_client::EchoClient, echo_server::EchoServer},
    say,
};
use tonic::{Code, Status};

const TRUST_DOMAIN: &str = "authz.test";
const SERVER: &str = "vessel-authz";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn identity(authority: &Authority, name: &str) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = authority.issue(name, DAY).unwrap();
    (cert.into_bytes(), key.into_bytes())
}

fn client(registry: &MemoryRegistry, authority: &Authority, name: Option<&str>) -> Client {
    let tls = TlsConfig {
        identity: name.map(|name| identity(authority, name)),
        ca: Some(authority.certificate_pem().as_bytes().to_vec()),
        source: None,
    };
    let config = ClientConfig {
        tls: Some(tls),
        request_timeout: Duration::from_secs(5),
        retries: 0,
        ..ClientConfig::default()
    };
    Client::new(Arc::new(registry.clone())).config(config)
}

async fn say_hello(client: &Client) -> Result<String, Status> {
    Ok(EchoClient::new(client.channel(SERVER)).say(say("hello")).await?.into_inner().instance)
}

async fn start(registry: &MemoryRegistry, authority: &Authority, policy: &Path) -> RunningServer {
    let tls = TlsConfig {
        identity: Some(identity(authority, SERVER)),
        ca: Some(authority.certificate_pem().as_bytes().to_vec()),
        source: None,
    };
    let config = ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        authz_policy: Some(policy.to_owned()),
        ..ServerConfig::default()
    };
    Server::builder(SERVER)
        .config(config)
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(Labelled::new("authz-echo")))
        .start()
        .await
        .unwrap()
}

fn allow(callers: &[&str]) -> String {
    let callers: Vec<String> =
        callers.iter().map(|name| format!("{:?}", spiffe_id(TRUST_DOMAIN, name))).collect();
    format!(
        "rules:\n  - callers: [{}]\n    methods: [\"echo.Echo/*\"]\n    effect: allow\n",
        callers.join(", ")
    )
}

#[tokio::test]
async fn only_what_the_policy_allows_is_served_and_an_edit_applies_without_a_restart() {
    let authority = Authority::new(TRUST_DOMAIN, DAY).unwrap();
    let registry = MemoryRegistry::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, allow(&["consignment"])).unwrap();
    let server = start(&registry, &authority, &policy).await;

    let allowed = client(&registry, &authority, Some("consignment"));
    assert_eq!(say_hello(&allowed).await.unwrap(), "authz-echo");

    let other = client(&registry, &authority, Some("cli"));
    let denied = say_hello(&other).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let cli_id = spiffe_id(TRUST_DOMAIN, "cli");
    assert!(
        denied.message().contains(&cli_id) && denied.message().contains("echo.Echo/Say"),
        "names the caller and the method: {denied:?}"
    );
    let counted = micro_core::metrics::metrics().render();
    assert!(
        counted.contains(&format!(
            r#"micro_authz_denied_total{{service="{SERVER}",grpc_service="echo.Echo"}} "#
        )),
        "{counted}"
    );

    // No certificate: refused before any call, whatever the method.
    let anonymous = client(&registry, &authority, None);
    let refused = say_hello(&anonymous).await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    assert_ne!(refused.code(), Code::PermissionDenied, "refused at the handshake, not by the policy");

    // Another CA's certificate for the allowed name: refused at the handshake too.
    let stranger = Authority::new(TRUST_DOMAIN, DAY).unwrap();
    let forged = TlsConfig {
        identity: Some(identity(&stranger, "consignment")),
        ca: Some(authority.certificate_pem().as_bytes().to_vec()),
        source: None,
    };
    let forged = Client::new(Arc::new(registry.clone())).config(ClientConfig {
        tls: Some(forged),
        retries: 0,
        ..ClientConfig::default()
    });
    let refused = say_hello(&forged).await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    assert_ne!(refused.code(), Code::PermissionDenied);

    // The policy edited on disk: cli allowed too, without a restart.
    std::fs::write(&policy, allow(&["consignment", "cli"])).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match say_hello(&other).await {
            Ok(instance) => break assert_eq!(instance, "authz-echo"),
            Err(status) if status.code() == Code::PermissionDenied => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the edited policy did not apply within 20 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_policy_without_client_certificates_to_check_is_refused_at_start() {
    let authority = Authority::new(TRUST_DOMAIN, DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, allow(&["consignment"])).unwrap();
    let config = ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        tls: Some(TlsConfig { identity: Some(identity(&authority, SERVER)), ca: None, source: None }),
        authz_policy: Some(policy),
        ..ServerConfig::default()
    };
    let err = Server::builder(SERVER)
        .config(config)
        .registry(Arc::new(MemoryRegistry::new()))
        .add_service(EchoServer::new(Labelled::new("x")))
        .start()
        .await
        .err()
        .expect("refused");
    let err = micro_core::error::error_chain(&err);
    assert!(err.contains("MICRO_AUTHZ_POLICY") && err.contains("MICRO_TLS_CA"), "{err}");
}

/// `say("hello")` carrying `subject` in `x-micro-subject`, as the gateway sends it.
async fn say_as(client: &Client, subject: Option<&str>) -> Result<String, Status> {
    let mut request = tonic::Request::new(say("hello"));
    if let Some(subject) = subject {
        request.metadata_mut().insert(micro_core::auth::SUBJECT_HEADER, subject.parse().unwrap());
    }
    Ok(EchoClient::new(client.channel(SERVER)).say(request).await?.into_inner().instance)
}

#[tokio::test]
async fn a_subject_counts_only_when_a_caller_the_rule_names_vouches_for_it() {
    let authority = Authority::new(TRUST_DOMAIN, DAY).unwrap();
    let registry = MemoryRegistry::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let gateway_id = spiffe_id(TRUST_DOMAIN, "gateway");
    std::fs::write(
        &policy,
        format!(
            "rules:\n  - callers: [{gateway_id:?}]\n    subjects: [\"jwt:alice\", \"apikey:*\"]\n    \
             methods: [\"echo.Echo/Say\"]\n    effect: allow\n"
        ),
    )
    .unwrap();
    let server = start(&registry, &authority, &policy).await;

    let gateway = client(&registry, &authority, Some("gateway"));
    assert_eq!(say_as(&gateway, Some("jwt:alice")).await.unwrap(), "authz-echo");
    assert_eq!(say_as(&gateway, Some("apikey:ci")).await.unwrap(), "authz-echo");
    for subject in [Some("jwt:bob"), None] {
        let denied = say_as(&gateway, subject).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{subject:?}: {denied:?}");
    }
    // Another service setting the header itself vouches for nobody.
    let other = client(&registry, &authority, Some("cli"));
    let spoofed = say_as(&other, Some("jwt:alice")).await.unwrap_err();
    assert_eq!(spoofed.code(), Code::PermissionDenied, "{spoofed:?}");
    server.stop().await.unwrap();
}
