//! The shippy flow on the etcd and dns registries, with the binaries as real processes:
//! on one etcd member (loopback), on a 3-member etcd cluster with one member per host
//! (`e2e::hosts`), through the loss of the member a service talks to, and on DNS records
//! served by dnsmasq (the platform's part: the test publishes the records).
//!
//! etcd and dnsmasq come from Debian (`make test-deps`). Services get `MICRO_REGISTER_TTL=3`
//! and `MICRO_REGISTER_INTERVAL=1`.

use std::{net::TcpListener, sync::Arc, time::Duration};

use e2e::{
    dnsmasq::Dnsmasq,
    etcd::EtcdCluster,
    hosts::Network,
    process::Process,
    require_private_netns,
    shippy::{run_cli, sample_consignment},
    unique_name,
};
use micro_core::{Registry, registry::EtcdRegistry};

const SOON: Duration = Duration::from_secs(15);

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("e2e=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

fn etcd_env(endpoints: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MICRO_REGISTRY", "etcd".into()),
        ("MICRO_REGISTRY_ADDRESS", endpoints.into()),
        ("MICRO_REGISTER_TTL", "3".into()),
        ("MICRO_REGISTER_INTERVAL", "1".into()),
        ("CONSIGNMENT_DB", ":memory:".into()),
    ]
}

