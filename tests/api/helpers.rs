//! Starting real servers for tests, and small conveniences for calling them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use kemon_keys::app::{Application, MasterKeySource, Settings};
use kemon_keys::clock::ManualClock;
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;
use kemon_keys::vault::MasterKey;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

/// 2026-01-01T00:00:00Z: where every test clock starts.
pub const T0_MS: i64 = 1_767_225_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// A running server on a random port, with its own data directory and clock.
pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub data_dir: PathBuf,
    pub master_key_hex: String,
    /// Keeps the temporary directory alive for the server's (and its restarts') lifetime.
    _tmp: Option<Arc<tempfile::TempDir>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A fresh server: new data directory, clock at [`T0_MS`], a random master key.
    pub async fn start() -> TestServer {
        TestServer::start_with_live_buffer(4096).await
    }

    /// [`TestServer::start`] with a given buffer for live audit subscribers.
    pub async fn start_with_live_buffer(live_buffer: usize) -> TestServer {
        let tmp = Arc::new(tempfile::tempdir().expect("temp dir"));
        let master_key_hex = MasterKey::generate().to_hex();
        let mut server = TestServer::start_with(
            tmp.path(),
            ManualClock::new(T0_MS),
            MasterKeySource::Hex(master_key_hex.clone()),
            live_buffer,
        )
        .await
        .expect("server starts");
        server._tmp = Some(tmp);
        server.master_key_hex = master_key_hex;
        server
    }

    /// A server on an existing data directory.
    pub async fn start_in(
        data_dir: &Path,
        clock: ManualClock,
        master_key: MasterKeySource,
    ) -> anyhow::Result<TestServer> {
        TestServer::start_with(data_dir, clock, master_key, 4096).await
    }

    async fn start_with(
        data_dir: &Path,
        clock: ManualClock,
        master_key: MasterKeySource,
        live_buffer: usize,
    ) -> anyhow::Result<TestServer> {
        let server = TestServer::spawn(
            data_dir,
            clock,
            master_key,
            live_buffer,
            std::future::ready(()),
        )
        .await?;
        server.wait_until_serving().await;
        Ok(server)
    }

    /// A fresh server that serves but loads its verification cache only when the returned
    /// sender is used (or dropped): until then it is not ready.
    pub async fn start_loading_held() -> (TestServer, oneshot::Sender<()>) {
        let tmp = Arc::new(tempfile::tempdir().expect("temp dir"));
        let master_key_hex = MasterKey::generate().to_hex();
        let (release, held) = oneshot::channel::<()>();
        let mut server = TestServer::spawn(
            tmp.path(),
            ManualClock::new(T0_MS),
            MasterKeySource::Hex(master_key_hex),
            4096,
            async {
                let _ = held.await;
            },
        )
        .await
        .expect("server starts");
        server._tmp = Some(tmp);
        (server, release)
    }

    /// Builds and runs a server, its cache load waiting for `load_after`; does not wait for it
    /// to serve.
    async fn spawn(
        data_dir: &Path,
        clock: ManualClock,
        master_key: MasterKeySource,
        live_buffer: usize,
        load_after: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<TestServer> {
        let settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data_dir.to_owned(),
            master_key: master_key.clone(),
            write_batch_max: 64,
            audit_live_buffer: live_buffer,
            connection_limits: Default::default(),
        };
        let app = Application::build(settings, Arc::new(clock.clone())).await?;
        let addr = app.local_addr();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(app.run_loading_cache_after(
            async {
                let _ = rx.await;
            },
            load_after,
        ));
        let server = TestServer {
            addr,
            clock,
            data_dir: data_dir.to_owned(),
            master_key_hex: match master_key {
                MasterKeySource::Hex(h) => h,
                _ => String::new(),
            },
            _tmp: None,
            shutdown: Some(tx),
            handle: Some(handle),
        };
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    pub async fn client(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel().await)
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(kemon_keys::store::DATABASE_FILE)
    }

    async fn wait_until_serving(&self) {
        wait_for_health(&self.channel().await, "", ServingStatus::Serving).await;
    }

    /// Graceful shutdown; returns what the server's run returned. Keeps the data directory.
    pub async fn stop(mut self) -> (Option<Arc<tempfile::TempDir>>, anyhow::Result<()>) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = self.handle.take().unwrap().await.expect("server task");
        (self._tmp.take(), result)
    }

    /// Stops this server and starts another on the same data directory, clock and master key.
    pub async fn restart(self) -> TestServer {
        let clock = self.clock.clone();
        let dir = self.data_dir.clone();
        let key = self.master_key_hex.clone();
        let (tmp, result) = self.stop().await;
        result.expect("clean shutdown");
        let mut server = TestServer::start_in(&dir, clock, MasterKeySource::Hex(key))
            .await
            .expect("restart");
        server._tmp = tmp;
        server
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A plaintext HTTP/2 channel to a test server.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

/// What the health service says of `service` ("" for the server as a whole).
pub async fn health_of(channel: &Channel, service: &str) -> Option<ServingStatus> {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?
        .into_inner()
        .status;
    ServingStatus::try_from(status).ok()
}

/// Polls the health service until `service` reports `want` (10 s at most).
pub async fn wait_for_health(channel: &Channel, service: &str, want: ServingStatus) {
    for _ in 0..1000 {
        if health_of(channel, service).await == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("health of {service:?} did not become {want:?}");
}

pub const WORKSPACE: &str = "ws_acme";

/// A request acting as `actor` with `role`.
pub fn as_role<T>(role: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-kemon-actor", "user_alice".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-kemon-role", role.parse().unwrap());
    request
}

/// A request acting as an admin.
pub fn admin<T>(message: T) -> Request<T> {
    as_role("admin", message)
}

/// The (field, reason) pairs of a status's BadRequest details.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// The `google.rpc.ErrorInfo` domain of every error the service returns.
pub const ERROR_DOMAIN: &str = "keys.kemon.dev";

/// Asserts that `status` has `code` and a `google.rpc.ErrorInfo` in the service's domain with
/// `reason`; returns the ErrorInfo's metadata.
#[track_caller]
pub fn assert_reason(status: &Status, code: Code, reason: &str) -> HashMap<String, String> {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(info.domain, ERROR_DOMAIN, "{status:?}");
    assert_eq!(info.reason, reason, "{status:?}");
    info.metadata
}

/// Asserts INVALID_ARGUMENT (reason `INVALID_REQUEST`) naming `field`, and returns the reasons
/// given for it.
#[track_caller]
pub fn assert_invalid(result: Result<impl std::fmt::Debug, Status>, field: &str) -> Vec<String> {
    let status = result.expect_err("expected INVALID_ARGUMENT");
    assert_reason(&status, Code::InvalidArgument, "INVALID_REQUEST");
    let reasons: Vec<String> = field_violations(&status)
        .into_iter()
        .filter(|(f, _)| f == field)
        .map(|(_, r)| r)
        .collect();
    assert!(!reasons.is_empty(), "no violation for {field}: {status:?}");
    reasons
}

/// The fields an INVALID_ARGUMENT names, each once, sorted; checks that it carries reason
/// `INVALID_REQUEST` and that its message names every one of them too.
#[track_caller]
pub fn bad_fields(status: &Status) -> Vec<String> {
    assert_reason(status, Code::InvalidArgument, "INVALID_REQUEST");
    let mut named: Vec<String> = field_violations(status)
        .into_iter()
        .map(|(field, _)| field)
        .collect();
    named.sort();
    named.dedup();
    for field in &named {
        assert!(
            status.message().contains(&format!("{field}: ")),
            "the message does not name {field}: {status:?}"
        );
    }
    named
}

/// A CreateKey request for a production private key with the given scopes.
pub fn private_key(name: &str, scopes: &[&str]) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        workspace_id: WORKSPACE.into(),
        name: name.into(),
        r#type: pb::KeyType::Private as i32,
        environment: pb::Environment::Production as i32,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A CreateKey request for a production public key.
pub fn public_key(name: &str, scopes: &[&str], domains: &[&str]) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        workspace_id: WORKSPACE.into(),
        name: name.into(),
        r#type: pb::KeyType::Public as i32,
        environment: pb::Environment::Production as i32,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        allowed_domains: domains.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Creates a key and returns it with its secret.
pub async fn create(
    client: &mut KeyServiceClient<Channel>,
    request: pb::CreateKeyRequest,
) -> (pb::Key, String) {
    let response = client
        .create_key(admin(request))
        .await
        .expect("create_key")
        .into_inner();
    (response.key.expect("key"), response.secret)
}

/// GetKey as an admin of [`WORKSPACE`].
pub async fn get_key(client: &mut KeyServiceClient<Channel>, key_id: &str) -> pb::Key {
    client
        .get_key(admin(pb::GetKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
        }))
        .await
        .expect("get_key")
        .into_inner()
}

