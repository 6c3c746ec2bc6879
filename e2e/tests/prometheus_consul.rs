//! A real Prometheus (Debian's 2.42, from `scripts/install-prometheus`) scrapes the shippy
//! services at the metrics address each one announced in a real Consul agent, finds them
//! `up`, and sees the request counters move. Runs inside the private namespace.
//!
//! Debian builds Prometheus 2.42 without Consul discovery ("Disable Consul SD until its
//! Debian package is back in shape", its changelog), so `consul_sd_configs` is refused by
//! this binary: the test reads each instance's `metrics` label from Consul's catalog and
//! hands Prometheus the targets through `file_sd_configs`, relabelled as the README's
//! `consul_sd_configs` example relabels them.

use std::{path::PathBuf, time::Duration};

use e2e::{
    calls::poll_until, consul::ConsulAgent, process::Process, require_private_netns, shippy, unique_name,
};
use serde_json::Value;

fn prometheus_binary() -> PathBuf {
    let path = e2e::process::workspace_root().join(".tools/prometheus/usr/bin/prometheus");
    assert!(
        path.exists(),
        "prometheus not found at {}: run scripts/install-prometheus (or make test-deps), which unpacks \
         Debian's prometheus 2.42 package into .tools/prometheus",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn get_json(url: &str) -> Option<Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_shippy_services_at_the_metrics_address_they_announce_in_consul() {
    require_private_netns();
    let agent = ConsulAgent::start_async().await;
    let consul = agent.http_address();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let common = [("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", consul.as_str())];
    let mut env = common.to_vec();
    env.push(("MICRO_SERVER_NAME", &vessel_name));
    let _vessel = Process::start("vessel-service", &[], &env);
    let mut env = common.to_vec();
    env.extend([
        ("MICRO_SERVER_NAME", consignment_name.as_str()),
        ("VESSEL_SERVICE", vessel_name.as_str()),
        ("CONSIGNMENT_DB", ":memory:"),
    ]);
    let _consignment = Process::start("consignment-service", &[], &env);

    // Each instance's announced metrics address, as Consul's catalog has it.
    let mut groups = Vec::new();
    for name in [&vessel_name, &consignment_name] {
        let url = format!("http://{consul}/v1/catalog/service/{name}");
        let metrics =
            poll_until(format!("{name} in Consul's catalog"), Duration::from_secs(20), async || {
                let entries = get_json(&url).await?;
                entries.as_array()?.first()?["ServiceMeta"]["metrics"].as_str().map(str::to_owned)
            })
            .await;
        groups.push(serde_json::json!({
            "targets": [name.as_str()],
            "labels": { "__meta_consul_service": name.as_str(), "__meta_consul_service_metadata_metrics": metrics },
        }));
    }
    let dir = tempfile::tempdir().unwrap();
    let targets_file = dir.path().join("targets.json");
    std::fs::write(&targets_file, serde_json::to_vec(&groups).unwrap()).unwrap();
    // The README's relabelling, with short intervals and this test's services only.
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: micro
    file_sd_configs:
      - files: [{targets}]
    relabel_configs:
      - source_labels: [__meta_consul_service]
        regex: {vessel_name}|{consignment_name}
        action: keep
      - source_labels: [__meta_consul_service_metadata_metrics]
        regex: (.+)
        action: keep
      - source_labels: [__meta_consul_service_metadata_metrics]
        target_label: __address__
      - source_labels: [__meta_consul_service]
        target_label: service
"#,
            targets = targets_file.display()
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let _prometheus = tokio::process::Command::new(prometheus_binary())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");

    // Both services are targets, `up`, at the metrics address each announced.
    let targets_url = format!("http://{web}/api/v1/targets?state=active");
    let targets = poll_until("both shippy services up in Prometheus", Duration::from_secs(60), async || {
        let body = get_json(&targets_url).await?;
        let active = body["data"]["activeTargets"].as_array()?.clone();
        let up = |name: &str| active.iter().any(|t| t["labels"]["service"] == name && t["health"] == "up");
        (up(&vessel_name) && up(&consignment_name)).then_some(active)
    })
    .await;
    for target in &targets {
        let address = target["labels"]["instance"].as_str().unwrap();
        assert!(address.starts_with("127.0.0.1:"), "scraped at the announced metrics address: {target}");
    }

    // A creation moves the request counters Prometheus reads.
    let run = shippy::run_cli(
        &consignment_name,
        &shippy::sample_consignment(),
        &[],
        &[("MICRO_REGISTRY", "consul"), ("MICRO_REGISTRY_ADDRESS", consul.as_str())],
    )
    .await;
    assert!(run.success, "CLI failed: {}", run.stderr);
    for (service, method) in [
        (&consignment_name, "/consignment.ShippingService/CreateConsignment"),
        (&vessel_name, "/vessel.VesselService/Reserve"),
    ] {
        let query =
            format!(r#"micro_server_requests_total{{service="{service}",method="{method}",code="OK"}}"#);
        let url = format!("http://{web}/api/v1/query?query={}", urlencode(&query));
        poll_until(format!("{query} >= 1 in Prometheus"), Duration::from_secs(30), async || {
            let body = get_json(&url).await?;
            let value =
                body["data"]["result"].as_array()?.first()?["value"][1].as_str()?.parse::<f64>().ok()?;
            (value >= 1.0).then_some(())
        })
        .await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
