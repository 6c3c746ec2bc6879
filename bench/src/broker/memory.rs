//! Figure 9, memory: `MemoryBroker` against a bounded `tokio::sync::mpsc` channel of the
//! same size as the broker's inbox (what the broker uses inside), filled with `try_send`
//! and read by one task, in this process.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use micro_core::broker::{MemoryBroker, SubscribeOptions};
use tokio::sync::mpsc;

use super::{Baseline, Probe, Publish, Side, Task, contest, sdk_side, topic};

/// The memory broker's inbox size per subscriber.
const CAPACITY: usize = 1024;

struct ChannelPublisher(mpsc::Sender<Bytes>);

impl Publish for ChannelPublisher {
    fn publish(&self, body: Bytes) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            self.0.try_send(body).map_err(|err| anyhow::anyhow!("the plain channel refused a message: {err}"))
        })
    }
}

fn channel_side() -> Side {
    let probe = Arc::new(Probe::default());
    let (sender, mut receiver) = mpsc::channel::<Bytes>(CAPACITY);
    let seen = probe.clone();
    let reader = tokio::spawn(async move {
        while let Some(body) = receiver.recv().await {
            seen.arrived(&body);
        }
    });
    Side::new(ChannelPublisher(sender), probe, Task(reader))
}

/// The memory broker's figures.
pub async fn run() -> anyhow::Result<()> {
    let broker = Arc::new(MemoryBroker::new());
    let sdk = sdk_side(broker, &topic("memory"), SubscribeOptions::default()).await?;
    let baseline = Baseline {
        prefix: "broker_memory".into(),
        is: "a bounded tokio::sync::mpsc channel (1,024, try_send) read by one task".into(),
        side: channel_side(),
    };
    contest("memory", sdk, vec![baseline]).await
}
