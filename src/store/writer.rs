//! The single writer: group commit.
//!
//! Commands queue on a channel. The writer takes the first, then every other already waiting
//! (up to `max_batch`), and runs them all in one transaction: for each, it folds the key's
//! stream, asks the domain to decide, appends the events and updates the projection, inside a
//! savepoint so that one failing command leaves the others intact. After the single COMMIT
//! (one fsync for the whole batch under synchronous=FULL) it hands the new states to the
//! commit listener (the verification cache) in commit order, and only then answers each
//! caller. A caller is therefore never told "done" before its event is durable, and Verify
//! on this server reflects the change before the caller hears back.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{Connection, SqliteConnection};
use tokio::sync::{broadcast, mpsc, oneshot};

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

pub(super) async fn run(mut writer: Writer, mut requests: mpsc::Receiver<Request>) {
    let max_batch = writer.max_batch;
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = requests.recv().await {
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

async fn commit_batch(writer: &mut Writer, batch: &mut Vec<Request>) {
    let mut outcomes: Vec<Result<(KeyState, bool), StoreError>> = Vec::with_capacity(batch.len());
    let mut records: Vec<LogRecord> = Vec::new();
    let batch_mark = writer.heads.mark();
    let committed = async {
        let mut tx = writer.conn.begin().await?;
        for request in batch.iter_mut() {
            let mark = writer.heads.mark();
            let appended = records.len();
            let mut savepoint = tx.begin().await?;
            let now = writer.clock.now_ms();
            match apply_one(
                &mut savepoint,
                &mut request.write,
                now,
                &mut writer.heads,
                &mut records,
            )
            .await
            {
                Ok((state, changed)) => {
                    savepoint.commit().await?;
                    outcomes.push(Ok((state, changed)));
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    writer.heads.rollback(mark);
                    records.truncate(appended);
                    outcomes.push(Err(e));
                }
            }
        }
        if !records.is_empty() {
            sqlx::query("UPDATE projection_checkpoint SET last_sequence = ? WHERE id = 1")
                .bind(i64::try_from(writer.heads.last_sequence).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;

    if let Err(e) = committed {
        writer.heads.rollback(batch_mark);
        tracing::error!(error = %e, commands = batch.len(), "group commit failed; nothing of it was written");
        for request in batch.drain(..) {
            let _ = request
                .reply
                .send(Err(StoreError::Internal(format!("commit failed: {e}"))));
        }
        return;
    }
    let changed: Vec<KeyState> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok((state, true)) => Some(state.clone()),
            _ => None,
        })
        .collect();
    writer.heads.settle();
    if !changed.is_empty() {
        writer.listener.committed(&changed);
    }
    for record in records {
        // No subscriber is not an error.
        let _ = writer.committed.send(Arc::new(record));
    }
    for (request, outcome) in batch.drain(..).zip(outcomes) {
        let _ = request.reply.send(outcome.map(|(state, _)| state));
    }
}

/// Decides and records one command. Returns the new state and whether anything was appended;
/// the appended records are pushed onto `records`.
async fn apply_one(
    conn: &mut SqliteConnection,
    write: &mut Write,
    now: i64,
    heads: &mut Heads,
    records: &mut Vec<LogRecord>,
) -> Result<(KeyState, bool), StoreError> {
    let current = load_stream(conn, write.key_id)
        .await?
        // A key of another workspace does not exist for this caller.
        .filter(|s| {
            s.workspace_id == write.workspace_id || matches!(write.command, Command::Create(_))
        });
    let events = domain::decide(current.as_ref(), &write.command)?;
    let changed = !events.is_empty();
    let mut state = current;
    for event in events {
        let stream_version = state.as_ref().map_or(1, |s| s.stream_version + 1);
        let encoded = codec::encode_event(&event);
        let mut record = LogRecord {
            sequence: 0,
            key_id: write.key_id.to_string(),
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
        insert_record(conn, &record).await?;
        records.push(record);
        match &event {
            Event::KeyCreated(_) => {
                if let Some(sealed) = write.sealed_secret.take() {
                    sqlx::query(
                        "INSERT INTO sealed_secrets (key_id, sealed, master_key_id) VALUES (?, ?, ?)",
                    )
                    .bind(write.key_id.to_string())
                    .bind(sealed.sealed)
                    .bind(sealed.master_key_id)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Event::KeyRevoked => {
                sqlx::query("DELETE FROM sealed_secrets WHERE key_id = ?")
                    .bind(write.key_id.to_string())
                    .execute(&mut *conn)
                    .await?;
            }
            Event::KeyRenamed { .. } | Event::KeyScopesChanged { .. } | Event::KeyRevealed => {}
        }
        let recorded = Recorded {
            event,
            actor: write.actor.clone(),
            recorded_at_ms: now,
            stream_version,
        };
        state = Some(domain::apply(state, &recorded).map_err(StoreError::Internal)?);
    }
    let state = state.ok_or(StoreError::Domain(domain::DomainError::NotFound))?;
    if changed {
        project(conn, &state).await?;
    }
    Ok((state, changed))
}

async fn insert_record(conn: &mut SqliteConnection, r: &LogRecord) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (sequence, key_id, workspace_id, stream_version, event_type, \
         schema_version, payload, actor, recorded_at, hash, workspace_hash) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
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
    .bind(&r.workspace_hash[..])
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes a key's state into the projection. The one row encoding, shared by the live path
/// and [`super::rebuild`].
pub(super) async fn project(
    conn: &mut SqliteConnection,
    state: &KeyState,
) -> Result<(), sqlx::Error> {
    let placeholders = vec!["?"; KEY_COLUMNS.split(',').count()].join(", ");
    let sql = format!("INSERT OR REPLACE INTO keys ({KEY_COLUMNS}) VALUES ({placeholders})");
    codec::bind_state(sqlx::query(sqlx::AssertSqlSafe(sql)), state)
        .execute(conn)
        .await?;
    Ok(())
}
