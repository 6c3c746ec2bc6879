//! `micro new NAME`: a new service's crate, ready for `cargo build`, `cargo test` and
//! `cargo run`: its proto, a `build.rs` that compiles it (protox, no system `protoc`), a
//! server in one line of SDK, a client binary (unless `--no-client`), a subscriber
//! (`--subscriber TOPIC`), a test that calls the service by name in-process over a memory
//! registry, and a README of its own.
//!
//! micro-core is not on crates.io yet, so the crate depends on it by path: the
//! `micro-core` folder of the clone this `micro` was built from, or `--micro-core PATH`. The
//! crate is a workspace of its own (an empty `[workspace]` table), so it builds wherever it
//! lives, inside a clone of micro too. It gets that clone's `Cargo.lock` when there is one,
//! so its first build takes the versions micro is tested with, and what cargo has already
//! downloaded.
//!
//! # Examples
//! ```sh
//! micro new counter                    # ./counter, served as "counter" over mDNS
//! micro new billing --path services/billing --subscriber orders.created --registry consul
//! ```

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::Args;
use micro_core::config::RegistryKind;

use crate::exit::Failure;

/// The folder of the micro-core crate beside the micro-cli crate this binary was built from.
pub const DEFAULT_MICRO_CORE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../micro-core");

/// The versions the generated crate asks for, the ones micro's workspace pins
/// (`Cargo.toml` at its root; a test keeps them equal).
const VERSIONS: &[(&str, &str)] = &[
    ("prost", "0.14"),
    ("protox", "0.10"),
    ("tonic", "0.14"),
    ("tonic-prost", "0.14"),
    ("tonic-prost-build", "0.14"),
    ("tracing", "0.1"),
];

/// `micro new`'s arguments. The registry is `micro`'s own `--registry` (`MICRO_REGISTRY`,
/// default mdns): the README's commands use it, and micro-core is built with its feature
/// besides mDNS (the default, no set-up); each run can still choose with `MICRO_REGISTRY`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The service's name: what it registers under and its crate's name; lowercase letters,
    /// digits and `-`, each part starting with a letter, e.g. `counter` or `order-book`.
    #[arg(value_parser = parse_name)]
    pub name: String,
    /// Where to write the crate: a folder that does not exist yet or is empty. Default: ./NAME.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Leave out the client binary (`src/bin/NAME-client.rs`).
    #[arg(long)]
    pub no_client: bool,
    /// Subscribe the service to this topic's events (queue group NAME), with a handler in
    /// `src/lib.rs`; the client publishes one after its call.
    #[arg(long, value_name = "TOPIC")]
    pub subscriber: Option<String>,
    /// The micro-core crate to depend on by path (the `micro-core` folder of a clone of micro).
    #[arg(long, env = "MICRO_NEW_MICRO_CORE", default_value = DEFAULT_MICRO_CORE)]
    pub micro_core: PathBuf,
}

/// The registries a new service can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// Multicast DNS: no server, one network segment.
    Mdns,
    /// A Consul agent.
    Consul,
    /// An etcd cluster.
    Etcd,
    /// DNS SRV records (discovery only).
    Dns,
}

impl From<RegistryKind> for Registry {
    fn from(kind: RegistryKind) -> Self {
        match kind {
            RegistryKind::Consul => Registry::Consul,
            RegistryKind::Etcd => Registry::Etcd,
            RegistryKind::Dns => Registry::Dns,
            // Memory needs no feature, and no process sees another's: mDNS for the README.
            _ => Registry::Mdns,
        }
    }
}

impl Registry {
    fn name(self) -> &'static str {
        match self {
            Registry::Mdns => "mdns",
            Registry::Consul => "consul",
            Registry::Etcd => "etcd",
            Registry::Dns => "dns",
        }
    }

    /// The environment a run on this registry needs, for the README's commands.
    fn env(self) -> &'static str {
        match self {
            Registry::Mdns => "",
            Registry::Consul => "MICRO_REGISTRY=consul MICRO_REGISTRY_ADDRESS=127.0.0.1:8500 ",
            Registry::Etcd => "MICRO_REGISTRY=etcd MICRO_REGISTRY_ADDRESS=127.0.0.1:2379 ",
            Registry::Dns => "MICRO_REGISTRY=dns ",
        }
    }
}

