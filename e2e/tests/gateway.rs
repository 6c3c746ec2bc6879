//! `micro gateway` as a real process in front of the real shippy binaries over mDNS:
//! HTTP/JSON calls by name, errors as HTTP statuses with `{"code", "message"}`, headers as
//! call metadata and deadlines, the body limit, discovery, health and metrics.

use std::time::Duration;

use e2e::{
    browser::{chromium_run, percent_encoded},
    calls::poll_until,
    discovery::{STARTUP, mdns, wait_for},
    process::Process,
    unique_name,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A running `micro gateway` and the base URL it serves.
struct Gateway {
    process: Process,
    url: String,
}

impl Gateway {
    /// Starts the gateway on a port the system picks, with extra `args`, and waits for
    /// its address line.
    async fn start(args: &[&str]) -> Gateway {
        let mut all = vec!["gateway", "--address", "127.0.0.1:0"];
        all.extend(args);
        let process = Process::start("micro", &all, &[("MICRO_LOOKUP_TIMEOUT", "1500")]);
        let url = e2e::gateway::url_of(&process).await;
        Gateway { process, url }
    }

    /// Polls `GET /` until it lists every one of `names`.
    async fn wait_listed(&self, names: &[&str]) {
        let http = reqwest::Client::new();
        let what = format!("the gateway listing {names:?}");
        poll_until(what, STARTUP, async || {
            let listed: Value = http.get(format!("{}/", self.url)).send().await.ok()?.json().await.ok()?;
            let listed = listed["services"].as_array()?.clone();
            names.iter().all(|n| listed.iter().any(|l| l == n)).then_some(())
        })
        .await;
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> Answer {
        let mut request = reqwest::Client::new().post(format!("{}{path}", self.url)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::of(request.send().await.expect("the gateway answers")).await
    }

    async fn get(&self, path: &str) -> Answer {
        Answer::of(reqwest::get(format!("{}{path}", self.url)).await.expect("the gateway answers")).await
    }
}

/// An HTTP answer: status, headers and body.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    async fn of(response: reqwest::Response) -> Answer {
        let (status, headers) = (response.status(), response.headers().clone());
        Answer { status, headers, text: response.text().await.expect("a body") }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|err| panic!("{err}: {}", self.text))
    }

    /// Asserts an error answer: the status, the gRPC code name, and what the message says.
    fn assert_error(&self, status: u16, code: &str, says: &[&str]) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        assert_eq!(self.headers["content-type"], "application/json");
        let body = self.json();
        assert_eq!(body["code"], code, "{}", self.text);
        let message = body["message"].as_str().unwrap_or_default();
        for part in says {
            assert!(message.contains(part), "{message:?} should say {part:?}");
        }
    }
}

fn shippy(vessel_name: &str, consignment_name: &str) -> (Process, Process) {
    // A metrics page on a port of its own, announced, for the dashboard's per-method figures.
    let metrics = ("MICRO_METRICS_ADDRESS", "127.0.0.1:0");
    let vessel = Process::start("vessel-service", &[], &[("MICRO_SERVER_NAME", vessel_name), metrics]);
    let consignment = Process::start(
        "consignment-service",
        &[],
        &[
            ("MICRO_SERVER_NAME", consignment_name),
            ("VESSEL_SERVICE", vessel_name),
            ("MICRO_LOOKUP_TIMEOUT", "1500"),
            ("CONSIGNMENT_DB", ":memory:"),
        ],
    );
    (vessel, consignment)
}

