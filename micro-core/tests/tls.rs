//! TLS with a CA generated for the test: a plaintext client is refused, a client that
//! trusts the CA is served, and one that trusts another CA is refused.

use std::{sync::Arc, time::Duration};

use micro_core::{
    Client, RunningServer, Server,
    config::{ClientConfig, ServerConfig, TlsConfig},
    registry::MemoryRegistry,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use test_proto::{
    Labelled,
    echo::{echo_client::EchoClient, echo_server::EchoServer},
    say,
};
use tonic::Status;

struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Authority { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn ca_pem(&self) -> Vec<u8> {
        self.issuer.pem().into_bytes()
    }

    /// A certificate and key for the service `name`.
    fn identity(&self, name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let cert =
            CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

async fn call(client: &Client, name: &str) -> Result<String, Status> {
    let mut echo = EchoClient::new(client.channel(name));
    Ok(echo.say(say("hello")).await?.into_inner().instance)
}

fn client_with(registry: &MemoryRegistry, tls: Option<TlsConfig>) -> Client {
    let config =
        ClientConfig { tls, request_timeout: Duration::from_secs(3), retries: 0, ..ClientConfig::default() };
    Client::new(Arc::new(registry.clone())).config(config)
}

/// An echo instance labelled `tls-echo`, registered as `vessel-tls`, serving TLS with `tls`.
async fn start_tls_server(registry: &MemoryRegistry, tls: TlsConfig) -> RunningServer {
    let config =
        ServerConfig { address: "127.0.0.1:0".parse().unwrap(), tls: Some(tls), ..ServerConfig::default() };
    Server::builder("vessel-tls")
        .config(config)
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(Labelled::new("tls-echo")))
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn plaintext_is_refused_and_a_client_trusting_the_ca_is_served() {
    let authority = Authority::new();
    let registry = MemoryRegistry::new();
    let tls = TlsConfig {
        identity: Some(authority.identity("vessel-tls")),
        ca: Some(authority.ca_pem()),
        source: None,
    };
    let server = start_tls_server(&registry, tls).await;

    let plaintext = client_with(&registry, None);
    let refused = call(&plaintext, "vessel-tls").await.unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Ok);

    let trusting = client_with(
        &registry,
        Some(TlsConfig { identity: None, ca: Some(authority.ca_pem()), source: None }),
    );
    assert_eq!(call(&trusting, "vessel-tls").await.unwrap(), "tls-echo");

    let mutual = client_with(
        &registry,
        Some(TlsConfig {
            identity: Some(authority.identity("cli")),
            ca: Some(authority.ca_pem()),
            source: None,
        }),
    );
    assert_eq!(call(&mutual, "vessel-tls").await.unwrap(), "tls-echo");

    let stranger = Authority::new();
    let distrusting =
        client_with(&registry, Some(TlsConfig { identity: None, ca: Some(stranger.ca_pem()), source: None }));
    let refused = call(&distrusting, "vessel-tls").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_certificate_for_another_service_is_refused() {
    let authority = Authority::new();
    let registry = MemoryRegistry::new();
    // The server presents a certificate for a different service name than it registers.
    let tls = TlsConfig { identity: Some(authority.identity("impostor")), ca: None, source: None };
    let server = start_tls_server(&registry, tls).await;
    let client = client_with(
        &registry,
        Some(TlsConfig { identity: None, ca: Some(authority.ca_pem()), source: None }),
    );
    let refused = call(&client, "vessel-tls").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    server.stop().await.unwrap();
}

/// Over the registry broker, a publisher that calls over mutual TLS reaches the subscriber
/// of a process with a certificate of its own: the subscriber serves TLS with it and
/// registers the name it carries (`tls-name`), which the publisher checks in place of
/// `broker.<topic>`.
#[tokio::test(flavor = "multi_thread")]
async fn registry_broker_deliveries_go_over_mutual_tls() {
    use micro_core::{
        Registry,
        auth::certs::Authority as Certs,
        broker::{Broker, Message, RegistryBroker, SubscribeOptions, handler, topic_service_name},
        labels,
    };
    let certs = Certs::new("test", Duration::from_secs(3600)).unwrap();
    let tls_of = |name: &str| {
        let (cert, key) = certs.issue(name, Duration::from_secs(3600)).unwrap();
        TlsConfig {
            identity: Some((cert.into_bytes(), key.into_bytes())),
            ca: Some(certs.certificate_pem().as_bytes().to_vec()),
            source: None,
        }
    };
    let registry = MemoryRegistry::new();
    let topic = format!("orders.{:08x}", rand::random::<u32>());
    let subscriber = RegistryBroker::new(client_with(&registry, Some(tls_of("vessel-service"))));
    let (delivered, mut deliveries) = tokio::sync::mpsc::unbounded_channel();
    let _subscription = subscriber
        .subscribe(
            &topic,
            SubscribeOptions::default(),
            handler(move |message: Message| {
                let delivered = delivered.clone();
                async move {
                    let _ = delivered.send(message.body);
                    Ok(())
                }
            }),
        )
        .await
        .expect("subscribe");
    let nodes = registry.lookup(&topic_service_name(&topic)).await.expect("the subscriber registered");
    assert_eq!(nodes[0].metadata.get(labels::TLS).map(String::as_str), Some(labels::FLAG_ON));
    assert_eq!(nodes[0].metadata.get(labels::TLS_NAME).map(String::as_str), Some("vessel-service"));

    let publisher = RegistryBroker::new(client_with(&registry, Some(tls_of("consignment-service"))));
    publisher.publish(Message::new(topic.clone(), "booked")).await.expect("delivered over mutual TLS");
    let body = tokio::time::timeout(Duration::from_secs(5), deliveries.recv()).await.expect("in time");
    assert_eq!(body.as_deref(), Some(&b"booked"[..]));

    // A publisher of another CA is refused at the handshake, so nothing reaches the handler.
    let stranger = Certs::new("test", Duration::from_secs(3600)).unwrap();
    let (cert, key) = stranger.issue("consignment-service", Duration::from_secs(3600)).unwrap();
    let foreign = TlsConfig {
        identity: Some((cert.into_bytes(), key.into_bytes())),
        ca: Some(stranger.certificate_pem().as_bytes().to_vec()),
        source: None,
    };
    let outsider = RegistryBroker::new(client_with(&registry, Some(foreign)));
    assert!(outsider.publish(Message::new(topic.clone(), "forged")).await.is_err());
    assert!(deliveries.try_recv().is_err(), "nothing forged was delivered");
}
