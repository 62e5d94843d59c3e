//! The PostgreSQL backend: the same log, projection and side tables as SQLite, in one
//! PostgreSQL schema shared by several replicas. The only module that names a PostgreSQL type.
//!
//! Writers on every replica serialise on one transaction-level advisory lock, taken first in
//! each write transaction and held through COMMIT. A writer therefore always continues from
//! the last committed record (the `events_in_order` trigger checks it), and records become
//! visible in sequence order: a snapshot that sees record N sees every record before it. That
//! is the tailing rule, correct by construction: a replica that has applied everything up to
//! N reads `sequence > N`, and no record can later commit below N. LISTEN/NOTIFY only wakes
//! the tailers early; they also poll, so a lost notification delays nothing past the poll.
//!
//! Several schemas may share one database (one per test, or per deployment): the lock, the
//! notification channel and the migrations are all per schema (`search_path`, e.g.
//! `postgres://host/db?options[search_path]=kemon`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::backend::{
    Answered, Backend, EachKeys, Effects, KEY_BATCH, RebuildReport, Replica, SharedLog, Snapshot,
    Wakeups, WriteSession,
};
use super::sqlite;
use super::sqlite::rows::{KEY_COLUMNS, KeyRow, VERIFY_COLUMNS, VerifyRow};
use super::{
    CREATE_REQUEST_WINDOW_MS, Cause, ExpiryCursor, Head, KeyUsage, ListFilter, RecordFilter,
    StoreError,
};
use crate::domain::{self, DomainPattern, KeyId, KeyState, Recorded, WorkspaceId};
use crate::log::chain::{self, Chains, Hash, LogRecord};
use crate::log::events;
use crate::log::fold::{self, FoldedKeys};
use crate::log::spill::{EventRef, FoldLimits, Spill};

/// The advisory lock class of kemon-keys' log lock; the second key is the schema's hash.
/// (Tools that must hold the log still, as a writer does, take the same lock.)
pub const LOG_LOCK_CLASS: i32 = 0x6b6b_6c67; // "kklg"

/// How long opening a connection may take before the database counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A PostgreSQL schema holding a log and its projection.
pub struct PgBackend {
    pool: PgPool,
    options: PgConnectOptions,
    /// The schema everything lives in (the connection's `current_schema()`).
    schema: String,
    /// Where writers announce appends: per schema.
    channel: String,
}

impl PgBackend {
    /// Connects and applies the migrations (under sqlx's migration lock, so replicas starting
    /// together are safe). When every migration is already applied nothing is run, so that
    /// replicas may use a role without the right to create tables (README, "PostgreSQL").
    pub async fn open(url: &str) -> Result<PgBackend, StoreError> {
        let backend = PgBackend::connect(url, 8).await?;
        let applied: Result<Vec<i64>, _> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&backend.pool)
                .await;
        if applied.is_ok_and(|done| MIGRATOR.iter().all(|m| done.contains(&m.version))) {
            return Ok(backend);
        }
        MIGRATOR.run(&backend.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
            e => StoreError::Database(Cause::msg(format!("migrations failed: {e}"))),
        })?;
        Ok(backend)
    }

    /// Connects to an existing schema without migrating it: for the audit tools.
    pub async fn open_read_only(url: &str) -> Result<PgBackend, StoreError> {
        let backend = PgBackend::connect(url, 2).await?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = 'events')",
        )
        .fetch_one(&backend.pool)
        .await?;
        if !exists {
            return Err(StoreError::Refused(format!(
                "no kemon-keys log in schema {:?} of that database",
                backend.schema
            )));
        }
        Ok(backend)
    }

    async fn connect(url: &str, connections: u32) -> Result<PgBackend, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            StoreError::Refused(format!("the database URL is not valid: {}", describe(&e)))
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let schema = schema.ok_or_else(|| {
            StoreError::Refused(
                "the database URL's search_path names no existing schema; create it first".into(),
            )
        })?;
        let channel = format!("kemon_keys_log.{schema}");
        Ok(PgBackend {
            pool,
            options,
            schema,
            channel,
        })
    }

    /// The schema in use.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}

