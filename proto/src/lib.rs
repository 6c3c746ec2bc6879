//! Generated gRPC types and stubs for the shippy example.
//!
//! The messages also derive `serde`'s traits, so `consignment.json` parses straight into
//! [`consignment::Consignment`].
//!
//! # Examples
//! ```
//! let spec = proto::vessel::Specification { capacity: 3, max_weight: 55_000 };
//! assert_eq!(spec.capacity, 3);
//! ```

/// `vessel.proto`: the vessel fleet service.
#[allow(missing_docs)]
pub mod vessel {
    tonic::include_proto!("vessel");
}

/// `consignment.proto`: the shipping service that stores consignments.
#[allow(missing_docs)]
pub mod consignment {
    tonic::include_proto!("consignment");
}

/// The gRPC paths of methods marked `idempotency_level = NO_SIDE_EFFECTS` or `IDEMPOTENT`
/// in the `.proto` files: safe for the SDK client to retry after the request was sent.
///
/// ```
/// assert!(proto::IDEMPOTENT_METHODS.contains(&"/vessel.VesselService/FindAvailable"));
/// assert!(!proto::IDEMPOTENT_METHODS.contains(&"/consignment.ShippingService/CreateConsignment"));
/// ```
pub const IDEMPOTENT_METHODS: &[&str] = include!(concat!(env!("OUT_DIR"), "/idempotent_methods.rs"));

/// The encoded `FileDescriptorSet` of every `.proto` here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
