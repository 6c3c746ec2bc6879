//! `--bulk`: every consignment of a JSON-lines file stored in one stream.

use std::{path::Path, time::Duration};

use anyhow::{Context, anyhow};
use micro_core::{NamedChannel, client::IDEMPOTENCY_KEY_HEADER};
use proto::consignment::{Consignment, shipping_service_client::ShippingServiceClient};

use crate::{Output, failed, line};

/// The longest stream key consignment-service takes: its own limit less `/` and an index.
const MAX_BULK_KEY_BYTES: usize = 122;

/// The deadline of a whole bulk load: its answer comes only once every consignment is stored.
const BULK_DEADLINE: Duration = Duration::from_secs(600);

/// The consignments of `path`, one JSON object per non-empty line; the first bad line fails
/// the whole file, naming it, before anything is sent.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<Consignment>> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read consignment file {shown}"))?;
    let mut consignments = Vec::new();
    for (number, text) in text.lines().enumerate().filter(|(_, text)| !text.trim().is_empty()) {
        let consignment = serde_json::from_str(text).map_err(|err| {
            let reason = err.to_string();
            let reason = reason.split(" at line ").next().unwrap_or(&reason).to_owned();
            anyhow!(
                "{shown}:{}:{}: malformed consignment JSON: {reason}; nothing was sent (--bulk takes one consignment per line)",
                number + 1,
                err.column().max(1)
            )
        })?;
        consignments.push(consignment);
    }
    if consignments.is_empty() {
        return Err(anyhow!("{shown}: no consignment in the file; nothing was sent"));
    }
    Ok(consignments)
}

/// Sends `consignments` in one `CreateConsignments` stream keyed `request_id`, and prints
/// the summary.
pub async fn load(
    mut shipping: ShippingServiceClient<NamedChannel>,
    consignments: Vec<Consignment>,
    request_id: &str,
    output: Output,
) -> anyhow::Result<()> {
    let count = consignments.len();
    if request_id.len() > MAX_BULK_KEY_BYTES {
        return Err(anyhow!(
            "--request-id: at most {MAX_BULK_KEY_BYTES} bytes with --bulk (each consignment's key adds its index), got {}",
            request_id.len()
        ));
    }
    let mut request = tonic::Request::new(tokio_stream::iter(consignments));
    request.set_timeout(BULK_DEADLINE);
    request.metadata_mut().insert(IDEMPOTENCY_KEY_HEADER, request_id.parse().context("request id")?);
    let summary = shipping.create_consignments(request).await.map_err(|status| {
        let err = failed("CreateConsignments", status);
        anyhow!("{err:#} (request id {request_id}: re-run with --request-id {request_id} to go on without storing twice)")
    })?;
    let summary = summary.into_inner();
    match output {
        Output::Json => {
            let json = serde_json::json!({
                "request_id": request_id,
                "sent": count,
                "created": summary.created,
                "replayed": summary.replayed,
                "rejected": summary.rejected,
                "rejections": summary.rejections.iter().map(|r| serde_json::json!({"index": r.index, "code": r.code, "message": r.message})).collect::<Vec<_>>(),
                "consignment_ids": summary.consignment_ids,
            });
            line(serde_json::to_string_pretty(&json)?);
        }
        Output::Text => {
            line(format!(
                "bulk load of {count}: {} created, {} stored by an earlier run, {} rejected",
                summary.created, summary.replayed, summary.rejected
            ));
            for rejection in &summary.rejections {
                line(format!("  line {}: {}: {}", rejection.index + 1, rejection.code, rejection.message));
            }
            line(format!("request id {request_id} (re-run with --request-id {request_id} to retry safely)"));
        }
    }
    Ok(())
}
