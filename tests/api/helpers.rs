//! The test toolkit: real servers (in-process and as a process of their own), a client that
//! acts as a given caller (`server.client().await.acting(actor, role).rename(id, name)`), the
//! one builder of request metadata ([`Caller`]), the one runner of the `kemon-keys` binary
//! ([`Cli`]), and checks of what the service answers. Looking at the database is in
//! `inspect`; the shared multi-workspace scenario in `story`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use kemon_keys::app::{Application, MasterKeySource, Settings};
use kemon_keys::clock::ManualClock;
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::audit_service_client::AuditServiceClient;
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

use crate::inspect::Db;

/// 2026-01-01T00:00:00Z: where every test clock starts.
pub const T0_MS: i64 = 1_767_225_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// A running server on a random port, with its own data directory and clock.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The health-only listener, for servers started with [`TestServer::start_configured`].
    pub admin_addr: Option<SocketAddr>,
    pub clock: ManualClock,
    pub data_dir: PathBuf,
    /// The PostgreSQL database (its schema the `search_path`) the server uses; `None` for
    /// the SQLite file in its data directory.
    pub database_url: Option<String>,
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

    /// [`TestServer::start`], and a client of it.
    pub async fn with_client() -> (TestServer, TestClient) {
        let server = TestServer::start().await;
        let client = server.client().await;
        (server, client)
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

    /// A fresh server with `configure` applied to its settings, and an admin listener, through
    /// which it is waited for (its main port may need TLS and a client certificate).
    pub async fn start_configured(configure: impl FnOnce(&mut Settings)) -> TestServer {
        TestServer::try_start_configured(configure)
            .await
            .expect("server starts")
    }

    /// [`TestServer::start_configured`], or why the server refused to start.
    pub async fn try_start_configured(
        configure: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<TestServer> {
        let tmp = Arc::new(tempfile::tempdir().expect("temp dir"));
        let master_key_hex = MasterKey::generate().to_hex();
        let mut settings = settings(tmp.path(), MasterKeySource::Hex(master_key_hex.clone()));
        settings.admin_listen = Some("127.0.0.1:0".into());
        configure(&mut settings);
        let mut server =
            TestServer::spawn_settings(settings, ManualClock::new(T0_MS), std::future::ready(()))
                .await?;
        server._tmp = Some(tmp);
        server.master_key_hex = master_key_hex;
        let admin = server.admin_addr.expect("an admin listener");
        wait_for_health(&connect(admin).await, "", ServingStatus::Serving).await;
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
            audit_live_buffer: live_buffer,
            database_url: suite_database_url(data_dir).await,
            ..settings(data_dir, master_key)
        };
        TestServer::spawn_settings(settings, clock, load_after).await
    }

    /// A replica on the PostgreSQL schema at `database_url`, with a data directory of its
    /// own, named `replica_id`, serving once it has caught up with the log.
    pub async fn start_replica(
        database_url: &str,
        master_key_hex: &str,
        replica_id: &str,
        max_staleness: Duration,
    ) -> TestServer {
        let tmp = Arc::new(tempfile::tempdir().expect("temp dir"));
        let settings = Settings {
            database_url: Some(database_url.to_owned()),
            replica_id: replica_id.to_owned(),
            max_staleness,
            ..settings(tmp.path(), MasterKeySource::Hex(master_key_hex.to_owned()))
        };
        let mut server =
            TestServer::spawn_settings(settings, ManualClock::new(T0_MS), std::future::ready(()))
                .await
                .expect("replica starts");
        server._tmp = Some(tmp);
        server.wait_until_serving().await;
        server
    }

    async fn spawn_settings(
        settings: Settings,
        clock: ManualClock,
        load_after: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<TestServer> {
        let data_dir = settings.data_dir.clone();
        let database_url = settings.database_url.clone();
        let master_key = settings.master_key.clone();
        let app = Application::build(settings, Arc::new(clock.clone())).await?;
        let addr = app.local_addr();
        let admin_addr = app.admin_addr();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(app.run_loading_cache_after(
            async {
                let _ = rx.await;
            },
            load_after,
        ));
        let server = TestServer {
            addr,
            admin_addr,
            clock,
            data_dir,
            database_url,
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

    /// A KeyService client on a connection of its own, acting as an admin of [`WORKSPACE`].
    pub async fn client(&self) -> TestClient {
        TestClient::connect(self.addr).await
    }

    /// `n` clients, each on a connection of its own.
    pub async fn clients(&self, n: usize) -> Vec<TestClient> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(self.client().await);
        }
        clients
    }

    /// An AuditService client on a connection of its own.
    pub async fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel().await)
    }

    /// Where the server's SQLite file is (or would be: with the suite on PostgreSQL there is
    /// none). For tests about the file itself; others look through [`TestServer::db`].
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(kemon_keys::store::DATABASE_FILE)
    }

    /// The server's database, whichever backend it uses, for looking behind its back.
    pub fn db(&self) -> Db {
        Db::of_server(&self.data_dir, self.database_url.as_deref())
    }

    /// The arguments that name the server's database to `kemon-keys audit …`: `--db FILE`
    /// or `--database-url URL`.
    pub fn source_args(&self) -> Vec<String> {
        self.db().source_args()
    }

    /// The arguments that give `kemon-keys serve|rebuild` the server's storage:
    /// `--data-dir DIR`, and `--database-url URL` when it uses PostgreSQL.
    pub fn data_args(&self) -> Vec<String> {
        data_args(&self.data_dir, self.database_url.as_deref())
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

    /// [`TestServer::stop`] that must be clean, failing (instead of hanging) if it does not
    /// finish within 10 s. Keeps the data directory alive through the returned handle.
    pub async fn shut_down(self) -> Option<Arc<tempfile::TempDir>> {
        let (tmp, result) = tokio::time::timeout(Duration::from_secs(10), self.stop())
            .await
            .expect("graceful stop did not finish within 10 s");
        result.expect("clean shutdown");
        tmp
    }

    /// Stops this server and starts another on the same data directory, clock and master key;
    /// fails (instead of hanging) if that takes more than 10 s.
    pub async fn restart(self) -> TestServer {
        let clock = self.clock.clone();
        let dir = self.data_dir.clone();
        let key = self.master_key_hex.clone();
        tokio::time::timeout(Duration::from_secs(10), async move {
            let tmp = self.shut_down().await;
            let mut server = TestServer::start_in(&dir, clock, MasterKeySource::Hex(key))
                .await
                .expect("restart");
            server._tmp = tmp;
            server
        })
        .await
        .expect("restart (graceful stop, then start) did not finish within 10 s")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The settings of a test server on `data_dir`: a random port on 127.0.0.1.
pub fn settings(data_dir: &Path, master_key: MasterKeySource) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        master_key,
        write_batch_max: 64,
        audit_live_buffer: 4096,
        connection_limits: Default::default(),
        max_database_mib: None,
        ext_authz_api_key_header: "x-api-key".into(),
        database_url: None,
        max_staleness: Duration::from_secs(5),
        replica_id: "test".into(),
        security: Default::default(),
        admin_listen: None,
        call_metrics: true,
    }
}