/// A connection error's text without the URL (which may carry a password).
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

#[async_trait]
impl Backend for PgBackend {
    async fn claim_master_key(&self, fingerprint: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO meta (name, value) VALUES ('master_key_id', $1) ON CONFLICT DO NOTHING",
        )
        .bind(fingerprint)
        .execute(&self.pool)
        .await?;
        let stored: String =
            sqlx::query_scalar("SELECT value FROM meta WHERE name = 'master_key_id'")
                .fetch_one(&self.pool)
                .await?;
        if stored != fingerprint {
            return Err(StoreError::Refused(format!(
                "the master key (fingerprint {fingerprint}) is not the one this database was \
                 created with (fingerprint {stored}); start with the original master key"
            )));
        }
        Ok(())
    }

    async fn write_session(&self) -> Result<Box<dyn WriteSession>, StoreError> {
        // Bounded: an unreachable host would otherwise hold the writer for the kernel's TCP
        // retries (minutes) while writes queue behind it.
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| {
                StoreError::Unavailable(Cause::msg(format!(
                    "no connection to PostgreSQL within {CONNECT_TIMEOUT:?}"
                )))
            })??;
        Ok(Box::new(PgSession {
            conn,
            schema: self.schema.clone(),
            channel: self.channel.clone(),
        }))
    }

    async fn read_records(
        &self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        read_records(&self.pool, after, limit, filter).await
    }

    async fn head(&self, workspace_id: Option<&str>) -> Result<(Head, Option<Head>), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let log = log_head(&mut tx).await?;
        let workspace = match workspace_id {
            None => None,
            Some(w) => {
                let row: Option<(i64, Vec<u8>)> = sqlx::query_as(
                    "SELECT sequence, workspace_hash FROM events WHERE workspace_id = $1 \
                     ORDER BY sequence DESC LIMIT 1",
                )
                .bind(w)
                .fetch_optional(&mut *tx)
                .await?;
                Some(head_from(row, chain::workspace_genesis(w))?)
            }
        };
        tx.commit().await?;
        Ok((log, workspace))
    }

    async fn get_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: KeyId,
    ) -> Result<Option<KeyState>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE key_id = $1 AND workspace_id = $2"
        )))
        .bind(key_id.to_string())
        .bind(workspace_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(KeyRow::into_state)
            .transpose()
            .map_err(StoreError::Corrupt)
    }

    async fn list_keys(
        &self,
        workspace_id: &WorkspaceId,
        filter: &ListFilter,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError> {
        // Absent filters compare with NULL and match everything: one statement text.
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE workspace_id = $1 AND key_id > $2 \
             AND ($3::text IS NULL OR key_type = $3) \
             AND ($4::text IS NULL OR environment = $4) \
             AND ($5 OR revoked_at IS NULL) \
             AND ($7::bigint IS NULL OR (expires_at IS NOT NULL AND expires_at < $7)) \
             AND (NOT $8 OR NOT EXISTS (SELECT 1 FROM key_usage u WHERE u.key_id = keys.key_id)) \
             AND ($9::bigint IS NULL OR NOT EXISTS (SELECT 1 FROM key_usage u \
                  WHERE u.key_id = keys.key_id AND u.last_used_at >= $9)) \
             ORDER BY key_id LIMIT $6"
        );
        let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(workspace_id.as_str())
            .bind(after.map(|k| k.to_string()).unwrap_or_default())
            .bind(filter.key_type.map(|t| t.as_str()))
            .bind(filter.environment.map(|e| e.as_str()))
            .bind(filter.include_revoked)
            .bind(i64::from(limit))
            .bind(filter.expires_before_ms)
            .bind(filter.never_used)
            .bind(filter.unused_since_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(KeyRow::into_state)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Corrupt)
    }

    async fn sealed_secret(&self, key_id: KeyId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM sealed_secrets WHERE key_id = $1")
                .bind(key_id.to_string())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        // Not under the log's lock: a use is not a change to any key.
        sqlx::query(
            "INSERT INTO key_usage (key_id, last_used_at, last_used_origin) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[]) \
             ON CONFLICT (key_id) DO UPDATE SET last_used_at = excluded.last_used_at, \
             last_used_origin = excluded.last_used_origin \
             WHERE excluded.last_used_at > key_usage.last_used_at",
        )
        .bind(
            usage
                .iter()
                .map(|u| u.key_id.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(usage.iter().map(|u| u.last_used_at_ms).collect::<Vec<_>>())
        .bind(usage.iter().map(|u| u.origin.as_str()).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn key_usage(&self, key_ids: &[KeyId]) -> Result<Vec<KeyUsage>, StoreError> {
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT key_id, last_used_at, last_used_origin FROM key_usage WHERE key_id = ANY($1)",
        )
        .bind(key_ids.iter().map(KeyId::to_string).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(super::sqlite::usage_from_row)
            .collect()
    }

    async fn expiring(
        &self,
        workspace_id: Option<&WorkspaceId>,
        after: ExpiryCursor,
        up_to_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE expires_at IS NOT NULL \
             AND revoked_at IS NULL AND rolled_to_key_id IS NULL \
             AND (expires_at > $1 OR (expires_at = $1 AND key_id > $2)) AND expires_at <= $3 \
             AND ($4::text IS NULL OR workspace_id = $4) \
             ORDER BY expires_at, key_id LIMIT $5"
        );
        let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(after.0)
            .bind(after.1.map(|k| k.to_string()).unwrap_or_default())
            .bind(up_to_ms)
            .bind(workspace_id.map(WorkspaceId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(KeyRow::into_state)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Corrupt)
    }

    async fn for_each_key(
        &self,
        each: &mut (dyn FnMut(KeyState) + Send),
    ) -> Result<u64, StoreError> {
        let mut rows = sqlx::query_as::<_, KeyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys"
        )))
        .fetch(&self.pool);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            each(row.into_state().map_err(StoreError::Corrupt)?);
            count += 1;
        }
        Ok(count)
    }

    /// Reads only the columns verification uses, and hands them on in batches, rather than
    /// whole rows each made a `KeyState` (strings and all) and then a cache entry: a
    /// replica's start-up at 1M keys went from 2.85 to 2.30 s (BENCHMARKS.md, target 8).
    async fn for_each_key_concurrently(&self, each: Arc<EachKeys>) -> Result<u64, StoreError> {
        let mut rows = sqlx::query_as::<_, VerifyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {VERIFY_COLUMNS} FROM keys"
        )))
        .fetch(&self.pool);
        let mut batch: Vec<VerifyRow> = Vec::with_capacity(KEY_BATCH);
        let mut count = 0;
        loop {
            let row = rows.try_next().await?;
            let end = row.is_none();
            batch.extend(row);
            if batch.len() == KEY_BATCH || (end && !batch.is_empty()) {
                let states = batch
                    .iter()
                    .map(VerifyRow::to_verify_state)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StoreError::Corrupt)?;
                count += states.len() as u64;
                each(states);
                batch.clear();
            }
            if end {
                return Ok(count);
            }
        }
    }

    async fn count_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn rebuild(&self, limits: &FoldLimits) -> Result<RebuildReport, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Writers wait while the projection is rewritten; replicas keep answering Verify
        // from their caches, which the rebuild does not change.
        lock_log(&mut tx, &self.schema).await?;
        // Folded as SQLite's rebuild folds: in memory, or, for a log of more events than
        // `limits` allows keys in memory, in parts through temporary files. Those are written
        // and read on this task: a rebuild is a command of its own, with nothing else on its
        // runtime to hold up.
        let max_sequence: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        let dir = limits.dir_or(&std::env::temp_dir());
        let spill_error = |e| StoreError::temp_files(&dir, e);
        let mut spill = (usize::try_from(max_sequence).unwrap_or(0) > limits.keys_in_memory)
            .then(|| Spill::new(&dir))
            .transpose()
            .map_err(spill_error)?;
        let mut folded = FoldedKeys::default();
        let mut events = 0u64;
        let mut last_sequence = 0i64;
        {
            let mut rows = sqlx::query(
                "SELECT sequence, key_id, stream_version, event_type, schema_version, payload, \
                 actor, recorded_at FROM events ORDER BY sequence",
            )
            .fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                let sequence: i64 = row.try_get("sequence")?;
                let event = EventRef {
                    // Read in the order of their sequences, which the log's key makes unique.
                    position: u64::try_from(sequence).unwrap_or(0),
                    sequence: u64::try_from(sequence).unwrap_or(0),
                    stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?)
                        .unwrap_or(0),
                    schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                        .unwrap_or(u32::MAX),
                    recorded_at_ms: row.try_get("recorded_at")?,
                    key_id: row.try_get::<&str, _>("key_id")?.as_bytes(),
                    workspace_id: &[],
                    event_type: row.try_get::<&str, _>("event_type")?.as_bytes(),
                    payload: row.try_get("payload")?,
                    actor: row.try_get::<&str, _>("actor")?.as_bytes(),
                };
                match &mut spill {
                    Some(parts) => parts.event(&event).map_err(spill_error)?,
                    None => sqlite::fold_one(&mut folded, &event)?,
                }
                events += 1;
                last_sequence = sequence;
            }
        }
        sqlx::query("DELETE FROM keys").execute(&mut *tx).await?;
        let keys = match spill {
            None => write_folded(&mut tx, folded).await?,
            Some(spill) => {
                // Every part is folded, so that the failure reported is the first in log
                // order, as in memory; rows are written while none has failed (a failure
                // rolls them back with the transaction).
                let mut keys = 0;
                let mut first: Option<sqlite::FoldFailure> = None;
                for part in spill.into_parts().map_err(spill_error)? {
                    match sqlite::fold_spilled(part).map_err(spill_error)? {
                        Ok(folded) if first.is_none() => {
                            keys += write_folded(&mut tx, folded).await?;
                        }
                        Ok(_) => {}
                        Err(failure) => sqlite::FoldFailure::keep_first(&mut first, Some(failure)),
                    }
                }
                if let Some(failure) = first {
                    return Err(failure.error);
                }
                keys
            }
        };
        sqlx::query("UPDATE projection_checkpoint SET last_sequence = $1 WHERE id = 1")
            .bind(last_sequence)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RebuildReport {
            events,
            keys,
            last_sequence,
        })
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut conn)
            .await?;
        Ok(Box::new(PgSnapshot { conn }))
    }

    async fn close_readers(&self) {
        // The pool also serves the tailer and the heartbeat, which stop with the writer.
    }

    async fn release(&self) {
        self.pool.close().await;
    }

    fn shared(&self) -> Option<&dyn SharedLog> {
        Some(self)
    }
}

