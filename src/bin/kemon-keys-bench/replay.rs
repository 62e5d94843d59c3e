//! Targets 5 and 6: rebuilding the projection from 1M events and loading the cache for 1M
//! keys, each against a raw SELECT scan of the same rows; and resident memory per cached key.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::TryStreamExt;
use kemon_keys::cache::VerifyCache;
use kemon_keys::clock::SystemClock;
use kemon_keys::domain::{ApiKey, Environment, Event, KeyType};
use kemon_keys::log::chain::{self, LogRecord};
use kemon_keys::log::events;
use kemon_keys::store::sqlite::rows::{KEY_COLUMNS, KeyRow};
use kemon_keys::store::{self, Backend, Store, StoreOptions};
use kemon_keys::vault::MasterKey;
use sqlx::Row;

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
    // Move the seeded rows from the WAL into the database file, as a server's normal
    // checkpoints would have, so the scans below read what a long-running log looks like.
    session.scrub(std::time::Duration::from_secs(10)).await?;
    // Readers first: the writer's session, closing last, removes the WAL.
    backend.close_readers().await;
    session.close().await;
    backend.release().await;
    Ok(())
}

/// Reads every event row into owned values, as any consumer of the log must.
async fn raw_event_scan(path: &Path) -> anyhow::Result<(u64, f64)> {
    let mut conn = store::sqlite::open_read_only(path).await?;
    let start = Instant::now();
    let mut rows = sqlx::query(
        "SELECT sequence, key_id, workspace_id, stream_version, event_type, schema_version, \
         payload, actor, recorded_at, hash, workspace_hash FROM events ORDER BY sequence",
    )
    .fetch(&mut conn);
    let (mut n, mut bytes) = (0u64, 0usize);
    while let Some(row) = rows.try_next().await? {
        let _: i64 = row.try_get("sequence")?;
        let key_id: String = row.try_get("key_id")?;
        let workspace: String = row.try_get("workspace_id")?;
        let _: i64 = row.try_get("stream_version")?;
        let event_type: String = row.try_get("event_type")?;
        let _: i64 = row.try_get("schema_version")?;
        let payload: Vec<u8> = row.try_get("payload")?;
        let actor: String = row.try_get("actor")?;
        let _: i64 = row.try_get("recorded_at")?;
        let hash: Vec<u8> = row.try_get("hash")?;
        let workspace_hash: Vec<u8> = row.try_get("workspace_hash")?;
        bytes += key_id.len()
            + workspace.len()
            + event_type.len()
            + payload.len()
            + actor.len()
            + hash.len()
            + workspace_hash.len();
        n += 1;
    }
    std::hint::black_box(bytes);
    Ok((n, start.elapsed().as_secs_f64()))
}

/// Reads every `keys` row into a [`KeyRow`]: the same query and decoding the cache load
/// starts from.
async fn raw_key_scan(path: &Path) -> anyhow::Result<(u64, f64)> {
    let mut conn = store::sqlite::open_read_only(path).await?;
    let start = Instant::now();
    let mut rows = sqlx::query_as::<_, KeyRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {KEY_COLUMNS} FROM keys"
    )))
    .fetch(&mut conn);
    let mut n = 0u64;
    while let Some(row) = rows.try_next().await? {
        std::hint::black_box(&row);
        n += 1;
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

pub async fn run(events: usize, server_bin: &Path, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(store::DATABASE_FILE);
    let seeding = Instant::now();
    seed_events(&path, events).await?;
    println!(
        "seeded {events} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );

    let (scanned, scan_s) = raw_event_scan(&path).await?;
    let rebuild_start = Instant::now();
    let rebuilt = store::rebuild(&path).await?;
    let rebuild_s = rebuild_start.elapsed().as_secs_f64();
    anyhow::ensure!(
        scanned == rebuilt.events,
        "scan and rebuild saw different logs"
    );

    let (key_rows, key_scan_s) = raw_key_scan(&path).await?;
    let clock = Arc::new(SystemClock);
    let cache = Arc::new(VerifyCache::new(clock.clone()));
    let store = Store::open(
        &path,
        &bench_master_key().fingerprint(),
        clock,
        cache.clone(),
        StoreOptions::default(),
    )
    .await?;
    let load_start = Instant::now();
    let loaded = kemon_keys::app::load_cache(&store, &cache).await?;
    let load_s = load_start.elapsed().as_secs_f64();
    store.close().await;
    anyhow::ensure!(
        loaded == key_rows,
        "cache load and scan saw different tables"
    );

    report.section(&format!("5. Replay: {events} events, {loaded} keys"));
    report.line("| Operation | Rows | Seconds | Rows per second |");
    report.line("|---|---|---|---|");
    let per_s = |n: u64, s: f64| n as f64 / s;
    report.line(format!(
        "| Raw SELECT scan of `events` | {scanned} | {scan_s:.2} | {:.0} |",
        per_s(scanned, scan_s)
    ));
    report.line(format!("| `kemon-keys rebuild` (decode, apply, write `keys`, one transaction) | {} | {rebuild_s:.2} | {:.0} |", rebuilt.events, per_s(rebuilt.events, rebuild_s)));
    report.line(format!(
        "| Raw SELECT scan of `keys` | {key_rows} | {key_scan_s:.2} | {:.0} |",
        per_s(key_rows, key_scan_s)
    ));
    report.line(format!(
        "| Cache load at start-up (scan, validate, insert) | {loaded} | {load_s:.2} | {:.0} |",
        per_s(loaded, load_s)
    ));
    report.check(
        "5. Rebuild / raw event scan, events per second",
        scan_s / rebuild_s,
        true,
        0.25,
    );
    report.check(
        "5. Cache load / raw key scan, keys per second",
        key_scan_s / load_s,
        true,
        0.5,
    );
    drop(cache);

    // 6. Memory: the same database served by the real binary, against an empty one.
    let empty = tempfile::tempdir()?;
    let baseline = ServerProcess::start(server_bin, empty.path(), &[]).await?;
    let rss_empty = baseline.rss_bytes()?;
    drop(baseline);
    let full = ServerProcess::start(server_bin, dir.path(), &[]).await?;
    let rss_full = full.rss_bytes()?;
    let startup = full.startup;
    drop(full);
    let per_key = (rss_full.saturating_sub(rss_empty)) as f64 / loaded as f64;
    report.section(&format!("6. Resident memory per cached key, {loaded} keys"));
    report.line(format!(
        "Server RSS with an empty database: {:.1} MiB; with {loaded} keys loaded: {:.1} MiB \
         (start-up to SERVING {:.1} s). Added per key: {per_key:.0} bytes.",
        rss_empty as f64 / 1048576.0,
        rss_full as f64 / 1048576.0,
        startup.as_secs_f64()
    ));
    report.check(
        "6. Resident bytes added per cached key",
        per_key,
        false,
        300.0,
    );
    Ok(())
}
