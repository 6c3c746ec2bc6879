//! Several hosts on one machine, for tests of what happens between machines: each host is
//! a network namespace with an `eth0` at `10.77.X.I/24` on a private bridge, so real
//! processes talk over real TCP and multicast, and a host can be cut off (its packets
//! vanish, with no RST, as with a dead machine or a pulled cable) and brought back.
//!
//! Everything happens inside the test run's own namespace (`scripts/netns-run`), which keeps
//! only `lo`: the bridge lives in a namespace of its own (the switch), and every namespace
//! is held by an `unshare -n sleep 900` process, since `ip netns add` cannot work there.
//! Each [`Network`] gets its own subnet and interface names, so tests running in parallel in
//! one test binary never collide.
//!
//! Processes run on a host through `nsenter -t HOLDER -n`; code of the test itself runs on
//! a host through [`Host::within`] or [`Host::block_on`] (a thread that joins the host's
//! namespace; a socket stays in the namespace it was made in, whichever thread uses it).
//! Dropping the network kills every process left in its namespaces, which also removes its
//! links.
//!
//! # Examples
//! ```no_run
//! use e2e::hosts::Network;
//!
//! let network = Network::new(2);
//! // Binds 10.77.X.1:0 (MICRO_SERVER_ADDRESS) and advertises that address.
//! let _server = network.host(0).start("fault-server", &[], &[("FAULT_NAME", "echo")]);
//! let listener = network.host(1).within(|| std::net::TcpListener::bind((network.host(1).address(), 0)));
//! // A client on host 1 (its tokio runtime and sockets are there) calls host 0.
//! let reached = network.host(1).block_on(|| async {
//!     tokio::net::TcpStream::connect((network.host(0).address(), 80)).await.is_ok()
//! });
//! network.partition(0); // host 0's packets vanish
//! network.heal(0);
//! ```

