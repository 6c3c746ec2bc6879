//! Well-known labels: the names the SDK writes in one place and reads in another.
//!
//! A node's metadata carries two kinds of label besides the user's own:
//! - **registry fields** ([`REGISTRY_FIELDS`]): the node's own fields as a backend writes
//!   them beside the metadata (mDNS TXT entries, Consul `Meta`): [`TXTVERS`], [`NAME`],
//!   [`VERSION`], [`ID`], [`DRAINING`]. Backends strip them when they decode a node.
//! - **SDK labels** that the server sets on itself and peers read: [`HEALTH`] (it serves
//!   `grpc.health.v1`, so Consul runs its gRPC check), [`TLS`] (it serves TLS) and
//!   [`METRICS`] (where its Prometheus endpoint is).
//!
//! All of them together are [`RESERVED`]: a user cannot set them, so
//! [`crate::registry::validate_metadata`] refuses them by name.
//!
//! # Examples
//! ```
//! use micro_core::labels;
//! use std::collections::BTreeMap;
//!
//! assert!(labels::is_reserved(labels::HEALTH));
//! let user = BTreeMap::from([(labels::HEALTH.to_owned(), labels::HEALTH_GRPC.to_owned())]);
//! let err = micro_core::registry::validate_metadata("1.0", &user).unwrap_err();
//! assert!(err.to_string().contains("\"health\""));
//! ```

/// The TXT entry that versions the mDNS record layout; always [`TXTVERS_CURRENT`].
pub const TXTVERS: &str = "txtvers";
/// The record layout version this SDK writes.
pub const TXTVERS_CURRENT: &str = "1";
/// The service name, as an mDNS TXT entry.
pub const NAME: &str = "name";
/// The node id, as an mDNS TXT entry.
pub const ID: &str = "id";
/// The service version (a TXT entry over mDNS, a `Meta` key in Consul).
pub const VERSION: &str = "version";
/// Set to [`FLAG_ON`] while the node drains: it finishes calls but takes no new ones.
pub const DRAINING: &str = "draining";
/// Set to [`HEALTH_GRPC`] by every SDK server: it serves `grpc.health.v1`, so a registry
/// that can (Consul) checks it.
pub const HEALTH: &str = "health";
/// The value of [`HEALTH`] for a node that serves `grpc.health.v1`.
pub const HEALTH_GRPC: &str = "grpc";
/// Set to [`FLAG_ON`] by a server that serves TLS, so health checks speak TLS to it.
pub const TLS: &str = "tls";
/// The address (`ip:port`) of the node's Prometheus endpoint, when it serves one.
pub const METRICS: &str = "metrics";
/// The service its TLS certificate names, set by a server that registers under another
/// name (a registry broker subscriber serves with its process's certificate): what a client
/// checks the certificate against instead of the registered name.
pub const TLS_NAME: &str = "tls-name";
/// The value of a flag label that is on ([`DRAINING`], [`TLS`]).
pub const FLAG_ON: &str = "1";

/// The node's own fields, as registries write them beside the metadata.
pub const REGISTRY_FIELDS: [&str; 5] = [TXTVERS, NAME, VERSION, ID, DRAINING];
/// Labels the SDK server sets on itself.
pub const SDK_LABELS: [&str; 4] = [HEALTH, TLS, METRICS, TLS_NAME];
/// Every label a user may not set: [`REGISTRY_FIELDS`] and [`SDK_LABELS`].
pub const RESERVED: [&str; 9] = [TXTVERS, NAME, VERSION, ID, DRAINING, HEALTH, TLS, METRICS, TLS_NAME];

/// Whether `key` is one of the [`RESERVED`] labels.
pub fn is_reserved(key: &str) -> bool {
    RESERVED.contains(&key)
}

/// Whether `key` is one of the [`REGISTRY_FIELDS`], which decoding strips from metadata.
pub fn is_registry_field(key: &str) -> bool {
    REGISTRY_FIELDS.contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_is_the_registry_fields_and_the_sdk_labels() {
        let mut both: Vec<&str> = REGISTRY_FIELDS.iter().chain(&SDK_LABELS).copied().collect();
        let mut reserved = RESERVED.to_vec();
        both.sort();
        reserved.sort();
        assert_eq!(both, reserved);
        assert!(is_reserved(METRICS) && !is_registry_field(METRICS));
        assert!(!is_reserved("zone"));
    }
}
