//! micro-core: a service-mesh SDK for tonic.
//!
//! Services register themselves by name in a [`registry`] (mDNS with no set-up, Consul in
//! production, or memory in one process); clients turn a name into a channel that picks an
//! instance per call and follows instances as they come and go.
//!
//! | concept | module |
//! | --- | --- |
//! | where instances are listed | [`registry`] |
//! | which instance gets a call | [`selector`] |
//! | calling a name | [`client`] |
//! | serving under a name | [`server`] |
//! | settings as plain values | [`config`] |
//! | flags and environment, log set-up for binaries (feature `cli`) | `cli` |
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> micro_core::Result<()> {
//! use micro_core::{Client, config::RegistryConfig};
//! let registry = RegistryConfig::default().connect().await?;
//! let vessels = Client::new(registry).channel("vessel-service");
//! # Ok(()) }
//! ```

#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod middleware;
pub mod registry;
pub mod selector;
pub mod server;

pub use client::{Client, NamedChannel};
pub use error::{BoxError, Error, Result};
pub use registry::{Node, Registry};
pub use server::{RunningServer, Server};
