//! micro-core: a service-mesh SDK for tonic.
//!
//! Services register themselves by name in a [`registry`] (mDNS with no set-up, Consul in
//! production, or memory in one process); clients turn a name into a channel that picks an
//! instance per call and follows instances as they come and go.
//!
//! | concept | module |
//! | --- | --- |
//! | one line to a service or client configured by the environment (feature `cli`) | `service` |
//! | events between services: publish, subscribe, queue groups | [`broker`] |
//! | where instances are listed | [`registry`] |
//! | which instance gets a call | [`selector`] |
//! | calling a name | [`client`] |
//! | serving under a name | [`server`] |
//! | TLS material that is renewed while servers and clients run | [`tls`] |
//! | well-known labels (`health`, `tls`, `metrics`, `draining`, …), reserved for the SDK | [`labels`] |
//! | settings as plain values; they never read the environment | [`config`] |
//! | flags and environment, log set-up for binaries (feature `cli`) | `cli` |
//!
//! # Examples
//! A service in one line: `service(name)` reads the standard environment
//! (`MICRO_REGISTRY`, `MICRO_SERVER_ADDRESS`, `MICRO_TLS_*`, `RUST_LOG`, …; `--help` lists
//! them) and leaves the command line to the program, installs logging, and serves
//! reflection for the descriptors it is given:
//! ```no_run
//! # async fn demo(fleet: impl proto::vessel::vessel_service_server::VesselService) -> micro_core::Result<()> {
//! use proto::vessel::vessel_service_server::VesselServiceServer;
//!
//! micro_core::service("vessel-service")
//!     .file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
//!     .add_service(VesselServiceServer::new(fleet))
//!     .run()
//!     .await
//! # }
//! ```
//! A client in one line, on the same settings:
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use proto::vessel::vessel_service_client::VesselServiceClient;
//!
//! let client = micro_core::service("vessel-finder").client().await?;
//! let vessels = VesselServiceClient::new(client.channel("vessel-service"));
//! # Ok(()) }
//! ```
//! The long form reads nothing from the environment: every setting is a plain value, and
//! [`config::RegistryConfig::default()`] is mDNS whatever `MICRO_REGISTRY` says.
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{Client, config::RegistryConfig};
//! let registry = RegistryConfig::default().connect().await?;
//! let vessels = Client::new(registry).channel("vessel-service");
//! # Ok(()) }
//! ```

pub mod auth;
pub mod broker;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod labels;
pub mod metrics;
pub mod middleware;
pub mod registry;
pub mod selector;
pub mod server;
#[cfg(feature = "cli")]
pub mod service;
#[cfg(test)]
mod test_log;
pub mod tls;

pub use client::{Client, NamedChannel};
pub use error::{BoxError, Error, Result};
pub use registry::{Node, Registry};
pub use server::{RunningServer, Server};
#[cfg(feature = "cli")]
pub use service::{Service, service};
