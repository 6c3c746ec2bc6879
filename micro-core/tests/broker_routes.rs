//! The registry broker keeps routes (and their registry follows) for recent topics only.
//! A test binary of its own: its thousand topics would use up the metrics' topic labels
//! that other tests of the broker read.

use std::{sync::Arc, time::Duration};

use micro_core::{
    Client,
    broker::{Broker, MAX_ROUTED_TOPICS, Message, ROUTE_IDLE, RegistryBroker},
    registry::MemoryRegistry,
};

#[tokio::test(start_paused = true)]
async fn a_registry_broker_keeps_the_routes_of_recent_topics_only() {
    let broker = RegistryBroker::new(Client::new(Arc::new(MemoryRegistry::new())));
    for i in 0..MAX_ROUTED_TOPICS + 10 {
        broker.publish(Message::new(format!("flood.{i}"), "x")).await.expect("no subscriber: dropped");
    }
    assert_eq!(broker.routed_topics(), MAX_ROUTED_TOPICS, "the oldest topics' routes went");
    tokio::time::advance(ROUTE_IDLE + Duration::from_secs(1)).await;
    broker.publish(Message::new("fresh", "x")).await.expect("no subscriber: dropped");
    assert_eq!(broker.routed_topics(), 1, "idle routes went");
}
