//! Targets 5 and 6, the cold paths (issue 14): start-up to SERVING, `kemon-keys rebuild`,
//! `kemon-keys audit verify --db` and `audit export` on a log of N keys, each run as the
//! real binary, in seconds and peak resident memory, beside the floor: the `sqlite3`
//! command-line tool reading the same rows. And resident memory per cached key.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kemon_keys::domain::{ApiKey, Environment, Event, KeyType};
use kemon_keys::log::chain::{self, LogRecord};
use kemon_keys::log::events;
use kemon_keys::store::{self, Backend};
use kemon_keys::vault::MasterKey;

use crate::fixtures::sample_state;
use crate::report::Report;
use crate::server::ServerProcess;

/// The master key the benchmark servers run with (throw-away data only).
pub fn bench_master_key() -> MasterKey {
    MasterKey::parse_hex(&"00".repeat(32)).expect("valid hex")
}

/// Writes `n` KeyCreated events (one per key, 1000 workspaces) into a new database at
/// `path`, hash-chained exactly as the service chains them. The projection is left empty:
/// building it is what the rebuild measures.
pub async fn seed_events(path: &Path, n: usize) -> anyhow::Result<()> {
    // Through the backend, as the server writes: the same statements, the same files.
    let backend = store::SqliteBackend::open(path).await?;
    let mut session = write_seed(&backend, n).await?;
    // Move the seeded rows from the WAL into the database file, as a server's normal
    // checkpoints would have, so the scans below read what a long-running log looks like.
    session.scrub(std::time::Duration::from_secs(10)).await?;
    // Readers first: the writer's session, closing last, removes the WAL.
    backend.close_readers().await;
    session.close().await;
    backend.release().await;
    Ok(())
}

/// Writes `n` KeyCreated events (one per key, 1000 workspaces) into `backend`'s empty log
/// in one transaction, through the same write session as the server's writer, and returns
/// the session (committed).
pub async fn write_seed(
    backend: &dyn Backend,
    n: usize,
) -> anyhow::Result<Box<dyn store::WriteSession>> {
    backend
        .claim_master_key(&bench_master_key().fingerprint())
        .await?;
    let mut session = backend.write_session().await?;
    let mut chains = chain::Chains::default();
    let now = 1_767_225_600_000i64;
    session.begin().await?;
    const ROWS: usize = 500;
    let mut batch: Vec<LogRecord> = Vec::with_capacity(ROWS);
    for i in 0..n {
        let key = ApiKey::generate(KeyType::Private, Environment::Production);
        let state = sample_state(&key, i, now);
        let new = kemon_keys::domain::NewKey {
            key_id: state.key_id,
            workspace_id: state.workspace_id.clone(),
            name: state.name.clone(),
            key_type: state.key_type,
            environment: state.environment,
            scopes: state.scopes,
            full_access: state.full_access,
            secret_hash: state.secret_hash,
            masked: state.masked.clone(),
            public_key: None,
            allowed_domains: vec![],
            created_at_ms: now,
            expires_at_ms: None,
            reveal_later: false,
            rolled_from: None,
        };
        let encoded = events::encode_event(&Event::KeyCreated(Box::new(new)));
        let mut record = LogRecord {
            sequence: 0,
            key_id: state.key_id.to_string(),
            workspace_id: state.workspace_id.to_string(),
            stream_version: 1,
            event_type: encoded.event_type.to_owned(),
            schema_version: encoded.schema_version,
            payload: encoded.payload,
            actor: "bench".into(),
            recorded_at_ms: now,
            caller_identity: None,
            hash: [0; 32],
            workspace_hash: [0; 32],
        };
        chains.append(&mut record);
        batch.push(record);
        if batch.len() == ROWS || i + 1 == n {
            let effects = store::Effects {
                records: std::mem::take(&mut batch),
                ..Default::default()
            };
            session.write(&effects).await?;
        }
    }
    session.commit().await?;
    Ok(session)
}

