//! Wiring: settings, start-up, serving and graceful shutdown.
//!
//! [`Application::build`] opens the store and binds the listener (so a test can ask for port 0
//! and read the real port); [`Application::run_until`] serves until a shutdown signal. While
//! the verification cache loads, the health service reports NOT_SERVING and key calls answer
//! UNAVAILABLE ([`CallLayer`]); then it reports SERVING.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::Instrument as _;

use tonic_health::ServingStatus;

use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::config::{LogFormat, ServeArgs};
use crate::grpc::calls::CallLayer;
use crate::grpc::connections::{ConnectionLimits, MAX_REQUEST_BYTES, TrackCallsLayer};
use crate::grpc::ext_authz::{AuthorizationService, ExtAuthzApi};
use crate::grpc::policy::AccessLayer;
use crate::grpc::{AuditApi, KeyApi, tls};
use crate::security::{Security, SecuritySettings};
use crate::telemetry::{self, traces::Tracing};

/// Largest Check request: Envoy's default limit on a request's headers is 60 KiB.
const CHECK_REQUEST_BYTES: usize = 96 * 1024;
use crate::proto::v1::audit_service_server::AuditServiceServer;
use crate::proto::v1::key_service_server::KeyServiceServer;
use crate::store::{self, Store, StoreOptions};
use crate::vault::MasterKey;

/// Where the master key comes from.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// 64 hex characters, e.g. from KEMON_MASTER_KEY.
    Hex(String),
    /// A file holding 64 hex characters.
    File(PathBuf),
    /// Development only: generated once into `<data_dir>/dev-master.key` and reused.
    Development,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `host:port`; a host name is resolved and the first address bound.
    pub listen: String,
    pub data_dir: PathBuf,
    /// PostgreSQL instead of SQLite in `data_dir`: several replicas share its log.
    pub database_url: Option<String>,
    /// For PostgreSQL: how long a replica may go without confirming it is caught up.
    pub max_staleness: std::time::Duration,
    /// For PostgreSQL: this replica's name among the live ones.
    pub replica_id: String,
    pub master_key: MasterKeySource,
    pub write_batch_max: usize,
    /// Committed events buffered for live audit subscribers (see `SubscribeEvents`).
    pub audit_live_buffer: usize,
    /// What one client may hold of the server.
    pub connection_limits: ConnectionLimits,
    /// A quota on the database's size, in MiB.
    pub max_database_mib: Option<u32>,
    /// The header Envoy's Check reads a key from besides `authorization: Bearer`.
    pub ext_authz_api_key_header: String,
    /// TLS, mutual TLS, the access policy and role assertions.
    pub security: SecuritySettings,
    /// The plaintext admin listener for probes and Prometheus, `host:port`.
    pub admin_listen: Option<String>,
    /// Whether calls are counted in the metrics (on unless measuring what counting costs).
    pub call_metrics: bool,
}

