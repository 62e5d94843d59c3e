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

use std::sync::Arc;

use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, KEY_COLUMNS};
use super::{StoreError, Write, load_stream};
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

pub(super) async fn run(
    mut conn: SqliteConnection,
    mut requests: mpsc::Receiver<Request>,
    clock: Arc<dyn Clock>,
    listener: Arc<dyn CommitListener>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = requests.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch, clock.as_ref(), listener.as_ref()).await;
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the writer connection failed");
    }
}

async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &mut Vec<Request>,
    clock: &dyn Clock,
    listener: &dyn CommitListener,
) {
    let mut outcomes: Vec<Result<(KeyState, bool), StoreError>> = Vec::with_capacity(batch.len());
    let committed = async {
        let mut tx = conn.begin().await?;
        let mut last_sequence = None;
        for request in batch.iter_mut() {
            let mut savepoint = tx.begin().await?;
            match apply_one(&mut savepoint, &mut request.write, clock).await {
                Ok((state, sequence)) => {
                    savepoint.commit().await?;
                    last_sequence = sequence.or(last_sequence);
                    outcomes.push(Ok((state, sequence.is_some())));
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    outcomes.push(Err(e));
                }
            }
        }
        if let Some(sequence) = last_sequence {
            sqlx::query("UPDATE projection_checkpoint SET last_sequence = ? WHERE id = 1")
                .bind(sequence)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;

    if let Err(e) = committed {
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
    if !changed.is_empty() {
        listener.committed(&changed);
    }
    for (request, outcome) in batch.drain(..).zip(outcomes) {
        let _ = request.reply.send(outcome.map(|(state, _)| state));
    }
}

/// Decides and records one command. Returns the new state and the last sequence appended
/// (`None` when the command changed nothing).
async fn apply_one(
    conn: &mut SqliteConnection,
    write: &mut Write,
    clock: &dyn Clock,
) -> Result<(KeyState, Option<i64>), StoreError> {
    let current = load_stream(conn, write.key_id)
        .await?
        // A key of another workspace does not exist for this caller.
        .filter(|s| {
            s.workspace_id == write.workspace_id || matches!(write.command, Command::Create(_))
        });
    let events = domain::decide(current.as_ref(), &write.command)?;
    let now = clock.now_ms();
    let mut state = current;
    let mut last_sequence = None;
    for event in events {
        let stream_version = state.as_ref().map_or(1, |s| s.version + 1);
        let encoded = codec::encode_event(&event);
        let sequence: i64 = sqlx::query_scalar(
            "INSERT INTO events (key_id, workspace_id, stream_version, event_type, \
             schema_version, payload, actor, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             RETURNING sequence",
        )
        .bind(write.key_id.to_string())
        .bind(write.workspace_id.as_str())
        .bind(i64::try_from(stream_version).unwrap_or(i64::MAX))
        .bind(encoded.event_type)
        .bind(i64::from(encoded.schema_version))
        .bind(encoded.payload)
        .bind(write.actor.as_str())
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
        last_sequence = Some(sequence);
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
            Event::KeyRenamed { .. } | Event::KeyScopesChanged { .. } => {}
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
    if last_sequence.is_some() {
        project(conn, &state).await?;
    }
    Ok((state, last_sequence))
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