fn with(env: &[(&'static str, String)], extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut all = env.to_vec();
    all.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    all
}

fn refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn etcd_view(endpoints: &str) -> Arc<dyn Registry> {
    let etcd = EtcdRegistry::builder().endpoints(endpoints).connect().await.expect("endpoints");
    Arc::new(etcd)
}

async fn wait_registered(registry: &Arc<dyn Registry>, names: &[&str]) {
    for name in names {
        e2e::discovery::wait_for(registry, name, 1).await;
    }
}

async fn create(consignment_name: &str, env: &[(&'static str, String)]) -> String {
    let run = run_cli(consignment_name, &sample_consignment(), &[], &refs(env)).await;
    assert!(run.success, "consignment-cli failed:\n{}\n{}", run.stdout, run.stderr);
    run.stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn shippy_on_one_etcd_member() {
    require_private_netns();
    init_logs();
    let cluster = EtcdCluster::start(1);
    let env = etcd_env(&cluster.endpoints());
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let _vessel =
        Process::start("vessel-service", &[], &refs(&with(&env, &[("MICRO_SERVER_NAME", &vessel_name)])));
    let consignment_env =
        with(&env, &[("MICRO_SERVER_NAME", &consignment_name), ("VESSEL_SERVICE", &vessel_name)]);
    let _consignment = Process::start("consignment-service", &[], &refs(&consignment_env));
    wait_registered(&etcd_view(&cluster.endpoints()).await, &[&vessel_name, &consignment_name]).await;
    let out = create(&consignment_name, &env).await;
    assert!(out.contains("vessel001"), "{out}");
}

/// Three hosts, one etcd member each; vessel-service on host 0, consignment-service on host
/// 1, the CLI on host 2, every one given all three endpoints. Then the member on host 0 dies
/// and the flow still works, and a second vessel-service registers.
#[test]
fn shippy_across_hosts_on_a_three_member_etcd_cluster_survives_a_dead_member() {
    init_logs();
    let network = Network::new(3);
    let mut cluster = EtcdCluster::start_on(&network, 3);
    let endpoints = cluster.endpoints();
    let env = etcd_env(&endpoints);
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let _vessel = network.host(0).start(
        "vessel-service",
        &[],
        &refs(&with(&env, &[("MICRO_SERVER_NAME", &vessel_name)])),
    );
    let consignment_env =
        with(&env, &[("MICRO_SERVER_NAME", &consignment_name), ("VESSEL_SERVICE", &vessel_name)]);
    let _consignment = network.host(1).start("consignment-service", &[], &refs(&consignment_env));

    let cli = network.host(2);
    cli.block_on(|| async {
        let view = etcd_view(&endpoints).await;
        wait_registered(&view, &[&vessel_name, &consignment_name]).await;
    });
    let first = cli.within(|| tokio_run(create(&consignment_name, &env)));
    assert!(first.contains("vessel001"), "{first}");

    cluster.kill(0);
    // Past the TTL: the heartbeats of every service went on through the other members.
    std::thread::sleep(Duration::from_secs(4));
    let _second = network.host(2).start(
        "vessel-service",
        &[],
        &refs(&with(&env, &[("MICRO_SERVER_NAME", &vessel_name)])),
    );
    cli.block_on(|| async {
        let view = etcd_view(&endpoints).await;
        wait_registered(&view, &[&consignment_name]).await;
        e2e::discovery::wait_for(&view, &vessel_name, 2).await;
    });
    let again = cli.within(|| tokio_run(create(&consignment_name, &env)));
    assert!(again.contains("vessel001"), "{again}");
}

/// Four hosts: etcd members on hosts 0 to 2, shippy on host 3 with every endpoint. The
/// member on host 0 is partitioned (its packets vanish, nothing is refused): heartbeats go
/// on past the TTL, a new instance registers, and the flow works, until it is healed.
#[test]
fn shippy_goes_on_while_an_etcd_member_is_partitioned() {
    init_logs();
    let network = Network::new(4);
    let cluster = EtcdCluster::start_on(&network, 3);
    let endpoints = cluster.endpoints();
    let mut env = etcd_env(&endpoints);
    env.retain(|(key, _)| *key != "MICRO_REGISTER_TTL");
    env.push(("MICRO_REGISTER_TTL", "5".into()));
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let shippy = network.host(3);
    let _vessel =
        shippy.start("vessel-service", &[], &refs(&with(&env, &[("MICRO_SERVER_NAME", &vessel_name)])));
    let consignment_env =
        with(&env, &[("MICRO_SERVER_NAME", &consignment_name), ("VESSEL_SERVICE", &vessel_name)]);
    let _consignment = shippy.start("consignment-service", &[], &refs(&consignment_env));
    shippy.block_on(|| async {
        wait_registered(&etcd_view(&endpoints).await, &[&vessel_name, &consignment_name]).await;
    });
    let first = shippy.within(|| tokio_run(create(&consignment_name, &env)));
    assert!(first.contains("vessel001"), "{first}");

    network.partition(0);
    // Twice the TTL: every lease must have been renewed through members 1 and 2.
    std::thread::sleep(Duration::from_secs(10));
    let _second =
        shippy.start("vessel-service", &[], &refs(&with(&env, &[("MICRO_SERVER_NAME", &vessel_name)])));
    shippy.block_on(|| async {
        let view = etcd_view(&cluster.endpoint(1)).await;
        wait_registered(&view, &[&consignment_name]).await;
        e2e::discovery::wait_for(&view, &vessel_name, 2).await;
    });
    let again = shippy.within(|| tokio_run(create(&consignment_name, &env)));
    assert!(again.contains("vessel001"), "{again}");
    network.heal(0);
}

/// Runs `future` on a fresh runtime on the calling thread (a host's, inside `within`).
fn tokio_run<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
}

#[tokio::test(flavor = "multi_thread")]
async fn shippy_on_dns_records_the_platform_publishes() {
    require_private_netns();
    init_logs();
    let free = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (vessel_port, consignment_port) = (free(), free());
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let records = [
        "local=/shippy.test/".to_owned(),
        format!("srv-host=_grpc._tcp.{vessel_name}.shippy.test,node1.shippy.test,{vessel_port}"),
        format!("srv-host=_grpc._tcp.{consignment_name}.shippy.test,node1.shippy.test,{consignment_port}"),
        "host-record=node1.shippy.test,127.0.0.1".to_owned(),
    ];
    let dns = Dnsmasq::start(&records.iter().map(String::as_str).collect::<Vec<_>>());
    let nameserver = dns.address().to_string();
    let env: Vec<(&'static str, String)> = vec![
        ("MICRO_REGISTRY", "dns".into()),
        ("MICRO_DNS_NAMESERVER", nameserver),
        ("MICRO_DNS_DOMAIN", "shippy.test".into()),
        ("CONSIGNMENT_DB", ":memory:".into()),
    ];
    let vessel_address = format!("127.0.0.1:{vessel_port}");
    let consignment_address = format!("127.0.0.1:{consignment_port}");
    let mut vessel = Process::start(
        "vessel-service",
        &[],
        &refs(&with(&env, &[("MICRO_SERVER_NAME", &vessel_name), ("MICRO_SERVER_ADDRESS", &vessel_address)])),
    );
    let consignment_env = with(
        &env,
        &[
            ("MICRO_SERVER_NAME", &consignment_name),
            ("VESSEL_SERVICE", &vessel_name),
            ("MICRO_SERVER_ADDRESS", &consignment_address),
        ],
    );
    let _consignment = Process::start("consignment-service", &[], &refs(&consignment_env));
    // No registration to wait for: wait until the vessel port answers.
    e2e::calls::poll_until("vessel-service listening", SOON, async || {
        tokio::net::TcpStream::connect(&vessel_address).await.ok()
    })
    .await;
    e2e::calls::poll_until("consignment-service listening", SOON, async || {
        tokio::net::TcpStream::connect(&consignment_address).await.ok()
    })
    .await;
    let out = create(&consignment_name, &env).await;
    assert!(out.contains("vessel001"), "{out}");
    vessel.signal("TERM");
    vessel.wait(SOON).await;
    assert!(vessel.log().contains("registration is left to the platform"), "{}", vessel.log());
}