/// Words that cannot name a Rust crate's module, separated by spaces.
const KEYWORDS: &str = "as async await box break const continue crate dyn else enum extern false fn for gen \
                        if impl in let loop match mod move mut pub ref return self static struct super trait \
                        true try type unsafe use where while yield test proc_macro core std";

/// A service name `micro new` can make a crate, a proto package and a registered name of.
fn parse_name(text: &str) -> Result<String, String> {
    let parts_ok = !text.is_empty()
        && text.split('-').all(|part| {
            part.starts_with(|c: char| c.is_ascii_lowercase())
                && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if !parts_ok {
        return Err(format!(
            "{text:?}: a name is lowercase letters, digits and `-`, each part starting with a letter, e.g. \
             counter or order-book"
        ));
    }
    let ident = text.replace('-', "_");
    if KEYWORDS.split_whitespace().any(|word| word == ident) || text.ends_with("-client") {
        return Err(format!("{text:?} cannot name a crate and its client binary: choose another name"));
    }
    Ok(text.to_owned())
}

/// Writes the crate; returns what to do next, for the terminal.
pub fn new(args: NewArgs, registry: RegistryKind) -> Result<String, Failure> {
    let dir = args.path.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    let micro_core = args.micro_core.canonicalize().ok().filter(|p| p.join("Cargo.toml").is_file()).ok_or_else(|| {
        Failure::Other(format!(
            "micro-core not found at {}: pass --micro-core PATH (or MICRO_NEW_MICRO_CORE), the micro-core \
             folder of a clone of micro",
            args.micro_core.display()
        ))
    })?;
    let occupied = std::fs::read_dir(&dir).map(|mut entries| entries.next().is_some()).unwrap_or(false);
    if occupied || dir.is_file() {
        return Err(Failure::Other(format!(
            "{} exists and is not empty: choose another --path, or remove it",
            dir.display()
        )));
    }
    let crate_ = Crate::new(&args, registry.into(), &micro_core);
    let files = crate_.files();
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|err| write_failed(parent, &err))?;
        }
        std::fs::write(&path, text).map_err(|err| write_failed(&path, &err))?;
    }
    // The clone's lock file: the versions micro is tested with, and already downloaded.
    let lock = micro_core.parent().map(|clone| clone.join("Cargo.lock")).filter(|lock| lock.is_file());
    if let Some(lock) = &lock {
        std::fs::copy(lock, dir.join("Cargo.lock"))
            .map_err(|err| write_failed(&dir.join("Cargo.lock"), &err))?;
    }
    tracing::info!(name = %args.name, path = %dir.display(), "created");
    Ok(crate_.next_steps(&dir, files.iter().map(|(path, _)| path.as_str()), lock.is_some()))
}

fn write_failed(path: &Path, err: &std::io::Error) -> Failure {
    Failure::Other(format!("could not write {}: {err}", path.display()))
}

/// What the templates are filled with.
struct Crate {
    /// `order-book`: the registered name, the crate and the server binary.
    name: String,
    /// `order_book`: the library, the proto file and its package.
    ident: String,
    /// `OrderBook`: the gRPC service.
    service: String,
    client: bool,
    topic: Option<String>,
    registry: Registry,
    micro_core: PathBuf,
}

impl Crate {
    fn new(args: &NewArgs, registry: Registry, micro_core: &Path) -> Self {
        let service = args
            .name
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars
                    .next()
                    .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect();
        Crate {
            name: args.name.clone(),
            ident: args.name.replace('-', "_"),
            service,
            client: !args.no_client,
            topic: args.subscriber.clone(),
            registry,
            micro_core: micro_core.to_path_buf(),
        }
    }

    /// Fills `template`'s markers.
    fn fill(&self, template: &str) -> String {
        template
            .replace("__NAME__", &self.name)
            .replace("__IDENT__", &self.ident)
            .replace("__SERVICE__", &self.service)
            .replace("__TOPIC__", self.topic.as_deref().unwrap_or_default())
            .replace("__REGISTRY_ENV__", self.registry.env())
    }

