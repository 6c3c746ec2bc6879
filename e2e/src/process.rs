//! The workspace's binaries as real child processes: built fresh with escargot, logs kept
//! in a file each, stopped with SIGTERM or SIGKILL, killed when dropped.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use tokio::time::Instant;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e sits in the workspace").to_path_buf()
}

/// The path of the workspace binary `name`, built (or found up to date) by cargo.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let package = match name {
        "micro" => "micro-cli",
        "fault-server" => "e2e",
        package => package,
    };
    let run = escargot::CargoBuild::new()
        .manifest_path(workspace_root().join("Cargo.toml"))
        .package(package)
        .bin(name)
        .run()
        .unwrap_or_else(|err| panic!("cargo could not build {name}: {err}"));
    let path = run.path().to_path_buf();
    built.insert(name.to_owned(), path.clone());
    path
}

/// A running child process whose stdout and stderr go to a log file.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts the workspace binary `name` with `args` and extra environment `env`, on
    /// loopback (`MICRO_SERVER_ADDRESS=127.0.0.1:0` unless `env` says otherwise), with
    /// vessel-service's bookings in memory (`VESSEL_DB=:memory:` unless `env` or `--db`
    /// says otherwise), so no test leaves bookings in a file another test or run reads, and
    /// events on the in-process broker (`MICRO_BROKER=memory` unless `env` says otherwise):
    /// shippy's topic is fixed, so over the registry broker every test's vessel-service would
    /// book every other test's consignments. Tests of events name their broker.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(name, Command::new(binary(name)), args, env)
    }

    /// Starts `command` (a program and any leading arguments, e.g. `nsenter -t PID -n
    /// BINARY` as [`crate::hosts::Host::start`] builds it) with `args` and `env` as
    /// [`Process::start`] does; `name` labels its log.
    pub fn spawn(name: &str, mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Process {
        let logs = workspace_root().join("target").join("e2e-logs");
        std::fs::create_dir_all(&logs).expect("log folder");
        let log = logs.join(format!("{}.log", crate::unique_name(name)));
        let file = std::fs::File::create(&log).expect("log file");
        command
            .args(args)
            .env("MICRO_SERVER_ADDRESS", "127.0.0.1:0")
            .env("VESSEL_DB", ":memory:")
            .env("MICRO_BROKER", "memory")
            .env("RUST_LOG", "info,micro_core=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap_or_else(|err| panic!("could not start {name}: {err}"));
        Process { name: name.to_owned(), child, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has exited, `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Sends `signal` (e.g. `TERM`, `KILL`) without waiting.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {} ({}) failed", self.pid(), self.name);
    }

    /// Sends SIGTERM and waits up to `limit` for the exit, without blocking the runtime.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait(limit).await
    }

    /// Waits up to `limit` for the process to exit, without blocking the runtime; panics
    /// with its log if it does not.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(crate::calls::POLL_EVERY).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ({}) ----\n{}", self.name, self.log.display(), self.log());
        }
    }
}

/// Where a test's process runs: this namespace, or a host of a [`crate::hosts::Network`].
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// The test's own namespace (loopback only).
    Here,
    /// A host of the test's network.
    On(&'a crate::hosts::Host),
}

impl Place<'_> {
    /// Starts the workspace binary `name` there, as [`Process::start`] does.
    pub fn start(self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        match self {
            Place::Here => Process::start(name, args, env),
            Place::On(host) => host.start(name, args, env),
        }
    }
}

/// An environment of owned values as the `(&str, &str)` pairs [`Process::start`] takes.
pub fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(name, value)| (*name, value.as_str())).collect()
}
