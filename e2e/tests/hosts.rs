//! The multi-host harness itself (`e2e::hosts`): hosts reach each other over TCP and mDNS,
//! a partitioned host gets no answer (no RST) until healed, and dropping the network leaves
//! no process behind.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use e2e::{
    discovery::{mdns, wait_for},
    hosts::{Network, processes_in},
    unique_name,
};
use micro_core::Client;
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};

/// How long a connect may take before it counts as unanswered.
const NO_ANSWER: Duration = Duration::from_secs(1);
/// How long a fresh network may take before its hosts reach each other (a busy machine
/// can take longer than [`NO_ANSWER`] to pass a new link's first packets).
const LINKS_UP_WITHIN: Duration = Duration::from_secs(10);

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("e2e=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A listener on `host`'s address, any port.
fn listen(network: &Network, host: usize) -> TcpListener {
    let address = network.host(host).address();
    network.host(host).within(|| TcpListener::bind((address, 0))).expect("bind on the host")
}

/// Connects from `host` to `target`, waiting at most [`NO_ANSWER`].
fn connect(network: &Network, host: usize, target: SocketAddr) -> std::io::Result<TcpStream> {
    network.host(host).within(|| TcpStream::connect_timeout(&target, NO_ANSWER))
}

/// Connects from `host` to `target`, trying again while the fresh links do not answer yet,
/// for at most [`LINKS_UP_WITHIN`].
fn connect_once_up(network: &Network, host: usize, target: SocketAddr) -> std::io::Result<TcpStream> {
    let started = Instant::now();
    loop {
        match connect(network, host, target) {
            Err(err) if err.kind() == ErrorKind::TimedOut && started.elapsed() < LINKS_UP_WITHIN => continue,
            result => return result,
        }
    }
}

/// A port on `address` that nothing listens on (it was bound and released).
fn closed_port(network: &Network, host: usize) -> SocketAddr {
    listen(network, host).local_addr().expect("local address")
}

fn read_with_timeout(stream: &mut TcpStream, timeout: Duration, buffer: &mut [u8]) -> std::io::Result<usize> {
    stream.set_read_timeout(Some(timeout)).expect("read timeout");
    stream.read(buffer)
}

#[test]
fn two_hosts_reach_each_other_over_tcp_from_their_own_addresses() {
    init_logs();
    let network = Network::new(2);
    let (a, b) = (network.host(0).address(), network.host(1).address());
    assert_ne!(a, b);
    assert!(a.octets()[..2] == [10, 77] && b.octets()[..2] == [10, 77], "{a} {b}");

    let listener = listen(&network, 0);
    let mut client =
        connect_once_up(&network, 1, listener.local_addr().unwrap()).expect("host 1 reaches host 0");
    let (mut server, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), b, "the connection comes from host 1's address");

    client.write_all(b"ping").unwrap();
    let mut buffer = [0; 4];
    server.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"ping");
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"pong");

    // Each host has its own loopback: host 1 cannot reach what listens on host 0's.
    let on_loopback = network.host(0).within(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let refused = connect(&network, 1, on_loopback.local_addr().unwrap()).map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
}

#[test]
fn a_partitioned_host_answers_nothing_not_even_a_reset_until_healed() {
    init_logs();
    let network = Network::new(2);
    let listener = listen(&network, 0);
    let closed = closed_port(&network, 0);
    let mut client = connect_once_up(&network, 1, listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    // Connected, a closed port answers at once with a reset.
    let refused = connect(&network, 1, closed).map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    network.partition(0);
    let started = Instant::now();
    let unanswered = connect(&network, 1, closed).map(|_| ()).unwrap_err();
    assert_eq!(unanswered.kind(), ErrorKind::TimedOut, "no reset from a partitioned host: {unanswered}");
    assert!(started.elapsed() >= NO_ANSWER * 9 / 10, "gave up after {:?}", started.elapsed());
    let outbound = connect(&network, 0, client.local_addr().unwrap()).map(|_| ()).unwrap_err();
    assert_eq!(outbound.kind(), ErrorKind::TimedOut, "the partitioned host reaches nothing: {outbound}");
    // An open connection neither fails nor delivers.
    client.write_all(b"ping").unwrap();
    let mut buffer = [0; 4];
    let silent = read_with_timeout(&mut server, NO_ANSWER, &mut buffer).unwrap_err();
    assert!(matches!(silent.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{silent}");
    let silent = read_with_timeout(&mut client, Duration::from_millis(100), &mut buffer).unwrap_err();
    assert!(matches!(silent.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{silent}");

    network.heal(0);
    let healed = Instant::now();
    let refused = loop {
        match connect(&network, 1, closed) {
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => break err,
            other => {
                let other = other.map(|_| ());
                assert!(healed.elapsed() < Duration::from_secs(10), "not healed after 10 s: {other:?}");
            }
        }
    };
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    connect(&network, 1, listener.local_addr().unwrap()).expect("connects after healing");
    // What was sent during the partition arrives once TCP retransmits it.
    read_with_timeout(&mut server, Duration::from_secs(10), &mut buffer[..]).expect("the held data arrives");
    assert_eq!(buffer[0], b'p');
}

#[test]
fn a_server_on_one_host_is_found_over_mdns_and_called_from_another() {
    init_logs();
    let network = Network::new(2);
    let name = unique_name("hosts-fault");
    let _server = network.host(0).start("fault-server", &[], &[("FAULT_NAME", &name), ("FAULT_LABEL", "h0")]);
    let expected = network.host(0).address();
    network.host(1).block_on(|| async {
        let registry = mdns();
        let started = tokio::time::Instant::now();
        let nodes = wait_for(&registry, &name, 1).await;
        tracing::info!(after = ?started.elapsed(), "found over mdns");
        assert_eq!(nodes[0].address.ip(), expected, "the server advertises its host's address");
        let mut vessels = VesselServiceClient::new(Client::new(registry).channel(&name));
        let reply =
            vessels.find_available(Specification { capacity: 1, max_weight: 1 }).await.expect("a reply");
        assert_eq!(reply.into_inner().vessel.expect("a vessel").id, "h0");
    });
}

#[test]
fn dropping_the_network_stops_every_process_on_its_hosts() {
    init_logs();
    let network = Network::new(2);
    let mut server = network.host(0).start("fault-server", &[], &[("FAULT_NAME", &unique_name("drop"))]);
    // A process nobody holds a handle to: `sh` exits, its `sleep` lives on.
    let output = network.host(1).command("sh").args(["-c", "sleep 300 >/dev/null 2>&1 & echo $!"]).output();
    let orphan: u32 =
        String::from_utf8_lossy(&output.expect("sh runs").stdout).trim().parse().expect("a pid");
    let ids = network.namespace_ids();
    assert_eq!(ids.len(), 3, "the switch and two hosts");
    // `nsenter` joins the namespace a moment after it is spawned, under the same pid.
    assert!(joins(network.host(0).namespace_id(), server.pid()), "the server runs on host 0");
    assert!(joins(network.host(1).namespace_id(), orphan), "the orphan runs on host 1");

    drop(network);
    for id in &ids {
        assert_eq!(processes_in(id), Vec::<u32>::new(), "left running in {id}");
    }
    assert!(server.exit_status().is_some(), "the server was stopped");
    let orphan_state = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
    assert!(orphan_state.is_empty() || orphan_state.contains(") Z"), "the orphan runs on: {orphan_state}");
}

/// Whether process `pid` is in the namespace `namespace_id` within a few seconds.
fn joins(namespace_id: &str, pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in(namespace_id).contains(&pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