    /// Each file: its path in the crate and its text.
    fn files(&self) -> Vec<(String, String)> {
        let mut files = vec![
            ("Cargo.toml".to_owned(), self.manifest()),
            ("build.rs".to_owned(), self.fill(BUILD_RS)),
            (format!("proto/{}.proto", self.ident), self.proto()),
            ("src/lib.rs".to_owned(), self.lib()),
            ("src/main.rs".to_owned(), self.main()),
        ];
        if self.client {
            files.push((format!("src/bin/{}-client.rs", self.name), self.client()));
        }
        files.push((format!("tests/{}.rs", self.ident), self.test()));
        files.push(("README.md".to_owned(), self.readme()));
        files.push((".gitignore".to_owned(), "/target\n".to_owned()));
        files
    }

    fn version(krate: &str) -> &'static str {
        VERSIONS.iter().find(|(name, _)| *name == krate).map(|(_, v)| *v).expect("a pinned version")
    }

    fn manifest(&self) -> String {
        let mut features = vec!["cli", "mdns"];
        if self.registry != Registry::Mdns {
            features.push(self.registry.name());
        }
        let features: Vec<String> = features.iter().map(|f| format!("{f:?}")).collect();
        let path = self.micro_core.display().to_string();
        let v = Crate::version;
        let mut text = self.fill(MANIFEST_HEAD);
        let _ = write!(
            text,
            "micro-core = {{ path = {path:?}, default-features = false, features = [{}] }}\n\
             prost = \"{}\"\n\
             tokio = {{ version = \"1\", features = [\"macros\", \"rt-multi-thread\"] }}\n\
             tonic = \"{}\"\n\
             tonic-prost = \"{}\"\n\
             tracing = \"{}\"\n\
             \n\
             [build-dependencies]\n\
             prost = \"{}\"\n\
             protox = \"{}\"\n\
             tonic-prost-build = \"{}\"\n",
            features.join(", "),
            v("prost"),
            v("tonic"),
            v("tonic-prost"),
            v("tracing"),
            v("prost"),
            v("protox"),
            v("tonic-prost-build"),
        );
        text.push_str(MANIFEST_TAIL);
        text
    }

    fn proto(&self) -> String {
        let mut text = self.fill(PROTO);
        if self.topic.is_some() {
            text.push_str(&self.fill(PROTO_EVENT));
        }
        text
    }

    fn lib(&self) -> String {
        let mut text = self.fill(LIB_RS);
        if self.topic.is_some() {
            text.push_str(&self.fill(LIB_SUBSCRIBER));
        }
        text
    }

    fn main(&self) -> String {
        let subscribe = if self.topic.is_some() {
            "        .subscribe_proto(TOPIC, SubscribeOptions::default().queue(SERVICE_NAME), on_event)\n"
        } else {
            ""
        };
        let uses = if self.topic.is_some() {
            "use __IDENT__::{TOPIC, on_event};\nuse micro_core::broker::SubscribeOptions;\n"
        } else {
            ""
        };
        self.fill(&MAIN_RS.replace("__SUBSCRIBE__", subscribe).replace("__USES__", uses))
    }

    fn client(&self) -> String {
        let (uses, publish) = if self.topic.is_some() {
            ("use __IDENT__::{TOPIC, api::Event};\nuse micro_core::broker::publish_proto;\n", CLIENT_PUBLISH)
        } else {
            ("", "")
        };
        self.fill(&CLIENT_RS.replace("__USES__", uses).replace("__PUBLISH__", publish))
    }

    fn test(&self) -> String {
        let mut text = self.fill(TEST_RS);
        if self.topic.is_some() {
            text.push_str(&self.fill(TEST_SUBSCRIBER));
        }
        text
    }

    fn readme(&self) -> String {
        let mut text = self.fill(README_HEAD);
        if self.client {
            text.push_str(&self.fill(README_CLIENT));
        }
        if self.topic.is_some() {
            text.push_str(&self.fill(README_SUBSCRIBER));
        }
        let _ = write!(
            text,
            "{}",
            self.fill(README_TAIL).replace("__MICRO_CORE__", &self.micro_core.display().to_string())
        );
        text
    }

    /// What `micro new` prints: what it made and the commands to try it.
    fn next_steps<'a>(&self, dir: &Path, files: impl Iterator<Item = &'a str>, locked: bool) -> String {
        let files: Vec<&str> = files.collect();
        let mut text = format!("created {} in {}: {}", self.name, dir.display(), files.join(", "));
        if locked {
            text.push_str(", Cargo.lock (micro's)");
        }
        let _ = write!(
            text,
            "\nmicro-core comes by path from {} (it is not on crates.io yet)\n\nnext:\n  cd {}\n  \
             cargo test    # calls {} by name in-process\n  {}cargo run     # serves it until Ctrl-C\n",
            self.micro_core.display(),
            dir.display(),
            self.name,
            self.registry.env()
        );
        if self.client {
            let _ = writeln!(text, "  {}cargo run --bin {}-client -- you", self.registry.env(), self.name);
        }
        let _ = write!(
            text,
            "  {}micro call {} {}.{}/Hello '{{\"name\": \"you\"}}'",
            self.registry.env(),
            self.name,
            self.ident,
            self.service
        );
        text
    }
}

