//! Consul Connect (native) in one process over a real dev agent (run inside
//! `scripts/netns-run`): a server and clients take their leaves from the agent.
//! Intentions decide who is served, a denial is counted, and a changed intention applies
//! within the answer cache; when Consul's CA is rotated, the agent's renewed leaf reaches
//! new connections through the blocking queries, while a steady stream of calls fails none.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use e2e::consul::ConsulAgent;
use micro_core::{
    Client, RunningServer, Server,
    config::{ClientConfig, ServerConfig, TlsConfig},
    registry::ConsulRegistry,
    tls::{Trust, consul_spiffe_id},
};
use serde_json::{Value, json};
use test_proto::{
    Labelled,
    echo::{echo_client::EchoClient, echo_server::EchoServer},
    say,
};
use tonic::Code;

/// Bound on anything polled for here.
const LIMIT: Duration = Duration::from_secs(60);

async fn agent_api(agent: &ConsulAgent, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let url = format!("http://{}{path}", agent.http_address());
    let mut request = reqwest::Client::new().request(method, &url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn consul(agent: &ConsulAgent) -> ConsulRegistry {
    ConsulRegistry::builder().address(agent.http_address()).connect_native(true).build().unwrap()
}

async fn start(agent: &ConsulAgent, name: &str) -> RunningServer {
    let registry = consul(agent);
    let tls = registry.connect_tls(name).await.unwrap();
    let config =
        ServerConfig { address: "127.0.0.1:0".parse().unwrap(), tls: Some(tls), ..ServerConfig::default() };
    Server::builder(name)
        .config(config)
        .registry(Arc::new(registry))
        .add_service(EchoServer::new(Labelled::new("connect-echo")))
        .start()
        .await
        .unwrap()
}

/// A client presenting the leaf of `as_name`.
async fn client(agent: &ConsulAgent, as_name: &str) -> (Client, TlsConfig) {
    let registry = consul(agent);
    let tls = registry.connect_tls(as_name).await.unwrap();
    let config = ClientConfig { tls: Some(tls.clone()), retries: 0, ..ClientConfig::default() };
    (Client::new(Arc::new(registry)).config(config), tls)
}

async fn say_hello(client: &Client, name: &str) -> Result<String, tonic::Status> {
    Ok(EchoClient::new(client.channel(name)).say(say("hello")).await?.into_inner().instance)
}

#[tokio::test(flavor = "multi_thread")]
async fn intentions_decide_who_is_served_and_a_change_applies_within_the_cache() {
    e2e::require_private_netns();
    let agent = ConsulAgent::start_async().await;
    let (server_name, allowed_name, other_name) =
        (e2e::unique_name("echo"), e2e::unique_name("allowed"), e2e::unique_name("other"));
    let post = |source: &str, action: &str| json!({"SourceName": source, "DestinationName": server_name, "Action": action});
    agent_api(&agent, reqwest::Method::POST, "/v1/connect/intentions", Some(post("*", "deny"))).await;
    let allow = agent_api(
        &agent,
        reqwest::Method::POST,
        "/v1/connect/intentions",
        Some(post(&allowed_name, "allow")),
    )
    .await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let server = start(&agent, &server_name).await;

    let (allowed, tls) = client(&agent, &allowed_name).await;
    assert_eq!(say_hello(&allowed, &server_name).await.unwrap(), "connect-echo");
    let Some(Trust::ConsulConnect { trust_domain, datacenter }) =
        tls.source.as_ref().map(|s| s.trust().clone())
    else {
        panic!("a Connect trust: {tls:?}")
    };

    let (other, _) = client(&agent, &other_name).await;
    let denied = say_hello(&other, &server_name).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let other_id = consul_spiffe_id(&trust_domain, &datacenter, &other_name);
    assert!(
        denied.message().contains(&other_id) && denied.message().contains("echo.Echo/Say"),
        "names the caller and the method: {denied:?}"
    );
    assert!(denied.message().contains("intention"), "names the intention: {denied:?}");
    let counted = micro_core::metrics::metrics().render();
    assert!(
        counted.contains(&format!(
            r#"micro_authz_denied_total{{service="{server_name}",grpc_service="echo.Echo"}} "#
        )),
        "{counted}"
    );

    // The allow turned into a deny: the allowed caller is refused once the kept answer lapses.
    let path = format!("/v1/connect/intentions/{allow}");
    agent_api(&agent, reqwest::Method::PUT, &path, Some(post(&allowed_name, "deny"))).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match say_hello(&allowed, &server_name).await {
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "the changed intention did not apply");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => break assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
        }
    }
    server.stop().await.unwrap();
}

/// The serial of the leaf the server at `address` presents to a new connection, checked as
/// a Connect client checks it.
async fn presented_serial(address: std::net::SocketAddr, tls: &TlsConfig, name: &str) -> String {
    let config = tls.source().unwrap().client_config().unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let stream = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await.unwrap();
    let der = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    x509_parser::parse_x509_certificate(der.as_ref()).unwrap().1.raw_serial_as_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_ca_reaches_new_connections_and_no_call_fails() {
    e2e::require_private_netns();
    let agent = ConsulAgent::start_async().await;
    let server_name = e2e::unique_name("rotated");
    let server = start(&agent, &server_name).await;
    let address = server.local_addr();
    let (steady, tls) = client(&agent, &e2e::unique_name("caller")).await;
    let first = presented_serial(address, &tls, &server_name).await;

    let (calls, failures, stop) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let caller = {
        let (calls, failures, stop, name, tls) =
            (calls.clone(), failures.clone(), stop.clone(), server_name.clone(), tls.clone());
        let registry: Arc<dyn micro_core::Registry> = Arc::new(consul(&agent));
        tokio::spawn(async move {
            // Bounded by count, and stopped by the test.
            for _ in 0..50_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // A client of its own: a new connection, with the material in force now.
                let config = ClientConfig { tls: Some(tls.clone()), retries: 0, ..ClientConfig::default() };
                let fresh = Client::new(registry.clone()).config(config);
                for client in [&steady, &fresh] {
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(status) = say_hello(client, &name).await {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed call: {status:?}");
                    }
                }
            }
        })
    };
    while calls.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A new CA key: Consul makes a new root, cross-signed, and the agent re-issues leaves.
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let config = json!({"Provider": "consul", "Config": {"PrivateKey": key, "RootCert": ""}});
    agent_api(&agent, reqwest::Method::PUT, "/v1/connect/ca/configuration", Some(config)).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let renewed = loop {
        let serial = presented_serial(address, &tls, &server_name).await;
        if serial != first {
            break serial;
        }
        assert!(tokio::time::Instant::now() < deadline, "no renewed leaf presented after the CA rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seen = calls.load(Ordering::Relaxed);
    while calls.load(Ordering::Relaxed) < seen + 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    eprintln!("leaf {first} renewed as {renewed}; {} calls", calls.load(Ordering::Relaxed));
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {} calls", calls.load(Ordering::Relaxed));
    server.stop().await.unwrap();
}
