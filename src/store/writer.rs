//! The single writer: group commit.
//!
//! Commands queue on a channel. The writer takes the first, then every other already waiting
//! (up to `max_batch`), and decides them all inside one transaction: each command sees the
//! key's state as the commands before it in the batch left it (loaded by folding its stream
//! only when the batch has not touched the key yet; never for a create, whose key id is new).
//! The domain's decisions are pure, so a refused command simply contributes nothing. The
//! batch's events are then appended, and the touched keys' rows written, with a few
//! multi-row statements, and the whole batch is committed at once: one fsync under
//! synchronous=FULL. Only after the commit does the writer hand the new states to the commit
//! listener (the verification cache), in commit order, and then answer each caller. A caller
//! is therefore never told "done" before its event is durable, and Verify on this server
//! reflects the change before the caller hears back.
//!
//! Failures. A connection whose transaction failed is closed, never reused: when COMMIT fails
//! with SQLITE_FULL or an I/O error SQLite rolls back by itself, and a driver that believes
//! it is still inside the transaction would nest every later write in one that is never
//! committed. The next attempt opens a new connection and reads the log back first, so a
//! commit that reported failure but landed is caught up with, never lost from the cache.
//! When the storage fails (full, I/O errors, read-only files) every caller of the batch gets
//! that error and nothing of the batch is kept; the writer recovers by itself on the next
//! write once storage works again. When the database refuses a batch for another reason,
//! its commands are retried one per transaction, so that the one it refuses fails alone.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::rows::{self, KEY_COLUMNS};
use super::{CREATE_REQUEST_WINDOW_MS, Replayed, StoreError, Write, Written, load_stream};
use crate::clock::Clock;
use crate::domain::{self, Command, Event, KeyState, Recorded};
use crate::log::chain::{Chains, Hash, LogRecord};
use crate::log::events;

/// Told of every committed change, in commit order, before the writer answers its callers.
/// Must not block: it runs on the writer's task.
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, states: &[KeyState]);
}

pub(super) struct Request {
    pub write: Write,
    pub reply: oneshot::Sender<Result<Written, StoreError>>,
}

/// The chains' heads as of the last appended record (committed or, inside a batch, not
/// yet). Changes made in a batch are journaled so a rolled-back command or batch restores
/// exactly what it changed.
pub(super) struct Heads {
    pub chains: Chains,
    journal: Vec<(String, Option<Hash>)>,
}

/// A point to roll [`Heads`] back to.
#[derive(Clone, Copy)]
struct Mark {
    journal: usize,
    last_sequence: u64,
    last_hash: Hash,
}

impl Heads {
    pub fn new(chains: Chains) -> Heads {
        Heads {
            chains,
            journal: Vec::new(),
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            journal: self.journal.len(),
            last_sequence: self.chains.last_sequence,
            last_hash: self.chains.log,
        }
    }

    fn rollback(&mut self, mark: Mark) {
        while self.journal.len() > mark.journal {
            let (workspace, previous) = self.journal.pop().expect("journal entry");
            self.chains.restore_workspace(workspace, previous);
        }
        self.chains.last_sequence = mark.last_sequence;
        self.chains.log = mark.last_hash;
    }

    fn settle(&mut self) {
        self.journal.clear();
    }

    /// Assigns the next sequence to `record` and chains its hashes.
    fn append(&mut self, record: &mut LogRecord) {
        let previous = self.chains.append(record);
        self.journal.push((record.workspace_id.clone(), previous));
    }

    fn head(&self) -> (u64, Hash) {
        (self.chains.last_sequence, self.chains.log)
    }
}

/// The writer's surroundings.
pub(super) struct Writer {
    /// `None` after a failure: a connection whose transaction failed is never reused (SQLite
    /// may have rolled back by itself while the driver still thinks it is inside one), so the
    /// next attempt opens a new connection.
    pub conn: Option<SqliteConnection>,
    pub connect: SqliteConnectOptions,
    /// Held for as long as this writer may write.
    pub _lock: super::DatabaseLock,
    pub heads: Heads,
    pub clock: Arc<dyn Clock>,
    pub listener: Arc<dyn CommitListener>,
    pub committed: broadcast::Sender<Arc<LogRecord>>,
    pub writable: watch::Sender<bool>,
    /// A revoke destroyed an encrypted copy and the WAL still holds old frames with it.
    pub scrub_pending: bool,
    pub max_batch: usize,
}

