//! Starting the real `kemon-keys` binary as a child process, on a free port and a fresh data
//! directory, the way an operator would run it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// CPUs the server processes are pinned to (`taskset -c` syntax), when set.
pub static SERVER_CPUS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A running server process; killed on drop.
pub struct ServerProcess {
    child: Child,
    pub endpoint: String,
    pub startup: Duration,
}

impl ServerProcess {
    /// Starts `bin serve` on `data_dir` with `extra` flags and waits until it reports SERVING.
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.local_addr()?.port()
        };
        let listen = format!("127.0.0.1:{port}");
        let started = Instant::now();
        // With --server-cpus, `taskset` pins the server (it execs the server, so the pid is
        // the server's own).
        let mut command = match SERVER_CPUS.get() {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .arg("serve")
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            // A fixed benchmark master key: only ever used on throw-away data.
            .env("KEMON_MASTER_KEY", "00".repeat(32))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = ServerProcess {
            child,
            endpoint: format!("http://{listen}"),
            startup: Duration::ZERO,
        };
        server.wait_serving(Duration::from_secs(300)).await?;
        server.startup = started.elapsed();
        Ok(server)
    }

    async fn wait_serving(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the server exited during start-up: {status}");
            }
            let channel = tonic::transport::Channel::from_shared(self.endpoint.clone())?;
            if let Ok(channel) = channel.connect().await {
                let mut health = HealthClient::new(channel);
                let status = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("the server did not report SERVING within {limit:?}")
    }

    /// Resident set size of the server process, in bytes (Linux).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmRSS:")
    }

    /// The most the server process has held resident so far, in bytes (Linux).
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmHWM:")
    }

    fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .with_context(|| format!("no {field}"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb * 1024)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kemon-keys` binary next to this one (both come from one `cargo build`).
pub fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kemon-keys")))
        .unwrap_or_else(|| PathBuf::from("kemon-keys"))
}