/// A store (no server) on the suite's backend: the SQLite file in `data_dir`, or with the
/// suite on PostgreSQL the schema of `data_dir`; master key fingerprint `test`.
pub async fn open_store(
    data_dir: &Path,
    clock: Arc<ManualClock>,
    listener: Arc<dyn kemon_keys::store::CommitListener>,
    options: kemon_keys::store::StoreOptions,
) -> kemon_keys::store::Store {
    use kemon_keys::store::{PgBackend, Store};
    match suite_database_url(data_dir).await {
        Some(url) => {
            let backend = PgBackend::open(&url).await.expect("open the schema");
            Store::with_backend(Arc::new(backend), "test", clock, listener, options).await
        }
        None => {
            let path = data_dir.join(kemon_keys::store::DATABASE_FILE);
            Store::open(&path, "test", clock, listener, options).await
        }
    }
    .expect("open the store")
}

/// [`data_args`] for a server on `data_dir` on the suite's backend ([`suite_database_url`]).
pub async fn suite_data_args(data_dir: &Path) -> Vec<String> {
    data_args(data_dir, suite_database_url(data_dir).await.as_deref())
}

/// `--data-dir DIR`, and `--database-url URL` for PostgreSQL.
pub fn data_args(data_dir: &Path, database_url: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--data-dir".to_owned(),
        data_dir.to_string_lossy().into_owned(),
    ];
    if let Some(url) = database_url {
        args.extend(["--database-url".to_owned(), url.to_owned()]);
    }
    args
}

