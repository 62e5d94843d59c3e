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

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::Instrument as _;

use super::backend::{Backend, Effects, WriteSession};
use super::follow::Follower;
use super::plan::{self, Heads};
use super::{Cause, RecordFilter, StoreError, Write, Written};
use crate::clock::Clock;
use crate::domain::KeyState;
use crate::log::chain::LogRecord;
use crate::telemetry;

/// Told of every committed change, in commit order, before the writer answers its callers.
/// Must not block: it runs on the writer's task.
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, states: &[KeyState]);
}

pub(super) struct Request {
    pub write: Write,
    pub reply: oneshot::Sender<Result<Written, StoreError>>,
    /// The span of the call that asked: a traced one parents the batch's span.
    pub span: tracing::Span,
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
    /// For a shared log: where committed records go instead of straight to the listener, so
    /// that they are applied in order with the other replicas' records.
    pub follower: Option<Arc<Follower>>,
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
    telemetry::metrics()
        .log_head
        .store(writer.heads.chains.last_sequence, Relaxed);
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
pub(super) type Outcome = Result<Written, StoreError>;

/// Why [`write_batch`] failed.
enum Failure {
    /// Before COMMIT: nothing of the batch can have been written.
    Before(StoreError),
    /// COMMIT itself failed. Whether it landed is found out by reading the log back; if it
    /// did, the decided outcomes stand.
    AtCommit(StoreError, Vec<Outcome>),
}

/// The span of a batch's commit: a child of the first traced call in it, linked to the other
/// traced ones; disabled when none is traced (an untraced write must not start a trace).
fn batch_span(batch: &[Request]) -> tracing::Span {
    let mut traced = batch
        .iter()
        .filter(|r| telemetry::traces::is_traced(&r.span));
    let Some(first) = traced.next() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        target: telemetry::traces::TRACED,
        parent: &first.span,
        "writer.commit",
        otel.name = "kemon.writer.commit",
        otel.status_code = tracing::field::Empty,
        kemon.batch_size = batch.len()
    );
    for other in traced {
        span.follows_from(&other.span);
    }
    span
}

async fn commit_batch(writer: &mut Writer, batch: &mut Vec<Request>) {
    let span = batch_span(batch);
    let started = std::time::Instant::now();
    let size = batch.len();
    let outcomes = commit_in(writer, batch).instrument(span.clone()).await;
    telemetry::metrics().batch(size, started.elapsed());
    if outcomes
        .iter()
        .any(|o| o.as_ref().is_err_and(StoreError::is_storage_fault))
    {
        span.record("otel.status_code", "error");
    }
    // A revoke is answered once its encrypted copy is gone from the files too (unless
    // readers of an older snapshot hold the WAL; then within SCRUB_RETRY of their end).
    if writer.scrub_pending {
        writer.scrub(SCRUB_BUSY_TIMEOUT).await;
    }
    for (request, outcome) in batch.drain(..).zip(outcomes) {
        let _ = request.reply.send(outcome);
    }
}

/// Commits `batch`, or its commands one by one when the database refused it for a reason
/// other than its storage.
async fn commit_in(writer: &mut Writer, batch: &mut [Request]) -> Vec<Outcome> {
    match writer.attempt(batch).await {
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
    }
}