/// The floor: what SQLite itself needs to read every row of a table, measured with the
/// `sqlite3` command-line tool (Debian and Ubuntu: `apt-get install sqlite3`). Each query
/// reads every column of every row (`length` of each value) and returns one line.
pub const EVENTS_FLOOR_SQL: &str = "SELECT count(*), total(length(key_id) + \
    length(workspace_id) + length(event_type) + length(payload) + length(actor) + \
    length(hash) + length(workspace_hash) + stream_version + schema_version + recorded_at) \
    FROM events";
pub const KEYS_FLOOR_SQL: &str = "SELECT count(*), total(length(key_id) + \
    length(workspace_id) + length(name) + length(key_type) + length(environment) + \
    length(scopes) + full_access + length(secret_hash) + length(masked) + \
    ifnull(length(public_key), 0) + length(allowed_domains) + created_at + \
    ifnull(expires_at, 0) + ifnull(revoked_at, 0) + reveal_later + version + stream_version + \
    length(created_by) + updated_at + ifnull(last_revealed_at, 0)) FROM keys";

/// Issue 14's bounds, on this machine. The rebuild's and the verifier's are set at 1M events;
/// a path that reads at the speed of the disk takes time in proportion to the log, so they
/// scale with it ([`per_million`]). Peak memory must not grow with the log: it does not scale.
const STARTUP_SECONDS_1M: f64 = 2.0;
const STARTUP_SECONDS_5M: f64 = 5.0;
const REBUILD_SECONDS_PER_MILLION: f64 = 4.0;
const VERIFY_SECONDS_PER_MILLION: f64 = 4.0;
const PEAK_MIB: f64 = 300.0;

/// A bound set per million events, for a log of `events` (and no less than at 1M).
fn per_million(bound: f64, events: u64) -> f64 {
    bound * (events as f64 / 1e6).max(1.0)
}

/// The `sqlite3` floors on this machine with nothing else running, in seconds per million
/// rows (BENCHMARKS.md). The same bounds as multiples of the floor measured in the run are
/// the bound divided by these: a loaded machine slows the floor and the paths alike, so the
/// multiple holds where the seconds do not.
const KEYS_FLOOR_IDLE: f64 = 0.2;
const EVENTS_FLOOR_IDLE: f64 = 0.4;

/// The start-up bound for `keys` keys: 2 s at 1M, 5 s at 5M, linear between (and 2 s below).
fn startup_bound(keys: u64) -> f64 {
    let millions = keys as f64 / 1e6;
    STARTUP_SECONDS_1M + (millions - 1.0).max(0.0) * (STARTUP_SECONDS_5M - STARTUP_SECONDS_1M) / 4.0
}

/// The load average over the last minute.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// One timed run: seconds, peak resident memory, the load average when it started.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) seconds: f64,
    pub(crate) peak_bytes: u64,
    pub(crate) load: String,
}

/// Several runs of one thing: the median is the figure, the spread is shown.
pub(crate) struct Runs(pub(crate) Vec<Run>);

impl Runs {
    pub(crate) fn median(&self) -> &Run {
        let mut order: Vec<&Run> = self.0.iter().collect();
        order.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        order[order.len() / 2]
    }

    pub(crate) fn max_peak_mib(&self) -> f64 {
        self.0.iter().map(|r| r.peak_bytes).max().unwrap_or(0) as f64 / 1048576.0
    }

    pub(crate) fn cell(&self) -> String {
        let times: Vec<String> = self.0.iter().map(|r| format!("{:.2}", r.seconds)).collect();
        let loads: Vec<&str> = self.0.iter().map(|r| r.load.as_str()).collect();
        format!(
            "{:.2} ({}; load {})",
            self.median().seconds,
            times.join(", "),
            loads.join(", ")
        )
    }
}

/// Runs `bin` with `args` to completion; its wall time and peak resident memory (VmHWM,
/// read every 5 ms while it runs).
pub(crate) fn run_child(bin: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let load = load();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut stderr);
        }
        anyhow::bail!("{} {args:?} failed: {status}: {stderr}", bin.display());
    }
    Ok(Run {
        seconds,
        peak_bytes: peak_kib * 1024,
        load,
    })
}

