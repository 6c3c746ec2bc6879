//! Servers this project did not write, for interop tests: a grpc-go 1.33 server (Debian's
//! `golang-go` and `golang-google-grpc-dev`, installed by `scripts/install-test-deps`),
//! built here from `micro-core/tests/interop/health_server.go` in GOPATH mode, with no
//! module proxy: the standard health service, reflection v1alpha, and grpc-go's default
//! keepalive policy. It reports each connection it accepts.
//!
//! # Examples
//! ```no_run
//! # async fn demo() {
//! let server = e2e::interop::GoServer::start().await;
//! println!("grpc-go at {}, {} connections so far", server.address, server.accepted());
//! # }
//! ```

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::process::workspace_root;

/// Where Debian's `golang-google-grpc-dev` puts grpc-go's source.
const GOPATH: &str = "/usr/share/gocode";

/// The server binary, built once per test process.
fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let install = "apt-get install --no-install-recommends golang-go golang-google-grpc-dev \
                           (scripts/install-test-deps does)";
            let go = std::process::Command::new("go").arg("version").output();
            assert!(go.is_ok_and(|out| out.status.success()), "no `go` on PATH: {install}");
            assert!(
                std::path::Path::new(GOPATH).join("src/google.golang.org/grpc").is_dir(),
                "no grpc-go under {GOPATH}: {install}"
            );
            let folder = workspace_root().join("target/interop");
            std::fs::create_dir_all(&folder).expect("target/interop");
            let output = folder.join("grpc-go-health-server");
            let source = workspace_root().join("micro-core/tests/interop/health_server.go");
            // At the lowest priority: the timing figures of tests running beside it count.
            let built = std::process::Command::new("nice")
                .args(["-n", "19", "go", "build", "-o"])
                .arg(&output)
                .arg(&source)
                .env("GO111MODULE", "off")
                .env("GOPATH", GOPATH)
                .env("GOCACHE", folder.join("gocache"))
                .output()
                .expect("go runs");
            assert!(
                built.status.success(),
                "go build {} failed: {}",
                source.display(),
                String::from_utf8_lossy(&built.stderr)
            );
            output
        })
        .clone()
}

/// A running grpc-go server, killed when dropped; its transport log (grpc-go's info
/// level: GOAWAYs, `too many pings`) goes to a file under `target/e2e-logs`.
pub struct GoServer {
    /// Where it serves, on loopback.
    pub address: SocketAddr,
    accepted: Arc<AtomicUsize>,
    log: PathBuf,
    _child: Child,
    reader: tokio::task::JoinHandle<()>,
}

impl GoServer {
    /// Builds (once) and starts the server; returns once it listens.
    ///
    /// # Panics
    /// Without `go` or grpc-go's source, naming what to install.
    pub async fn start() -> GoServer {
        let binary = tokio::task::spawn_blocking(binary).await.expect("the build");
        let logs = workspace_root().join("target/e2e-logs");
        std::fs::create_dir_all(&logs).expect("a log folder");
        let log = logs.join(format!("{}.log", crate::unique_name("grpc-go")));
        let mut child = Command::new(binary)
            .env("GRPC_GO_LOG_VERBOSITY_LEVEL", "99")
            .env("GRPC_GO_LOG_SEVERITY_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("the grpc-go server starts");
        let mut lines = BufReader::new(child.stdout.take().expect("its stdout")).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the grpc-go server listens within 30 s")
            .expect("its stdout")
            .expect("a line");
        let port: u16 = first.trim_start_matches("listening on ").parse().expect("listening on PORT");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("accepted ") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        GoServer { address: ([127, 0, 0, 1], port).into(), accepted, log, _child: child, reader }
    }

    /// The connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GoServer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
