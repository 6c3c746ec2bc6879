//! The release binaries as child processes: their stderr is read line by line for the
//! moment they registered (or started listening) and their address; they are killed when
//! dropped, and by the watchdog if the run overstays.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::watch,
    time::Instant,
};

/// Every child's pid, so the watchdog can kill what is left.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The network namespaces of hosts (`net:[INODE]`), whose every process the watchdog kills.
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// SIGKILLs every child still listed and every process in a listed namespace; for the
/// watchdog and for exits on error.
pub fn kill_all_children() {
    let mut pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for namespace in NAMESPACES.lock().map(|n| n.clone()).unwrap_or_default() {
        pids.extend(e2e::hosts::processes_in(&namespace));
    }
    // Servers started through e2e's helpers (nats-server) are children too, not listed.
    pids.extend(descendants(std::process::id()));
    for pid in pids {
        let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
}

/// Every process below `root` in the process tree, from `/proc`.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `PID (COMM) STATE PPID ...`; COMM may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    found.remove(0);
    found
}

/// Whether `program` is an executable file in a directory of `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Lists network namespaces (of an `e2e::hosts::Network`) whose processes the watchdog
/// kills; `untrack_namespaces` takes them off once the network is down.
pub fn track_namespaces(ids: &[String]) {
    NAMESPACES.lock().expect("namespaces lock").extend_from_slice(ids);
}

/// Takes namespaces listed by [`track_namespaces`] off the list.
pub fn untrack_namespaces(ids: &[String]) {
    NAMESPACES.lock().expect("namespaces lock").retain(|id| !ids.contains(id));
}

/// Past `limit`, kills every child and exits with status 3, whatever the run is doing.
pub fn start_watchdog(program: &'static str, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("{program}: over its {limit:?} limit; stopping");
        kill_all_children();
        std::process::exit(3);
    });
}

/// Lists a child for the watchdog.
pub fn track(pid: u32) {
    CHILDREN.lock().expect("children lock").push(pid);
}

/// Takes a child that was stopped off the watchdog's list.
pub fn untrack(pid: u32) {
    CHILDREN.lock().expect("children lock").retain(|&p| p != pid);
}

/// A release binary next to this one (`cargo build --release` puts them together).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("where is micro-bench")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release -p {} -p bench` (`make bench` does)",
            path.display(),
            match name {
                "raw-vessel" | "unary-mimalloc" | "unary-logged" | "alloc-per-call" => "bench",
                "fault-server" => "e2e",
                "micro" => "micro-cli",
                package => package,
            }
        );
    }
    Ok(path)
}

/// When the child said it was ready, and the address it serves on.
pub type Ready = Option<(Instant, SocketAddr)>;

/// A running child process.
pub struct Service {
    child: Child,
    pid: u32,
    /// When it was started.
    pub spawned: Instant,
    ready: watch::Receiver<Ready>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `name` on `127.0.0.1:0` with JSON logs at info level and `env`. Events go
    /// through the in-process broker, so the first `registered` line is the service's own,
    /// not a broker subscriber's; vessel-service keeps its bookings in memory.
    pub fn start(name: &str, env: &[(&str, &str)]) -> anyhow::Result<Service> {
        let mut command = Command::new(binary(name)?);
        command
            .env("MICRO_SERVER_ADDRESS", "127.0.0.1:0")
            .env("MICRO_BROKER", "memory")
            .env("VESSEL_DB", ":memory:")
            .env("MICRO_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let spawned = Instant::now();
        let mut child = command.spawn().with_context(|| format!("could not start {name}"))?;
        let pid = child.id().context("child pid")?;
        CHILDREN.lock().expect("children lock").push(pid);
        let (ready_tx, ready) = watch::channel(None);
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("child stderr")?;
        let lines_log = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let now = Instant::now();
                if ready_tx.borrow().is_none()
                    && let Some(address) = ready_address(&line)
                {
                    let _ = ready_tx.send(Some((now, address)));
                }
                let mut log = lines_log.lock().expect("log lock");
                if log.len() < 200 {
                    log.push(line);
                }
            }
        });
        Ok(Service { child, pid, spawned, ready, log })
    }

    /// Waits until the child logged its registration (or `listening`), up to `limit`.
    pub async fn ready(&mut self, limit: Duration) -> anyhow::Result<(Instant, SocketAddr)> {
        let result = tokio::time::timeout(limit, self.ready.wait_for(Option::is_some)).await;
        match result {
            Ok(Ok(ready)) => Ok(ready.expect("checked")),
            _ => bail!(
                "pid {} did not log its registration within {limit:?}; its log:\n{}",
                self.pid,
                self.log.lock().expect("log lock").join("\n")
            ),
        }
    }

    /// How many kept log lines (the first 200) contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log.lock().expect("log lock").iter().filter(|line| line.contains(text)).count()
    }

    /// Whether the child has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL, then reap.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGKILL without waiting.
    pub fn start_kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// (VmRSS, RssAnon) in KiB: all resident pages, and the private ones alone (heap and
    /// stacks, without the executable's clean pages, which every instance shares).
    pub fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).context("no such field")?;
            Ok(line[name.len()..].trim().trim_end_matches("kB").trim().parse()?)
        };
        Ok((field("VmRSS:")?, field("RssAnon:")?))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        CHILDREN.lock().expect("children lock").retain(|&p| p != self.pid);
    }
}

/// The CPU time `pid` has used so far, user and system, all its threads together, in
/// seconds (Linux counts it in ticks of 10 ms).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name: state is the first, utime the 12th, stime the 13th.
    let (_, rest) = stat.rsplit_once(')').context("a /proc stat line")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |n: usize| -> anyhow::Result<f64> { Ok(fields.get(n).context("a short stat line")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

/// The address in a `registered` JSON log line of the SDK's server, or in raw-vessel's
/// `listening ADDRESS` line.
pub(crate) fn ready_address(line: &str) -> Option<SocketAddr> {
    if let Some(rest) = line.strip_prefix("listening ") {
        return rest.trim().parse().ok();
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "registered" {
        return None;
    }
    fields.get("address")?.as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_are_recognised() {
        let line = r#"{"timestamp":"x","level":"INFO","fields":{"message":"registered","service":"v","address":"127.0.0.1:4000"},"target":"micro_core::server"}"#;
        assert_eq!(ready_address(line), Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(ready_address("listening 127.0.0.1:5"), Some("127.0.0.1:5".parse().unwrap()));
        assert_eq!(ready_address(r#"{"fields":{"message":"fleet loaded"}}"#), None);
    }
}
