//! Real etcd servers for tests (Debian's `etcd-server`, with `etcdctl` from `etcd-client`):
//! a cluster of one or more members on loopback ports picked at start, or one member on
//! each of the first hosts of an [`e2e::hosts::Network`](crate::hosts::Network). Every member is killed, and
//! its data folder removed, when the cluster is dropped.
//!
//! The binaries come from `ETCD_BIN` / `ETCDCTL_BIN`, else `etcd` / `etcdctl` on `PATH`.
//!
//! # Examples
//! ```no_run
//! let cluster = e2e::etcd::EtcdCluster::start(1);
//! println!("MICRO_REGISTRY_ADDRESS={}", cluster.endpoints());
//! ```

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{hosts::Network, process::Process};

/// How long a started cluster gets to report itself healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Option<Process>>,
    clients: Vec<SocketAddr>,
    data: Vec<PathBuf>,
}

/// The path of the `name` binary: `$var`, else on `PATH`; panics saying what to install.
fn find(name: &str, var: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("no {name} binary: `apt-get install {package}` (`make test-deps` does it) or set {var}")
        })
}

/// The etcd server binary.
pub fn etcd_binary() -> PathBuf {
    find("etcd", "ETCD_BIN", "etcd-server")
}

/// Runs `etcdctl --endpoints ENDPOINTS ARGS...` (API v3) and returns its output; panics
/// with it when the command fails.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> String {
    let output = Command::new(find("etcdctl", "ETCDCTL_BIN", "etcd-client"))
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "etcdctl {args:?} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// A loopback port free for TCP.
fn free_port() -> u16 {
    crate::free_port()
}

/// A fresh, empty data folder.
fn data_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique_name(&format!("micro-etcd-{label}")));
    std::fs::create_dir_all(&dir).expect("etcd data folder");
    dir
}

impl EtcdCluster {
    /// Starts `size` members on loopback and waits (up to 20 s) until every one is healthy.
    ///
    /// # Panics
    /// When no `etcd` binary is found, or the cluster does not become healthy in time.
    pub fn start(size: usize) -> EtcdCluster {
        // A free port may be taken by another test's process before etcd binds it: then the
        // whole cluster starts again on fresh ports.
        let mut attempt = 1;
        loop {
            match EtcdCluster::start_on_free_ports(size) {
                Ok(cluster) => return cluster,
                Err(err) if attempt < 3 && err.contains("address already in use") => attempt += 1,
                Err(err) => panic!("{err}"),
            }
        }
    }

    fn start_on_free_ports(size: usize) -> Result<EtcdCluster, String> {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster { members: Vec::new(), clients: Vec::new(), data: Vec::new() };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = data_dir(&format!("e{i}"));
            let args = member_args(i, Ipv4Addr::LOCALHOST, *client, *peer, &initial, &data, false);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let process = Process::spawn(&format!("etcd-e{i}"), Command::new(etcd_binary()), &args, &[]);
            cluster.members.push(Some(process));
            cluster.clients.push(SocketAddr::from((Ipv4Addr::LOCALHOST, *client)));
            cluster.data.push(data);
        }
        cluster.wait_healthy(health)?;
        Ok(cluster)
    }

    /// Starts one member on each of the first `size` hosts of `network` (client port 2379 on
    /// the host's address and on its loopback, peer port 2380) and waits until every one is
    /// healthy.
    pub fn start_on(network: &Network, size: usize) -> EtcdCluster {
        let hosts = &network.hosts()[..size];
        let initial = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| format!("e{i}=http://{}:2380", host.address()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster { members: Vec::new(), clients: Vec::new(), data: Vec::new() };
        for (i, host) in hosts.iter().enumerate() {
            let data = data_dir(&format!("e{i}"));
            let args = member_args(i, host.address(), 2379, 2380, &initial, &data, true);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.members.push(Some(host.start_program("etcd", &etcd_binary(), &args, &[])));
            cluster.clients.push(SocketAddr::from((host.address(), 2379)));
            cluster.data.push(data);
        }
        let first = network.host(0);
        if let Err(err) = cluster.wait_healthy(|address| first.within(|| health(address))) {
            panic!("{err}");
        }
        cluster
    }

    /// Every member's client endpoint, `ip:port`, comma-separated: a `MICRO_REGISTRY_ADDRESS`.
    pub fn endpoints(&self) -> String {
        self.clients.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }

    /// Member `index`'s client endpoint, `ip:port`.
    pub fn endpoint(&self, index: usize) -> String {
        self.clients[index].to_string()
    }

    /// The index of the member that leads the cluster now, as the members report it
    /// (`etcdctl endpoint status`), waiting (up to 20 s) until one does.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            let status = etcdctl(&self.endpoints(), &["endpoint", "status", "-w", "json"]);
            let members: Vec<serde_json::Value> = serde_json::from_str(&status).expect("etcdctl status JSON");
            let leader = members.iter().position(|member| {
                let status = &member["Status"];
                status["leader"]
                    .as_u64()
                    .is_some_and(|leader| Some(leader) == status["header"]["member_id"].as_u64())
            });
            match leader {
                Some(index) => return index,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => panic!("no etcd member reports that it leads: {status}"),
            }
        }
    }

    /// Kills member `index` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut member) = self.members[index].take() {
            member.signal("KILL");
            while member.exit_status().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn wait_healthy(&mut self, healthy: impl Fn(SocketAddr) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        for (i, address) in self.clients.clone().into_iter().enumerate() {
            while !healthy(address) {
                let exited = self.members[i].as_mut().and_then(Process::exit_status);
                if exited.is_some() || Instant::now() > deadline {
                    let log = self.members[i].as_ref().map(Process::log).unwrap_or_default();
                    return Err(format!(
                        "etcd member e{i} at {address} is not healthy (exit: {exited:?}); log:\n{log}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

fn member_args(
    index: usize,
    ip: Ipv4Addr,
    client: u16,
    peer: u16,
    initial: &str,
    data: &std::path::Path,
    also_loopback: bool,
) -> Vec<String> {
    let mut clients = format!("http://{ip}:{client}");
    if also_loopback {
        clients.push_str(&format!(",http://127.0.0.1:{client}"));
    }
    vec![
        format!("--name=e{index}"),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={clients}"),
        format!("--advertise-client-urls=http://{ip}:{client}"),
        format!("--listen-peer-urls=http://{ip}:{peer}"),
        format!("--initial-advertise-peer-urls=http://{ip}:{peer}"),
        format!("--initial-cluster={initial}"),
        "--initial-cluster-state=new".into(),
        "--initial-cluster-token=micro-test".into(),
        // Short Raft timings, so a lost member or leader is noticed within a second or two.
        "--heartbeat-interval=100".into(),
        "--election-timeout=1000".into(),
        "--log-level=warn".into(),
    ]
}

/// Whether the member at `address` answers `/health` with `"health":"true"`.
fn health(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(300)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.members.clear();
        for dir in &self.data {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
