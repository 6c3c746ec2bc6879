//! Support for tests that start real processes and agents: the private network namespace
//! check, unique names, waiting and paced calls ([`calls`]), (in [`consul`]) a real
//! Consul dev agent, (in [`postgres`]) a real PostgreSQL server, and (in [`interop`]) a
//! grpc-go server.
//!
//! # Examples
//! ```no_run
//! e2e::require_private_netns();
//! let name = e2e::unique_name("vessel-service");
//! assert!(name.starts_with("vessel-service-"));
//! ```

pub mod browser;
pub mod calls;
pub mod consul;
pub mod discovery;
pub mod dnsmasq;
pub mod etcd;
pub mod gateway;
pub mod hosts;
pub mod interop;
pub mod nats;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod rabbitmq;
pub mod shippy;

use std::sync::atomic::{AtomicU32, Ordering};

/// Fails the calling test unless it runs inside the private namespace that
/// `scripts/netns-run` makes (only `lo`), so multicast never leaves the machine.
pub fn require_private_netns() {
    if let Err(interfaces) = in_private_netns() {
        panic!(
            "this test uses multicast and must run in a private network namespace with only loopback \
             (found interfaces {interfaces:?}); run it through `make test`, or `scripts/netns-run cargo test`"
        );
    }
}

/// Whether this process runs inside `scripts/netns-run`'s namespace (only `lo`); when not,
/// the interfaces it sees.
pub fn in_private_netns() -> Result<(), Vec<String>> {
    // /proc/net/dev lists the interfaces of this process's own network namespace.
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next().map(|name| name.trim().to_owned()))
        .collect();
    let only_loopback = interfaces.iter().all(|name| name == "lo");
    match only_loopback && std::env::var("MICRO_NETNS").as_deref() == Ok("1") {
        true => Ok(()),
        false => Err(interfaces),
    }
}

/// `prefix` with a suffix unique to this process and call, so parallel tests never share a
/// service name.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A loopback port free for TCP and UDP now, for a server a test starts. It lies below the
/// range the kernel hands out for outgoing connections (from 32768 by default), so no
/// connection a test makes can take it before the server binds it, and it is drawn at
/// random, so tests side by side rarely draw the same one. (A port the kernel picks with
/// `:0` comes from that range, and tests running together took such ports first.)
pub fn free_port() -> u16 {
    use std::net::{TcpListener, UdpSocket};
    use std::time::{SystemTime, UNIX_EPOCH};
    static DRAWS: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    loop {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let draw = DRAWS.fetch_add(1, Ordering::Relaxed);
        let mixed = (nanos ^ std::process::id().rotate_left(16) ^ draw.wrapping_mul(2_654_435_761))
            .wrapping_mul(2_246_822_519);
        let port = (LOWEST + (mixed >> 8) % SPAN) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}
