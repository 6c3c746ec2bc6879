//! A real `rabbitmq-server` for tests: its own node name, free loopback ports (AMQP,
//! Erlang distribution and its own `epmd`), a temporary data and log directory and `HOME`;
//! restartable on the same ports and data; killed, with its `epmd`, on drop.
//!
//! Each process runs under a small `sh` guard that kills it when the guard's standard input
//! closes, so a server kept in a static for a whole test binary ([`RabbitMqServer::shared`])
//! still goes away when the binary exits.
//!
//! # Examples
//! ```no_run
//! let server = e2e::rabbitmq::RabbitMqServer::start();
//! println!("{}", server.address()); // 127.0.0.1:PORT
//! ```

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The broker's start script as Debian installs it (the one in /usr/sbin switches user).
const SERVER_SCRIPT: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What to run when the server is missing.
const INSTALL_HINT: &str =
    "install it with `make test-deps` or `apt-get install --no-install-recommends rabbitmq-server`";

/// A running (or stopped) RabbitMQ node.
pub struct RabbitMqServer {
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    node: String,
    dir: PathBuf,
    epmd: Option<Guarded>,
    server: Option<Guarded>,
}

impl RabbitMqServer {
    /// Starts one and waits until it answers AMQP.
    ///
    /// # Panics
    /// When `rabbitmq-server` is not installed (`make test-deps`), or does not answer AMQP
    /// within 60 s (the panic names its log directory).
    pub fn start() -> RabbitMqServer {
        assert!(Path::new(SERVER_SCRIPT).exists(), "{SERVER_SCRIPT} is missing: {INSTALL_HINT}");
        let port = crate::free_port();
        let node = format!("e2e-{}-{port}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("e2e-rabbitmq-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("rabbitmq data directory");
        let mut server = RabbitMqServer {
            port,
            dist_port: crate::free_port(),
            epmd_port: crate::free_port(),
            node,
            dir,
            epmd: None,
            server: None,
        };
        server.start_epmd();
        server.launch();
        server
    }

    /// One server for the whole test binary, started on first use. Tests that share it
    /// keep apart by their own topic and queue names; a test that stops or restarts a
    /// server starts its own.
    pub fn shared() -> &'static RabbitMqServer {
        static SHARED: OnceLock<RabbitMqServer> = OnceLock::new();
        SHARED.get_or_init(RabbitMqServer::start)
    }

    /// `host:port` of its AMQP listener (vhost `/`, user `guest`, which RabbitMQ allows
    /// from loopback).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The Erlang node name, for `rabbitmqctl -n` (with [`RabbitMqServer::ctl_env`]).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The environment `rabbitmqctl` needs to reach this node (its `HOME` for the Erlang
    /// cookie, and its `epmd` port).
    pub fn ctl_env(&self) -> Vec<(&'static str, String)> {
        vec![("HOME", self.dir.display().to_string()), ("ERL_EPMD_PORT", self.epmd_port.to_string())]
    }

    /// Kills the node (SIGKILL) and waits for it; its data stays.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop();
        }
    }

    /// Starts it again on the same ports and data directory and waits until it answers AMQP.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn start_epmd(&mut self) {
        let mut command = Command::new("epmd");
        command.args(["-port", &self.epmd_port.to_string(), "-address", "127.0.0.1"]);
        // The last process to go removes the data directory, even for a server kept in a
        // static (never dropped) when the test binary exits.
        let epmd =
            Guarded::spawn(command, &self.dir.join("epmd.log"), &self.dir.join("epmd.exit"), Some(&self.dir));
        let address: SocketAddr = ([127, 0, 0, 1], self.epmd_port).into();
        let started = Instant::now();
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(
                epmd.exit_code().is_none(),
                "epmd exited at once: {}",
                log_tail(&self.dir.join("epmd.log"))
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "epmd did not listen on {address} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.epmd = Some(epmd);
    }

    fn launch(&mut self) {
        let dir = &self.dir;
        let mut command = Command::new(SERVER_SCRIPT);
        command
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("HOME", dir);
        let exit = dir.join("server.exit");
        let _ = std::fs::remove_file(&exit);
        let server = Guarded::spawn(command, &dir.join("server.log"), &exit, None);
        let address: SocketAddr = self.address().parse().expect("address");
        let started = Instant::now();
        while !answers_amqp(address) {
            if let Some(code) = server.exit_code() {
                panic!(
                    "rabbitmq-server (node {}) exited with {code} before answering AMQP on {address}; \
                     its logs are in {}: {}",
                    self.node,
                    dir.display(),
                    log_tail(&dir.join("server.log"))
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "rabbitmq-server (node {}) did not answer AMQP on {address} within {START_TIMEOUT:?}; \
                 is it installed ({INSTALL_HINT})? its logs are in {}",
                self.node,
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.server = Some(server);
    }
}

impl Drop for RabbitMqServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut epmd) = self.epmd.take() {
            epmd.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a broker on `address` greets an AMQP 0-9-1 client: it answers the protocol
/// header with a method frame (connection.start), which it does only once it is booted.
fn answers_amqp(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut frame_type = [0_u8; 1];
    stream.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && stream.read_exact(&mut frame_type).is_ok()
        && frame_type[0] == 1
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A process in a session of its own under an `sh` guard: closing the guard's standard
/// input (a stop, or this process's exit) kills the process's whole group; its exit code,
/// should it end by itself, lands in a file.
struct Guarded {
    child: Child,
    stdin: Option<ChildStdin>,
    exit_file: PathBuf,
}

/// The guard: `$1` the exit-code file, `$2` a directory to remove afterwards (or empty),
/// the rest the command. It kills the group when its input closes, or when the test
/// binary's process group is signalled (Ctrl-C, a timeout).
const GUARD_SCRIPT: &str = r#"exit_file=$1; remove=$2; shift 2
setsid sh -c '"$@"; echo "$?" > "$0"' "$exit_file" "$@" </dev/null &
group=$!
finish() {
  kill -KILL "-$group" 2>/dev/null
  wait
  if [ -n "$remove" ]; then rm -rf "$remove"; fi
  exit 0
}
trap finish INT TERM HUP
read _closed || true
finish"#;

impl Guarded {
    /// Starts `command` under a guard; `remove_after`, if any, goes once the guard killed it.
    fn spawn(command: Command, log: &Path, exit_file: &Path, remove_after: Option<&Path>) -> Guarded {
        let log_file = std::fs::File::create(log).expect("log file");
        let mut guard = Command::new("sh");
        guard.arg("-c").arg(GUARD_SCRIPT).arg("sh").arg(exit_file);
        guard.arg(remove_after.map(Path::as_os_str).unwrap_or_default()).arg(command.get_program());
        guard.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => guard.env(key, value),
                None => guard.env_remove(key),
            };
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = guard
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {program} under sh ({err}): {INSTALL_HINT}"));
        let stdin = child.stdin.take();
        Guarded { child, stdin, exit_file: exit_file.to_owned() }
    }

    /// The exit code, once the process ended by itself.
    fn exit_code(&self) -> Option<String> {
        std::fs::read_to_string(&self.exit_file).ok().map(|code| code.trim().to_owned())
    }

    /// Kills the process group and waits for the guard.
    fn stop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}
