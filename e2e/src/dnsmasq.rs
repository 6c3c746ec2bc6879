//! A real dnsmasq (Debian's `dnsmasq-base`) serving SRV and A records a test writes, on a
//! loopback port picked at start. Records change by [`Dnsmasq::set_records`], which rewrites
//! the configuration and restarts the server on the same port (SRV records are read only at
//! start). Killed when dropped.
//!
//! # Examples
//! ```no_run
//! let mut dns = e2e::dnsmasq::Dnsmasq::start(&["host-record=a.test,127.0.0.1"]);
//! dns.set_records(&["srv-host=_grpc._tcp.svc.test,a.test,50051", "host-record=a.test,127.0.0.1"]);
//! println!("MICRO_DNS_NAMESERVER={}", dns.address());
//! ```

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::process::Process;

/// A running dnsmasq.
pub struct Dnsmasq {
    binary: PathBuf,
    port: u16,
    conf: PathBuf,
    process: Option<Process>,
}

impl Dnsmasq {
    /// Starts dnsmasq answering only from `records` (dnsmasq configuration lines such as
    /// `srv-host=…` and `host-record=…`), with a TTL of 1 s on each.
    ///
    /// # Panics
    /// When no `dnsmasq` binary is found, or it does not start within 5 s.
    pub fn start(records: &[&str]) -> Dnsmasq {
        let binary = std::env::var_os("DNSMASQ_BIN").map(PathBuf::from).unwrap_or_else(|| {
            ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"].iter().map(PathBuf::from).find(|p| p.is_file()).unwrap_or_else(
                || panic!("no dnsmasq binary: `apt-get install dnsmasq-base` (`make test-deps` does it) or set DNSMASQ_BIN"),
            )
        });
        let port = crate::free_port();
        let conf = std::env::temp_dir().join(format!("{}.conf", crate::unique_name("micro-dnsmasq")));
        let mut dns = Dnsmasq { binary, port, conf, process: None };
        dns.set_records(records);
        dns
    }

    /// Where it answers, `127.0.0.1:<port>`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Serves `records` from now on: rewrites the configuration and restarts dnsmasq.
    pub fn set_records(&mut self, records: &[&str]) {
        std::fs::write(&self.conf, records.join("\n") + "\n").expect("write the dnsmasq configuration");
        if let Some(mut old) = self.process.take() {
            old.signal("KILL");
            while old.exit_status().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let args = [
            "--keep-in-foreground".to_owned(),
            "--log-facility=-".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            "--pid-file=".into(),
            "--user=root".into(),
            "--group=".into(),
            "--bind-interfaces".into(),
            "--listen-address=127.0.0.1".into(),
            "--local-ttl=1".into(),
            format!("--port={}", self.port),
            format!("--conf-file={}", self.conf.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = Process::spawn("dnsmasq", Command::new(&self.binary), &args, &[]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process.log().contains("started, version") {
            assert!(
                process.exit_status().is_none() && Instant::now() < deadline,
                "dnsmasq did not start:\n{}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(process);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.process = None;
        let _ = std::fs::remove_file(&self.conf);
    }
}