/// The `sqlite3` floor for `sql` on `db`, `runs` times; `None` (after saying how to get it)
/// when the tool is not installed.
fn floor(db: &Path, sql: &str, runs: usize) -> anyhow::Result<Option<Runs>> {
    if Command::new("sqlite3").arg("-version").output().is_err() {
        println!(
            "sqlite3 not found: the floor is not measured. Install the command-line tool \
             (Debian/Ubuntu: `apt-get install sqlite3`, Fedora: `dnf install sqlite`, \
             macOS: preinstalled) and run again."
        );
        return Ok(None);
    }
    let db = db.to_str().unwrap_or_default();
    let mut all = Vec::with_capacity(runs);
    for _ in 0..runs {
        all.push(run_child(Path::new("sqlite3"), &["-readonly", db, sql])?);
    }
    Ok(Some(Runs(all)))
}

fn sqlite3_version() -> String {
    Command::new("sqlite3")
        .arg("-version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "not installed".into())
}

pub async fn run(
    events: usize,
    runs: usize,
    server_bin: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let runs = runs.max(1);
    // Beside the other data of a run (TMPDIR), not in memory: 1M keys take ~600 MB.
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let path = data.join(store::DATABASE_FILE);
    let db = path.to_str().unwrap_or_default().to_owned();
    let data_arg = data.to_str().unwrap_or_default().to_owned();
    let seeding = Instant::now();
    seed_events(&path, events).await?;
    println!(
        "seeded {events} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );

    // The first rebuild builds the projection from the seeded log; the later ones rebuild a
    // full one (the table is emptied and written again), as an operator's would.
    let mut rebuilds = Vec::with_capacity(runs);
    for _ in 0..runs {
        rebuilds.push(run_child(
            server_bin,
            &["rebuild", "--data-dir", &data_arg],
        )?);
    }
    let rebuilds = Runs(rebuilds);
    let events_floor = floor(&path, EVENTS_FLOOR_SQL, runs)?;
    let keys_floor = floor(&path, KEYS_FLOOR_SQL, runs)?;

    let mut startups = Vec::with_capacity(runs);
    let mut rss_full = 0;
    for _ in 0..runs {
        let load = load();
        let server = ServerProcess::start(server_bin, data, &[]).await?;
        rss_full = server.rss_bytes()?;
        startups.push(Run {
            seconds: server.startup.as_secs_f64(),
            peak_bytes: server.peak_rss_bytes()?,
            load,
        });
        drop(server);
    }
    let startups = Runs(startups);

    let mut verifies = Vec::with_capacity(runs);
    for _ in 0..runs {
        verifies.push(run_child(server_bin, &["audit", "verify", "--db", &db])?);
    }
    let verifies = Runs(verifies);
    let export_file = data.join("export.ndjson");
    let export = run_child(
        server_bin,
        &[
            "audit",
            "export",
            "--db",
            &db,
            "-o",
            export_file.to_str().unwrap_or_default(),
        ],
    )?;
    let export_bytes = std::fs::metadata(&export_file)?.len();
    std::fs::remove_file(&export_file)?;

    report.section(&format!(
        "5. Cold paths: {events} events, {events} keys (issue 14)"
    ));
    report.line(format!(
        "Median of {runs} runs (each run's seconds and the 1-minute load average when it \
         began in brackets). Floor: `sqlite3` {} reading every column of every row \
         (`sqlite3 -readonly kemon-keys.db \"SELECT count(*), total(length(…) + …) FROM …\"`).",
        sqlite3_version()
    ));
    report.line("");
    report.line("| Operation | Seconds | Peak RSS | × floor |");
    report.line("|---|---|---|---|");
    let mib = |r: &Runs| format!("{:.0} MiB", r.max_peak_mib());
    let times_floor = |r: &Runs, f: &Option<Runs>| {
        f.as_ref().map_or("—".to_owned(), |f| {
            format!("{:.1}", r.median().seconds / f.median().seconds)
        })
    };
    if let Some(f) = &events_floor {
        report.line(format!(
            "| floor: `sqlite3` scan of `events` | {} | {} | 1 |",
            f.cell(),
            mib(f)
        ));
    }
    if let Some(f) = &keys_floor {
        report.line(format!(
            "| floor: `sqlite3` scan of `keys` | {} | {} | 1 |",
            f.cell(),
            mib(f)
        ));
    }
    report.line(format!(
        "| start-up to SERVING (`kemon-keys serve`, cache loaded) | {} | {} | {} (keys) |",
        startups.cell(),
        mib(&startups),
        times_floor(&startups, &keys_floor)
    ));
    report.line(format!(
        "| `kemon-keys rebuild` (fold the log, write `keys`) | {} | {} | {} (events) |",
        rebuilds.cell(),
        mib(&rebuilds),
        times_floor(&rebuilds, &events_floor)
    ));
    report.line(format!(
        "| `kemon-keys audit verify --db` (chains, replay, projection) | {} | {} | {} (events) |",
        verifies.cell(),
        mib(&verifies),
        times_floor(&verifies, &events_floor)
    ));
    report.line(format!(
        "| `kemon-keys audit export --db` | {:.2} (load {}) | {:.0} MiB | {} (events) |",
        export.seconds,
        export.load,
        export.peak_bytes as f64 / 1048576.0,
        events_floor.as_ref().map_or("—".to_owned(), |f| format!(
            "{:.1}",
            export.seconds / f.median().seconds
        ))
    ));
    report.line("");
    report.line(format!(
        "Export: {export_bytes} bytes, {:.0} bytes per event.",
        export_bytes as f64 / events.max(1) as f64
    ));
    let keys = events as u64;
    report.check(
        "5. Start-up to SERVING, seconds",
        startups.median().seconds,
        false,
        startup_bound(keys),
    );
    report.check(
        "5. Rebuild, seconds",
        rebuilds.median().seconds,
        false,
        per_million(REBUILD_SECONDS_PER_MILLION, keys),
    );
    report.check(
        "5. Rebuild, peak RSS MiB",
        rebuilds.max_peak_mib(),
        false,
        PEAK_MIB,
    );
    report.check(
        "5. Audit verify, seconds",
        verifies.median().seconds,
        false,
        per_million(VERIFY_SECONDS_PER_MILLION, keys),
    );
    report.check(
        "5. Audit verify, peak RSS MiB",
        verifies.max_peak_mib(),
        false,
        PEAK_MIB,
    );
    let millions = (events as f64 / 1e6).max(1e-6);
    if let (Some(keys_floor), Some(events_floor)) = (&keys_floor, &events_floor) {
        report.check(
            "5. Start-up / sqlite3 keys scan",
            startups.median().seconds / keys_floor.median().seconds,
            false,
            (startup_bound(keys) / (KEYS_FLOOR_IDLE * millions)).round(),
        );
        report.check(
            "5. Rebuild / sqlite3 events scan",
            rebuilds.median().seconds / events_floor.median().seconds,
            false,
            (per_million(REBUILD_SECONDS_PER_MILLION, keys) / (EVENTS_FLOOR_IDLE * millions))
                .round(),
        );
        report.check(
            "5. Audit verify / sqlite3 events scan",
            verifies.median().seconds / events_floor.median().seconds,
            false,
            (per_million(VERIFY_SECONDS_PER_MILLION, keys) / (EVENTS_FLOOR_IDLE * millions))
                .round(),
        );
    }

    // 6. Memory: the same database served by the real binary, against an empty one.
    let empty = tempfile::tempdir()?;
    let baseline = ServerProcess::start(server_bin, empty.path(), &[]).await?;
    let rss_empty = baseline.rss_bytes()?;
    drop(baseline);
    let per_key = (rss_full.saturating_sub(rss_empty)) as f64 / keys.max(1) as f64;
    report.section(&format!("6. Resident memory per cached key, {keys} keys"));
    report.line(format!(
        "Server RSS with an empty database: {:.1} MiB; with {keys} keys loaded: {:.1} MiB. \
         Added per key: {per_key:.0} bytes.",
        rss_empty as f64 / 1048576.0,
        rss_full as f64 / 1048576.0,
    ));
    report.check(
        "6. Resident bytes added per cached key",
        per_key,
        false,
        300.0,
    );
    Ok(())
}