/// How often a pending scrub of the WAL is retried while no writes come.
const SCRUB_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Commits batches until `stop` turns true; then refuses new writes, commits those already
/// queued, checkpoints the WAL into the database file, and returns.
pub(super) async fn run(
    mut writer: Writer,
    mut requests: mpsc::Receiver<Request>,
    mut stop: watch::Receiver<bool>,
) {
    let max_batch = writer.max_batch;
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let scrub_retry = tokio::time::sleep(if writer.scrub_pending {
            SCRUB_RETRY
        } else {
            std::time::Duration::MAX / 4
        });
        let first = tokio::select! {
            biased;
            first = requests.recv() => first,
            _ = stop.changed() => {
                requests.close();
                requests.recv().await
            }
            () = scrub_retry => {
                writer.scrub(SCRUB_BUSY_TIMEOUT).await;
                continue;
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < max_batch {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        commit_batch(&mut writer, &mut batch).await;
    }
    if writer.conn.is_some() {
        writer.scrub(super::BUSY_TIMEOUT).await;
    }
    if let Some(conn) = writer.conn.take()
        && let Err(e) = conn.close().await
    {
        tracing::warn!(error = %e, "closing the writer connection failed");
    }
}

/// How long a scrub between batches waits for readers of an older snapshot before it gives
/// up and tries again later: writes wait behind it.
const SCRUB_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// The outcome of one command: its key's new state.
type Outcome = Result<Written, StoreError>;

/// What a decided batch writes.
#[derive(Default)]
struct Effects {
    records: Vec<LogRecord>,
    /// Final state of every key the batch changed, in first-touched order.
    changed: Vec<KeyState>,
    sealed_inserts: Vec<(String, super::SealedSecret)>,
    sealed_deletes: Vec<String>,
    /// (workspace id, key id, request) of creates made with a request id.
    create_requests: Vec<(String, String, super::CreateRequest)>,
}

/// A create request id already answered, in the log or earlier in the batch.
#[derive(Clone)]
struct Answered {
    digest: Vec<u8>,
    key_id: String,
    sealed_secret: Option<Vec<u8>>,
}

/// The create request `request_id` of `workspace_id` made within the window, if any.
async fn answered_create(
    tx: &mut SqliteConnection,
    workspace_id: &str,
    request_id: &str,
    now: i64,
) -> Result<Option<Answered>, StoreError> {
    let row: Option<(Vec<u8>, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT request_digest, key_id, sealed_secret FROM create_requests \
         WHERE workspace_id = ? AND request_id = ? AND created_at >= ?",
    )
    .bind(workspace_id)
    .bind(request_id)
    .bind(now - CREATE_REQUEST_WINDOW_MS)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(|(digest, key_id, sealed_secret)| Answered {
        digest,
        key_id,
        sealed_secret,
    }))
}

/// Why [`write_batch`] failed.
enum Failure {
    /// Before COMMIT: nothing of the batch can have been written.
    Before(StoreError),
    /// COMMIT itself failed. Whether it landed is found out by reading the log back; if it
    /// did, the decided outcomes stand.
    AtCommit(StoreError, Vec<Outcome>),
}

async fn commit_batch(writer: &mut Writer, batch: &mut Vec<Request>) {
    let outcomes = match writer.attempt(batch).await {
        Ok(outcomes) => outcomes,
        Err(e) if batch.len() > 1 && !e.is_storage_fault() => {
            // The database refused the batch for a reason other than its storage: retry its
            // commands one per transaction, so that the one it refuses fails alone.
            tracing::warn!(error = %e, commands = batch.len(), "group commit failed; retrying its commands one by one");
            let mut outcomes = Vec::with_capacity(batch.len());
            for request in batch.iter_mut() {
                match writer.attempt(std::slice::from_mut(request)).await {
                    Ok(mut one) => outcomes.push(one.pop().expect("one outcome")),
                    Err(e) => outcomes.push(Err(e)),
                }
            }
            outcomes
        }
        Err(e) => {
            tracing::error!(error = %e, commands = batch.len(), "commit failed");
            vec![Err(e); batch.len()]
        }
    };
    // A revoke is answered once its encrypted copy is gone from the files too (unless
    // readers of an older snapshot hold the WAL; then within SCRUB_RETRY of their end).
    if writer.scrub_pending {
        writer.scrub(SCRUB_BUSY_TIMEOUT).await;
    }
    for (request, outcome) in batch.drain(..).zip(outcomes) {
        let _ = request.reply.send(outcome);
    }
}

impl Writer {
    /// Decides, writes and commits `batch` in one transaction. On success the listener and
    /// the live subscribers have been told; on error nothing of the batch is in the log, or
    /// (only for [`StoreError::OutcomeUnknown`]) it could not be told whether it is.
    async fn attempt(&mut self, batch: &mut [Request]) -> Result<Vec<Outcome>, StoreError> {
        let result = self.attempt_once(batch).await;
        let storage_failed = result.as_ref().is_err_and(StoreError::is_storage_fault);
        self.writable.send_if_modified(|writable| {
            let was = *writable;
            *writable = !storage_failed;
            was != *writable
        });
        result
    }

    async fn attempt_once(&mut self, batch: &mut [Request]) -> Result<Vec<Outcome>, StoreError> {
        if self.conn.is_none() {
            self.reconnect().await?;
        }
        let conn = self.conn.as_mut().expect("connected above");
        let before = self.heads.mark();
        let now = self.clock.now_ms();
        match write_batch(conn, &mut self.heads, now, batch).await {
            Ok((outcomes, effects)) => {
                self.heads.settle();
                self.publish(&effects.changed, effects.records);
                self.scrub_pending |= !effects.sealed_deletes.is_empty();
                Ok(outcomes)
            }
            Err(Failure::Before(e)) => {
                self.heads.rollback(before);
                self.drop_connection().await;
                Err(e)
            }
            Err(Failure::AtCommit(e, outcomes)) => {
                let landed = self.heads.head();
                self.heads.rollback(before);
                self.drop_connection().await;
                // Reconnecting reads the log back and catches up with whatever is in it, so
                // if the commit landed after all, the cache and subscribers now have it.
                if let Err(again) = self.reconnect().await {
                    tracing::error!(error = %again, "cannot read the log back after a failed commit");
                    return Err(StoreError::OutcomeUnknown(e.to_string()));
                }
                if self.heads.head() == landed {
                    tracing::warn!(error = %e, "the commit reported an error but is in the log");
                    self.scrub_pending = true;
                    Ok(outcomes)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Hands committed states to the listener and records to live subscribers.
    fn publish(&self, changed: &[KeyState], records: Vec<LogRecord>) {
        if !changed.is_empty() {
            self.listener.committed(changed);
        }
        for record in records {
            // No subscriber is not an error.
            let _ = self.committed.send(Arc::new(record));
        }
    }

    async fn drop_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing rolls back whatever SQLite still holds open.
            let _ = conn.close().await;
        }
    }

    /// Opens a new connection and catches up with the log: anything committed beyond the
    /// heads this writer knows (a commit that reported failure but landed) is folded into
    /// the listener's state and sent to subscribers, and the heads are read from the log.
    async fn reconnect(&mut self) -> Result<(), StoreError> {
        let mut conn = SqliteConnection::connect_with(&self.connect).await?;
        let known = self.heads.chains.last_sequence;
        let mut after = known;
        loop {
            let records =
                super::read_records(&mut conn, after, 1024, &super::RecordFilter::default())
                    .await?;
            let Some(last) = records.last() else { break };
            after = last.sequence;
            let mut keys: Vec<&str> = records.iter().map(|r| r.key_id.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            let mut states = Vec::with_capacity(keys.len());
            for key in keys {
                let key_id = crate::domain::KeyId::parse(key)
                    .map_err(|e| StoreError::Internal(format!("key_id {key} in the log: {e}")))?;
                if let Some(state) = load_stream(&mut conn, key_id).await? {
                    states.push(state);
                }
            }
            self.publish(&states, records);
        }
        if after != known {
            tracing::warn!(
                from = known + 1,
                to = after,
                "caught up with records committed by a commit that reported failure"
            );
        }
        self.heads = super::load_heads(&mut conn).await?;
        self.conn = Some(conn);
        Ok(())
    }

    /// Checkpoints the WAL into the database file and truncates it, so that frames holding
    /// a destroyed encrypted copy are gone from disk. Readers of an older snapshot make the
    /// checkpoint incomplete; it is then retried.
    async fn scrub(&mut self, wait: std::time::Duration) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let result: Result<(i64, i64, i64), sqlx::Error> = async {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA busy_timeout = {}",
                wait.as_millis()
            )))
            .execute(&mut *conn)
            .await?;
            let row = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *conn)
                .await;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA busy_timeout = {}",
                super::BUSY_TIMEOUT.as_millis()
            )))
            .execute(&mut *conn)
            .await?;
            row
        }
        .await;
        match result {
            Ok((0, _, _)) => self.scrub_pending = false,
            Ok(_) => tracing::debug!("WAL checkpoint incomplete (readers); retrying"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
        }
    }
}

