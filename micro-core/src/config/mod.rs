//! Settings as plain values: where the registry is ([`RegistryConfig`]), how a server
//! binds and stops ([`ServerConfig`]), how a client calls ([`ClientConfig`]) and TLS
//! ([`TlsConfig`]). Nothing here reads the environment: binaries parse flags and
//! environment with [`crate::cli`] (flag, then environment, then default) and convert them
//! into these, so the library and its tests never depend on the process's environment.
//!
//! # Examples
//! ```
//! use std::time::Duration;
//! use micro_core::config::{ClientConfig, RegistryConfig, RegistryKind};
//!
//! let registry = RegistryConfig { kind: RegistryKind::Memory, ..RegistryConfig::default() };
//! let client = ClientConfig { request_timeout: Duration::from_secs(2), ..ClientConfig::default() };
//! assert_eq!(registry.kind.to_string(), "memory");
//! assert!(client.validate().is_ok());
//! ```

mod broker;
mod client;
mod registry;
mod server;
mod tls;

pub use broker::*;
pub use client::*;
pub use registry::*;
pub use server::*;
pub use tls::*;