use std::{
    ffi::OsStr,
    fmt,
    fs::File,
    io::Write,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use rustix::{
    process::{Pid, Signal, kill_process},
    thread::{LinkNameSpaceType, move_into_link_name_space},
};

use crate::process::{Process, binary};

/// The first two octets of every host address: host `i` (from 0) of network `X` is
/// `10.77.X.<i + 1>`.
const ADDRESS_PREFIX: [u8; 2] = [10, 77];
/// Networks one test binary may build (`X` runs from 1 to this).
const MAX_NETWORKS: usize = 254;
/// Hosts on one network.
const MAX_HOSTS: usize = 253;
/// Seconds a namespace holder lives, so a test killed before it could clean up leaves
/// nothing behind for long. Longer than any test.
const HOLDER_LIFETIME_SECS: &str = "900";
/// How long a new holder gets to enter its namespace.
const HOLDER_START: Duration = Duration::from_secs(5);
/// How long dropping a network waits for the processes it killed to go.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Host::block_on`] waits for tasks still running when its future is done.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);
/// Worker threads of [`Host::block_on`]'s runtime.
const RUNTIME_WORKERS: usize = 2;
/// The tools the harness runs, with the Debian package of each.
const TOOLS: [(&str, &str); 4] =
    [("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2"), ("sleep", "coreutils")];

/// Hosts on one bridge; see the module docs. Dropping it stops everything on its hosts.
pub struct Network {
    /// `X` in `10.77.X.I`, and in every interface name.
    number: usize,
    /// The namespace that holds the bridge and the bridge-side end of each host's link.
    switch: Namespace,
    hosts: Vec<Host>,
}

/// One host of a [`Network`]: a network namespace with `lo` and `eth0`.
pub struct Host {
    /// Its place in [`Network::hosts`], from 0; its address ends in `index + 1`.
    index: usize,
    address: Ipv4Addr,
    namespace: Namespace,
    /// The bridge-side end of the host's link, in the switch namespace; down = partitioned.
    port: String,
}

/// A network namespace, held by a sleeping process.
struct Namespace {
    holder: Child,
    /// What `/proc/PID/ns/net` of its processes reads, `net:[INODE]`.
    id: String,
    /// An open handle, for threads that join it.
    handle: File,
}

impl Network {
    /// Builds `hosts` hosts, `10.77.X.1` to `10.77.X.<hosts>` on one bridge, with `X` unique
    /// in this test binary. Host `i` (from 0) is `10.77.X.<i + 1>`.
    ///
    /// # Panics
    /// Outside the private namespace of `scripts/netns-run`, when `unshare`, `nsenter` or
    /// `ip` is missing, or when a step fails (with what failed).
    pub fn new(hosts: usize) -> Network {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        crate::require_private_netns();
        require_tools();
        assert!((1..=MAX_HOSTS).contains(&hosts), "a network has 1 to {MAX_HOSTS} hosts, not {hosts}");
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(number <= MAX_NETWORKS, "one test binary may build at most {MAX_NETWORKS} networks");

        let switch = Namespace::hold();
        let bridge = format!("m{number}br");
        switch.ip(&[
            format!("link add {bridge} type bridge mcast_snooping 0"),
            format!("link set {bridge} multicast on up"),
        ]);
        let hosts = (0..hosts).map(|index| Host::attach(&switch, &bridge, number, index)).collect();
        let network = Network { number, switch, hosts };
        tracing::info!(subnet = %network.subnet(), hosts = network.hosts.len(), %bridge, "network up");
        network
    }

    /// The network's subnet, `10.77.X.0/24`.
    pub fn subnet(&self) -> String {
        let [a, b] = ADDRESS_PREFIX;
        format!("{a}.{b}.{}.0/24", self.number)
    }

    /// Host `index` (from 0), whose address ends in `index + 1`.
    pub fn host(&self, index: usize) -> &Host {
        self.hosts
            .get(index)
            .unwrap_or_else(|| panic!("no host {index}: the network has {}", self.hosts.len()))
    }

    /// Every host, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Cuts host `index` off: the bridge side of its link goes down, so whatever it sends
    /// and whatever is sent to it vanishes, with no RST or error, until [`Network::heal`].
    pub fn partition(&self, index: usize) {
        let host = self.host(index);
        self.switch.ip(&[format!("link set {} down", host.port)]);
        tracing::info!(%host, "partitioned");
    }

    /// Reconnects host `index` after [`Network::partition`].
    pub fn heal(&self, index: usize) {
        let host = self.host(index);
        self.switch.ip(&[format!("link set {} up", host.port)]);
        tracing::info!(%host, "healed");
    }

    /// The ids (`net:[INODE]`) of the network's namespaces, the switch's and every host's;
    /// see [`processes_in`].
    pub fn namespace_ids(&self) -> Vec<String> {
        std::iter::once(&self.switch)
            .chain(self.hosts.iter().map(|h| &h.namespace))
            .map(|n| n.id.clone())
            .collect()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let ids = self.namespace_ids();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut killed = 0;
        loop {
            let left: Vec<u32> = ids.iter().flat_map(|id| processes_in(id)).collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(subnet = %self.subnet(), processes = ?left, "processes outlived the network");
                break;
            }
            for pid in left {
                if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                    // It may have exited on its own meanwhile.
                    let _ = kill_process(pid, Signal::KILL);
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The namespaces, and with them the bridge and every link, go once the holders are
        // reaped and the handles closed, as the fields drop.
        tracing::info!(subnet = %self.subnet(), killed, "network down");
    }
}

impl Host {
    /// A new namespace linked to `bridge` (in `switch`) as host `index` of network `network`.
    fn attach(switch: &Namespace, bridge: &str, network: usize, index: usize) -> Host {
        let [a, b] = ADDRESS_PREFIX;
        let octet = |n: usize| u8::try_from(n).expect("checked against MAX_NETWORKS and MAX_HOSTS");
        let address = Ipv4Addr::new(a, b, octet(network), octet(index + 1));
        let namespace = Namespace::hold();
        let (port, peer) = (format!("m{network}p{index}"), format!("m{network}e{index}"));
        switch.ip(&[
            format!("link add {port} type veth peer name {peer} netns {}", namespace.holder.id()),
            format!("link set {port} master {bridge}"),
            format!("link set {port} up"),
        ]);
        namespace.ip(&[
            "link set lo multicast on up".to_owned(),
            format!("link set {peer} name eth0"),
            format!("addr add {address}/24 dev eth0"),
            "link set eth0 multicast on up".to_owned(),
            "route add default dev eth0".to_owned(),
        ]);
        Host { index, address, namespace, port }
    }

    /// The host's address on the bridge, `10.77.X.I`.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The id (`net:[INODE]`) of the host's namespace; see [`processes_in`].
    pub fn namespace_id(&self) -> &str {
        &self.namespace.id
    }

    /// A command that runs `program` on this host (through `nsenter`); add arguments and
    /// run it as any [`Command`]. What it starts is stopped when the network is dropped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.namespace.command(program)
    }

    /// Starts the workspace binary `name` on this host, as [`Process::start`] does, with
    /// `MICRO_SERVER_ADDRESS` set to this host's address and port 0 (`env` may override it).
    pub fn start(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let server_address = format!("{}:0", self.address);
        let mut all_env = vec![("MICRO_SERVER_ADDRESS", server_address.as_str())];
        all_env.extend_from_slice(env);
        Process::spawn(&format!("{name}-host{}", self.index), self.command(binary(name)), args, &all_env)
    }

    /// Starts any `program` (e.g. a Consul agent) on this host with `args` and `env`, its
    /// log labelled `label`; see [`Process::spawn`].
    pub fn start_program(&self, label: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(&format!("{label}-host{}", self.index), self.command(program), args, env)
    }

    /// Runs `work` on a thread of this process that has joined the host's namespace, and
    /// returns what it returns: sockets it makes belong to the host, whichever thread uses
    /// them later, and so do threads and processes it starts.
    pub fn within<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("host{}", self.index))
                .spawn_scoped(scope, || {
                    move_into_link_name_space(
                        self.namespace.handle.as_fd(),
                        Some(LinkNameSpaceType::Network),
                    )
                    .unwrap_or_else(|err| panic!("could not join the namespace of {self}: {err}"));
                    work()
                })
                .expect("spawn a thread");
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs the future `make` returns to completion on a multi-threaded tokio runtime whose
    /// threads are on this host (see [`Host::within`]), e.g. a client and its registry. The
    /// future is made on the host, so it need not be `Send`; tasks it spawns run there too.
    pub fn block_on<F, Fut>(&self, make: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.within(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(RUNTIME_WORKERS)
                .thread_name(format!("host{}-tokio", self.index))
                .enable_all()
                .build()
                .expect("tokio runtime");
            let output = runtime.block_on(make());
            runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
            output
        })
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {} ({})", self.index, self.address)
    }
}

