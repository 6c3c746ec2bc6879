//! Examples of the SDK, compiled and run by `make test` (`examples/tests/examples.rs`):
//!
//! | binary | what it shows |
//! | --- | --- |
//! | `greeter-server` | a service in one line: `micro_core::service("greeter")`; its own argument is the greeting |
//! | `greeter-client` | a client in one line, with flags of its own |
//! | `greeter-listener` | a subscriber in one line: `.subscribe_proto("greeter.greeted", …)` |
//! | `vessel-finder` | a client of shippy's `vessel-service`, with shippy's proto |
//!
//! This library holds the greeter's generated types and its descriptor set.
//!
//! # Examples
//! ```
//! let request = examples::greeter::HelloRequest { name: "world".into() };
//! assert_eq!(request.name, "world");
//! ```

/// `proto/greeter.proto`: generated messages, client and server.
#[allow(missing_docs)]
pub mod greeter {
    tonic::include_proto!("greeter");

    /// The encoded `FileDescriptorSet` of `greeter.proto`, written by `build.rs`: hand it to
    /// `file_descriptor_set(..)` so the server offers reflection and `micro call` can call it.
    ///
    /// ```
    /// assert!(!examples::greeter::FILE_DESCRIPTOR_SET.is_empty());
    /// ```
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/greeter_descriptors.bin"));
}

/// The Rust snippets of the README and of `docs/`, compiled as doc tests so the guide
/// cannot stop compiling.
#[cfg(doctest)]
#[doc = include_str!(concat!(env!("OUT_DIR"), "/readme_snippets.md"))]
pub struct ReadmeSnippets;