const MANIFEST_HEAD: &str = r#"# __NAME__: a micro service, made by `micro new __NAME__`.
[package]
name = "__NAME__"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
# micro-core is not on crates.io yet: this crate uses it by path, from a clone of micro.
# Moved the clone? Change the path; or use git = "URL of a clone" instead of path.
# Its features: `cli` (settings from the environment, log set-up) and the registries this
# service may use; the others (etcd, NATS, RabbitMQ, …) stay out of the build.
"#;

const MANIFEST_TAIL: &str = r#"
# No debug info for dependencies: a faster first build (micro's own workspace does the same).
[profile.dev]
debug = "line-tables-only"

[profile.dev.package."*"]
debug = false

# A workspace of its own, so the crate builds wherever it lives.
[workspace]
"#;

const BUILD_RS: &str = r#"//! Compiles `proto/__IDENT__.proto` with protox (pure Rust: no system `protoc`), generates the
//! gRPC client and server, and writes the encoded descriptor set the server hands to gRPC
//! reflection (so `micro call` and grpcurl can call it).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["__IDENT__.proto"], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("__IDENT___descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
"#;

const PROTO: &str = r#"// __NAME__'s API. Change it and `cargo build` generates the Rust code again
// (src/lib.rs includes it as the module `api`).
syntax = "proto3";

package __IDENT__;

service __SERVICE__ {
  // Greets the name asked for; an empty name is INVALID_ARGUMENT.
  rpc Hello(HelloRequest) returns (HelloReply);
}

message HelloRequest {
  string name = 1;
}

message HelloReply {
  string message = 1;
}
"#;

const PROTO_EVENT: &str = r#"
// What is published on __TOPIC__.
message Event {
  string name = 1;
}
"#;

const LIB_RS: &str = r#"//! __NAME__: its API, generated from `proto/__IDENT__.proto`, and its handler.

/// `proto/__IDENT__.proto`: the generated messages, client and server.
pub mod api {
    tonic::include_proto!("__IDENT__");

    /// The encoded descriptor set of the proto, written by `build.rs`: the server hands it
    /// to gRPC reflection, so `micro call` and grpcurl can call the service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/__IDENT___descriptors.bin"));
}

use api::{HelloReply, HelloRequest, __IDENT___server::__SERVICE__};
use tonic::{Request, Response, Status};

/// The name the service registers under, and that its callers call.
pub const SERVICE_NAME: &str = "__NAME__";

/// The service's handler: its state goes here.
#[derive(Debug, Default)]
pub struct Handler;

#[tonic::async_trait]
impl __SERVICE__ for Handler {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is empty: say who to greet"));
        }
        tracing::debug!(%name, "hello");
        Ok(Response::new(HelloReply { message: format!("Hello, {name}!") }))
    }
}
"#;

const LIB_SUBSCRIBER: &str = r#"
/// The topic the service subscribes to.
pub const TOPIC: &str = "__TOPIC__";

/// Handles one event on [`TOPIC`]; an error leaves the message to the broker to redeliver.
pub async fn on_event(event: api::Event, message: micro_core::broker::Message) -> Result<(), micro_core::BoxError> {
    tracing::info!(name = %event.name, message_id = message.id().unwrap_or("-"), "event");
    Ok(())
}
"#;