/// The PostgreSQL server of the tests that need one: `KEMON_TEST_POSTGRES`, by default the
/// local server. Those tests fail (never skip) when it is unreachable; `scripts/test` says
/// when it leaves them out.
pub fn postgres_server() -> String {
    std::env::var("KEMON_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether the whole suite runs on PostgreSQL instead of SQLite (`KEMON_TEST_BACKEND=postgres`).
pub fn suite_on_postgres() -> bool {
    std::env::var("KEMON_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// For a test about SQLite's own files (a file size limit, the lock file, the page quota),
/// which has no meaning on PostgreSQL: `scripts/sqlite-only-tests` lists it, with why, and
/// the PostgreSQL pass skips it. Run there anyway, it fails here rather than pass for the
/// wrong reason.
#[track_caller]
pub fn sqlite_only() {
    assert!(
        !suite_on_postgres(),
        "this test is about SQLite's files and means nothing on PostgreSQL; \
         scripts/sqlite-only-tests lists it for the PostgreSQL pass to --skip"
    );
}

/// The database URL a server on `data_dir` uses: none for SQLite; with the suite on
/// PostgreSQL, a schema of its own, the same at every restart on that directory.
pub async fn suite_database_url(data_dir: &Path) -> Option<String> {
    if !suite_on_postgres() {
        return None;
    }
    use sha3::Digest;
    let digest = sha3::Sha3_256::digest(data_dir.as_os_str().as_encoded_bytes());
    Some(postgres_schema(&format!("kk_{}", hex::encode(&digest[..8]))).await)
}

/// A new, empty schema on [`postgres_server`], as a database URL whose `search_path` is it.
pub async fn fresh_postgres_schema() -> String {
    postgres_schema(&format!(
        "kk_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    ))
    .await
}

/// `schema` on [`postgres_server`] (created if needed), as a database URL.
pub async fn postgres_schema(schema: &str) -> String {
    use sqlx::Connection;
    let server = postgres_server();
    let mut conn = sqlx::PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {server} (KEMON_TEST_POSTGRES) is needed by this test and \
             unreachable: {e}"
            )
        });
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
    )))
    .execute(&mut conn)
    .await
    .expect("create schema");
    let _ = conn.close().await;
    let separator = if server.contains('?') { '&' } else { '?' };
    format!("{server}{separator}options[search_path]={schema}")
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

/// The workspace every request is about unless told otherwise.
pub const WORKSPACE: &str = "ws_acme";
/// A second workspace, for tests that need two.
pub const OTHER_WORKSPACE: &str = "ws_globex";
/// The actor of every request unless told otherwise.
pub const ACTOR: &str = "user_alice";

/// Who a request says it comes from: the `x-kemon-actor` and `x-kemon-role` metadata, `None`
/// leaving a header out. The one place the tests build request metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub actor: Option<String>,
    pub role: Option<String>,
}

impl Caller {
    pub fn new(actor: Option<&str>, role: Option<&str>) -> Caller {
        Caller {
            actor: actor.map(str::to_owned),
            role: role.map(str::to_owned),
        }
    }

    /// `actor` with `role`.
    pub fn acting(actor: &str, role: &str) -> Caller {
        Caller::new(Some(actor), Some(role))
    }

    /// [`ACTOR`] with `role`.
    pub fn role(role: &str) -> Caller {
        Caller::acting(ACTOR, role)
    }

    /// [`ACTOR`] as an admin: what every helper sends unless told otherwise.
    pub fn admin() -> Caller {
        Caller::role("admin")
    }

    /// [`ACTOR`] as an auditor.
    pub fn auditor() -> Caller {
        Caller::role("auditor")
    }

    /// No metadata at all.
    pub fn nobody() -> Caller {
        Caller::new(None, None)
    }

