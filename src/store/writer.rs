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
//! If the database fails during a batch, nothing of it is kept, and its commands are retried
//! one per transaction, so that a command the database refuses fails alone.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{Connection, SqliteConnection};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::codec::{self, KEY_COLUMNS};
use super::{StoreError, Write, load_stream};
use crate::audit::chain::{self, Hash, LogRecord};
use crate::clock::Clock;
use crate::domain::{self, Command, Event, KeyState, Recorded};

/// Told of every committed change, in commit order, before the writer answers its callers.
/// Must not block: it runs on the writer's task.
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, states: &[KeyState]);
}

pub(super) struct Request {
    pub write: Write,
    pub reply: oneshot::Sender<Result<KeyState, StoreError>>,
}

/// The heads of the hash chains, as of the last appended record (committed or, inside a
/// batch, not yet). Changes made in a batch are journaled so a rolled-back command or batch
/// restores exactly what it changed.
pub(super) struct Heads {
    pub last_sequence: u64,
    pub last_hash: Hash,
    pub workspaces: HashMap<String, Hash>,
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
    pub fn new(last_sequence: u64, last_hash: Hash, workspaces: HashMap<String, Hash>) -> Heads {
        Heads {
            last_sequence,
            last_hash,
            workspaces,
            journal: Vec::new(),
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            journal: self.journal.len(),
            last_sequence: self.last_sequence,
            last_hash: self.last_hash,
        }
    }

    fn rollback(&mut self, mark: Mark) {
        while self.journal.len() > mark.journal {
            let (workspace, previous) = self.journal.pop().expect("journal entry");
            match previous {
                Some(hash) => self.workspaces.insert(workspace, hash),
                None => self.workspaces.remove(&workspace),
            };
        }
        self.last_sequence = mark.last_sequence;
        self.last_hash = mark.last_hash;
    }

    fn settle(&mut self) {
        self.journal.clear();
    }

    /// Assigns the next sequence to `record` and chains its hashes.
    fn append(&mut self, record: &mut LogRecord) {
        record.sequence = self.last_sequence + 1;
        let canonical = chain::canonical_bytes(record);
        record.hash = chain::chain(&self.last_hash, &canonical);
        let previous = self.workspaces.get(&record.workspace_id).copied();
        let workspace_previous =
            previous.unwrap_or_else(|| chain::workspace_genesis(&record.workspace_id));
        record.workspace_hash = chain::chain(&workspace_previous, &canonical);
        self.journal.push((record.workspace_id.clone(), previous));
        self.workspaces
            .insert(record.workspace_id.clone(), record.workspace_hash);
        self.last_sequence = record.sequence;
        self.last_hash = record.hash;
    }
}

/// The writer's surroundings.
pub(super) struct Writer {
    pub conn: SqliteConnection,
    pub heads: Heads,
    pub clock: Arc<dyn Clock>,
    pub listener: Arc<dyn CommitListener>,
    pub committed: broadcast::Sender<Arc<LogRecord>>,
    pub max_batch: usize,
}