impl Writer {
    /// Decides, writes and commits `batch` in one transaction. On success the listener and
    /// the live subscribers have been told; on error nothing of the batch is in the log, or
    /// (only for [`StoreError::OutcomeUnknown`]) it could not be told whether it is.
    async fn attempt(&mut self, batch: &mut [Request]) -> Result<Vec<Outcome>, StoreError> {
        let result = self.attempt_once(batch).await;
        let storage_failed = result.as_ref().is_err_and(StoreError::is_storage_fault);
        let metrics = telemetry::metrics();
        if storage_failed {
            metrics.storage_failures.fetch_add(1, Relaxed);
        } else if result.is_ok() {
            metrics
                .log_head
                .store(self.heads.chains.last_sequence, Relaxed);
        }
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
        match write_batch(
            session.as_mut(),
            self.follower.is_some(),
            &mut self.heads,
            now,
            batch,
        )
        .await
        {
            Ok((outcomes, effects, destroyed)) => {
                self.heads.settle();
                self.publish(&effects.changed, effects.records).await;
                self.scrub_pending |= destroyed;
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
                let found = match self.reconnect().await {
                    Ok(()) => self.holds(landed).await,
                    Err(again) => Err(again),
                };
                match found {
                    Err(again) => {
                        tracing::error!(error = %again, "cannot read the log back after a failed commit");
                        Err(StoreError::OutcomeUnknown(Cause::new(e)))
                    }
                    Ok(true) => {
                        tracing::warn!(error = %e, "the commit reported an error but is in the log");
                        self.scrub_pending = true;
                        if let Some(follower) = self.follower.clone() {
                            wait_applied(follower, landed.0).await;
                        }
                        Ok(outcomes)
                    }
                    Ok(false) => Err(e),
                }
            }
        }
    }

    /// Whether the log holds the record `(sequence, hash)`.
    async fn holds(
        &mut self,
        (sequence, hash): (u64, crate::log::chain::Hash),
    ) -> Result<bool, StoreError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(false);
        };
        let found = session
            .read_records(sequence.saturating_sub(1), 1, &RecordFilter::default())
            .await?;
        Ok(found
            .first()
            .is_some_and(|r| r.sequence == sequence && r.hash == hash))
    }

    /// Hands committed states to the listener and records to live subscribers. For a shared
    /// log, through the follower; when other replicas' records come first and the tailer
    /// has not applied them yet, it is woken and waited for.
    async fn publish(&mut self, changed: &[KeyState], records: Vec<LogRecord>) {
        if let Some(follower) = &self.follower {
            if !follower.deliver(&records, changed)
                && let Some(last) = records.last()
            {
                wait_applied(follower.clone(), last.sequence).await;
            }
            return;
        }
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
        // For a shared log the follower applies whatever landed, with the others' records.
        while self.follower.is_none() {
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
            self.publish(&states, records).await;
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

/// Waits for the tailer to apply records up to `sequence` (at most the staleness bound:
/// past it this replica refuses Verify anyway, so answering the writer is safe).
async fn wait_applied(follower: Arc<Follower>, sequence: u64) {
    follower.wake();
    if !follower.applied(sequence, follower.max_staleness).await {
        tracing::warn!(
            sequence,
            "the tailer has not applied this commit within max-staleness; answering anyway"
        );
    }
}

/// Decides every command of `batch` against the state the commands before it left, then
/// appends the events, writes the touched rows and commits, all in one transaction.
async fn write_batch(
    session: &mut dyn WriteSession,
    shared: bool,
    heads: &mut Heads,
    now: i64,
    batch: &mut [Request],
) -> Result<(Vec<Outcome>, Effects, bool), Failure> {
    session.begin().await.map_err(Failure::Before)?;
    if shared {
        catch_up_heads(session, heads)
            .await
            .map_err(Failure::Before)?;
    }
    let loaded = plan::load(session, batch, now)
        .await
        .map_err(Failure::Before)?;
    let (outcomes, effects) = plan::plan(loaded, heads, now, batch).map_err(Failure::Before)?;
    let destroyed = session.write(&effects).await.map_err(Failure::Before)?;
    match session.commit().await {
        Ok(()) => Ok((outcomes, effects, destroyed)),
        Err(e) => Err(Failure::AtCommit(e, outcomes)),
    }
}

/// Moves the heads past records other replicas appended since this writer's last batch. Runs
/// under the log's lock, so nothing can be appended meanwhile. Every failure drops the
/// session and the next attempt reloads the heads from the log, so this needs no journal.
async fn catch_up_heads(
    session: &mut dyn WriteSession,
    heads: &mut Heads,
) -> Result<(), StoreError> {
    loop {
        let records = session
            .read_records(heads.chains.last_sequence, 1024, &RecordFilter::default())
            .await?;
        if records.is_empty() {
            return Ok(());
        }
        for record in &records {
            heads.chains.advance(record);
        }
    }
}