    /// [`Caller::role`], or for `None` [`Caller::nobody`].
    pub fn maybe_role(role: Option<&str>) -> Caller {
        role.map_or_else(Caller::nobody, Caller::role)
    }

    /// `message` with this caller's metadata.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(actor) = &self.actor {
            request
                .metadata_mut()
                .insert("x-kemon-actor", actor.parse().unwrap());
        }
        if let Some(role) = &self.role {
            request
                .metadata_mut()
                .insert("x-kemon-role", role.parse().unwrap());
        }
        request
    }
}

/// A request from [`ACTOR`] as an admin.
pub fn admin<T>(message: T) -> Request<T> {
    Caller::admin().request(message)
}

/// A request from [`ACTOR`] as an auditor.
pub fn auditor<T>(message: T) -> Request<T> {
    Caller::auditor().request(message)
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
        scopes: strings(scopes),
        ..Default::default()
    }
}

/// A CreateKey request for a production public key.
pub fn public_key(name: &str, scopes: &[&str], domains: &[&str]) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        r#type: pb::KeyType::Public as i32,
        allowed_domains: strings(domains),
        ..private_key(name, scopes)
    }
}

/// `request` for the test environment.
pub fn test_env(mut request: pb::CreateKeyRequest) -> pb::CreateKeyRequest {
    request.environment = pb::Environment::Test as i32;
    request
}

/// `request` in another workspace.
pub fn in_workspace(workspace: &str, mut request: pb::CreateKeyRequest) -> pb::CreateKeyRequest {
    request.workspace_id = workspace.into();
    request
}

