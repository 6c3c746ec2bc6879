//! `--watch`: consignments printed as they are stored, until interrupted.

use std::time::Duration;

use micro_core::NamedChannel;
use proto::consignment::{Consignment, WatchRequest, shipping_service_client::ShippingServiceClient};
use tonic::Code;

use crate::{Output, failed, line};

/// How long to wait before opening the stream again after an instance went away.
const REOPEN_AFTER: Duration = Duration::from_millis(500);

/// Prints every consignment stored after `after` (from now when empty), reopening the
/// stream after the last one printed whenever it ends or its instance goes away, so nothing
/// is missed or printed twice.
pub async fn watch(
    mut shipping: ShippingServiceClient<NamedChannel>,
    after: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let mut last = after.unwrap_or_default();
    loop {
        let request = WatchRequest { after_id: last.clone() };
        let mut stream = match shipping.watch_consignments(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) if status.code() == Code::Unavailable => {
                tracing::warn!(error = %status.message(), "cannot watch yet; trying again");
                tokio::time::sleep(REOPEN_AFTER).await;
                continue;
            }
            Err(status) => return Err(failed("WatchConsignments", status)),
        };
        loop {
            match stream.message().await {
                Ok(Some(consignment)) => {
                    print(&consignment, output)?;
                    last = consignment.id;
                }
                Ok(None) => break,
                Err(status) if status.code() == Code::Unavailable => {
                    tracing::warn!(error = %status.message(), after = %last, "the watch ended; reopening after the last consignment");
                    break;
                }
                Err(status) => return Err(failed("WatchConsignments", status)),
            }
        }
    }
}

fn print(consignment: &Consignment, output: Output) -> anyhow::Result<()> {
    line(match output {
        Output::Json => serde_json::to_string(consignment)?,
        Output::Text => format!(
            "{}  vessel {}  {} containers  weight {}  {}",
            consignment.id,
            consignment.vessel_id,
            consignment.containers.len(),
            consignment.weight,
            consignment.description
        ),
    });
    Ok(())
}
