//! `micro` against the etcd and dns registries: a name that is not there gets advice that
//! fits the backend.

use assert_cmd::cargo::cargo_bin_cmd;
use e2e::{dnsmasq::Dnsmasq, etcd::EtcdCluster};

fn why_missing(env: &[(&str, &str)]) -> (i32, String) {
    let mut micro = cargo_bin_cmd!("micro");
    micro.args(["why", "nowhere-service", "--lookup-timeout", "300"]);
    for (key, value) in env {
        micro.env(key, value);
    }
    let output = micro.output().expect("micro runs");
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn why_on_etcd_says_how_to_see_the_keys() {
    e2e::require_private_netns();
    let etcd = EtcdCluster::start(1);
    let (code, text) =
        why_missing(&[("MICRO_REGISTRY", "etcd"), ("MICRO_REGISTRY_ADDRESS", &etcd.endpoints())]);
    assert_eq!(code, 3, "not found: {text}");
    assert!(text.contains("etcdctl") && text.contains("/micro/registry/nowhere-service/"), "{text}");
}

#[test]
fn why_on_dns_says_which_records_the_platform_must_publish() {
    e2e::require_private_netns();
    // Authoritative for the domain, so a name it lacks is NXDOMAIN, not a refused query.
    let dns = Dnsmasq::start(&["local=/micro.test/", "host-record=other.micro.test,127.0.0.1"]);
    let nameserver = dns.address().to_string();
    let (code, text) = why_missing(&[
        ("MICRO_REGISTRY", "dns"),
        ("MICRO_DNS_NAMESERVER", &nameserver),
        ("MICRO_DNS_DOMAIN", "micro.test"),
    ]);
    assert_eq!(code, 3, "not found: {text}");
    assert!(text.contains("_grpc._tcp.nowhere-service") && text.contains("platform registers"), "{text}");
}