#[async_trait]
impl SharedLog for PgBackend {
    async fn tail(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LogRecord>, Vec<KeyState>), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let records = read_records(&mut *tx, after, limit, &RecordFilter::default()).await?;
        let mut keys: Vec<&str> = records.iter().map(|r| r.key_id.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let states = if keys.is_empty() {
            Vec::new()
        } else {
            let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ANY($1)"
            )))
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
            rows.into_iter()
                .map(KeyRow::into_state)
                .collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::Corrupt)?
        };
        tx.commit().await?;
        Ok((records, states))
    }

    async fn listen(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        let mut listener =
            tokio::time::timeout(CONNECT_TIMEOUT, PgListener::connect_with(&self.pool))
                .await
                .map_err(|_| StoreError::Unavailable(Cause::msg("no connection for LISTEN")))??;
        listener.listen(&self.channel).await?;
        Ok(Box::new(PgWakeups { listener }))
    }

    async fn heartbeat(&self, replica_id: &str, applied: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (replica_id, applied_sequence, heartbeat_at, started_at) \
             VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint, \
                     (extract(epoch FROM clock_timestamp()) * 1000)::bigint) \
             ON CONFLICT (replica_id) DO UPDATE SET \
             applied_sequence = excluded.applied_sequence, heartbeat_at = excluded.heartbeat_at",
        )
        .bind(replica_id)
        .bind(i64::try_from(applied).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn replicas(&self, live_within: Duration) -> Result<Vec<Replica>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT replica_id, applied_sequence, \
             (extract(epoch FROM clock_timestamp()) * 1000)::bigint - heartbeat_at \
             FROM replicas WHERE heartbeat_at >= \
             (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $1 ORDER BY replica_id",
        )
        .bind(i64::try_from(live_within.as_millis()).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(replica_id, applied, age)| Replica {
                replica_id,
                applied_sequence: u64::try_from(applied).unwrap_or(0),
                heartbeat_age: Duration::from_millis(u64::try_from(age).unwrap_or(0)),
            })
            .collect())
    }

    async fn leave(&self, replica_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replicas WHERE replica_id = $1")
            .bind(replica_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

struct PgWakeups {
    listener: PgListener,
}

#[async_trait]
impl Wakeups for PgWakeups {
    async fn next(&mut self) -> Result<(), StoreError> {
        // `None` means the connection was lost and is being re-established: a wakeup too,
        // since notifications sent meanwhile are lost.
        self.listener.try_recv().await?;
        Ok(())
    }
}

/// Takes the log's lock until the transaction ends.
async fn lock_log(conn: &mut PgConnection, schema: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOG_LOCK_CLASS)
        .bind(schema)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A writer's own connection. Transactions are plain BEGIN/COMMIT statements, as for SQLite.
struct PgSession {
    conn: PgConnection,
    schema: String,
    channel: String,
}

#[async_trait]
impl WriteSession for PgSession {
    async fn begin(&mut self) -> Result<(), StoreError> {
        sqlx::query("BEGIN").execute(&mut self.conn).await?;
        lock_log(&mut self.conn, &self.schema).await
    }

    async fn load_stream(&mut self, key_id: KeyId) -> Result<Option<KeyState>, StoreError> {
        let rows = sqlx::query(
            "SELECT stream_version, event_type, schema_version, payload, actor, recorded_at \
             FROM events WHERE key_id = $1 ORDER BY stream_version",
        )
        .bind(key_id.to_string())
        .fetch_all(&mut self.conn)
        .await?;
        let mut state = None;
        for row in rows {
            let recorded = recorded_from_row(&row)?;
            state = Some(domain::apply(state, &recorded).map_err(StoreError::Corrupt)?);
        }
        Ok(state)
    }

    async fn answered_create(
        &mut self,
        workspace_id: &str,
        request_id: &str,
        since_ms: i64,
    ) -> Result<Option<Answered>, StoreError> {
        let row: Option<(Vec<u8>, String, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT request_digest, key_id, sealed_secret FROM create_requests \
             WHERE workspace_id = $1 AND request_id = $2 AND created_at >= $3",
        )
        .bind(workspace_id)
        .bind(request_id)
        .bind(since_ms)
        .fetch_optional(&mut self.conn)
        .await?;
        Ok(row.map(|(digest, key_id, sealed_secret)| Answered {
            digest,
            key_id,
            sealed_secret,
        }))
    }

    async fn write(&mut self, effects: &Effects) -> Result<bool, StoreError> {
        write_effects(&mut self.conn, effects, &self.channel).await?;
        // PostgreSQL keeps no plaintext to scrub: the copies are ciphertext, and their dead
        // tuples are reclaimed by autovacuum (README, "PostgreSQL").
        Ok(false)
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn read_records(
        &mut self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        read_records(&mut self.conn, after, limit, filter).await
    }

    async fn chains(&mut self) -> Result<Chains, StoreError> {
        let last = log_head(&mut self.conn).await?;
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT DISTINCT ON (workspace_id) workspace_id, workspace_hash FROM events \
             ORDER BY workspace_id, sequence DESC",
        )
        .fetch_all(&mut self.conn)
        .await?;
        let mut workspaces = std::collections::HashMap::with_capacity(rows.len());
        for (workspace, hash) in rows {
            let hash: Hash = hash.try_into().map_err(|_| {
                StoreError::Corrupt(format!("workspace hash of {workspace} is not 32 bytes"))
            })?;
            workspaces.insert(workspace, hash);
        }
        Ok(Chains::new(last.sequence, last.hash, workspaces))
    }

    async fn scrub(&mut self, _wait: Duration) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn close(self: Box<Self>) {
        let _ = self.conn.close().await;
    }
}

/// One REPEATABLE READ transaction on a connection of its own.
struct PgSnapshot {
    conn: PgConnection,
}

#[async_trait]
impl Snapshot for PgSnapshot {
    async fn read_records(
        &mut self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        read_records(&mut self.conn, after, limit, filter).await
    }

    async fn projection(&mut self) -> Result<(Vec<KeyState>, u64), StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys ORDER BY key_id"
        )))
        .fetch_all(&mut self.conn)
        .await?;
        let states = rows
            .into_iter()
            .map(KeyRow::into_state)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Corrupt)?;
        let checkpoint: i64 =
            sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoint WHERE id = 1")
                .fetch_one(&mut self.conn)
                .await?;
        Ok((states, u64::try_from(checkpoint).unwrap_or(0)))
    }

    async fn log_end(&mut self) -> Result<u64, StoreError> {
        Ok(log_head(&mut self.conn).await?.sequence)
    }
}

