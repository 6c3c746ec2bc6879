//! A segment flooded with made-up mDNS instances: more than a process's cache keeps
//! ([`MAX_MDNS_INSTANCES`] plus one), announced over real multicast on a host of the test's
//! own. Shippy's consignment-service keeps working, finds a vessel-service instance that
//! starts after the flood (its name was asked for, so it takes the place of a made-up one),
//! and its memory grows by less than the documented bound.

use std::{net::UdpSocket, time::Duration};

use e2e::{
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    free_port,
    hosts::{Host, Network},
    process::{Place, Process},
    shippy::{fleet_file, run_cli, sample_consignment},
    unique_name,
};
use micro_core::registry::{MAX_MDNS_INSTANCES, SERVICE_TYPE};
use simple_dns::{
    CLASS, Name, Packet, PacketFlag, ResourceRecord,
    rdata::{A, PTR, RData, SRV, TXT},
};

/// Made-up instances announced: one more than a process keeps.
const FLOOD: usize = MAX_MDNS_INSTANCES + 1;
/// What a full cache may add to a process's resident memory (docs/registries.md).
const FULL_CACHE_RSS_BOUND_KB: u64 = 32 * 1024;
/// How long the flood is announced again until a process shows it refused some.
const FLOOD_SEEN: Duration = Duration::from_secs(60);

#[test]
fn a_flood_past_the_cache_limit_hides_no_peer_and_memory_stays_bounded() {
    e2e::require_private_netns();
    let network = Network::new(1);
    let host = network.host(0);
    let dir = tempfile::tempdir().expect("temporary folder");
    let vessel_name = unique_name("vessel");
    let consignment_name = unique_name("consignment");
    let fleet = fleet_file(dir.path(), "flooded").display().to_string();
    let vessels_db = dir.path().join("vessels.db").display().to_string();
    let vessel = || {
        let env = [("MICRO_SERVER_NAME", vessel_name.as_str())];
        Place::On(host).start("vessel-service", &["--fleet", &fleet, "--db", &vessels_db], &env)
    };
    let metrics_port = free_port().to_string();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let first_vessel = vessel();
    let consignments_db = dir.path().join("consignments.db").display().to_string();
    let consignment = Place::On(host).start(
        "consignment-service",
        &["--db", &consignments_db],
        &[
            ("MICRO_SERVER_NAME", &consignment_name),
            ("VESSEL_SERVICE", &vessel_name),
            ("MICRO_METRICS_ADDRESS", &metrics_address),
        ],
    );
    host.block_on(|| async {
        let registry = mdns();
        wait_for(&registry, &vessel_name, 1).await;
        wait_for(&registry, &consignment_name, 1).await;
        create(&consignment_name, "before the flood").await;
        let rss_before = resident_kb(&consignment);
        let refused = poll_until("consignment-service refusing made-up instances", FLOOD_SEEN, async || {
            announce_flood(host);
            let refused = registry_events(&metrics_address, "refused").await;
            (refused > 0.0).then_some(refused)
        })
        .await;
        eprintln!("consignment-service refused {refused} made-up instances");

        // The instance it knew dies without a goodbye; one that starts now must be found.
        first_vessel.signal("KILL");
        let _second_vessel = vessel();
        poll_until("consignment-service making room for the new vessel-service", STARTUP, async || {
            (registry_events(&metrics_address, "evicted").await > 0.0).then_some(())
        })
        .await;
        create(&consignment_name, "after the flood, on the new instance").await;

        let grown = resident_kb(&consignment).saturating_sub(rss_before);
        eprintln!("consignment-service grew by {grown} kB with a full cache");
        assert!(
            grown < FULL_CACHE_RSS_BOUND_KB,
            "consignment-service grew by {grown} kB, over the documented {FULL_CACHE_RSS_BOUND_KB} kB"
        );
    });
}

/// Creates the sample consignment through consignment-cli; fails the test unless it is stored.
async fn create(consignment_name: &str, when: &str) {
    let run = run_cli(consignment_name, &sample_consignment(), &[], &[]).await;
    assert!(run.success, "creation {when} failed:\n{}\n{}", run.stdout, run.stderr);
}

/// Announces [`FLOOD`] made-up instances on `host`'s segment (call it on the host), one
/// unsolicited mDNS answer each (PTR, SRV, TXT and A records), as a responder announcing
/// itself would.
fn announce_flood(host: &Host) {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("flood socket");
    socket.set_multicast_loop_v4(true).expect("multicast loop");
    for i in 0..FLOOD {
        let packet = announcement(i, host.address().to_bits());
        // A full socket buffer drops some: the flood is announced again until it is seen.
        let _ = socket.send_to(&packet, "224.0.0.251:5353");
    }
}

fn announcement(i: usize, address: u32) -> Vec<u8> {
    let (instance, target) = (format!("flood-{i}.{SERVICE_TYPE}"), format!("flood-{i}.local"));
    let (id, name) = (format!("flood-{i}"), format!("made-up-{i}"));
    let service = SERVICE_TYPE.trim_end_matches('.');
    let instance = instance.trim_end_matches('.');
    let mut txt = TXT::new();
    for (key, value) in [("txtvers", "1"), ("name", name.as_str()), ("id", id.as_str())] {
        txt.add_attribute(key, Some(value.as_bytes())).expect("TXT entry");
    }
    let mut packet = Packet::new_reply(0);
    packet.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    packet.answers.push(record(service, RData::PTR(PTR(Name::new_unchecked(instance)))));
    let srv = SRV { priority: 0, weight: 0, port: 9, target: Name::new_unchecked(&target) };
    packet.answers.push(record(instance, RData::SRV(srv)));
    packet.answers.push(record(instance, RData::TXT(txt)));
    packet.answers.push(record(&target, RData::A(A { address })));
    packet.build_bytes_vec_compressed().expect("announcement packet")
}

fn record<'a>(owner: &'a str, data: RData<'a>) -> ResourceRecord<'a> {
    ResourceRecord::new(Name::new_unchecked(owner), CLASS::IN, 120, data)
}

/// The process's resident memory, in kB (`VmRSS` of `/proc/PID/status`).
fn resident_kb(process: &Process) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid())).expect("process status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in the process status")
}

/// The process's count of the mDNS registry event `event` for made-up names (service `*`),
/// read from its `/metrics`; 0 until it has one.
async fn registry_events(metrics_address: &str, event: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("http://{metrics_address}/metrics")).await else { return 0.0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with("micro_registry_events_total{"))
        .filter(|line| {
            line.contains("registry=\"mdns\"")
                && line.contains("service=\"*\"")
                && line.contains(&format!("event=\"{event}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