fn consignment(weight: u32) -> String {
    json!({
        "description": "through the gateway",
        "weight": weight,
        "containers": [{ "customer_id": "cust001", "user_id": "user001", "origin": "Derby" }],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn shippy_through_the_gateway() {
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let (mut vessel, _consignment) = shippy(&vessel_name, &consignment_name);
    wait_for(&registry, &vessel_name, 1).await;
    wait_for(&registry, &consignment_name, 1).await;
    let mut gateway = Gateway::start(&[]).await;
    gateway.wait_listed(&[&vessel_name, &consignment_name]).await;

    // A call by name, replied as proto3 JSON.
    let find = format!("/{vessel_name}/vessel.VesselService/FindAvailable");
    let answer =
        gateway.post(&find, r#"{"capacity": 3, "maxWeight": 55000}"#, &[("x-request-id", "req-1")]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json()["vessel"]["id"], "vessel001", "{}", answer.text);
    assert_eq!(answer.headers["x-request-id"], "req-1", "the request id comes back");
    assert!(answer.headers.get("access-control-allow-origin").is_none(), "CORS is off by default");

    // A create stores once per idempotency key; the replay says so in a header.
    let create = format!("/{consignment_name}/consignment.ShippingService/CreateConsignment");
    let key = [("idempotency-key", "gateway-test-key-1")];
    let first = gateway.post(&create, consignment(55_000), &key).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.json()["created"], true, "{}", first.text);
    assert_eq!(first.json()["consignment"]["vesselId"], "vessel001", "{}", first.text);
    let again = gateway.post(&create, consignment(55_000), &key).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.json()["consignment"]["id"], first.json()["consignment"]["id"]);
    assert_eq!(again.headers["idempotent-replayed"], "true", "response metadata comes back as headers");
    let get = format!("/{consignment_name}/consignment.ShippingService/GetConsignments");
    let listed = gateway.post(&get, "", &[]).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
    assert_eq!(
        listed.json()["consignments"].as_array().map(Vec::len),
        Some(1),
        "stored once: {}",
        listed.text
    );

    // Errors: the refusal, malformed JSON, unknown names, the body limit.
    let heavy = gateway.post(&create, consignment(300_000), &[]).await;
    heavy.assert_error(400, "FAILED_PRECONDITION", &["vessel"]);
    let malformed = gateway.post(&find, "{\n  \"capacity\": 3,\n  \"maxWeight\" 55000\n}", &[]).await;
    malformed.assert_error(400, "INVALID_ARGUMENT", &["malformed JSON", "line 3 column"]);
    let wrong_field = gateway.post(&find, r#"{"capacity": "lots"}"#, &[]).await;
    wrong_field.assert_error(400, "INVALID_ARGUMENT", &["line 1 column"]);
    let unknown_method =
        gateway.post(&format!("/{vessel_name}/vessel.VesselService/FindAll"), "{}", &[]).await;
    unknown_method.assert_error(404, "NOT_FOUND", &["FindAll", "vessel.VesselService/FindAvailable"]);
    let typo = vessel_name.replacen("vessel", "vesel", 1);
    let unknown_service =
        gateway.post(&format!("/{typo}/vessel.VesselService/FindAvailable"), "{}", &[]).await;
    unknown_service.assert_error(
        404,
        "NOT_FOUND",
        &[&typo, &format!("did you mean {vessel_name}"), &consignment_name],
    );
    let huge = gateway.post(&find, vec![b' '; 5 * 1024 * 1024], &[]).await;
    huge.assert_error(413, "RESOURCE_EXHAUSTED", &["4194304 bytes"]);

    // Discovery, health and metrics; unknown names created no cache entries.
    let described = gateway.get(&format!("/{vessel_name}")).await;
    assert_eq!(described.status, StatusCode::OK, "{}", described.text);
    let method = &described.json()["methods"][0];
    assert_eq!(method["path"], "vessel.VesselService/FindAvailable");
    assert_eq!(method["request"]["type"], "vessel.Specification");
    assert_eq!(method["request"]["fields"][1]["name"], "maxWeight");
    assert_eq!(method["response"]["fields"][0]["message"]["type"], "vessel.Vessel");
    assert_eq!(method["example"], json!({ "capacity": 0, "maxWeight": 0 }));
    let health = gateway.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json()["status"], "SERVING");
    assert_eq!(health.json()["cached_services"], 2, "only listed names are cached: {}", health.text);
    let metrics = gateway.get("/metrics").await;
    let ok_line = format!(
        r#"micro_gateway_requests_total{{service="{vessel_name}",method="vessel.VesselService/FindAvailable",status="200"}}"#
    );
    assert!(metrics.text.contains(&ok_line), "{}", metrics.text);
    assert!(metrics.text.contains("micro_client_attempts_total"), "the SDK's metrics too");
    gateway.get("/no/such/route/here").await.assert_error(404, "NOT_FOUND", &["no route"]);
    // A GET on a method path says to POST, and where the schema is.
    let get_method = gateway.get(&format!("/{vessel_name}/vessel.VesselService/FindAvailable")).await;
    get_method.assert_error(405, "UNIMPLEMENTED", &["POST", &format!("GET /{vessel_name}")]);
    assert_eq!(get_method.headers["allow"], "POST");

    // vessel-service gone: the create is 503 naming it.
    vessel.terminate(Duration::from_secs(10)).await;
    let down = gateway.post(&create, consignment(1_000), &[]).await;
    down.assert_error(503, "UNAVAILABLE", &[&vessel_name]);

    let status = gateway.process.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "the gateway stops cleanly on SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn x_timeout_is_the_deadline_and_cors_is_one_flag() {
    let registry = mdns();
    let slow_name = unique_name("slow");
    let _slow =
        Process::start("fault-server", &[], &[("FAULT_NAME", &slow_name), ("FAULT_DELAY_MS", "5000")]);
    wait_for(&registry, &slow_name, 1).await;
    let gateway = Gateway::start(&["--cors-origin", "https://ops.example", "--max-body", "1000"]).await;
    gateway.wait_listed(&[&slow_name]).await;

    let find = format!("/{slow_name}/vessel.VesselService/FindAvailable");
    let started = std::time::Instant::now();
    let answer = gateway.post(&find, "{}", &[("X-Timeout", "300ms")]).await;
    answer.assert_error(504, "DEADLINE_EXCEEDED", &[]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the deadline, not after the reply: {:?}",
        started.elapsed()
    );
    assert_eq!(answer.headers["access-control-allow-origin"], "https://ops.example");
    gateway.post(&find, "{}", &[("X-Timeout", "soon")]).await.assert_error(
        400,
        "INVALID_ARGUMENT",
        &["X-Timeout"],
    );
    gateway.post(&find, vec![b' '; 1001], &[]).await.assert_error(413, "RESOURCE_EXHAUSTED", &["1000 bytes"]);

    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{}{find}", gateway.url))
        .header("origin", "https://ops.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap().to_owned();
    assert!(allowed.contains("idempotency-key") && allowed.contains("x-timeout"), "{allowed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_in_a_real_browser() {
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));
    let (_vessel, _consignment) = shippy(&vessel_name, &consignment_name);
    // A subscriber on the registry broker, in a queue group, for the page's topics.
    let (topic, queue) = (unique_name("dashboard.topic"), unique_name("listeners"));
    let _subscriber = Process::start(
        "micro",
        &["subscribe", &topic, "--queue", &queue, "--timeout", "300s"],
        &[("MICRO_BROKER", "registry")],
    );
    let vessel_node = wait_for(&registry, &vessel_name, 1).await.remove(0);
    let consignment_node = wait_for(&registry, &consignment_name, 1).await.remove(0);
    let gateway = Gateway::start(&[]).await;
    gateway.wait_listed(&[&vessel_name, &consignment_name]).await;

    // The page lists both services and their instances, and a call from its form answers.
    let call = format!("{vessel_name}/vessel.VesselService/FindAvailable");
    let body = r#"{"capacity": 1, "maxWeight": 1}"#;
    let url = format!("{}/ui?call={}&body={}", gateway.url, percent_encoded(&call), percent_encoded(body));
    let dom = chromium_run(&["--dump-dom"], &url).await;
    assert!(dom.contains("micro dashboard"), "chromium printed the page: {dom}");
    for name in [&vessel_name, &consignment_name] {
        assert!(dom.contains(&format!(r#"data-service="{name}""#)), "{name} is listed:\n{dom}");
    }
    for node in [&vessel_node, &consignment_node] {
        assert!(dom.contains(&format!(r#"data-instance="{}""#, node.id)), "{} is shown:\n{dom}", node.id);
        assert!(dom.contains(&node.address.to_string()), "{} is shown:\n{dom}", node.address);
    }
    assert!(dom.contains("SERVING"), "health is shown:\n{dom}");
    assert!(dom.contains("vessel.VesselService/FindAvailable"), "methods are listed:\n{dom}");
    let reply = dom.split(r#"id="last-reply""#).nth(1).expect("the reply area");
    assert!(reply.starts_with(r#" data-status="200""#), "the form's call succeeded:\n{dom}");
    assert!(reply.contains("vessel001"), "the reply is shown:\n{dom}");

    // Calls through the gateway show as the method's rate, error ratio and latency, read
    // from vessel-service's own metrics; the registry broker's topic shows its subscriber.
    let http = reqwest::Client::new();
    let find = format!("{}/{vessel_name}/vessel.VesselService/FindAvailable", gateway.url);
    let figures = poll_until(
        "the dashboard showing FindAvailable's calls per second and the topic",
        STARTUP,
        async || {
            let called = http.post(&find).body(body).send().await.ok()?;
            assert_eq!(called.status(), 200, "a call through the gateway");
            let state: Value =
                http.get(format!("{}/ui/state", gateway.url)).send().await.ok()?.json().await.ok()?;
            let vessel =
                state["services"].as_array()?.iter().find(|s| s["name"] == vessel_name.as_str())?.clone();
            let method = vessel["methods"]
                .as_array()?
                .iter()
                .find(|m| m["method"] == "vessel.VesselService/FindAvailable")?
                .clone();
            let topic_listed = state["topics"].as_array()?.iter().any(|t| t["topic"] == topic.as_str());
            (topic_listed && method["calls_per_s"].as_f64()? > 0.0 && method["p99_ms"].as_f64().is_some())
                .then_some(method)
        },
    )
    .await;
    assert_eq!(figures["error_ratio"].as_f64(), Some(0.0), "{figures}");
    let dom = chromium_run(&["--dump-dom"], &format!("{}/ui", gateway.url)).await;
    let stats = dom
        .split(r#"data-method-stats="vessel.VesselService/FindAvailable""#)
        .nth(1)
        .unwrap_or_else(|| panic!("the method's figures are shown:\n{dom}"));
    let row = stats.split("</tr>").next().unwrap_or_default();
    assert!(
        row.contains("/s") && row.contains(" ms") && row.contains("0.0 %"),
        "rate, errors, latency: {row}"
    );
    let shown = dom
        .split(&format!(r#"data-topic="{topic}""#))
        .nth(1)
        .unwrap_or_else(|| panic!("the topic is shown:\n{dom}"));
    let row = shown.split("</tr>").next().unwrap_or_default();
    assert!(row.contains(&format!("(queue {queue})")), "its subscriber, in its queue group: {row}");

    // A screenshot for people, kept with the test logs, out of the repository.
    let screenshot = e2e::process::workspace_root().join("target").join("e2e-logs").join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot = format!("--screenshot={}", screenshot.display());
    chromium_run(&[&shot, "--window-size=1400,1200"], &url).await;
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "chromium wrote a screenshot to {}", screenshot.display());

    // The state the page polls follows instances as they come.
    let _second = Process::start("vessel-service", &[], &[("MICRO_SERVER_NAME", &vessel_name)]);
    poll_until("the dashboard state showing a second vessel instance", STARTUP, async || {
        let state: Value =
            http.get(format!("{}/ui/state", gateway.url)).send().await.ok()?.json().await.ok()?;
        let services = state["services"].as_array()?;
        let vessel = services.iter().find(|s| s["name"] == vessel_name.as_str())?;
        (vessel["instances"].as_array()?.len() == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_rate_gets_429_with_retry_after_while_another_is_served() {
    let registry = mdns();
    let name = unique_name("rated");
    let _server = Process::start("fault-server", &[], &[("FAULT_NAME", &name)]);
    wait_for(&registry, &name, 1).await;
    // One call per 10 s per client address, in bursts of 3: the fourth call at once is over.
    let gateway = Gateway::start(&["--rate-limit", "0.1", "--rate-burst", "3"]).await;
    gateway.wait_listed(&[&name]).await;
    let find = format!("{}/{name}/vessel.VesselService/FindAvailable", gateway.url);
    let from = |address: [u8; 4]| {
        reqwest::Client::builder().local_address(std::net::IpAddr::from(address)).build().expect("client")
    };
    let (greedy, other) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    for _ in 0..3 {
        let answer = Answer::of(greedy.post(&find).body("{}").send().await.expect("answer")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }
    let over = Answer::of(greedy.post(&find).body("{}").send().await.expect("answer")).await;
    over.assert_error(429, "RESOURCE_EXHAUSTED", &["client 127.0.0.1", "MICRO_GATEWAY_RATE_LIMIT"]);
    let retry_after: u64 = over.headers["retry-after"].to_str().unwrap().parse().expect("whole seconds");
    assert!((1..=10).contains(&retry_after), "Retry-After: {retry_after}");
    let served = Answer::of(other.post(&find).body("{}").send().await.expect("answer")).await;
    assert_eq!(served.status, StatusCode::OK, "another client is served: {}", served.text);
}
