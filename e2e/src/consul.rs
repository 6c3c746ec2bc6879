//! A real Consul agent for tests: `consul agent -dev` on loopback ports picked at start, so
//! parallel test binaries never share one. Nothing is kept across restarts (dev mode).
//!
//! The binary comes from `CONSUL_BIN`, else `.tools/consul/usr/bin/consul` in the workspace
//! (what `scripts/install-consul` unpacks), else `consul` on `PATH`.
//!
//! # Examples
//! ```no_run
//! # async fn demo() {
//! let agent = e2e::consul::ConsulAgent::start_async().await;
//! println!("Consul HTTP API at {}", agent.http_address());
//! let agent = agent.restarted().await; // a fresh agent on the same ports
//! # drop(agent); }
//! ```
//!
//! Starting, stopping and restarting wait for the agent: the plain methods block the
//! calling thread (for synchronous callers); async tests use the `async` ones, which wait
//! on a blocking thread instead of the test's runtime.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long a started agent gets to elect itself leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits after SIGTERM before it kills the agent.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `consul agent -dev`, killed when dropped.
pub struct ConsulAgent {
    binary: PathBuf,
    ports: Ports,
    log: PathBuf,
    /// With ACLs on (default policy deny), the management token.
    acl_master_token: Option<String>,
    child: Option<Child>,
}

#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    serf_lan: u16,
    serf_wan: u16,
    server: u16,
}

impl ConsulAgent {
    /// Starts a dev agent on free loopback ports and waits (up to 10 s) until it is leader.
    ///
    /// # Panics
    /// When no `consul` binary is found, or the agent does not become leader in time.
    pub fn start() -> ConsulAgent {
        Self::start_with(None)
    }

    /// Like [`ConsulAgent::start`], with ACLs enabled, the default policy `deny`, and
    /// `master_token` as the management token: a request without a token may do nothing.
    pub fn start_with_acls(master_token: &str) -> ConsulAgent {
        Self::start_with(Some(master_token.to_owned()))
    }

    /// [`ConsulAgent::start`] for async code: it waits on a blocking thread.
    pub async fn start_async() -> ConsulAgent {
        blocking(ConsulAgent::start).await
    }

    /// [`ConsulAgent::start_with_acls`] for async code: it waits on a blocking thread.
    pub async fn start_with_acls_async(master_token: &str) -> ConsulAgent {
        let token = master_token.to_owned();
        blocking(move || ConsulAgent::start_with_acls(&token)).await
    }

    /// [`ConsulAgent::stop`] for async code: it waits on a blocking thread.
    pub async fn stopped(mut self) -> ConsulAgent {
        blocking(move || {
            self.stop();
            self
        })
        .await
    }

    /// [`ConsulAgent::restart`] for async code: it waits on a blocking thread.
    pub async fn restarted(mut self) -> ConsulAgent {
        blocking(move || {
            self.restart();
            self
        })
        .await
    }

    /// Starts an agent on free ports; one that exits at once (a port taken between choosing
    /// it and binding it, which tests running side by side make likely) is started again on
    /// other ports, up to three times.
    fn start_with(acl_master_token: Option<String>) -> ConsulAgent {
        let binary = find_binary();
        let mut tries = 0;
        loop {
            tries += 1;
            let ports = free_ports();
            let log =
                std::env::temp_dir().join(format!("micro-consul-{}-{}.log", std::process::id(), ports.http));
            let mut agent = ConsulAgent {
                binary: binary.clone(),
                ports,
                log,
                acl_master_token: acl_master_token.clone(),
                child: None,
            };
            match agent.try_spawn() {
                Ok(()) => return agent,
                Err(AgentFailure::Exited(message)) if tries < 3 => {
                    eprintln!("{message}\n(starting the agent again on other ports)");
                }
                Err(AgentFailure::Exited(message) | AgentFailure::NoLeader(message)) => panic!("{message}"),
            }
        }
    }

    /// The agent's HTTP API, `127.0.0.1:<port>`.
    pub fn http_address(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }

    /// Stops the agent with SIGTERM and waits for it to exit (killing it after 10 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the agent and starts a fresh one on the same ports; like every dev agent, the
    /// new one knows no services.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        if let Err(AgentFailure::Exited(message) | AgentFailure::NoLeader(message)) = self.try_spawn() {
            panic!("{message}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), AgentFailure> {
        let log = File::create(&self.log).expect("create the consul agent log");
        let port = |p: u16| p.to_string();
        let child = Command::new(&self.binary)
            .args(["agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .args(["-http-port", &port(self.ports.http), "-dns-port", "-1", "-grpc-port", "-1"])
            .args([
                "-serf-lan-port",
                &port(self.ports.serf_lan),
                "-serf-wan-port",
                &port(self.ports.serf_wan),
            ])
            .args(["-server-port", &port(self.ports.server)])
            // Connect's built-in CA, for MICRO_CONSUL_CONNECT (dev agents have it on anyway).
            .args(["-hcl", "connect { enabled = true }"])
            .args(self.acl_master_token.iter().flat_map(|token| {
                // Consul 1.8 names the management token `master`.
                let acl = format!(
                    r#"acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{token}", agent = "{token}" }} }}"#
                );
                ["-hcl".to_owned(), acl]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("could not start {}: {err}", self.binary.display()));
        self.child = Some(child);
        self.wait_for_leader()
    }

    fn wait_for_leader(&mut self) -> Result<(), AgentFailure> {
        let address: SocketAddr = self.http_address().parse().expect("loopback address");
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Some(leader) = http_get(address, "/v1/status/leader")
                && leader.trim().trim_matches('"').contains(':')
            {
                return Ok(());
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> =
                    log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
                let message = format!(
                    "consul agent at {address} {} (exit: {exited:?}); log {}:\n{}",
                    if exited.is_some() { "exited" } else { "had no leader after 10 s" },
                    self.log.display(),
                    tail.join("\n")
                );
                return Err(match exited {
                    Some(_) => AgentFailure::Exited(message),
                    None => AgentFailure::NoLeader(message),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs `work` on tokio's blocking threads, passing its panic on.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CONSUL_BIN") {
        return PathBuf::from(path);
    }
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/consul/usr/bin/consul");
    if unpacked.is_file() {
        return unpacked;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join("consul")).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "no consul binary: set CONSUL_BIN, put consul on PATH, or run `scripts/install-consul` \
             (`make test` does it), which unpacks one into {}",
            unpacked.display()
        )
    })
}

/// Four distinct loopback ports free for TCP, and for UDP too (serf gossips over both).
fn free_ports() -> Ports {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 4 {
        let port = crate::free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ports { http: ports[0], serf_lan: ports[1], serf_wan: ports[2], server: ports[3] }
}

/// The body of a plain HTTP/1.0 GET, or `None` on any failure or a status other than 200.
fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_owned())
}

/// Why an agent did not come up.
enum AgentFailure {
    /// It exited, e.g. because a port was taken.
    Exited(String),
    /// It ran but found no leader in time.
    NoLeader(String),
}
