//! `micro gateway` as the tests start it.

use crate::{calls::poll_until, discovery::STARTUP, process::Process};

/// The URL a `micro gateway` process serves on, from its `micro gateway on URL` line
/// (waited for up to [`STARTUP`]), without a trailing slash.
pub async fn url_of(gateway: &Process) -> String {
    poll_until("the gateway's address line", STARTUP, async || {
        let log = gateway.log();
        let line = log.lines().find(|l| l.starts_with("micro gateway on "))?;
        Some(line.trim_start_matches("micro gateway on ").split(' ').next()?.trim_end_matches('/').to_owned())
    })
    .await
}
