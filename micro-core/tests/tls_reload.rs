//! Certificates renewed on disk apply without a restart and without a failed call: a
//! server and a client read their `MICRO_TLS_*` files (certificates of
//! `micro_core::auth::certs`, what `micro certs` writes); while calls go on, over the
//! connection already open and over new ones, the server's certificate is issued again
//! on disk, and a new connection soon presents the new serial number.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use micro_core::{
    Client, Server,
    auth::certs::Authority,
    config::{ClientConfig, ServerConfig, TlsConfig},
    registry::MemoryRegistry,
};
use test_proto::{
    Labelled,
    echo::{echo_client::EchoClient, echo_server::EchoServer},
    say,
};

const SERVER: &str = "vessel-renewed";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Writes a new certificate and key for `name` into `dir`; returns the certificate's serial.
fn issue(authority: &Authority, dir: &Path, name: &str) -> String {
    let (cert, key) = authority.issue(name, DAY).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), &cert).unwrap();
    serial_of_pem(cert.as_bytes())
}

fn serial_of_pem(pem: &[u8]) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
    serial_of_der(&pem.contents)
}

fn serial_of_der(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der).unwrap().1.raw_serial_as_string()
}

fn files(dir: &Path, name: &str) -> TlsConfig {
    let (cert, key, ca) =
        (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")), dir.join("ca.pem"));
    TlsConfig::from_files(Some((&cert, &key)), Some(&ca)).unwrap().unwrap()
}

/// The serial of the certificate the server at `address` presents to a new connection.
async fn presented_serial(address: std::net::SocketAddr, ca: &[u8]) -> String {
    let source = TlsConfig { identity: None, ca: Some(ca.to_vec()), source: None }.source().unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER).unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(source.client_config().unwrap()).connect(name, tcp).await.unwrap();
    serial_of_der(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref())
}

fn client(registry: &MemoryRegistry, tls: TlsConfig) -> Client {
    let config = ClientConfig { tls: Some(tls), retries: 0, ..ClientConfig::default() };
    Client::new(Arc::new(registry.clone())).config(config)
}

#[tokio::test]
async fn a_certificate_renewed_on_disk_is_presented_to_new_connections_and_no_call_fails() {
    let dir = tempfile::tempdir().unwrap();
    let authority = Authority::new("renew.test", DAY).unwrap();
    let ca = authority.certificate_pem().as_bytes().to_vec();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    let first = issue(&authority, dir.path(), SERVER);
    issue(&authority, dir.path(), "cli");

    let registry = MemoryRegistry::new();
    let config = ServerConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        tls: Some(files(dir.path(), SERVER)),
        ..ServerConfig::default()
    };
    let server = Server::builder(SERVER)
        .config(config)
        .registry(Arc::new(registry.clone()))
        .add_service(EchoServer::new(Labelled::new("renewed-echo")))
        .start()
        .await
        .unwrap();
    let address = server.local_addr();
    assert_eq!(presented_serial(address, &ca).await, first);

    // A steady stream of calls: over the client's open connection, and over a new client
    // (a new connection) each time.
    let client_tls = files(dir.path(), "cli");
    let steady = client(&registry, client_tls.clone());
    let (calls, failures, stop) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let caller = {
        let (registry, calls, failures, stop) =
            (registry.clone(), calls.clone(), failures.clone(), stop.clone());
        tokio::spawn(async move {
            // Bounded by count, and stopped by the test.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let fresh = client(&registry, client_tls.clone());
                for client in [&steady, &fresh] {
                    let answer = EchoClient::new(client.channel(SERVER)).say(say("hello")).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(status) = answer {
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

    let renewed = issue(&authority, dir.path(), SERVER);
    assert_ne!(renewed, first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if presented_serial(address, &ca).await == renewed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not presented within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Calls go on for a while over new connections with the renewed certificate.
    let seen = calls.load(Ordering::Relaxed);
    while calls.load(Ordering::Relaxed) < seen + 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {} calls", calls.load(Ordering::Relaxed));
    server.stop().await.unwrap();
}
