//! The dns registry against a real dnsmasq (Debian's `dnsmasq-base`; `make test-deps`
//! installs it) serving SRV and A records the test rewrites: look-ups, the A/AAAA fallback,
//! records added and removed reaching a running watch within the TTL bounds, a name with no
//! record, and an SRV record whose target does not resolve.
//!
//! Run with `scripts/netns-run cargo test -p micro-core --test dns`.

use std::{collections::BTreeSet, time::Duration};

use e2e::{dnsmasq::Dnsmasq, unique_name};
use futures::StreamExt;
use micro_core::{
    Error, Registry,
    config::{RegistryConfig, RegistryKind},
    registry::Change,
};
use tokio::time::timeout;

/// The TTL bounds the registry under test keeps answers within.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(2);

async fn registry(dns: &Dnsmasq) -> std::sync::Arc<dyn Registry> {
    let config = RegistryConfig {
        kind: RegistryKind::Dns,
        lookup_timeout: Duration::from_millis(300),
        dns_domain: Some("micro.test".into()),
        dns_nameserver: Some(dns.address()),
        dns_port: 7000,
        dns_min_ttl: MIN_TTL,
        dns_max_ttl: MAX_TTL,
        ..RegistryConfig::default()
    };
    config.connect().await.expect("dns registry")
}

fn srv(name: &str, target: &str, port: u16) -> String {
    format!("srv-host=_grpc._tcp.{name}.micro.test,{target}.micro.test,{port}")
}

fn host(target: &str, ip: &str) -> String {
    format!("host-record={target}.micro.test,{ip}")
}

/// `lines`, after the line that makes dnsmasq answer for `micro.test` itself (NXDOMAIN for
/// names it does not know, rather than REFUSED).
fn refs(lines: &[String]) -> Vec<&str> {
    std::iter::once(AUTHORITATIVE).chain(lines.iter().map(String::as_str)).collect()
}

const AUTHORITATIVE: &str = "local=/micro.test/";

#[tokio::test(flavor = "multi_thread")]
async fn srv_records_added_and_removed_reach_a_running_watch_within_the_ttl() {
    let name = unique_name("dns");
    let mut records = vec![srv(&name, "a", 6001), host("a", "127.0.0.11")];
    let mut dns = Dnsmasq::start(&refs(&records));
    let registry = registry(&dns).await;

    let nodes = registry.lookup(&name).await.expect("one instance");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].address, "127.0.0.11:6001".parse().unwrap());
    assert_eq!(nodes[0].name, name);

    let mut watch = registry.watch(&name);
    let first = timeout(Duration::from_secs(5), watch.next()).await.expect("an Insert");
    assert!(matches!(first, Some(Ok(Change::Insert(_, ref n))) if n.address.port() == 6001), "{first:?}");

    // Added: a second target.
    records.extend([srv(&name, "b", 6002), host("b", "127.0.0.12")]);
    dns.set_records(&refs(&records));
    // Generous bounds: they tell a change picked up by the next look-up from one never seen.
    let next = timeout(MAX_TTL + Duration::from_secs(10), watch.next()).await.expect("the new record");
    assert!(
        matches!(next, Some(Ok(Change::Insert(_, ref n))) if n.address == "127.0.0.12:6002".parse().unwrap()),
        "{next:?}"
    );

    // Removed: the first.
    records.drain(..2);
    dns.set_records(&refs(&records));
    let next = timeout(MAX_TTL + Duration::from_secs(10), watch.next()).await.expect("the removal");
    assert!(matches!(next, Some(Ok(Change::Remove(ref id))) if id.ends_with("127.0.0.11:6001")), "{next:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bare_a_record_uses_the_default_port_and_a_target_that_does_not_resolve_is_skipped() {
    let (plain, mixed) = (unique_name("plain"), unique_name("mixed"));
    let records = [
        host(&plain, "127.0.0.21"),
        srv(&mixed, "good", 6101),
        host("good", "127.0.0.22"),
        srv(&mixed, "nowhere", 6102),
    ];
    let dns = Dnsmasq::start(&refs(&records));
    let registry = registry(&dns).await;

    let nodes = registry.lookup(&plain).await.expect("the A record");
    assert_eq!(nodes.iter().map(|n| n.address.to_string()).collect::<Vec<_>>(), ["127.0.0.21:7000"]);

    let nodes = registry.lookup(&mixed).await.expect("the good record");
    assert_eq!(nodes.iter().map(|n| n.address.to_string()).collect::<Vec<_>>(), ["127.0.0.22:6101"]);
    let mut watch = registry.watch(&mixed);
    let mut seen = BTreeSet::new();
    // The watch keeps going over the bad record: one Insert, then nothing for two TTLs.
    let first = timeout(Duration::from_secs(5), watch.next()).await.expect("an Insert");
    if let Some(Ok(Change::Insert(id, _))) = first {
        seen.insert(id);
    }
    assert_eq!(seen.len(), 1);
    assert!(timeout(MAX_TTL * 2, watch.next()).await.is_err(), "nothing changed");

    // Registration is the platform's: a no-op.
    registry.register(&nodes[0], Duration::from_secs(5)).await.expect("no-op");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_with_no_record_is_unavailable_naming_the_name_the_registry_and_the_query() {
    let dns = Dnsmasq::start(&refs(&[host("other", "127.0.0.31")]));
    let registry = registry(&dns).await;
    let name = unique_name("missing");
    let err = registry.lookup(&name).await.expect_err("no record");
    assert!(matches!(err, Error::NoInstance { .. }), "{err:?}");
    let text = err.to_string();
    for needle in
        [name.as_str(), "dns", &format!("_grpc._tcp.{name}.micro.test."), &dns.address().to_string()]
    {
        assert!(text.contains(needle), "{needle:?} missing from {text}");
    }
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
}