impl Namespace {
    /// A new network namespace, held by `unshare -n sleep`.
    fn hold() -> Namespace {
        let before = std::fs::read_link("/proc/thread-self/ns/net").expect("read this thread's namespace");
        let mut holder = Command::new("unshare")
            .args(["-n", "sleep", HOLDER_LIFETIME_SECS])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("could not run unshare: {err}"));
        let link = format!("/proc/{}/ns/net", holder.id());
        let deadline = Instant::now() + HOLDER_START;
        loop {
            if let Ok(Some(status)) = holder.try_wait() {
                let mut message = String::new();
                if let Some(mut stderr) = holder.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut message);
                }
                panic!(
                    "`unshare -n sleep` exited ({status}): {}; hosts need the user namespace of \
                     `scripts/netns-run` (unshare -rn)",
                    message.trim()
                );
            }
            // Until unshare has run, the holder still shows this thread's namespace.
            if let Ok(id) = std::fs::read_link(&link)
                && id != before
            {
                let handle = File::open(&link).unwrap_or_else(|err| panic!("open {link}: {err}"));
                let id = id.to_string_lossy().into_owned();
                return Namespace { holder, id, handle };
            }
            if Instant::now() > deadline {
                let _ = holder.kill();
                let _ = holder.wait();
                panic!("`unshare -n sleep` did not enter a new namespace within {HOLDER_START:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.args(["-t", &self.holder.id().to_string(), "-n"]).arg(program);
        command
    }

    /// Runs `ip -batch` with `commands` in this namespace; panics with its error if one fails.
    fn ip(&self, commands: &[String]) {
        let mut ip = self
            .command("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("could not run nsenter ip: {err}"));
        let mut script = commands.join("\n");
        script.push('\n');
        ip.stdin.take().expect("piped stdin").write_all(script.as_bytes()).expect("write to ip");
        let output = ip.wait_with_output().expect("wait for ip");
        assert!(
            output.status.success(),
            "ip failed in {}:\n{script}{}",
            self.id,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The processes (by pid) whose network namespace is `namespace_id` (`net:[INODE]`, e.g.
/// [`Host::namespace_id`]); threads that joined it with [`Host::within`] are not listed.
pub fn processes_in(namespace_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|id| id.as_os_str() == OsStr::new(namespace_id))
        })
        .filter(|&pid| pid != std::process::id())
        .collect()
}

fn require_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in TOOLS {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        assert!(found, "hosts need `{tool}` on PATH: apt-get install {package}");
    }
}