impl Settings {
    pub fn from_args(args: &ServeArgs) -> Settings {
        let master_key = match (&args.master_key, &args.master_key_file) {
            (Some(hex), _) => MasterKeySource::Hex(hex.clone()),
            (None, Some(path)) => MasterKeySource::File(path.clone()),
            (None, None) => MasterKeySource::Development,
        };
        Settings {
            listen: args.listen.clone(),
            data_dir: args.data.data_dir.clone(),
            database_url: args.data.database_url.clone(),
            max_staleness: args.max_staleness,
            replica_id: args
                .replica_id
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
                .unwrap_or_else(|| ulid::Ulid::new().to_string()),
            master_key,
            write_batch_max: usize::from(args.write_batch_max),
            audit_live_buffer: args.audit_live_buffer as usize,
            max_database_mib: args.max_database_mib,
            ext_authz_api_key_header: args.ext_authz_api_key_header.clone(),
            security: SecuritySettings::from_args(args),
            admin_listen: args.admin_listen.clone(),
            call_metrics: args.call_metrics,
            connection_limits: ConnectionLimits {
                max_connections: args.max_connections as usize,
                max_streams: args.max_streams_per_connection,
                idle_timeout: std::time::Duration::from_secs(args.idle_timeout_secs),
                handshake_timeout: std::time::Duration::from_secs(args.handshake_timeout_secs),
                request_timeout: std::time::Duration::from_secs(args.request_timeout_secs),
                ..ConnectionLimits::default()
            },
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join(store::DATABASE_FILE)
    }
}

/// Development master key file inside the data directory.
pub const DEV_MASTER_KEY_FILE: &str = "dev-master.key";

fn load_master_key(settings: &Settings) -> anyhow::Result<MasterKey> {
    match &settings.master_key {
        MasterKeySource::Hex(hex) => MasterKey::parse_hex(hex).context("KEMON_MASTER_KEY"),
        MasterKeySource::File(path) => MasterKey::from_file(path).context("KEMON_MASTER_KEY_FILE"),
        MasterKeySource::Development => {
            let path = settings.data_dir.join(DEV_MASTER_KEY_FILE);
            let key = if path.exists() {
                MasterKey::from_file(&path)?
            } else {
                let key = MasterKey::generate();
                write_private_file(&path, &key.to_hex())
                    .with_context(|| format!("writing {}", path.display()))?;
                key
            };
            tracing::warn!(
                path = %path.display(),
                "USING A DEVELOPMENT MASTER KEY stored in plain text next to the database. \
                 Anyone who can read the data directory can decrypt revealable keys. \
                 Set KEMON_MASTER_KEY_FILE (or KEMON_MASTER_KEY) in production."
            );
            Ok(key)
        }
    }
}

fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Loads the master key and opens the store, creating the data directory if needed.
async fn open_data(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<(MasterKey, Arc<VerifyCache>, Store)> {
    if !matches!(settings.master_key, MasterKeySource::Development) {
        load_master_key(settings)?;
    }
    // PostgreSQL with a master key of its own needs no local files at all (a read-only
    // root filesystem is fine); SQLite and the development key live in the data directory.
    if settings.database_url.is_none()
        || matches!(settings.master_key, MasterKeySource::Development)
    {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
    }
    let master_key = load_master_key(settings)?;
    let cache = Arc::new(VerifyCache::new(clock.clone()));
    let options = StoreOptions {
        max_batch: settings.write_batch_max,
        live_buffer: settings.audit_live_buffer,
        max_database_bytes: settings.max_database_mib.map(|m| u64::from(m) << 20),
        max_staleness: settings.max_staleness,
        replica_id: settings.replica_id.clone(),
    };
    let store = match &settings.database_url {
        Some(url) => {
            anyhow::ensure!(
                settings.max_database_mib.is_none(),
                "--max-database-mib applies to SQLite; set a quota on PostgreSQL itself"
            );
            let backend = store::PgBackend::open(url)
                .await
                .context("opening the PostgreSQL database")?;
            tracing::info!(
                schema = backend.schema(),
                replica_id = %settings.replica_id,
                "PostgreSQL: replicas share this schema's log"
            );
            Store::with_backend(
                Arc::new(backend),
                &master_key.fingerprint(),
                clock,
                cache.clone(),
                options,
            )
            .await
            .context("opening the PostgreSQL database")?
        }
        None => Store::open(
            &settings.database_path(),
            &master_key.fingerprint(),
            clock,
            cache.clone(),
            options,
        )
        .await
        .with_context(|| format!("opening {}", settings.database_path().display()))?,
    };
    Ok((master_key, cache, store))
}

/// A built server: store open, listener bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    limits: ConnectionLimits,
    store: Store,
    cache: Arc<VerifyCache>,
    api: KeyApi,
    audit: AuditApi,
    /// Set when shutdown begins, to end live subscriptions.
    stopping: tokio::sync::watch::Sender<bool>,
    ext_authz_api_key_header: String,
    max_staleness: std::time::Duration,
    security: Security,
    admin: Option<AdminListener>,
    call_metrics: bool,
}

/// How often a live subscriber is sent a checkpoint when the log has moved.
pub const AUDIT_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Application> {
        // Everything that can fail without touching the disk comes first, so that a start
        // that fails (port taken, malformed master key) leaves nothing behind.
        let listener = TcpListener::bind(settings.listen.as_str())
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        settings.security.check_listen(listener.local_addr()?)?;
        let security = settings.security.load(clock.clone())?;
        let admin = match &settings.admin_listen {
            Some(address) => Some(AdminListener::bind(address).await?),
            None => None,
        };
        let created_dir = !settings.data_dir.exists();
        let dev_key = settings.data_dir.join(DEV_MASTER_KEY_FILE);
        let created_key =
            matches!(settings.master_key, MasterKeySource::Development) && !dev_key.exists();
        let opened = open_data(&settings, clock.clone()).await;
        if opened.is_err() {
            if created_dir {
                let _ = std::fs::remove_dir_all(&settings.data_dir);
            } else if created_key {
                let _ = std::fs::remove_file(&dev_key);
            }
        }
        let (master_key, cache, store) = opened?;
        let local_addr = listener.local_addr()?;
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let audit = AuditApi::new(
            store.clone(),
            clock.clone(),
            AUDIT_CHECKPOINT_EVERY,
            stopping_rx,
        );
        let api = KeyApi::new(store.clone(), cache.clone(), clock, master_key)
            .stopping_on(stopping.subscribe());
        Ok(Application {
            listener,
            local_addr,
            limits: settings.connection_limits,
            store,
            cache,
            api,
            audit,
            stopping,
            ext_authz_api_key_header: settings.ext_authz_api_key_header.clone(),
            max_staleness: settings.max_staleness,
            security,
            admin,
            call_metrics: settings.call_metrics,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the admin (health-only) listener bound, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr)
    }

    /// Serves until `shutdown` resolves, then stops accepting calls, lets in-flight calls
    /// finish, waits for the writer to commit what it was given, and closes the database.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.run_loading_cache_after(shutdown, std::future::ready(()))
            .await
    }

