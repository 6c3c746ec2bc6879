//! A real PostgreSQL server for tests (Debian's `postgresql`): a fresh cluster made with
//! `initdb` in a temporary folder, user `shippy` with trust authentication (no password),
//! on a free loopback port, or on a host of an [`e2e::hosts::Network`](crate::hosts::Network)
//! at the host's address. Databases are made per test with
//! [`PostgresServer::create_database`], and [`PostgresServer::query`] reads them back for
//! checks.
//!
//! Any client on loopback or on the server's subnet (the other hosts of its network) may
//! connect as any user without a password.
//!
//! PostgreSQL refuses to run as root, and inside `scripts/netns-run`'s user namespace only
//! uid 0 is mapped; so `initdb` and `postgres` run in a nested user namespace that maps uid
//! 1000 to ours (`unshare -U --map-user=1000 --map-group=1000`). The cluster is throwaway:
//! it runs with `fsync=off`, and its folder goes when the server stops.
//!
//! Stopping: dropping a server asks for PostgreSQL's fast shutdown (SIGINT: open sessions
//! are closed, not waited for; SIGTERM would wait for every client to leave), waits up to
//! 20 s, then kills its process group (SIGKILL), and removes its folder. A small `sh`
//! watchdog beside every server does the same when the test binary exits without dropping
//! it (as with [`PostgresServer::shared`], kept in a static): it waits on a pipe from this
//! process, which closes when the process ends however it ends.
//!
//! The binaries come from the newest `/usr/lib/postgresql/<major>/bin`.
//!
//! # Examples
//! ```no_run
//! let server = e2e::postgres::PostgresServer::shared();
//! let url = server.create_database(&e2e::unique_name("vessels"));
//! println!("VESSEL_DB={url}"); // postgres://shippy@127.0.0.1:PORT/vessels-PID-N
//! assert_eq!(server.query("postgres", "select 1 + 1"), "2");
//! ```

