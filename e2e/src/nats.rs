//! A real `nats-server` with JetStream for tests: loopback, a free port, a temporary store;
//! restartable on the same port and store; killed on drop.
//!
//! # Examples
//! ```no_run
//! let server = e2e::nats::NatsServer::start();
//! println!("{}", server.address()); // 127.0.0.1:PORT
//! ```

use std::{
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running (or stopped) `nats-server -js`.
pub struct NatsServer {
    port: u16,
    store: std::path::PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one and waits until it accepts connections.
    ///
    /// # Panics
    /// When `nats-server` is not installed (`make test-deps`, or `apt-get install nats-server`)
    /// or does not start within 10 s.
    pub fn start() -> NatsServer {
        let port = crate::free_port();
        let store = std::env::temp_dir().join(format!("e2e-nats-{}-{port}", std::process::id()));
        let mut server = NatsServer { port, store, child: None };
        server.launch();
        server
    }

    /// `host:port` to connect to.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn launch(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start nats-server ({err}): install it with `make test-deps` or `apt-get install nats-server`")
            });
        self.child = Some(child);
        let address: SocketAddr = self.address().parse().expect("address");
        let started = Instant::now();
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {address} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
