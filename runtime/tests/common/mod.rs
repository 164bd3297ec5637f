//! A private `nats-server -js` for tests: its own port and store directory, so a test can stop
//! and restart it. A missing `nats-server` fails the test loudly.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use council_proto::fleet::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
    /// A config file (authorization etc.) when started with one.
    config: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// With `extra` (nats-server config syntax, e.g. an `authorization` block) in its config.
    pub fn start_with_config(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = (!extra.is_empty()).then(|| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, extra).expect("writes the nats config");
            path
        });
        let mut server = Self {
            child: None,
            port,
            store: dir.path().join("js"),
            config,
            _dir: dir,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and store) and waits until it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `check` until it holds (bounded).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Served {
    pub child: Child,
    pub addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `council serve` on free ports with the model in `model` and `extra` flags; returns once it
/// printed its address.
pub fn serve_with(model: &str, extra: &[&str], stderr: Stdio) -> Served {
    let mut args = vec!["--model-dir", model];
    args.extend_from_slice(extra);
    serve_args(&args, stderr)
}

/// `council serve` on free ports with `extra` flags (the model too); returns once it printed
/// its address.
pub fn serve_args(extra: &[&str], stderr: Stdio) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_council"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env(
            "RUST_LOG",
            if stderr_is_logged(extra) {
                "info"
            } else {
                "warn"
            },
        )
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("council serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reads the address line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Served { child, addr }
}

/// JSON-log runs need the info lines; the others keep test output quiet.
fn stderr_is_logged(extra: &[&str]) -> bool {
    extra.contains(&"json")
}

pub async fn client(addr: &str) -> OrchestratorServiceClient<tonic::transport::Channel> {
    OrchestratorServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

/// Writes a tiny model under `dir` with `council dev tiny-model`; returns its path.
pub fn tiny_model(dir: &Path) -> String {
    let model = dir.join("model");
    let model = model.to_str().expect("utf-8").to_owned();
    let made = Command::new(env!("CARGO_BIN_EXE_council"))
        .args(["dev", "tiny-model", &model])
        .output()
        .expect("runs");
    assert!(made.status.success());
    model
}

/// The councils `addr` lists (with their agents).
pub async fn councils(addr: &str) -> Vec<council_proto::fleet::orchestrator::v1::CouncilInfo> {
    client(addr)
        .await
        .list_councils(
            council_proto::fleet::orchestrator::v1::ListCouncilsRequest {
                role_filter: String::new(),
                include_agents: true,
            },
        )
        .await
        .expect("list")
        .into_inner()
        .councils
}