    /// [`Application::run_until`], with the verification cache loaded only once `load_after`
    /// resolves: for tests of what clients get while it loads.
    pub async fn run_loading_cache_after(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        load_after: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            local_addr,
            limits,
            store,
            cache,
            api,
            audit,
            stopping,
            ext_authz_api_key_header,
            max_staleness,
            security,
            admin,
            call_metrics,
        } = self;
        // For a shared log: whether this replica is caught up, for VerifyKey and Check.
        let fresh = Arc::new(AtomicBool::new(false));
        security.watch(&stopping);
        let admin_stop = stopping.subscribe();
        let upkeep_stop = stopping.subscribe();
        let push_stop = stopping.subscribe();
        // Key calls that need the cache are refused (NOT_READY) until it is loaded.
        let ready = Arc::new(AtomicBool::new(false));
        let shutdown = async move {
            shutdown.await;
            let _ = stopping.send(true);
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health.set_not_serving::<KeyServiceServer<KeyApi>>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // The error details every error carries (ErrorInfo, BadRequest), so that tools
            // such as grpcurl print them decoded.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let gauges = gauge_reader(&store, &cache);
        let push = telemetry::otlp::MetricsPush::from_env()
            .map(|push| tokio::spawn(push.run(gauges.clone(), push_stop)));
        let admin_addr = admin.as_ref().map(|a| a.local_addr);
        let admin = admin.map(|admin| {
            tokio::spawn(admin.serve(limits, health_service.clone(), gauges, admin_stop))
        });
        let mut calls = CallLayer::new(ready.clone()).refusing_stale(fresh.clone(), max_staleness);
        if !call_metrics {
            calls = calls.without_metrics();
        }
        let server = limits
            .apply(tonic::transport::Server::builder())
            .layer(TrackCallsLayer)
            .layer(calls)
            .layer(AccessLayer::new(security.access.clone()))
            .add_service(health_service.max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(reflection_v1.max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(reflection_v1alpha.max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(KeyServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
            .add_service(
                AuditServiceServer::new(audit).max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                // A Check describes the whole HTTP request's headers: Envoy allows up to
                // 60 KiB of them by default.
                AuthorizationService::new(
                    ExtAuthzApi::new(cache.clone(), ready.clone(), &ext_authz_api_key_header),
                    CHECK_REQUEST_BYTES,
                ),
            )
            .serve_with_incoming_shutdown(
                tls::incoming(
                    limits.incoming(listener),
                    security.tls.clone(),
                    limits.handshake_timeout,
                ),
                shutdown,
            );
        let server = tokio::spawn(server);
        tracing::info!(
            %local_addr,
            admin_addr = admin_addr.map(tracing::field::display),
            tls = security.tls.is_some(),
            mutual_tls = security.access.is_some(),
            "listening"
        );

        load_after.await;
        let started = std::time::Instant::now();
        // A trace of its own, sampled as a call that starts one is.
        let loading = if telemetry::traces::sampling().is_some_and(|s| s.sample(None)) {
            tracing::info_span!(
                target: telemetry::traces::TRACED,
                "cache.load",
                otel.name = "kemon.cache.load",
                kemon.keys = tracing::field::Empty
            )
        } else {
            tracing::Span::none()
        };
        let loaded = load_cache(&store, &cache)
            .instrument(loading.clone())
            .await?;
        loading.record("kemon.keys", loaded);
        drop(loading);
        let metrics = telemetry::metrics();
        metrics.cache_loaded_keys.store(loaded, Ordering::Relaxed);
        metrics.cache_load_us.store(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        ready.store(true, Ordering::Release);
        health.set_serving::<AuditServiceServer<AuditApi>>().await;
        tokio::spawn(report_freshness(store.fresh(), fresh, health.clone()));
        tokio::spawn(report_writes(store.writable(), health.clone()));
        let upkeep = tokio::spawn(crate::usage::run(cache.clone(), store.clone(), upkeep_stop));
        tracing::info!(
            keys = cache.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cache loaded; serving"
        );

        server.await.context("server task")?.context("server")?;
        if let Some(admin) = admin {
            admin
                .await
                .context("admin server task")?
                .context("admin server")?;
        }
        // Last uses seen until the last call are written before the store closes.
        upkeep.await.context("last-used task")?;
        crate::usage::write(&cache, &store, &mut Vec::new()).await;
        store.close().await;
        if let Some(push) = push {
            // The last push, with the final counts; not forever if the collector is gone.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), push).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The admin listener: plaintext, for kubelet probes (which cannot present client
/// certificates) and Prometheus: the gRPC health service (HTTP/2) and `GET /metrics`
/// (HTTP/1.1 or HTTP/2), and nothing that changes or reveals keys. Its statuses are the main
/// port's (one health reporter).
struct AdminListener {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl AdminListener {
    async fn bind(address: &str) -> anyhow::Result<AdminListener> {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the admin listener {address}"))?;
        let local_addr = listener.local_addr()?;
        Ok(AdminListener {
            listener,
            local_addr,
        })
    }

    /// Serves health and metrics with the main port's connection limits until `stop` turns
    /// true.
    async fn serve(
        self,
        limits: ConnectionLimits,
        health: tonic_health::pb::health_server::HealthServer<
            impl tonic_health::pb::health_server::Health,
        >,
        gauges: telemetry::GaugeReader,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        tracing::info!(admin_addr = %self.local_addr, "admin listener: gRPC health and GET /metrics");
        limits
            .apply(tonic::transport::Server::builder())
            // Prometheus scrapes over HTTP/1.1.
            .accept_http1(true)
            .layer(TrackCallsLayer)
            .layer(telemetry::MetricsEndpointLayer::new(gauges))
            .add_service(health.max_decoding_message_size(MAX_REQUEST_BYTES))
            .serve_with_incoming_shutdown(limits.incoming(self.listener), async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            })
            .await?;
        Ok(())
    }
}

/// Reads what the metrics need from the running server.
fn gauge_reader(store: &Store, cache: &Arc<VerifyCache>) -> telemetry::GaugeReader {
    let (store, cache) = (store.clone(), cache.clone());
    let fresh = store.fresh();
    Arc::new(move || telemetry::Gauges {
        cache_keys: cache.len(),
        writer_queue: store.queued_writes(),
        audit_subscribers: store.live_subscribers(),
        replica: store
            .applied_sequence()
            .map(|applied_sequence| telemetry::metrics::Replica {
                applied_sequence,
                fresh: *fresh.borrow(),
            }),
    })
}

/// The health service name that reports whether writes reach storage.
pub const WRITES_HEALTH_SERVICE: &str = "kemon-keys.writes";

/// Mirrors the writer's storage state into the health service under
/// [`WRITES_HEALTH_SERVICE`]. The overall status ("") and KeyService stay SERVING while
/// writes fail, because VerifyKey still answers from the cache: taking the replica out of
/// rotation would turn a storage problem into an outage of every API call.
async fn report_writes(
    mut writable: tokio::sync::watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
) {
    loop {
        let status = if *writable.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health
            .set_service_status(WRITES_HEALTH_SERVICE, status)
            .await;
        if writable.changed().await.is_err() {
            return;
        }
    }
}

/// Mirrors whether this replica may answer Verify into `fresh` (read by [`CallLayer`]) and
/// the health service: "", KeyService and Authorization are SERVING while it may, so that
/// load balancers and sidecars move to another replica while it is stale. A log only this
/// process writes is always fresh.
async fn report_freshness(
    mut store_fresh: tokio::sync::watch::Receiver<bool>,
    fresh: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
) {
    loop {
        let now = *store_fresh.borrow_and_update();
        fresh.store(now, Ordering::Release);
        let status = if now {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health
            .set_service_status(
                <KeyServiceServer<KeyApi> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        health
            .set_service_status(
                <AuthorizationService as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        if store_fresh.changed().await.is_err() {
            // The sender is gone: a log only this process writes (always fresh), or the
            // store has closed.
            if now {
                std::future::pending::<()>().await;
            }
            return;
        }
    }
}

/// Fills the verification cache from the projection, on every core.
pub async fn load_cache(store: &Store, cache: &Arc<VerifyCache>) -> anyhow::Result<u64> {
    let expected = store.count_keys().await?;
    cache.reserve(usize::try_from(expected).unwrap_or(0));
    let filling = cache.clone();
    store
        .for_each_key_concurrently(Arc::new(move |states| filling.upsert_all(states)))
        .await
        .context("loading the verification cache")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight calls");
}

/// `kemon-keys rebuild`.
pub async fn rebuild(args: &crate::config::RebuildArgs) -> anyhow::Result<()> {
    let (data, limits) = (&args.data, args.fold.limits());
    let report = match &data.database_url {
        Some(url) => {
            use crate::store::Backend;
            store::PgBackend::open(url)
                .await
                .context("opening the PostgreSQL database")?
                .rebuild(&limits)
                .await?
        }
        None => {
            let path = data.data_dir.join(store::DATABASE_FILE);
            anyhow::ensure!(path.exists(), "no database at {}", path.display());
            store::rebuild(&path, &limits).await?
        }
    };
    tracing::info!(
        events = report.events,
        keys = report.keys,
        last_sequence = report.last_sequence,
        "projection rebuilt from the event log"
    );
    Ok(())
}

/// Installs the tracing subscriber: log lines on stderr, text or JSON (one object per line),
/// filtered by `RUST_LOG` (default `info`); and, when `otel` and the `OTEL_*` variables ask for
/// it, the OTLP exporter of traces (see [`telemetry::traces`]), whose exporter is returned to
/// be flushed at exit. Must run inside the Tokio runtime.
pub fn init_tracing(format: LogFormat, otel: bool) -> anyhow::Result<Option<Tracing>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let settings = otel
        .then(telemetry::traces::TraceSettings::from_env)
        .flatten();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if settings.is_some() {
        // Exported spans do not depend on RUST_LOG; they are the calls' spans in the lines
        // too. (One global filter, not one per layer: see telemetry::traces::layer.)
        filter = filter.add_directive(telemetry::traces::TRACED_DIRECTIVE.parse()?);
    }
    // Colour only where a person reads it: a pipe or a file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry().with(filter).with(lines);
    match settings {
        Some(settings) => {
            let (traces, tracing) = telemetry::traces::layer(&settings)?;
            subscriber.with(traces).try_init()?;
            Ok(Some(tracing))
        }
        None => {
            subscriber.try_init()?;
            Ok(None)
        }
    }
}
