//! Broker metrics: publishes and handled messages counted by broker, topic and result, and a
//! flood of topics that adds no series beyond the cap. A test binary of its own, so no other
//! test's topics share the process's cap.

use std::time::Duration;

use micro_core::{
    broker::{Broker, MemoryBroker, Message, SubscribeOptions, handler},
    metrics::{Format, MAX_BROKER_TOPICS, OTHER_TOPIC, metrics},
};
use tokio::sync::mpsc;

fn page() -> String {
    metrics().render_as(Format::Prometheus)
}

/// The value of the sample line that starts with `series`, or 0 when there is none.
fn value(page: &str, series: &str) -> f64 {
    page.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_are_counted_by_topic_and_result_and_a_flood_of_topics_adds_no_series() {
    let broker = MemoryBroker::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _subscription = broker
        .subscribe(
            "orders.created",
            SubscribeOptions::default(),
            handler(move |m: Message| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(());
                    if &m.body[..] == b"bad" { Err("refused".into()) } else { Ok(()) }
                }
            }),
        )
        .await
        .expect("subscribe");
    for body in ["a", "b", "bad"] {
        broker.publish(Message::new("orders.created", body)).await.expect("publish");
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("handled");
    }
    // The handler's outcome is counted right after it returns.
    let mut page = page();
    for _ in 0..100 {
        if value(
            &page,
            r#"micro_broker_handled_total{broker="memory",topic="orders.created",result="error"}"#,
        ) == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        page = self::page();
    }
    let published = r#"micro_broker_published_total{broker="memory",topic="orders.created",result="ok"}"#;
    assert_eq!(value(&page, published), 3.0, "{page}");
    let handled_ok = r#"micro_broker_handled_total{broker="memory",topic="orders.created",result="ok"}"#;
    assert_eq!(value(&page, handled_ok), 2.0, "{page}");
    let handled_error =
        r#"micro_broker_handled_total{broker="memory",topic="orders.created",result="error"}"#;
    assert_eq!(value(&page, handled_error), 1.0, "{page}");
    let durations = r#"micro_broker_handle_duration_seconds_count{broker="memory",topic="orders.created"}"#;
    assert_eq!(value(&page, durations), 3.0, "{page}");
    for family in
        ["micro_broker_published_total", "micro_broker_handled_total", "micro_broker_handle_duration_seconds"]
    {
        assert!(page.contains(&format!("# HELP {family} ")), "no help for {family}");
    }

    // Topics published in turn, more than a thread keeps at hand: each counted as its own.
    const MIXED: usize = 6;
    for round in 0..3 {
        for i in 0..MIXED {
            broker.publish(Message::new(format!("mixed.{i}"), "x")).await.expect("publish");
            let page = self::page();
            let mixed =
                format!(r#"micro_broker_published_total{{broker="memory",topic="mixed.{i}",result="ok"}}"#);
            assert_eq!(value(&page, &mixed), (round + 1) as f64, "{page}");
        }
    }

    // Topics made up by the thousand: the first ones up to the cap get a label, the rest
    // count as one.
    for i in 0..(MAX_BROKER_TOPICS + 500) {
        broker.publish(Message::new(format!("made.up.{i}"), "x")).await.expect("publish");
    }
    let page = self::page();
    let topics: std::collections::BTreeSet<&str> = page
        .lines()
        .filter(|line| line.starts_with("micro_broker_published_total{"))
        .filter_map(|line| line.split("topic=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(topics.len(), MAX_BROKER_TOPICS + 1, "{} topics labelled", topics.len());
    assert!(topics.contains("orders.created") && topics.contains(OTHER_TOPIC));
    let other =
        format!(r#"micro_broker_published_total{{broker="memory",topic="{OTHER_TOPIC}",result="ok"}}"#);
    // Labelled before them: orders.created and the mixed ones.
    assert_eq!(value(&page, &other), (500 + 1 + MIXED) as f64, "{page}");
}
