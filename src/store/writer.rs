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

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::backend::{Answered, Backend, Effects, WriteSession};
use super::{CREATE_REQUEST_WINDOW_MS, Cause, RecordFilter, Replayed, StoreError, Write, Written};
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
    /// `None` after a failure: a session whose transaction failed is never reused (SQLite
    /// may have rolled back by itself while the driver still thinks it is inside one), so the
    /// next attempt opens a new one.
    pub session: Option<Box<dyn WriteSession>>,
    pub backend: Arc<dyn Backend>,
    pub heads: Heads,
    pub clock: Arc<dyn Clock>,
    pub listener: Arc<dyn CommitListener>,
    pub committed: broadcast::Sender<Arc<LogRecord>>,
    pub writable: watch::Sender<bool>,
    /// A revoke destroyed an encrypted copy and the WAL still holds old frames with it.
    pub scrub_pending: bool,
    pub max_batch: usize,
}

/// How long the scrub at a clean stop waits for readers: none are left by then.
const FINAL_SCRUB_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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
    if writer.session.is_some() {
        writer.scrub(FINAL_SCRUB_WAIT).await;
    }
    if let Some(session) = writer.session.take() {
        session.close().await;
    }
}

/// How long a scrub between batches waits for readers of an older snapshot before it gives
/// up and tries again later: writes wait behind it.
const SCRUB_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// The outcome of one command: its key's new state.
type Outcome = Result<Written, StoreError>;

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
        if self.session.is_none() {
            self.reconnect().await?;
        }
        let session = self.session.as_mut().expect("connected above");
        let before = self.heads.mark();
        let now = self.clock.now_ms();
        match write_batch(session.as_mut(), &mut self.heads, now, batch).await {
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
                    return Err(StoreError::OutcomeUnknown(Cause::new(e)));
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
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }

    /// Opens a new session and catches up with the log: anything committed beyond the heads
    /// this writer knows (a commit that reported failure but landed) is folded into the
    /// listener's state and sent to subscribers, and the heads are read from the log.
    async fn reconnect(&mut self) -> Result<(), StoreError> {
        let mut session = self.backend.write_session().await?;
        let known = self.heads.chains.last_sequence;
        let mut after = known;
        loop {
            let records = session
                .read_records(after, 1024, &RecordFilter::default())
                .await?;
            let Some(last) = records.last() else { break };
            after = last.sequence;
            let mut keys: Vec<&str> = records.iter().map(|r| r.key_id.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            let mut states = Vec::with_capacity(keys.len());
            for key in keys {
                let key_id = crate::domain::KeyId::parse(key)
                    .map_err(|e| StoreError::Corrupt(format!("key_id {key} in the log: {e}")))?;
                if let Some(state) = session.load_stream(key_id).await? {
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
        self.heads = Heads::new(session.chains().await?);
        self.session = Some(session);
        Ok(())
    }

    /// Makes a destroyed encrypted copy unrecoverable from the files; readers of an older
    /// snapshot make it incomplete, and it is then retried.
    async fn scrub(&mut self, wait: std::time::Duration) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match session.scrub(wait).await {
            Ok(true) => self.scrub_pending = false,
            Ok(false) => tracing::debug!("scrub incomplete (readers); retrying"),
            Err(e) => tracing::warn!(error = %e, "scrub failed; retrying"),
        }
    }
}

/// Decides every command of `batch` against the state the commands before it left, then
/// appends the events, writes the touched rows and commits, all in one transaction.
async fn write_batch(
    session: &mut dyn WriteSession,
    heads: &mut Heads,
    now: i64,
    batch: &mut [Request],
) -> Result<(Vec<Outcome>, Effects), Failure> {
    session.begin().await.map_err(Failure::Before)?;
    let (outcomes, effects) = decide_batch(session, heads, now, batch)
        .await
        .map_err(Failure::Before)?;
    session.write(&effects).await.map_err(Failure::Before)?;
    match session.commit().await {
        Ok(()) => Ok((outcomes, effects)),
        Err(e) => Err(Failure::AtCommit(e, outcomes)),
    }
}

async fn decide_batch(
    tx: &mut dyn WriteSession,
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
                None => {
                    tx.answered_create(&slot.0, &slot.1, now - CREATE_REQUEST_WINDOW_MS)
                        .await?
                }
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
            None => match tx.load_stream(write.key_id).await {
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
                StoreError::Invariant(format!("apply refused a decided event: {e}"))
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
    tx: &mut dyn WriteSession,
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
                StoreError::Corrupt(format!("create_requests key_id {}: {e}", earlier.key_id))
            })?;
            tx.load_stream(key_id).await?
        }
    };
    let state = state.ok_or_else(|| {
        StoreError::Corrupt(format!(
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