const MAIN_RS: &str = r#"//! The __NAME__ server: registers as "__NAME__", serves `__IDENT__.__SERVICE__` (and health and
//! reflection) until SIGINT or SIGTERM, then drains and deregisters.
//!
//! Its settings come from the environment: `MICRO_REGISTRY` (default mdns),
//! `MICRO_SERVER_ADDRESS`, `RUST_LOG`, …; `cargo run -- --help` lists them. Its command line
//! is its own.

use std::process::ExitCode;

__USES__use __IDENT__::{
    Handler, SERVICE_NAME,
    api::{FILE_DESCRIPTOR_SET, __IDENT___server::__SERVICE__Server},
};

#[tokio::main]
async fn main() -> ExitCode {
    let served = micro_core::service(SERVICE_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .file_descriptor_set(FILE_DESCRIPTOR_SET)
        .add_service(__SERVICE__Server::new(Handler::default()))
__SUBSCRIBE__        .run()
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", micro_core::error::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
"#;

const CLIENT_RS: &str = r#"//! Calls __NAME__ by name: `cargo run --bin __NAME__-client -- you` prints "Hello, you!".
//! It finds the server through the registry `MICRO_REGISTRY` names, as the server does.

use std::process::ExitCode;

__USES__use __IDENT__::{
    SERVICE_NAME,
    api::{HelloRequest, __IDENT___client::__SERVICE__Client},
};

#[tokio::main]
async fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_else(|| "world".to_owned());
    match hello(name).await {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn hello(name: String) -> Result<String, String> {
    let service = micro_core::service("__NAME__-client");
    let client = service.client().await.map_err(|err| micro_core::error::error_chain(&err))?;
    let mut api = __SERVICE__Client::new(client.channel(SERVICE_NAME));
    let reply = api
        .hello(HelloRequest { name: name.clone() })
        .await
        .map_err(|status| format!("call {SERVICE_NAME} Hello: {:?}: {}", status.code(), status.message()))?;
__PUBLISH__    Ok(reply.into_inner().message)
}
"#;

const CLIENT_PUBLISH: &str = r#"    // The event the server subscribes to, on the broker MICRO_BROKER names.
    let broker = service.broker().await.map_err(|err| micro_core::error::error_chain(&err))?;
    publish_proto(&*broker, TOPIC, None, &Event { name })
        .await
        .map_err(|err| format!("publish on {TOPIC}: {}", micro_core::error::error_chain(&err)))?;
"#;

const TEST_RS: &str = r#"//! __NAME__ called by name in this process: a memory registry, a real server on
//! 127.0.0.1:0, and a client that finds it by its name. No network set-up needed.

use std::sync::Arc;

use __IDENT__::{
    Handler, SERVICE_NAME,
    api::{FILE_DESCRIPTOR_SET, HelloRequest, __IDENT___client::__SERVICE__Client, __IDENT___server::__SERVICE__Server},
};
use micro_core::{Client, Server, config::ServerConfig, registry::MemoryRegistry};

#[tokio::test]
async fn answers_a_call_by_name() {
    let registry = Arc::new(MemoryRegistry::new());
    let running = Server::builder(SERVICE_NAME)
        .registry(registry.clone())
        .config(ServerConfig { address: "127.0.0.1:0".parse().expect("an address"), ..ServerConfig::default() })
        .file_descriptor_set(FILE_DESCRIPTOR_SET)
        .add_service(__SERVICE__Server::new(Handler::default()))
        .start()
        .await
        .expect("the server starts");

    let client = Client::new(registry);
    let mut api = __SERVICE__Client::new(client.channel(SERVICE_NAME));
    let reply = api.hello(HelloRequest { name: "test".into() }).await.expect("the call");
    assert_eq!(reply.into_inner().message, "Hello, test!");
    let empty = api.hello(HelloRequest::default()).await.expect_err("an empty name");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    running.stop().await.expect("the server stops");
}
"#;

const TEST_SUBSCRIBER: &str = r#"
#[tokio::test]
async fn handles_an_event() {
    use micro_core::broker::Message;
    let event = __IDENT__::api::Event { name: "test".into() };
    __IDENT__::on_event(event, Message::new(__IDENT__::TOPIC, Vec::new())).await.expect("handled");
}
"#;

const README_HEAD: &str = r#"# __NAME__

A service built on micro (`micro new __NAME__` made this crate). It registers as
`__NAME__` and serves `__IDENT__.__SERVICE__/Hello`.

| file | what it is |
| --- | --- |
| `proto/__IDENT__.proto` | the API: change it and `cargo build` generates the Rust code again |
| `build.rs` | compiles the proto with protox (no system `protoc`) and keeps its descriptor set for reflection |
| `src/lib.rs` | the generated API (module `api`) and the handler, `Handler` |
| `src/main.rs` | the server, in one line of SDK: `micro_core::service("__NAME__")` |
| `tests/__IDENT__.rs` | calls the service by name in-process, over a memory registry |

```sh
cargo test    # the in-process test: no network set-up
__REGISTRY_ENV__cargo run     # serves __NAME__ until Ctrl-C; `cargo run -- --help` lists its settings
```

The server reads its settings from the environment only (`MICRO_REGISTRY`,
`MICRO_SERVER_ADDRESS`, `RUST_LOG`, …); its command line is yours. Once it runs, the
`micro` command calls it by name, learning the types from its reflection:

```sh
__REGISTRY_ENV__micro call __NAME__ __IDENT__.__SERVICE__/Hello '{"name": "you"}'
```
"#;

const README_CLIENT: &str = r#"
`src/bin/__NAME__-client.rs` is a client, finding the server by name through the same registry:

```sh
__REGISTRY_ENV__cargo run --bin __NAME__-client -- you    # Hello, you!
```
"#;

const README_SUBSCRIBER: &str = r#"
The server subscribes to `__TOPIC__` (queue group `__NAME__`: one instance gets each event)
and `on_event` in `src/lib.rs` handles each one; the client publishes one after its call.
Events go over the broker `MICRO_BROKER` names (default: the registry broker, no server).
"#;

const README_TAIL: &str = r#"
## Depending on micro-core

micro-core is not on crates.io yet, so `Cargo.toml` takes it by path, from the clone of micro
this crate was made with:

    __MICRO_CORE__

If the clone moves, change that path; or depend on a git clone instead
(`micro-core = { git = "URL", ... }`). The crate is a workspace of its own (the empty
`[workspace]` table), so it builds wherever it lives; its `Cargo.lock` started as micro's, so
the first build takes the versions micro is tested with.

micro-core is built with the features this service needs: `cli` (the settings from the
environment) and the registries it may use. Its guide is in the clone's `docs/`.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_a_crate_an_ident_and_a_service() {
        assert_eq!(parse_name("order-book").as_deref(), Ok("order-book"));
        for bad in ["", "Counter", "my_service", "9lives", "a-1b", "-x", "type", "foo-client"] {
            assert!(parse_name(bad).is_err(), "{bad:?} accepted");
        }
        let args = NewArgs {
            name: "order-book".into(),
            path: None,
            no_client: false,
            subscriber: Some("orders.created".into()),
            micro_core: PathBuf::from(DEFAULT_MICRO_CORE),
        };
        let made = Crate::new(&args, Registry::Consul, Path::new("/x/micro-core"));
        assert_eq!((made.ident.as_str(), made.service.as_str()), ("order_book", "OrderBook"));
        let files = made.files();
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert!(paths.contains(&"src/bin/order-book-client.rs") && paths.contains(&"tests/order_book.rs"));
        for (path, text) in &files {
            assert!(!text.contains("__"), "{path} keeps a marker:\n{text}");
        }
        let manifest = &files[0].1;
        assert!(manifest.contains(r#"features = ["cli", "mdns", "consul"]"#), "{manifest}");
        assert!(manifest.contains(r#"path = "/x/micro-core""#), "{manifest}");
    }

    #[test]
    fn the_generated_crate_asks_for_the_versions_the_workspace_pins() {
        let root = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
        for (name, version) in VERSIONS {
            let plain = format!("\n{name} = \"{version}\"");
            let table = format!("\n{name} = {{ version = \"{version}\"");
            assert!(root.contains(&plain) || root.contains(&table), "the workspace pins {name} otherwise");
        }
    }
}