/// Verifies a key string with the given required scopes and origin.
pub async fn verify(
    client: &mut KeyServiceClient<Channel>,
    key: &str,
    required_scopes: &[&str],
    origin: &str,
) -> pb::VerifyKeyResponse {
    client
        .verify_key(pb::VerifyKeyRequest {
            key: key.into(),
            required_scopes: required_scopes.iter().map(|s| s.to_string()).collect(),
            origin: origin.into(),
        })
        .await
        .expect("verify_key")
        .into_inner()
}

pub fn code(response: &pb::VerifyKeyResponse) -> pb::VerifyCode {
    pb::VerifyCode::try_from(response.code).expect("known code")
}

/// The server binary, for tests that need a process of its own (signals, limits, RSS).
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_kemon-keys");

/// The real server binary, serving on a random port.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Log lines (JSON) as they arrive on stderr.
    pub log: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `kemon-keys serve` on `data_dir` with SIGXFSZ ignored (so that a file size limit
    /// makes writes fail with EFBIG instead of killing the process) and waits for SERVING.
    pub async fn start(data_dir: &Path, master_key_hex: &str, extra: &[&str]) -> ServerProcess {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        ServerProcess::start_with(data_dir, master_key_hex, &args, "info").await
    }

    /// [`ServerProcess::start`] with `RUST_LOG` set to `filter`.
    pub async fn start_logging(
        data_dir: &Path,
        master_key_hex: &str,
        filter: &str,
    ) -> ServerProcess {
        ServerProcess::start_with(
            data_dir,
            master_key_hex,
            &["--listen", "127.0.0.1:0"],
            filter,
        )
        .await
    }

    /// [`ServerProcess::start`] listening on `listen` (`host:port`).
    pub async fn start_listening(
        data_dir: &Path,
        master_key_hex: &str,
        listen: &str,
    ) -> ServerProcess {
        ServerProcess::start_with(data_dir, master_key_hex, &["--listen", listen], "info").await
    }

    async fn start_with(
        data_dir: &Path,
        master_key_hex: &str,
        extra: &[&str],
        filter: &str,
    ) -> ServerProcess {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"trap '' XFSZ; exec "$@""#)
            .arg("sh")
            .arg(SERVER_BIN)
            .arg("serve")
            .args(["--log-format", "json"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("KEMON_MASTER_KEY", master_key_hex)
            .env("RUST_LOG", filter)
            .env_remove("KEMON_MASTER_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn kemon-keys");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let line = log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server logs `listening` within 20 s");
            let value: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if value["message"] == "listening" {
                break value["local_addr"]
                    .as_str()
                    .expect("local_addr")
                    .parse()
                    .expect("socket address");
            }
        };
        let server = ServerProcess { child, addr, log };
        server.wait_for_health("", ServingStatus::Serving).await;
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    pub async fn client(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel().await)
    }

    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        health_of(&self.channel().await, service).await
    }

    pub async fn wait_for_health(&self, service: &str, want: ServingStatus) {
        wait_for_health(&self.channel().await, service, want).await;
    }

    /// Sets the process's file size limit (bytes; `None` for unlimited).
    pub fn limit_file_size(&self, bytes: Option<u64>) {
        let value = bytes.map_or("unlimited".to_owned(), |b| b.to_string());
        let status = Command::new("prlimit")
            .arg("--pid")
            .arg(self.pid().to_string())
            .arg(format!("--fsize={value}:unlimited"))
            .status()
            .expect("run prlimit (util-linux)");
        assert!(status.success(), "prlimit failed: {status}");
    }

    /// SIGKILL: no shutdown, no checkpoint.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then waits for a clean exit. Async: the runtime must go on closing this
    /// test's own connections, which the server waits for.
    pub async fn stop(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "unclean exit: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