/// Decides every command of `batch` against the state the commands before it left, then
/// appends the events, writes the touched rows and commits, all in one transaction.
async fn write_batch(
    conn: &mut SqliteConnection,
    heads: &mut Heads,
    now: i64,
    batch: &mut [Request],
) -> Result<(Vec<Outcome>, Effects), Failure> {
    let mut tx = conn.begin().await.map_err(|e| Failure::Before(e.into()))?;
    let (outcomes, effects) = decide_batch(&mut tx, heads, now, batch)
        .await
        .map_err(Failure::Before)?;
    write_effects(&mut tx, heads, &effects)
        .await
        .map_err(|e| Failure::Before(e.into()))?;
    match tx.commit().await {
        Ok(()) => Ok((outcomes, effects)),
        Err(e) => Err(Failure::AtCommit(e.into(), outcomes)),
    }
}

async fn decide_batch(
    tx: &mut SqliteConnection,
    heads: &mut Heads,
    now: i64,
    batch: &mut [Request],
) -> Result<(Vec<Outcome>, Effects), StoreError> {
    let mut touched: HashMap<String, Option<KeyState>> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut effects = Effects::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    // Create request ids answered earlier in this batch.
    let mut answered: HashMap<(String, String), Answered> = HashMap::new();
    for request in batch.iter_mut() {
        let write = &mut request.write;
        if let Some(create) = &write.create_request {
            let slot = (write.workspace_id.to_string(), create.request_id.clone());
            let earlier = match answered.get(&slot) {
                Some(earlier) => Some(earlier.clone()),
                None => answered_create(tx, &slot.0, &slot.1, now).await?,
            };
            if let Some(earlier) = earlier {
                outcomes.push(replay(tx, &touched, earlier, &create.digest).await?);
                continue;
            }
        }
        let key = write.key_id.to_string();
        let current = match touched.get(&key) {
            Some(state) => state.clone(),
            None if matches!(write.command, Command::Create(_)) => None,
            None => match load_stream(tx, write.key_id).await {
                Ok(state) => state,
                // The storage failing fails the batch; anything else fails this command.
                Err(e) if e.is_storage_fault() => return Err(e),
                Err(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
            },
        };
        // A key of another workspace does not exist for this caller.
        let visible = current
            .clone()
            .filter(|s| s.workspace_id == write.workspace_id);
        let events = match domain::decide(visible.as_ref(), &write.command) {
            Ok(events) => events,
            Err(e) => {
                outcomes.push(Err(e.into()));
                continue;
            }
        };
        let mut state = visible;
        let changed = !events.is_empty();
        for event in events {
            let stream_version = state.as_ref().map_or(1, |s| s.stream_version + 1);
            match &event {
                Event::KeyCreated(_) => {
                    // Cloned, not taken: if this batch fails, the command is retried alone
                    // and must still carry its copy.
                    if let Some(sealed) = &write.sealed_secret {
                        effects.sealed_inserts.push((key.clone(), sealed.clone()));
                    }
                }
                Event::KeyRevoked => effects.sealed_deletes.push(key.clone()),
                _ => {}
            }
            let encoded = events::encode_event(&event);
            let mut record = LogRecord {
                sequence: 0,
                key_id: key.clone(),
                workspace_id: write.workspace_id.to_string(),
                stream_version,
                event_type: encoded.event_type.to_owned(),
                schema_version: encoded.schema_version,
                payload: encoded.payload,
                actor: write.actor.clone(),
                recorded_at_ms: now,
                hash: [0; 32],
                workspace_hash: [0; 32],
            };
            heads.append(&mut record);
            effects.records.push(record);
            let recorded = Recorded {
                event,
                actor: write.actor.clone(),
                recorded_at_ms: now,
                stream_version,
            };
            // decide and apply disagreeing is a bug, never a partial write: the whole batch
            // is abandoned so no record of this command is kept.
            state = Some(domain::apply(state.take(), &recorded).map_err(|e| {
                StoreError::Internal(format!("apply refused a decided event: {e}"))
            })?);
        }
        let Some(state) = state else {
            outcomes.push(Err(StoreError::Domain(domain::DomainError::NotFound)));
            continue;
        };
        if let Some(create) = write.create_request.as_ref().filter(|_| changed) {
            answered.insert(
                (write.workspace_id.to_string(), create.request_id.clone()),
                Answered {
                    digest: create.digest.to_vec(),
                    key_id: key.clone(),
                    sealed_secret: Some(create.sealed_secret.clone()),
                },
            );
            effects.create_requests.push((
                write.workspace_id.to_string(),
                key.clone(),
                create.clone(),
            ));
        }
        if changed {
            if !touched.contains_key(&key) {
                order.push(key.clone());
            }
            touched.insert(key, Some(state.clone()));
        }
        outcomes.push(Ok(Written {
            state,
            replayed: None,
        }));
    }
    effects.changed = order
        .iter()
        .filter_map(|k| touched.get(k).cloned().flatten())
        .collect();
    Ok((outcomes, effects))
}

/// The answer to a create whose request id was answered before: that key as it is now, or a
/// refusal when the id came with another request.
async fn replay(
    tx: &mut SqliteConnection,
    touched: &HashMap<String, Option<KeyState>>,
    earlier: Answered,
    digest: &[u8; 32],
) -> Result<Outcome, StoreError> {
    if earlier.digest != digest {
        return Ok(Err(StoreError::RequestIdReused));
    }
    let state = match touched.get(&earlier.key_id) {
        Some(state) => state.clone(),
        None => {
            let key_id = crate::domain::KeyId::parse(&earlier.key_id).map_err(|e| {
                StoreError::Internal(format!("create_requests key_id {}: {e}", earlier.key_id))
            })?;
            load_stream(tx, key_id).await?
        }
    };
    let state = state.ok_or_else(|| {
        StoreError::Internal(format!(
            "create request of {} names no key in the log",
            earlier.key_id
        ))
    })?;
    Ok(Ok(Written {
        state,
        replayed: Some(Replayed {
            sealed_secret: earlier.sealed_secret,
        }),
    }))
}

async fn write_effects(
    tx: &mut SqliteConnection,
    heads: &Heads,
    effects: &Effects,
) -> Result<(), sqlx::Error> {
    insert_records(tx, &effects.records).await?;
    project_many(tx, &effects.changed).await?;
    for (key_id, sealed) in &effects.sealed_inserts {
        sqlx::query("INSERT INTO sealed_secrets (key_id, sealed, master_key_id) VALUES (?, ?, ?)")
            .bind(key_id)
            .bind(&sealed.sealed)
            .bind(&sealed.master_key_id)
            .execute(&mut *tx)
            .await?;
    }
    for key_id in &effects.sealed_deletes {
        sqlx::query("DELETE FROM sealed_secrets WHERE key_id = ?")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE create_requests SET sealed_secret = NULL WHERE key_id = ?")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
    }
    if !effects.create_requests.is_empty() {
        let now = effects.records.last().map_or(0, |r| r.recorded_at_ms);
        // Forget request ids past the window (and their sealed secrets) as new ones come.
        sqlx::query("DELETE FROM create_requests WHERE created_at < ?")
            .bind(now - CREATE_REQUEST_WINDOW_MS)
            .execute(&mut *tx)
            .await?;
        for (workspace_id, key_id, create) in &effects.create_requests {
            sqlx::query(
                "INSERT INTO create_requests (workspace_id, request_id, request_digest, key_id, \
                 sealed_secret, created_at) VALUES (?, ?, ?, ?, ?, ?) \
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
            .execute(&mut *tx)
            .await?;
        }
    }
    if !effects.records.is_empty() {
        sqlx::query("UPDATE projection_checkpoint SET last_sequence = ? WHERE id = 1")
            .bind(i64::try_from(heads.chains.last_sequence).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Splits `rows` into chunks of 256, 64, 16, 4 and 1 rows. Multi-row statements save a round
/// trip to SQLite's thread per row (256 rows of the projection bind 5120 values, well under
/// SQLite's limit); keeping to five shapes keeps every statement in sqlx's prepared-statement
/// cache instead of preparing a new text for every batch size.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let size = [256, 64, 16, 4, 1].into_iter().find(|&s| rows.len() >= s)?;
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

async fn insert_records(
    conn: &mut SqliteConnection,
    records: &[LogRecord],
) -> Result<(), sqlx::Error> {
    for chunk in chunks(records) {
        let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO events (sequence, key_id, workspace_id, stream_version, event_type, \
             schema_version, payload, actor, recorded_at, hash, workspace_hash) VALUES {values}"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            query = query
                .bind(i64::try_from(r.sequence).unwrap_or(i64::MAX))
                .bind(&r.key_id)
                .bind(&r.workspace_id)
                .bind(i64::try_from(r.stream_version).unwrap_or(i64::MAX))
                .bind(&r.event_type)
                .bind(i64::from(r.schema_version))
                .bind(&r.payload)
                .bind(&r.actor)
                .bind(r.recorded_at_ms)
                .bind(&r.hash[..])
                .bind(&r.workspace_hash[..]);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes keys' states into the projection, a few hundred rows per statement. The one row
/// encoding, shared by the live path and [`super::rebuild`].
pub(super) async fn project_many(
    conn: &mut SqliteConnection,
    states: &[KeyState],
) -> Result<(), sqlx::Error> {
    let columns = KEY_COLUMNS.split(',').count();
    let row = format!("({})", vec!["?"; columns].join(", "));
    let updates = KEY_COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| *c != "key_id")
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    for chunk in chunks(states) {
        let values = vec![row.as_str(); chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO keys ({KEY_COLUMNS}) VALUES {values} \
             ON CONFLICT (key_id) DO UPDATE SET {updates}"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for state in chunk {
            query = rows::bind_state(query, state);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_use_five_shapes_and_cover_every_row() {
        let rows: Vec<usize> = (0..407).collect();
        let sizes: Vec<usize> = chunks(&rows).map(<[usize]>::len).collect();
        assert_eq!(sizes, [256, 64, 64, 16, 4, 1, 1, 1]);
        let flat: Vec<usize> = chunks(&rows).flatten().copied().collect();
        assert_eq!(flat, rows);
        assert_eq!(chunks::<u8>(&[]).count(), 0);
    }
}