/// `request` with the key kept for RevealKey.
pub fn revealable(mut request: pb::CreateKeyRequest) -> pb::CreateKeyRequest {
    request.reveal_later = true;
    request
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The KeyService client side of a test server. Each call acts as [`Caller::admin`] in
/// [`WORKSPACE`] unless the client was made with [`TestClient::as_role`],
/// [`TestClient::acting`], [`TestClient::with_caller`] or [`TestClient::in_workspace`].
///
/// `try_*` methods return the call's outcome; the others expect success. The raw generated
/// client is reached through `Deref`, for requests the helpers do not build.
#[derive(Clone)]
pub struct TestClient {
    inner: KeyServiceClient<Channel>,
    caller: Caller,
    workspace: String,
}

impl TestClient {
    /// A client on `channel` (a TLS one, say), acting as [`Caller::admin`] in [`WORKSPACE`].
    pub fn on(channel: Channel) -> TestClient {
        TestClient {
            inner: KeyServiceClient::new(channel),
            caller: Caller::admin(),
            workspace: WORKSPACE.into(),
        }
    }
}

impl std::ops::Deref for TestClient {
    type Target = KeyServiceClient<Channel>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for TestClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl TestClient {
    pub async fn connect(addr: SocketAddr) -> TestClient {
        TestClient {
            inner: KeyServiceClient::new(connect(addr).await),
            caller: Caller::admin(),
            workspace: WORKSPACE.into(),
        }
    }

    /// This client, acting as `caller`.
    pub fn with_caller(&self, caller: Caller) -> TestClient {
        TestClient {
            caller,
            ..self.clone()
        }
    }

    /// This client, acting as [`ACTOR`] with `role`.
    pub fn as_role(&self, role: &str) -> TestClient {
        self.with_caller(Caller::role(role))
    }

    /// This client, acting as `actor` with `role`.
    pub fn acting(&self, actor: &str, role: &str) -> TestClient {
        self.with_caller(Caller::acting(actor, role))
    }

    /// This client, about keys of `workspace`.
    pub fn in_workspace(&self, workspace: &str) -> TestClient {
        TestClient {
            workspace: workspace.into(),
            ..self.clone()
        }
    }

    /// The generated client, for a request the helpers do not build (`get_key` with
    /// metadata of its own, say), where a method of this client has the same name.
    pub fn raw(&mut self) -> &mut KeyServiceClient<Channel> {
        &mut self.inner
    }

    /// `message` with this client's metadata.
    pub fn request<T>(&self, message: T) -> Request<T> {
        self.caller.request(message)
    }

    pub async fn try_create(
        &mut self,
        request: pb::CreateKeyRequest,
    ) -> Result<pb::CreateKeyResponse, Status> {
        let request = self.request(request);
        self.inner
            .create_key(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates a key (in the request's workspace) and returns it with its secret.
    pub async fn create(&mut self, request: pb::CreateKeyRequest) -> (pb::Key, String) {
        let response = self.try_create(request).await.expect("create_key");
        (response.key.expect("key"), response.secret)
    }

    pub async fn try_get_key(&mut self, key_id: &str) -> Result<pb::Key, Status> {
        let request = self.request(pb::GetKeyRequest {
            workspace_id: self.workspace.clone(),
            key_id: key_id.into(),
        });
        self.inner
            .get_key(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn get_key(&mut self, key_id: &str) -> pb::Key {
        self.try_get_key(key_id).await.expect("get_key")
    }

    pub async fn try_rename(
        &mut self,
        key_id: &str,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<pb::Key, Status> {
        let request = self.request(pb::RenameKeyRequest {
            workspace_id: self.workspace.clone(),
            key_id: key_id.into(),
            name: name.into(),
            expected_version,
        });
        self.inner
            .rename_key(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn rename(&mut self, key_id: &str, name: &str) -> pb::Key {
        self.try_rename(key_id, name, None)
            .await
            .expect("rename_key")
    }

    pub async fn try_rescope(
        &mut self,
        key_id: &str,
        scopes: &[&str],
        expected_version: Option<u64>,
    ) -> Result<pb::Key, Status> {
        let request = self.request(pb::UpdateKeyScopesRequest {
            workspace_id: self.workspace.clone(),
            key_id: key_id.into(),
            scopes: strings(scopes),
            expected_version,
        });
        self.inner
            .update_key_scopes(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn rescope(&mut self, key_id: &str, scopes: &[&str]) -> pb::Key {
        self.try_rescope(key_id, scopes, None)
            .await
            .expect("update_key_scopes")
    }

    pub async fn try_revoke(
        &mut self,
        key_id: &str,
        expected_version: Option<u64>,
    ) -> Result<pb::Key, Status> {
        let request = self.request(pb::RevokeKeyRequest {
            workspace_id: self.workspace.clone(),
            key_id: key_id.into(),
            expected_version,
            wait_for_replicas: false,
        });
        self.inner
            .revoke_key(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn revoke(&mut self, key_id: &str) -> pb::Key {
        self.try_revoke(key_id, None).await.expect("revoke_key")
    }

    /// RevealKey: the secret.
    pub async fn try_reveal(&mut self, key_id: &str) -> Result<String, Status> {
        let request = self.request(pb::RevealKeyRequest {
            workspace_id: self.workspace.clone(),
            key_id: key_id.into(),
        });
        self.inner
            .reveal_key(request)
            .await
            .map(|r| r.into_inner().secret)
    }

    pub async fn reveal(&mut self, key_id: &str) -> String {
        self.try_reveal(key_id).await.expect("reveal_key")
    }

    /// ListKeys with this client's metadata (the request names its workspace).
    pub async fn try_list(
        &mut self,
        request: pb::ListKeysRequest,
    ) -> Result<pb::ListKeysResponse, Status> {
        let request = self.request(request);
        self.inner
            .list_keys(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Every key of the workspace, revoked ones included, oldest first, page after page.
    pub async fn list_all(&mut self) -> Vec<pb::Key> {
        let mut keys = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListKeysRequest {
                workspace_id: self.workspace.clone(),
                page_size: 200,
                include_revoked: true,
                page_token,
                ..Default::default()
            };
            let page = self.try_list(request).await.expect("list_keys");
            keys.extend(page.keys);
            if page.next_page_token.is_empty() {
                return keys;
            }
            page_token = page.next_page_token;
        }
    }

    /// VerifyKey with the given required scopes and origin. Sends no metadata: verification
    /// needs none.
    pub async fn try_verify(
        &mut self,
        key: &str,
        required_scopes: &[&str],
        origin: &str,
    ) -> Result<pb::VerifyKeyResponse, Status> {
        self.inner
            .verify_key(pb::VerifyKeyRequest {
                key: key.into(),
                required_scopes: strings(required_scopes),
                origin: origin.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn verify(
        &mut self,
        key: &str,
        required_scopes: &[&str],
        origin: &str,
    ) -> pb::VerifyKeyResponse {
        self.try_verify(key, required_scopes, origin)
            .await
            .expect("verify_key")
    }
}

/// The code of a VerifyKey answer.
pub fn code(response: &pb::VerifyKeyResponse) -> pb::VerifyCode {
    pb::VerifyCode::try_from(response.code).expect("known code")
}

/// GetLogHead as an auditor ("" for no workspace).
pub async fn log_head(audit: &mut AuditServiceClient<Channel>, workspace: &str) -> pb::LogHead {
    audit
        .get_log_head(auditor(pb::GetLogHeadRequest {
            workspace_id: workspace.into(),
        }))
        .await
        .expect("get_log_head")
        .into_inner()
}

/// `sequence:hash` as `--expect-head` takes it.
pub fn head_arg(sequence: u64, hash: &[u8]) -> String {
    format!("{sequence}:{}", hex::encode(hash))
}

// ----------------------------------------------------------------------------------------------
// Running programs

/// A command with no `KEMON_*` variable of the test's own environment: what a test runs
/// sets what it means to.
fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        // Nor the OpenTelemetry settings of whoever runs the tests.
        if name_text.starts_with("KEMON_") || name_text.starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// One run of the `kemon-keys` binary (or, for the README, of a shell): arguments,
/// environment (no inherited `KEMON_*` variable), a time limit, and what it printed. It runs
/// off the runtime's threads, so an in-process server keeps serving meanwhile.
pub struct Cli {
    command: Command,
    shown: String,
    timeout: Duration,
}

impl Cli {
    /// `kemon-keys` with `args` (more with [`Cli::arg`]).
    pub fn kemon(args: &[&str]) -> Cli {
        Cli::program(SERVER_BIN).args(args)
    }

    pub fn program(program: impl AsRef<OsStr>) -> Cli {
        Cli {
            shown: program.as_ref().to_string_lossy().into_owned(),
            command: clean_command(program),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cli {
        self.shown.push(' ');
        self.shown.push_str(&arg.as_ref().to_string_lossy());
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(self, args: I) -> Cli
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        args.into_iter().fold(self, Cli::arg)
    }

    pub fn env(mut self, name: &str, value: impl AsRef<OsStr>) -> Cli {
        self.command.env(name, value);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Cli {
        self.command.current_dir(dir);
        self
    }

    /// Kill the run and fail the test past this (30 s unless told).
    pub fn timeout(mut self, timeout: Duration) -> Cli {
        self.timeout = timeout;
        self
    }

    pub async fn run(self) -> Ran {
        let Cli {
            mut command,
            shown,
            timeout,
        } = self;
        tokio::task::spawn_blocking(move || {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = command
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
            let stdout = read_all(child.stdout.take().expect("stdout"));
            let stderr = read_all(child.stderr.take().expect("stderr"));
            let deadline = Instant::now() + timeout;
            let status = loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{shown} did not exit within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            Ran {
                status,
                stdout: stdout.join().expect("stdout reader"),
                stderr: stderr.join().expect("stderr reader"),
            }
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

fn read_all(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// What a [`Cli`] run printed, and how it exited.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn report(&self) -> String {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Asserts a zero exit; returns stdout.
    #[track_caller]
    pub fn assert_success(&self) -> &str {
        assert!(self.status.success(), "{}", self.report());
        &self.stdout
    }

    /// Asserts a non-zero exit; returns stdout.
    #[track_caller]
    pub fn assert_failure(&self) -> &str {
        assert!(
            !self.status.success(),
            "expected a failure\n{}",
            self.report()
        );
        &self.stdout
    }

    /// Asserts an `audit verify` that succeeded and printed `OK …`; returns stdout.
    #[track_caller]
    pub fn assert_verified(&self) -> &str {
        let stdout = self.assert_success();
        assert!(stdout.starts_with("OK"), "{}", self.report());
        stdout
    }

    /// Asserts an `audit verify` that failed and did not print `OK`; returns stdout.
    #[track_caller]
    pub fn assert_refused(&self) -> &str {
        let stdout = self.assert_failure();
        assert!(!stdout.starts_with("OK"), "{}", self.report());
        stdout
    }

    /// Asserts an `audit verify` that failed with `first bad sequence {sequence}`.
    #[track_caller]
    pub fn assert_first_bad(&self, sequence: u64) {
        self.assert_refused();
        assert_eq!(
            first_bad_sequence(&self.stdout),
            Some(sequence),
            "{}",
            self.report()
        );
    }

    /// Asserts success; one JSON value per non-blank line of stdout.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.assert_success()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

/// The sequence N of `first bad sequence N` in a verify report.
pub fn first_bad_sequence(report: &str) -> Option<u64> {
    let marker = "first bad sequence ";
    let rest = &report[report.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The server binary, for tests that need a process of its own (signals, limits, RSS).
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_kemon-keys");

/// The real server binary, serving on a random port.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// The PostgreSQL database it was given; `None` for SQLite in its data directory.
    pub database_url: Option<String>,
    /// The admin listener's address, when it was started with `--admin-listen`.
    pub admin_addr: Option<SocketAddr>,
    /// The log lines (JSON) written before `listening`.
    pub startup: Vec<String>,
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

    /// `kemon-keys serve` with exactly `args` (after the data directory).
    pub async fn start_args(data_dir: &Path, master_key_hex: &str, args: &[&str]) -> ServerProcess {
        ServerProcess::start_with(data_dir, master_key_hex, args, "info").await
    }

    /// [`ServerProcess::start`] listening on `listen` (`host:port`).
    pub async fn start_listening(
        data_dir: &Path,
        master_key_hex: &str,
        listen: &str,
    ) -> ServerProcess {
        ServerProcess::start_with(data_dir, master_key_hex, &["--listen", listen], "info").await
    }

    /// `kemon-keys serve` with exactly `args` (after the data directory), `RUST_LOG` set to
    /// `filter` and the environment variables `env`.
    pub async fn start_env(
        data_dir: &Path,
        master_key_hex: &str,
        args: &[&str],
        filter: &str,
        env: &[(&str, &str)],
    ) -> ServerProcess {
        ServerProcess::start_with_env(data_dir, master_key_hex, args, filter, env).await
    }

    async fn start_with(
        data_dir: &Path,
        master_key_hex: &str,
        extra: &[&str],
        filter: &str,
    ) -> ServerProcess {
        ServerProcess::start_with_env(data_dir, master_key_hex, extra, filter, &[]).await
    }

    async fn start_with_env(
        data_dir: &Path,
        master_key_hex: &str,
        extra: &[&str],
        filter: &str,
        env: &[(&str, &str)],
    ) -> ServerProcess {
        let database_url = match extra.iter().position(|a| *a == "--database-url") {
            Some(i) => extra.get(i + 1).map(|url| (*url).to_owned()),
            None => suite_database_url(data_dir).await,
        };
        let mut command = clean_command("sh");
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
            .args(
                database_url
                    .iter()
                    .filter(|_| !extra.contains(&"--database-url"))
                    .flat_map(|url| ["--database-url", url]),
            )
            .env("KEMON_MASTER_KEY", master_key_hex)
            .env("RUST_LOG", filter)
            .envs(env.iter().copied())
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
        let mut startup = Vec::new();
        let (addr, admin_addr): (SocketAddr, Option<SocketAddr>) = loop {
            let line = log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server logs `listening` within 20 s");
            let value: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if value["message"] == "listening" {
                break (
                    value["local_addr"]
                        .as_str()
                        .expect("local_addr")
                        .parse()
                        .expect("socket address"),
                    value["admin_addr"]
                        .as_str()
                        .map(|a| a.parse().expect("admin socket address")),
                );
            }
            startup.push(line);
        };
        // A server on every address (0.0.0.0) is called on loopback.
        let addr = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        let server = ServerProcess {
            child,
            addr,
            admin_addr,
            data_dir: data_dir.to_owned(),
            database_url,
            startup,
            log,
        };
        server.wait_for_health("", ServingStatus::Serving).await;
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's database, whichever backend it uses.
    pub fn db(&self) -> Db {
        Db::of_server(&self.data_dir, self.database_url.as_deref())
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    pub async fn client(&self) -> TestClient {
        TestClient::connect(self.addr).await
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