async fn log_head(conn: &mut PgConnection) -> Result<Head, StoreError> {
    let row: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT sequence, hash FROM events ORDER BY sequence DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    head_from(row, chain::log_genesis())
}

fn head_from(row: Option<(i64, Vec<u8>)>, genesis: Hash) -> Result<Head, StoreError> {
    Ok(match row {
        None => Head {
            sequence: 0,
            hash: genesis,
        },
        Some((sequence, hash)) => Head {
            sequence: u64::try_from(sequence).unwrap_or(0),
            hash: hash
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("hash of {sequence} is not 32 bytes")))?,
        },
    })
}

const RECORD_COLUMNS: &str = "sequence, key_id, workspace_id, stream_version, event_type, \
    schema_version, payload, actor, recorded_at, hash, workspace_hash, caller_identity";

async fn read_records<'c, E>(
    executor: E,
    after: u64,
    limit: u32,
    filter: &RecordFilter,
) -> Result<Vec<LogRecord>, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    // Absent filters compare with NULL and match everything: one statement text.
    let sql = format!(
        "SELECT {RECORD_COLUMNS} FROM events WHERE sequence > $1 \
         AND ($2::text IS NULL OR workspace_id = $2) \
         AND ($3::text IS NULL OR key_id = $3) \
         AND ($4::bigint IS NULL OR sequence <= $4) \
         AND (cardinality($5::text[]) = 0 OR event_type = ANY($5)) \
         ORDER BY sequence LIMIT $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(filter.workspace_id.as_deref())
        .bind(filter.key_id.as_deref())
        .bind(filter.up_to.map(|s| i64::try_from(s).unwrap_or(i64::MAX)))
        .bind(&filter.event_types)
        .bind(i64::from(limit))
        .fetch_all(executor)
        .await?;
    rows.iter().map(record_from_row).collect()
}

