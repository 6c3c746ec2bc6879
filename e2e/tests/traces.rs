//! OpenTelemetry traces across real processes: consignment-cli → consignment-service →
//! vessel-service export their spans over OTLP (one over gRPC, the others over HTTP) to a
//! receiver this test runs, and the spans form one trace, each hop's server span the child
//! of the caller's attempt span, and vessel-service's handling of the event the creation
//! stored joins that trace too. Runs inside the private namespace (`make test`).

use std::time::Duration;

use e2e::{
    discovery::{mdns, wait_for},
    otlp::{Receiver, Span},
    process::Process,
    shippy::{self, sample_consignment},
    unique_name,
};
use proto::vessel::{Specification, vessel_service_client::VesselServiceClient};

/// Spans go out every 100 ms instead of every 5 s.
const SCHEDULE_DELAY: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// OTLP export to the receiver, and events over the default (registry) broker.
fn otlp_env<'a>(receiver_endpoint: &'a str, protocol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("MICRO_BROKER", "registry"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver_endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        SCHEDULE_DELAY,
    ]
}

fn by_id<'a>(spans: &'a [Span], id: &str) -> &'a Span {
    spans.iter().find(|s| s.span_id == id).unwrap_or_else(|| panic!("no span {id} in {spans:#?}"))
}

/// vessel-service's handling of a `consignment.created` event in a trace the CLI began.
fn event_handling(spans: &[Span]) -> Option<&Span> {
    spans.iter().find(|s| {
        s.service == "vessel-service"
            && s.name == "broker.handle"
            && spans.iter().any(|cli| cli.service == "consignment-cli" && cli.trace_id == s.trace_id)
    })
}

fn server_span<'a>(spans: &'a [Span], service: &str) -> Option<&'a Span> {
    spans.iter().find(|s| s.service == service && s.kind == SERVER && s.name.contains('/'))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_creation_is_one_trace_across_cli_consignment_and_vessel_services() {
    let receiver = Receiver::start().await;
    let (grpc, http) = (receiver.grpc_endpoint(), receiver.http_endpoint());
    let registry = mdns();
    let (vessel_name, consignment_name) = (unique_name("vessel"), unique_name("consignment"));

    let mut vessel_env = otlp_env(&grpc, "grpc");
    vessel_env.push(("MICRO_SERVER_NAME", &vessel_name));
    let _vessel = Process::start("vessel-service", &[], &vessel_env);
    let mut consignment_env = otlp_env(&http, "http/protobuf");
    consignment_env.extend([
        ("MICRO_SERVER_NAME", consignment_name.as_str()),
        ("VESSEL_SERVICE", vessel_name.as_str()),
        ("CONSIGNMENT_DB", ":memory:"),
    ]);
    let _consignment = Process::start("consignment-service", &[], &consignment_env);
    wait_for(&registry, &vessel_name, 1).await;
    wait_for(&registry, &consignment_name, 1).await;

    let run =
        shippy::run_cli(&consignment_name, &sample_consignment(), &[], &otlp_env(&http, "http/protobuf"))
            .await;
    assert!(run.success, "CLI failed: {}", run.stderr);

    // The CLI flushed its spans before exiting; the services send theirs within 100 ms.
    let spans = receiver
        .wait_for(
            |spans| {
                server_span(spans, "vessel-service").is_some()
                    && spans.iter().filter(|s| s.service == "consignment-service" && s.kind == SERVER).count()
                        >= 2
                    && spans.iter().any(|s| s.service == "consignment-cli")
                    && event_handling(spans).is_some()
            },
            Duration::from_secs(20),
        )
        .await;

    // The vessel call: vessel server span ← consignment-service attempt ← its call ← its server span.
    let vessel_server = server_span(&spans, "vessel-service").unwrap();
    assert_eq!(vessel_server.name, "vessel.VesselService/Reserve");
    assert_eq!(vessel_server.via, "grpc");
    let attempt = by_id(&spans, &vessel_server.parent_span_id);
    assert_eq!((attempt.service.as_str(), attempt.kind), ("consignment-service", CLIENT));
    assert_eq!(attempt.attribute("micro.attempt_kind"), Some("first"));
    let call = by_id(&spans, &attempt.parent_span_id);
    assert_eq!(call.name, "vessel.VesselService/Reserve");
    assert_eq!(call.attribute("rpc.service"), Some(vessel_name.as_str()));
    let create = by_id(&spans, &call.parent_span_id);
    assert_eq!((create.service.as_str(), create.kind), ("consignment-service", SERVER));
    assert_eq!(create.name, "consignment.ShippingService/CreateConsignment");

    // …and the consignment server span is the child of the CLI's attempt, in the CLI's trace.
    let cli_attempt = by_id(&spans, &create.parent_span_id);
    assert_eq!((cli_attempt.service.as_str(), cli_attempt.kind), ("consignment-cli", CLIENT));
    let cli_call = by_id(&spans, &cli_attempt.parent_span_id);
    assert_eq!(cli_call.service, "consignment-cli");
    let trace = &cli_call.trace_id;
    for span in [vessel_server, attempt, call, create, cli_attempt] {
        assert_eq!(&span.trace_id, trace, "{span:#?} is in another trace");
    }
    // The event the create stored reaches vessel-service later, through the outbox, and its
    // handling joins the same trace as a child of the create's server span.
    let handling = event_handling(&spans).unwrap();
    assert_eq!(&handling.trace_id, trace);
    assert_eq!(handling.parent_span_id, create.span_id, "{handling:#?}");
    assert_eq!(handling.attribute("topic"), Some("consignment.created"));
    let services: std::collections::BTreeSet<&str> =
        spans.iter().filter(|s| &s.trace_id == trace).map(|s| s.service.as_str()).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["consignment-cli", "consignment-service", "vessel-service"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_from_a_caller_outside_the_sdk_is_continued() {
    let receiver = Receiver::start().await;
    let http = receiver.http_endpoint();
    let registry = mdns();
    let vessel_name = unique_name("vessel");
    let mut env = otlp_env(&http, "http/protobuf");
    env.push(("MICRO_SERVER_NAME", &vessel_name));
    let _vessel = Process::start("vessel-service", &[], &env);
    wait_for(&registry, &vessel_name, 1).await;
    let address = registry.lookup(&vessel_name).await.unwrap()[0].address;

    // A plain tonic client, no SDK: it names its own trace and span.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut vessels = VesselServiceClient::new(channel);
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(Specification { capacity: 1, max_weight: 1 });
    request.metadata_mut().insert("traceparent", format!("00-{trace}-{parent}-01").parse().unwrap());
    vessels.find_available(request).await.unwrap();

    let spans = receiver
        .wait_for(|spans| server_span(spans, "vessel-service").is_some(), Duration::from_secs(20))
        .await;
    let served = server_span(&spans, "vessel-service").unwrap();
    assert_eq!(served.trace_id, trace, "the caller's trace is continued, not replaced");
    assert_eq!(served.parent_span_id, parent, "the server span is the caller's span's child");
}
