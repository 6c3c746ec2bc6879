//! Who is calling, and who may call what.
//!
//! - [`identity`]: a caller is known by the certificate it presented over mutual TLS: its
//!   SPIFFE id (`spiffe://<trust-domain>/svc/<name>`, a URI subject alternative name), read
//!   in a handler with [`caller`].
//! - [`policy`]: rules of caller identity × method (`package.Service/Method`,
//!   `package.Service/*`, `*`), allow or deny, default deny; loaded from a YAML or JSON file
//!   (`MICRO_AUTHZ_POLICY`) and reloaded when it changes. A server given a policy requires
//!   client certificates and answers a denied call `PERMISSION_DENIED` naming the method and
//!   the caller; health and reflection are always allowed (probes and tooling carry no
//!   certificate of a service, and they reveal no data).
//! - [`subject`]: the end user the gateway authenticated (`jwt:<sub>`, `apikey:<name>`),
//!   sent in the call metadata `x-micro-subject`; a rule may require it of a caller it trusts.
//! - [`authorize`]: authorization asked of an authority outside the process per caller
//!   (Consul Connect's intentions, see
//!   [`crate::registry::ConsulRegistry::connect_tls`]), answers kept a few
//!   seconds.
//! - [`certs`]: a development CA and short-lived certificates that name their service, what
//!   `micro certs` writes.
//!
//! # Examples
//! ```
//! use micro_core::auth::{Policy, spiffe_id};
//!
//! let policy = Policy::from_yaml(r#"
//! rules:
//!   - callers: ["spiffe://shippy/svc/consignment-service"]
//!     methods: ["vessel.VesselService/*"]
//!     effect: allow
//! "#).unwrap();
//! let consignment = spiffe_id("shippy", "consignment-service");
//! assert!(policy.decide(Some(&consignment), "/vessel.VesselService/Reserve").allowed);
//! assert!(!policy.decide(Some(&spiffe_id("shippy", "cli")), "/vessel.VesselService/Reserve").allowed);
//! assert!(!policy.decide(None, "/vessel.VesselService/FindAvailable").allowed, "default deny");
//! ```

pub mod authorize;
pub mod certs;
pub mod identity;
pub mod layer;
pub mod policy;
pub mod subject;

pub use authorize::{Authorize, AuthorizeLayer};
pub use identity::{Identity, caller, caller_of, spiffe_id};
pub use layer::AuthzLayer;
pub use policy::{Decision, Effect, Policy, Rule};
pub use subject::{SUBJECT_HEADER, subject, subject_of};