fn record_from_row(row: &sqlx::postgres::PgRow) -> Result<LogRecord, StoreError> {
    let hash = |name: &str| -> Result<Hash, StoreError> {
        let bytes: Vec<u8> = row.try_get(name)?;
        bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("{name} is not 32 bytes")))
    };
    Ok(LogRecord {
        sequence: u64::try_from(row.try_get::<i64, _>("sequence")?).unwrap_or(0),
        key_id: row.try_get("key_id")?,
        workspace_id: row.try_get("workspace_id")?,
        stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?).unwrap_or(0),
        event_type: row.try_get("event_type")?,
        schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?).unwrap_or(u32::MAX),
        payload: row.try_get("payload")?,
        actor: row.try_get("actor")?,
        recorded_at_ms: row.try_get("recorded_at")?,
        hash: hash("hash")?,
        workspace_hash: hash("workspace_hash")?,
        caller_identity: row.try_get("caller_identity")?,
    })
}

/// Writes folded states as `keys` rows, in key id order; how many.
async fn write_folded(conn: &mut PgConnection, mut folded: FoldedKeys) -> Result<u64, StoreError> {
    let mut states = folded
        .drain()
        .map(|(_, encoded)| fold::decode(&encoded).map_err(StoreError::Invariant))
        .collect::<Result<Vec<KeyState>, _>>()?;
    states.sort_unstable_by_key(|s| s.key_id);
    for chunk in states.chunks(10_000) {
        project_many(conn, chunk).await?;
    }
    Ok(states.len() as u64)
}