use std::{
    ffi::OsStr,
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

use crate::hosts::Host;

/// The user every cluster is made with (trust authentication, no password).
pub const USER: &str = "shippy";
/// The port a server on a host of a [`Network`](crate::hosts::Network) listens on
/// (each host has its own ports, so the usual one is free).
pub const HOST_PORT: u16 = 5432;
/// Where Debian installs each major version's binaries, in `<major>/bin`.
const INSTALL_ROOT: &str = "/usr/lib/postgresql";
/// What to run when PostgreSQL is missing.
const INSTALL_HINT: &str = "install it with `make test-deps` or `apt-get install postgresql`";
/// The uid (and gid) `initdb` and `postgres` run as, in their own user namespace.
const SERVER_UID: &str = "1000";
/// How long a new server may take to answer `select 1`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a start or a stop is checked on.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How many fresh ports [`PostgresServer::start`] tries when the drawn one is taken.
const PORT_ATTEMPTS: usize = 3;
/// Each `psql`'s limit for connecting, in seconds (`PGCONNECT_TIMEOUT`).
const CONNECT_TIMEOUT_SECS: &str = "5";
/// The longest database name PostgreSQL keeps whole (longer ones are cut, silently).
const MAX_NAME_LEN: usize = 63;

/// The watchdog: `$1` the postmaster's pid (its process group too), `$2` the folder to
/// remove. It waits for a line on its standard input: `stopped` means the test stopped the
/// server itself; anything else (the pipe closed because the test binary ended, or a
/// signal to the test binary's process group) makes it stop the server: SIGINT, up to
/// `$3` tenths of a second of waiting, SIGKILL to the group, then the folder goes. An
/// exited postmaster may stay a zombie a while (nobody is left to reap it at once), so it
/// counts as gone once `/proc/PID/stat` says `Z`.
const WATCHDOG: &str = r#"pid=$1; dir=$2; tenths=$3
running() {
  state=$(sed 's/.*) //; s/ .*//' "/proc/$pid/stat" 2>/dev/null) && [ -n "$state" ] && [ "$state" != Z ]
}
stop() {
  trap '' INT TERM HUP
  kill -INT "$pid" 2>/dev/null
  n=0
  while running && [ "$n" -lt "$tenths" ]; do sleep 0.1; n=$((n + 1)); done
  kill -KILL -- "-$pid" 2>/dev/null
  rm -rf "$dir"
  exit 0
}
trap stop INT TERM HUP
line=
read -r line || true
if [ "$line" = stopped ]; then exit 0; fi
stop"#;

/// A running PostgreSQL server with a cluster of its own; stopped, and its folder removed,
/// when dropped (see the module docs).
pub struct PostgresServer {
    address: IpAddr,
    port: u16,
    bin: PathBuf,
    /// The cluster (`data/`) and the Unix socket; removed on stop.
    dir: PathBuf,
    /// initdb's and the server's output; kept, for reading after a failure.
    log: PathBuf,
    /// Runs a program in the server's network namespace: a host's `nsenter` prefix.
    namespace: Option<Vec<String>>,
    postmaster: Child,
    watchdog: Option<(Child, ChildStdin)>,
}

impl PostgresServer {
    /// Makes a cluster in a fresh temporary folder and starts a server on `127.0.0.1` at a
    /// free port ([`crate::free_port`]), waiting (up to 30 s) until it answers `select 1`.
    ///
    /// # Panics
    /// When PostgreSQL is not installed (`apt-get install postgresql`, or `make
    /// test-deps`), `unshare` is missing, `initdb` fails, or the server does not answer in
    /// time (the panic quotes its log).
    pub fn start() -> PostgresServer {
        let (dir, log) = PostgresServer::init("local");
        let mut attempt = 1;
        loop {
            let port = crate::free_port();
            match PostgresServer::launch(dir.clone(), log.clone(), Ipv4Addr::LOCALHOST.into(), port, None) {
                Ok(server) => return server,
                // Another test's server may take the drawn port before this one binds it.
                Err(err) if attempt < PORT_ATTEMPTS && err.contains("already in use") => attempt += 1,
                Err(err) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    panic!("{err}");
                }
            }
        }
    }

    /// One server for the whole test binary, started on first use and stopped when the
    /// binary exits (by its watchdog). Tests that share it keep apart by their own
    /// databases ([`PostgresServer::create_database`] with a [`crate::unique_name`]).
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        SHARED.get_or_init(PostgresServer::start)
    }

    /// Makes a cluster and starts a server on `host`, listening at the host's address and
    /// its loopback on port [`HOST_PORT`], and waits (up to 30 s) until it answers there.
    /// Its processes run through [`Host::command`]; drop the server before the network.
    ///
    /// # Panics
    /// As [`PostgresServer::start`].
    pub fn start_on(host: &Host) -> PostgresServer {
        let (dir, log) = PostgresServer::init(&format!("host{}", host.address()));
        // The `nsenter ...` that Host::command puts before a program.
        let probe = host.command("true");
        let mut namespace: Vec<String> = std::iter::once(probe.get_program())
            .chain(probe.get_args())
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        assert_eq!(namespace.pop().as_deref(), Some("true"), "Host::command ends with the program");
        match PostgresServer::launch(dir.clone(), log, host.address().into(), HOST_PORT, Some(namespace)) {
            Ok(server) => server,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("{err} (on {host})");
            }
        }
    }

    /// The address it listens on: `127.0.0.1`, or the host's.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this server, `postgres://shippy@ADDRESS:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@{}:{}/{db}", self.address, self.port)
    }

    /// Creates the empty database `name` (letters, digits, `_` and `-`, at most 63) and
    /// returns its [`url`](PostgresServer::url).
    ///
    /// # Panics
    /// When the name is not such a name, or `createdb` fails (e.g. it exists), with its
    /// error.
    pub fn create_database(&self, name: &str) -> String {
        let plain = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        assert!(
            !name.is_empty() && name.len() <= MAX_NAME_LEN && plain,
            "database name {name:?}: use 1 to {MAX_NAME_LEN} letters, digits, `_` or `-`"
        );
        let output = self.client("createdb").arg(name).output().expect("run createdb");
        check(&output, &format!("createdb {name}"));
        tracing::info!(db = %name, port = self.port, "database created");
        self.url(name)
    }

    /// Runs `sql` in database `db` with `psql -At` and returns what it printed, without the
    /// final newline: one line per row, columns separated by `|`.
    ///
    /// # Panics
    /// When the statement fails (`ON_ERROR_STOP`), with psql's error.
    pub fn query(&self, db: &str, sql: &str) -> String {
        let output =
            self.psql(db).args(["-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output().expect("run psql");
        check(&output, &format!("psql -d {db} -c {sql:?}"));
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.ends_with('\n') {
            text.pop();
        }
        text
    }

    /// A `psql` connected to database `db` as [`USER`], without reading `~/.psqlrc`, run
    /// where the server runs (on its host, for [`PostgresServer::start_on`]); add arguments
    /// and run it.
    pub fn psql(&self, db: &str) -> Command {
        let mut command = self.client("psql");
        command.args(["-X", "-d", db]);
        command
    }

    /// The path of the PostgreSQL program `name` (e.g. `psql`), from the newest
    /// `/usr/lib/postgresql/<major>/bin`, for running it elsewhere (e.g. on another host
    /// with [`Host::command`]).
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// What initdb and the server have logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client program (`psql`, `createdb`) aimed at this server, in its namespace.
    fn client(&self, name: &str) -> Command {
        let mut command = self.command_here(self.binary(name));
        command
            .args(["-h", &self.address.to_string(), "-p", &self.port.to_string(), "-U", USER, "-w"])
            .env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS)
            .stdin(Stdio::null());
        command
    }

    /// `program` run in the server's network namespace.
    fn command_here(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.namespace {
            None => Command::new(program),
            Some(prefix) => {
                let mut command = Command::new(&prefix[0]);
                command.args(&prefix[1..]).arg(program);
                command
            }
        }
    }

    /// A fresh folder and log, and a cluster made in `folder/data` with initdb.
    fn init(label: &str) -> (PathBuf, PathBuf) {
        let bin = bin_dir();
        let name = crate::unique_name(&format!("postgres-{label}"));
        let dir = std::env::temp_dir().join(format!("e2e-{name}"));
        std::fs::create_dir_all(&dir).expect("postgres folder");
        // The server's uid in its namespace is ours outside it; 777 keeps it writable
        // however the outer ids are mapped.
        let status = Command::new("chmod").arg("777").arg(&dir).status().expect("run chmod");
        assert!(status.success(), "chmod 777 {}", dir.display());
        let logs = crate::process::workspace_root().join("target").join("e2e-logs");
        std::fs::create_dir_all(&logs).expect("log folder");
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let started = Instant::now();
        let status = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", USER, "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .status()
            .unwrap_or_else(|err| panic!("cannot run unshare ({err}): apt-get install util-linux"));
        if !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            panic!("initdb failed ({status}); its log, {}:\n{}", log.display(), log_tail(&log));
        }
        // initdb trusts loopback only; a server on a host is for its neighbours too.
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("data").join("pg_hba.conf"))
            .expect("open pg_hba.conf");
        writeln!(hba, "host all all samenet trust").expect("write pg_hba.conf");
        tracing::debug!(dir = %dir.display(), elapsed = ?started.elapsed(), "cluster made");
        (dir, log)
    }

    /// Starts the server on the cluster in `dir` and waits until it answers; on failure,
    /// what went wrong (the server is stopped by then, its folder kept).
    fn launch(
        dir: PathBuf,
        log: PathBuf,
        address: IpAddr,
        port: u16,
        namespace: Option<Vec<String>>,
    ) -> Result<PostgresServer, String> {
        let bin = bin_dir();
        let listen = match namespace {
            None => address.to_string(),
            Some(_) => format!("{address},{}", Ipv4Addr::LOCALHOST),
        };
        let file = std::fs::OpenOptions::new().append(true).open(&log).expect("log file");
        let mut command = match &namespace {
            None => as_server_user(&bin.join("postgres")),
            Some(prefix) => {
                let mut command = Command::new(&prefix[0]);
                command
                    .args(&prefix[1..])
                    .arg("unshare")
                    .args(as_server_user_args())
                    .arg(bin.join("postgres"));
                command
            }
        };
        command
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-k")
            .arg(&dir)
            .args(["-p", &port.to_string(), "-c", &format!("listen_addresses={listen}")])
            // A throwaway cluster: nothing needs to survive a crash of the machine.
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        // A process group of its own (nsenter and unshare exec, so the group is the
        // postmaster's), which a stop kills whole.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let postmaster = command.spawn().unwrap_or_else(|err| {
            panic!("cannot start postgres through unshare ({err}): apt-get install util-linux")
        });
        let watchdog = watchdog(postmaster.id(), &dir);
        let mut server =
            PostgresServer { address, port, bin, dir, log, namespace, postmaster, watchdog: Some(watchdog) };
        let started = Instant::now();
        loop {
            let probe = server.psql("postgres").args(["-A", "-t", "-c", "select 1"]).output();
            if probe.is_ok_and(|output| output.status.success()) {
                break;
            }
            if let Ok(Some(status)) = server.postmaster.try_wait() {
                let log = log_tail(&server.log);
                server.dir = PathBuf::new(); // kept for a retry; the caller removes it
                return Err(format!(
                    "postgres on {address}:{port} exited ({status}) before answering; its log, {}:\n{log}",
                    server.log.display()
                ));
            }
            if started.elapsed() > START_TIMEOUT {
                let log = log_tail(&server.log);
                server.dir = PathBuf::new();
                return Err(format!(
                    "postgres on {address}:{port} did not answer `select 1` within {START_TIMEOUT:?}; \
                     its log, {}:\n{log}",
                    server.log.display()
                ));
            }
            std::thread::sleep(POLL_EVERY);
        }
        tracing::info!(%address, port, elapsed = ?started.elapsed(), "postgres up");
        Ok(server)
    }

    /// Fast shutdown, SIGKILL to the group after [`STOP_TIMEOUT`], then the watchdog is
    /// told and the folder removed.
    fn stop(&mut self) {
        let pid = i32::try_from(self.postmaster.id()).ok().and_then(Pid::from_raw);
        if let (Some(pid), Ok(None)) = (pid, self.postmaster.try_wait()) {
            let _ = kill_process(pid, Signal::INT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.postmaster.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    tracing::warn!(port = self.port, "postgres did not shut down in time; killing it");
                    let _ = kill_process_group(pid, Signal::KILL);
                    let _ = self.postmaster.wait();
                    break;
                }
                std::thread::sleep(POLL_EVERY);
            }
        }
        if let Some((mut watchdog, mut stdin)) = self.watchdog.take() {
            let _ = stdin.write_all(b"stopped\n");
            drop(stdin);
            let _ = watchdog.wait();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        tracing::info!(address = %self.address, port = self.port, "postgres stopped");
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the watchdog (see [`WATCHDOG`]) of the postmaster `pid`.
fn watchdog(pid: u32, dir: &Path) -> (Child, ChildStdin) {
    let tenths = (STOP_TIMEOUT.as_millis() / 100).to_string();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("postgres-watchdog")
        .arg(pid.to_string())
        .arg(dir)
        .arg(tenths)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the postgres watchdog (sh)");
    let stdin = child.stdin.take().expect("piped stdin");
    (child, stdin)
}

/// `unshare`'s arguments for running a program as [`SERVER_UID`] in a user namespace.
fn as_server_user_args() -> [String; 3] {
    ["-U".into(), format!("--map-user={SERVER_UID}"), format!("--map-group={SERVER_UID}")]
}

/// `program` run as [`SERVER_UID`] (PostgreSQL refuses root) through `unshare`.
fn as_server_user(program: &Path) -> Command {
    let mut command = Command::new("unshare");
    command.args(as_server_user_args()).arg(program);
    command
}

/// The newest installed major version's `bin` folder; panics saying what to install.
fn bin_dir() -> PathBuf {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let entries = std::fs::read_dir(INSTALL_ROOT).ok()?;
        entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let major: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                ["initdb", "postgres", "psql", "createdb"]
                    .iter()
                    .all(|name| bin.join(name).is_file())
                    .then_some((major, bin))
            })
            .max_by_key(|(major, _)| *major)
            .map(|(_, bin)| bin)
    });
    found.clone().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server under {INSTALL_ROOT}/<major>/bin (initdb, postgres, psql): {INSTALL_HINT}"
        )
    })
}

/// Panics with `what` and the command's output unless it succeeded.
fn check(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    );
}

/// The last lines of a log.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