/// Commits batches until `stop` turns true; then refuses new writes, commits those already
/// queued, and returns.
pub(super) async fn run(
    mut writer: Writer,
    mut requests: mpsc::Receiver<Request>,
    mut stop: watch::Receiver<bool>,
) {
    let max_batch = writer.max_batch;
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let first = tokio::select! {
            biased;
            first = requests.recv() => first,
            _ = stop.changed() => {
                requests.close();
                requests.recv().await
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
    if let Err(e) = writer.conn.close().await {
        tracing::warn!(error = %e, "closing the writer connection failed");
    }
}

/// The outcome of one command: its key's new state.
type Outcome = Result<KeyState, StoreError>;

/// What a decided batch writes.
#[derive(Default)]
struct Effects {
    records: Vec<LogRecord>,
    /// Final state of every key the batch changed, in first-touched order.
    changed: Vec<KeyState>,
    sealed_inserts: Vec<(String, super::SealedSecret)>,
    sealed_deletes: Vec<String>,
}

async fn commit_batch(writer: &mut Writer, batch: &mut Vec<Request>) {
    let outcome = match try_commit(writer, batch).await {
        Ok(outcomes) => Ok(outcomes),
        Err(e) if batch.len() > 1 => {
            tracing::warn!(error = %e, commands = batch.len(), "group commit failed; retrying its commands one by one");
            let mut outcomes = Vec::with_capacity(batch.len());
            for request in batch.iter_mut() {
                match try_commit(writer, std::slice::from_mut(request)).await {
                    Ok(mut one) => outcomes.push(one.pop().expect("one outcome")),
                    Err(e) => outcomes.push(Err(StoreError::from(e))),
                }
            }
            Ok(outcomes)
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(outcomes) => {
            for (request, outcome) in batch.drain(..).zip(outcomes) {
                let _ = request.reply.send(outcome);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "commit failed; nothing of it was written");
            for request in batch.drain(..) {
                let _ = request
                    .reply
                    .send(Err(StoreError::Internal(format!("commit failed: {e}"))));
            }
        }
    }
}

/// Decides, writes and commits `batch` in one transaction. On success the listener and the
/// live subscribers have been told; on error nothing was written and the chain heads are as
/// before.
async fn try_commit(
    writer: &mut Writer,
    batch: &mut [Request],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mark = writer.heads.mark();
    let result = decide_and_write(writer, batch).await;
    match result {
        Ok((outcomes, effects)) => {
            writer.heads.settle();
            if !effects.changed.is_empty() {
                writer.listener.committed(&effects.changed);
            }
            for record in effects.records {
                // No subscriber is not an error.
                let _ = writer.committed.send(Arc::new(record));
            }
            Ok(outcomes)
        }
        Err(e) => {
            writer.heads.rollback(mark);
            Err(e)
        }
    }
}

async fn decide_and_write(
    writer: &mut Writer,
    batch: &mut [Request],
) -> Result<(Vec<Outcome>, Effects), sqlx::Error> {
    let mut tx = writer.conn.begin().await?;
    let now = writer.clock.now_ms();
    let mut touched: HashMap<String, Option<KeyState>> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut effects = Effects::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch.iter_mut() {
        let write = &mut request.write;
        let key = write.key_id.to_string();
        let current = match touched.get(&key) {
            Some(state) => state.clone(),
            None if matches!(write.command, Command::Create(_)) => None,
            None => match load_stream(&mut tx, write.key_id).await {
                Ok(state) => state,
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
        let mut failed = None;
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
            let encoded = codec::encode_event(&event);
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
            writer.heads.append(&mut record);
            effects.records.push(record);
            let recorded = Recorded {
                event,
                actor: write.actor.clone(),
                recorded_at_ms: now,
                stream_version,
            };
            match domain::apply(state.take(), &recorded) {
                Ok(next) => state = Some(next),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // decide and apply disagree: a bug, never a partial write. The whole batch is
            // abandoned so no record of this command is kept.
            return Err(sqlx::Error::Protocol(format!(
                "apply refused a decided event: {e}"
            )));
        }
        let Some(state) = state else {
            outcomes.push(Err(StoreError::Domain(domain::DomainError::NotFound)));
            continue;
        };
        if changed {
            if !touched.contains_key(&key) {
                order.push(key.clone());
            }
            touched.insert(key, Some(state.clone()));
        }
        outcomes.push(Ok(state));
    }

    effects.changed = order
        .iter()
        .filter_map(|k| touched.get(k).cloned().flatten())
        .collect();
    insert_records(&mut tx, &effects.records).await?;
    project_many(&mut tx, &effects.changed).await?;
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
    }
    if !effects.records.is_empty() {
        sqlx::query("UPDATE projection_checkpoint SET last_sequence = ? WHERE id = 1")
            .bind(i64::try_from(writer.heads.last_sequence).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((outcomes, effects))
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
            query = codec::bind_state(query, state);
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