fn recorded_from_row(row: &sqlx::postgres::PgRow) -> Result<Recorded, StoreError> {
    let event_type: String = row.try_get("event_type")?;
    let schema_version: i64 = row.try_get("schema_version")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let event = events::decode_event(
        &event_type,
        u32::try_from(schema_version).unwrap_or(u32::MAX),
        &payload,
    )
    .map_err(StoreError::Corrupt)?;
    Ok(Recorded {
        event,
        actor: row.try_get("actor")?,
        recorded_at_ms: row.try_get("recorded_at")?,
        stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?).unwrap_or(0),
    })
}

/// Writes `effects` with one statement per table (arrays unnested), then announces the new
/// head on the schema's channel (delivered by PostgreSQL at COMMIT, and only if it commits).
async fn write_effects(
    conn: &mut PgConnection,
    effects: &Effects,
    channel: &str,
) -> Result<(), StoreError> {
    let records = &effects.records;
    if !records.is_empty() {
        sqlx::query(
            "INSERT INTO events (sequence, key_id, workspace_id, stream_version, event_type, \
             schema_version, payload, actor, recorded_at, hash, workspace_hash, \
             caller_identity) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], \
             $5::text[], $6::bigint[], $7::bytea[], $8::text[], $9::bigint[], $10::bytea[], \
             $11::bytea[], $12::text[])",
        )
        .bind(
            records
                .iter()
                .map(|r| r.sequence as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.key_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.workspace_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.stream_version as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.event_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| i64::from(r.schema_version))
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.payload.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(records.iter().map(|r| r.actor.as_str()).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.recorded_at_ms).collect::<Vec<_>>())
        .bind(records.iter().map(|r| &r.hash[..]).collect::<Vec<_>>())
        .bind(
            records
                .iter()
                .map(|r| &r.workspace_hash[..])
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.caller_identity.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await?;
    }
    project_many(conn, &effects.changed).await?;
    for (key_id, sealed) in &effects.sealed_inserts {
        sqlx::query(
            "INSERT INTO sealed_secrets (key_id, sealed, master_key_id) VALUES ($1, $2, $3)",
        )
        .bind(key_id)
        .bind(&sealed.sealed)
        .bind(&sealed.master_key_id)
        .execute(&mut *conn)
        .await?;
    }
    if !effects.sealed_deletes.is_empty() {
        sqlx::query("DELETE FROM sealed_secrets WHERE key_id = ANY($1)")
            .bind(&effects.sealed_deletes)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE create_requests SET sealed_secret = NULL \
             WHERE key_id = ANY($1) AND sealed_secret IS NOT NULL",
        )
        .bind(&effects.sealed_deletes)
        .execute(&mut *conn)
        .await?;
    }
    if !effects.create_requests.is_empty() {
        let now = records.last().map_or(0, |r| r.recorded_at_ms);
        sqlx::query("DELETE FROM create_requests WHERE created_at < $1")
            .bind(now - CREATE_REQUEST_WINDOW_MS)
            .execute(&mut *conn)
            .await?;
        for (workspace_id, key_id, create) in &effects.create_requests {
            sqlx::query(
                "INSERT INTO create_requests (workspace_id, request_id, request_digest, key_id, \
                 sealed_secret, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (workspace_id, request_id) DO UPDATE SET \
                 request_digest = excluded.request_digest, key_id = excluded.key_id, \
                 sealed_secret = excluded.sealed_secret, created_at = excluded.created_at",
            )
            .bind(workspace_id)
            .bind(&create.request_id)
            .bind(&create.digest[..])
            .bind(key_id)
            .bind(&create.sealed_secret)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
    }
    if let Some(last) = records.last() {
        let sequence = i64::try_from(last.sequence).unwrap_or(i64::MAX);
        sqlx::query("UPDATE projection_checkpoint SET last_sequence = $1 WHERE id = 1")
            .bind(sequence)
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(sequence.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Writes keys' states into the projection with one statement (arrays unnested): the same
/// values the SQLite backend stores.
async fn project_many(conn: &mut PgConnection, states: &[KeyState]) -> Result<(), StoreError> {
    if states.is_empty() {
        return Ok(());
    }
    let updates = KEY_COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| *c != "key_id")
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO keys ({KEY_COLUMNS}) SELECT * FROM UNNEST($1::text[], $2::text[], \
         $3::text[], $4::text[], $5::text[], $6::text[], $7::boolean[], $8::bytea[], \
         $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bigint[], $14::bigint[], \
         $15::boolean[], $16::bigint[], $17::bigint[], $18::text[], $19::bigint[], \
         $20::bigint[], $21::text[], $22::text[]) ON CONFLICT (key_id) DO UPDATE SET {updates}"
    );
    let col = |f: &dyn Fn(&KeyState) -> Option<i64>| states.iter().map(f).collect::<Vec<_>>();
    let text = |f: &dyn Fn(&KeyState) -> String| states.iter().map(f).collect::<Vec<_>>();
    let flag = |f: &dyn Fn(&KeyState) -> bool| states.iter().map(f).collect::<Vec<_>>();
    let domains = |s: &KeyState| {
        s.allowed_domains
            .iter()
            .map(DomainPattern::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    };
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(text(&|s| s.key_id.to_string()))
        .bind(text(&|s| s.workspace_id.to_string()))
        .bind(text(&|s| s.name.as_str().to_owned()))
        .bind(text(&|s| s.key_type.as_str().to_owned()))
        .bind(text(&|s| s.environment.as_str().to_owned()))
        .bind(text(&|s| s.scopes.names().join(" ")))
        .bind(flag(&|s| s.full_access))
        .bind(
            states
                .iter()
                .map(|s| s.secret_hash.0.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(text(&|s| s.masked.clone()))
        .bind(
            states
                .iter()
                .map(|s| s.public_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(text(&domains))
        .bind(col(&|s| Some(s.created_at_ms)))
        .bind(col(&|s| s.expires_at_ms))
        .bind(col(&|s| s.revoked_at_ms))
        .bind(flag(&|s| s.reveal_later))
        .bind(col(&|s| Some(i64::try_from(s.version).unwrap_or(i64::MAX))))
        .bind(col(&|s| {
            Some(i64::try_from(s.stream_version).unwrap_or(i64::MAX))
        }))
        .bind(text(&|s| s.created_by.clone()))
        .bind(col(&|s| Some(s.updated_at_ms)))
        .bind(col(&|s| s.last_revealed_at_ms))
        .bind(
            states
                .iter()
                .map(|s| s.rolled_from.map(|k| k.to_string()))
                .collect::<Vec<_>>(),
        )
        .bind(
            states
                .iter()
                .map(|s| s.rolled_to.map(|k| k.to_string()))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// SQLSTATE classes that mean the database or its storage failed, not the statement
/// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
pub(super) fn classify(code: &str, e: sqlx::Error) -> StoreError {
    match code {
        // disk_full
        "53100" => StoreError::Full(Cause::new(e)),
        // insufficient resources, connection exceptions, operator intervention (shutdown,
        // cannot connect now), system errors (I/O), read-only transaction (a standby after a
        // failover), serialization failure and deadlock (retryable)
        c if c.starts_with("53")
            || c.starts_with("08")
            || c.starts_with("57P")
            || c.starts_with("58")
            || c == "25006"
            || c == "40001"
            || c == "40P01" =>
        {
            StoreError::Unavailable(Cause::new(e))
        }
        _ => StoreError::Database(Cause::new(e)),
    }
}
