//! Bulk work on SQLite through rusqlite: loading every key at start-up, reading a whole log for
//! the audit tools, and rebuilding the projection.
//!
//! sqlx runs each connection on a worker thread of its own and hands every row, as owned
//! values, to the task reading it: right for the live path's short statements, but at a
//! million rows that hand-off costs several times what SQLite spends reading the page
//! (BENCHMARKS.md). rusqlite steps the statement on the calling thread and lends each value
//! in place, from the same libsqlite3-sys (one SQLite in the binary). These functions block:
//! they run under `spawn_blocking`, and spread the CPU work (validating rows, decoding and
//! folding events) over the other cores while one thread reads.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, Row};

use super::rows::{self, KEY_COLUMN_COUNT, KEY_COLUMNS, RowBatch, VERIFY_COLUMNS, ValueBatch};
use super::{BUSY_TIMEOUT, Param, records_query};
use crate::domain::{self, KeyId, KeyState, Recorded};
use crate::log::chain::{Hash, LogRecord};
use crate::log::events;
use crate::log::fold::{self, FoldedKeys, SortablePart};
use crate::log::spill::{self, EventRef, FoldLimits, Item, Run, Spill};
use crate::store::backend::{EachKeys, RebuildReport, Snapshot};
use crate::store::{Cause, RecordFilter, StoreError};

/// Rows per batch handed between threads.
const BATCH: usize = 4096;

/// SQLite's page cache for a bulk connection: scans read each page once, so a small cache
/// does; memory is for the data being built.
const CACHE_KIB: i64 = 16 * 1024;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode as C;
        // A stored value of the wrong type, or text that is not UTF-8.
        if matches!(
            e,
            rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::Utf8Error(..)
        ) {
            return StoreError::Corrupt(e.to_string());
        }
        match e.sqlite_error_code() {
            Some(C::DiskFull) => StoreError::Full(Cause::new(e)),
            Some(
                C::PermissionDenied
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::OutOfMemory
                | C::ReadOnly
                | C::SystemIoFailure
                | C::DatabaseCorrupt
                | C::CannotOpen
                | C::FileLockingProtocolFailed
                | C::NotADatabase,
            ) => StoreError::Unavailable(Cause::new(e)),
            _ => StoreError::Database(Cause::new(e)),
        }
    }
}

/// A read-only connection for scans.
fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Refused(format!(
            "no database at {}",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    Ok(conn)
}

/// How many threads to spread CPU work over besides the reading one.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

fn corrupt(e: String) -> StoreError {
    StoreError::Corrupt(e)
}

/// A row of `SELECT {KEY_COLUMNS}`, validated; a row that is not valid is reported with its
/// key id (as stored, so that the operator can find it) and what is wrong with it.
fn projected_state(row: &Row<'_>) -> Result<KeyState, StoreError> {
    rows::row_ref(row)
        .map_err(|e| e.to_string())
        .and_then(|r| r.to_state())
        .map_err(|e| {
            let key_id = row
                .get_ref(0)
                .ok()
                .and_then(|v| v.as_bytes().ok())
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            StoreError::Corrupt(format!("keys row {key_id:?}: {e}"))
        })
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Unavailable(Cause::msg(format!("a bulk read failed: {e}"))))?
}

// ---------------------------------------------------------------------------------------------
// Start-up: every key, validated, on every core

/// Hands what verification needs of every projection row ([`rows::VERIFY_COLUMNS`]),
/// validated, to `each` from `workers()` threads while this one reads, all in one read
/// transaction. Refuses a projection whose checkpoint is not the log's last sequence: serving
/// from it would miss keys or revocations.
///
/// Only the columns verification reads are read and checked: the rest of a row (its name,
/// masked form, creator, times) is read, and checked, by the calls that serve it, and
/// `audit verify` reports a corrupt value in any column. With the cache's batched inserts,
/// reading 12 columns of 22 took the load from 4.8–6.5 s to 3.2–5.1 s at 5M keys
/// (BENCHMARKS.md).
pub(super) async fn for_each_key_concurrently(
    path: &Path,
    each: std::sync::Arc<EachKeys>,
) -> Result<u64, StoreError> {
    let path = path.to_owned();
    blocking(move || {
        let conn = open_read_only(&path)?;
        conn.execute_batch("BEGIN")?;
        let (checkpoint, end) = checkpoint_and_end(&conn)?;
        if checkpoint != end {
            return Err(StoreError::Corrupt(format!(
                "the keys table was last brought up to sequence {checkpoint} but the log ends \
                 at {end}; run `kemon-keys rebuild` with the server stopped"
            )));
        }
        let loaded = fan_out_key_rows(&conn, &*each);
        conn.execute_batch("COMMIT")?;
        loaded
    })
    .await
}

/// The projection's checkpoint and the log's last sequence, read in the caller's transaction.
fn checkpoint_and_end(conn: &Connection) -> Result<(u64, u64), StoreError> {
    let checkpoint: i64 = conn.query_row(
        "SELECT last_sequence FROM projection_checkpoint WHERE id = 1",
        [],
        |r| r.get(0),
    )?;
    let end: i64 = conn.query_row("SELECT COALESCE(MAX(sequence), 0) FROM events", [], |r| {
        r.get(0)
    })?;
    Ok((
        u64::try_from(checkpoint).unwrap_or(0),
        u64::try_from(end).unwrap_or(0),
    ))
}

/// Reads every `keys` row on this thread and validates them on `workers()` others, handing
/// each batch's states to `each` there.
fn fan_out_key_rows(conn: &Connection, each: &EachKeys) -> Result<u64, StoreError> {
    let workers = workers();
    // Batches go back to the reader once loaded: a new one each time would be fresh memory
    // from the system, every page of it faulted in and zeroed (a tenth of the load's time
    // at 5M keys).
    let (spare_tx, spare_rx) = sync_channel::<RowBatch>(4 * workers);
    let next_batch = || {
        spare_rx
            .try_recv()
            .unwrap_or_else(|_| RowBatch::with_capacity(BATCH))
    };
    std::thread::scope(|scope| {
        let mut senders: Vec<SyncSender<RowBatch>> = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = sync_channel::<RowBatch>(2);
            senders.push(tx);
            let spare = spare_tx.clone();
            handles.push(scope.spawn(move || -> Result<u64, StoreError> {
                let mut n = 0;
                for mut batch in rx {
                    let states = batch
                        .iter()
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(corrupt)?;
                    n += states.len() as u64;
                    each(states);
                    batch.clear();
                    let _ = spare.try_send(batch);
                }
                Ok(n)
            }));
        }
        drop(spare_tx);
        let read = (|| -> Result<(), StoreError> {
            let mut statement = conn.prepare(&format!("SELECT {VERIFY_COLUMNS} FROM keys"))?;
            let mut rows = statement.query([])?;
            let mut batch = next_batch();
            let mut next = 0;
            while let Some(row) = rows.next()? {
                batch.push(row)?;
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, next_batch());
                    if senders[next].send(full).is_err() {
                        // That worker stopped on a bad row: its error is the answer.
                        return Ok(());
                    }
                    next = (next + 1) % workers;
                }
            }
            if !batch.is_empty() {
                let _ = senders[next].send(batch);
            }
            Ok(())
        })();
        drop(senders);
        let mut loaded = 0;
        let mut failure = read.err();
        for handle in handles {
            match handle.join() {
                Ok(Ok(n)) => loaded += n,
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => {
                    failure = failure.or(Some(StoreError::Invariant(
                        "a thread loading keys panicked".into(),
                    )))
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(loaded),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The audit tools: a snapshot read by rusqlite

const RECORD_COLUMNS: &str = "sequence, key_id, workspace_id, stream_version, event_type, \
    schema_version, payload, actor, recorded_at, hash, workspace_hash, caller_identity";

/// A record from a row of `SELECT {RECORD_COLUMNS}`.
fn record(row: &Row<'_>) -> Result<LogRecord, StoreError> {
    let hash = |i: usize, name: &str| -> Result<Hash, StoreError> {
        row.get_ref(i)?
            .as_blob()
            .map_err(rusqlite::Error::from)?
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("{name} is not 32 bytes")))
    };
    Ok(LogRecord {
        sequence: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        key_id: row.get(1)?,
        workspace_id: row.get(2)?,
        stream_version: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
        event_type: row.get(4)?,
        schema_version: u32::try_from(row.get::<_, i64>(5)?).unwrap_or(u32::MAX),
        payload: row.get(6)?,
        actor: row.get(7)?,
        recorded_at_ms: row.get(8)?,
        hash: hash(9, "hash")?,
        workspace_hash: hash(10, "workspace_hash")?,
        caller_identity: row.get(11)?,
    })
}

fn bind_params(statement: &mut rusqlite::Statement<'_>, params: &[Param]) -> rusqlite::Result<()> {
    for (i, p) in params.iter().enumerate() {
        match p {
            Param::Int(v) => statement.raw_bind_parameter(i + 1, v)?,
            Param::Text(v) => statement.raw_bind_parameter(i + 1, v.as_str())?,
        }
    }
    Ok(())
}

/// One read transaction on a connection of its own, read through rusqlite: the log and the
/// projection as they were at one moment, even while a server keeps writing.
pub(super) struct BulkSnapshot {
    /// Lent to a blocking thread for each read; `None` only while it is out.
    conn: Option<Connection>,
}

impl BulkSnapshot {
    pub(super) async fn open(path: &Path) -> Result<BulkSnapshot, StoreError> {
        let path = path.to_owned();
        let conn = blocking(move || {
            let conn = open_read_only(&path)?;
            conn.execute_batch("BEGIN")?;
            // The snapshot is taken at the first read, so take it now.
            conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })?;
            Ok(conn)
        })
        .await?;
        Ok(BulkSnapshot { conn: Some(conn) })
    }

    fn lend(&mut self) -> Result<Connection, StoreError> {
        self.conn.take().ok_or_else(|| {
            StoreError::Unavailable(Cause::msg("the snapshot's connection was lost"))
        })
    }

    /// Runs `read` on the connection, on the blocking pool.
    async fn with<T: Send + 'static>(
        &mut self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.lend()?;
        let (conn, out) = tokio::task::spawn_blocking(move || {
            let out = read(&conn);
            (conn, out)
        })
        .await
        .map_err(|e| StoreError::Unavailable(Cause::msg(format!("a read failed: {e}"))))?;
        self.conn = Some(conn);
        out
    }

    /// Streams batches that `produce` sends from the blocking pool to `each`, until either
    /// side stops; the connection comes back whatever happened.
    async fn stream<T: Send + 'static, R: Send + 'static>(
        &mut self,
        produce: impl FnOnce(&Connection, &tokio::sync::mpsc::Sender<Vec<T>>) -> Result<R, StoreError>
        + Send
        + 'static,
        each: &mut (dyn FnMut(Vec<T>) -> bool + Send),
    ) -> Result<R, StoreError> {
        let conn = self.lend()?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<T>>(4);
        let producer = tokio::task::spawn_blocking(move || {
            let out = produce(&conn, &tx);
            (conn, out)
        });
        while let Some(batch) = rx.recv().await {
            if !each(batch) {
                break;
            }
        }
        // Stops a producer still sending (its next send fails), then takes the connection back.
        drop(rx);
        let (conn, out) = producer
            .await
            .map_err(|e| StoreError::Unavailable(Cause::msg(format!("a read failed: {e}"))))?;
        self.conn = Some(conn);
        out
    }
}

#[async_trait]
impl Snapshot for BulkSnapshot {
    async fn read_records(
        &mut self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let (sql, params) = records_query(after, limit, filter);
        self.with(move |conn| {
            let mut statement = conn.prepare(&sql)?;
            bind_params(&mut statement, &params)?;
            let mut rows = statement.raw_query();
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(record(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn projection(&mut self) -> Result<(Vec<KeyState>, u64), StoreError> {
        self.with(|conn| {
            let mut statement = conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys"))?;
            let mut rows = statement.query([])?;
            let mut states = Vec::new();
            while let Some(row) = rows.next()? {
                states.push(projected_state(row)?);
            }
            // Key id order, as the trait promises (the table is clustered by workspace).
            states.sort_unstable_by_key(|s| s.key_id);
            let (checkpoint, _) = checkpoint_and_end(conn)?;
            Ok((states, checkpoint))
        })
        .await
    }

    async fn log_end(&mut self) -> Result<u64, StoreError> {
        self.with(|conn| Ok(checkpoint_and_end(conn)?.1)).await
    }

    async fn scan_records(
        &mut self,
        up_to: u64,
        each: &mut (dyn FnMut(Vec<LogRecord>) -> bool + Send),
    ) -> Result<(), StoreError> {
        self.stream(
            move |conn, tx| {
                let mut statement = conn.prepare(&format!(
                    "SELECT {RECORD_COLUMNS} FROM events WHERE sequence <= ?1 ORDER BY sequence"
                ))?;
                let mut rows = statement.query([i64::try_from(up_to).unwrap_or(i64::MAX)])?;
                let mut batch = Vec::with_capacity(BATCH);
                while let Some(row) = rows.next()? {
                    batch.push(record(row)?);
                    if batch.len() == BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        if tx.blocking_send(full).is_err() {
                            return Ok(());
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = tx.blocking_send(batch);
                }
                Ok(())
            },
            each,
        )
        .await
    }

    async fn scan_projection(
        &mut self,
        each: &mut (dyn FnMut(Vec<KeyState>) -> bool + Send),
    ) -> Result<u64, StoreError> {
        self.stream(
            |conn, tx| {
                let (checkpoint, _) = checkpoint_and_end(conn)?;
                let mut statement = conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys"))?;
                let mut rows = statement.query([])?;
                let mut batch = Vec::with_capacity(BATCH);
                while let Some(row) = rows.next()? {
                    batch.push(projected_state(row)?);
                    if batch.len() == BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        if tx.blocking_send(full).is_err() {
                            return Ok(checkpoint);
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = tx.blocking_send(batch);
                }
                Ok(checkpoint)
            },
            each,
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Rebuild

/// Events copied out of SQLite's buffers into one allocation, for a folding thread.
#[derive(Default)]
struct EventBatch {
    bytes: Vec<u8>,
    events: Vec<CopiedEvent>,
}

/// Spans of [`EventBatch::bytes`]: key_id, event_type, payload, actor.
struct CopiedEvent {
    sequence: u64,
    stream_version: u64,
    schema_version: u32,
    recorded_at_ms: i64,
    spans: [(usize, usize); 4],
}

impl EventBatch {
    fn with_capacity(events: usize) -> EventBatch {
        EventBatch {
            bytes: Vec::with_capacity(events * 180),
            events: Vec::with_capacity(events),
        }
    }

    fn push(&mut self, event: CopiedEvent, values: [&[u8]; 4]) {
        let mut event = event;
        for (span, value) in event.spans.iter_mut().zip(values) {
            *span = (self.bytes.len(), value.len());
            self.bytes.extend_from_slice(value);
        }
        self.events.push(event);
    }

    fn get(&self, span: (usize, usize)) -> &[u8] {
        &self.bytes[span.0..span.0 + span.1]
    }

    fn event(&self, e: &CopiedEvent) -> EventRef<'_> {
        EventRef {
            position: e.sequence,
            sequence: e.sequence,
            stream_version: e.stream_version,
            schema_version: e.schema_version,
            recorded_at_ms: e.recorded_at_ms,
            key_id: self.get(e.spans[0]),
            // Not read by a rebuild's fold, and so not copied.
            workspace_id: &[],
            event_type: self.get(e.spans[1]),
            payload: self.get(e.spans[2]),
            actor: self.get(e.spans[3]),
        }
    }
}

/// Where a fold stopped: the first bad event it met.
#[derive(Debug)]
pub(in crate::store) struct FoldFailure {
    pub sequence: u64,
    pub error: StoreError,
}

impl FoldFailure {
    /// Keeps in `first` whichever of it and `failure` comes first in the log.
    pub(in crate::store) fn keep_first(
        first: &mut Option<FoldFailure>,
        failure: Option<FoldFailure>,
    ) {
        if let Some(failure) = failure
            && first.as_ref().is_none_or(|f| failure.sequence < f.sequence)
        {
            *first = Some(failure);
        }
    }
}

/// One folding thread's share: the keys routed to it, folded in log order, made ready to sort
/// on this thread (so that the parts are made in parallel). Nothing is sorted after a
/// failure.
fn fold_events(
    batches: Receiver<EventBatch>,
    capacity: usize,
    failed_at: &AtomicU64,
) -> (SortablePart, Result<(), FoldFailure>) {
    let mut folded = FoldedKeys::with_capacity(capacity);
    let mut outcome = Ok(());
    for batch in batches {
        if outcome.is_err() {
            continue;
        }
        for e in &batch.events {
            if let Err(error) = fold_one(&mut folded, &batch.event(e)) {
                failed_at.fetch_min(e.sequence, Ordering::Relaxed);
                outcome = Err(FoldFailure {
                    sequence: e.sequence,
                    error,
                });
                break;
            }
        }
    }
    match outcome {
        Ok(()) => (folded.into_part(), Ok(())),
        Err(failure) => (SortablePart::default(), Err(failure)),
    }
}

/// Folds one event into its key's state with the domain's `apply`: the rebuild's fold, on
/// either backend.
pub(in crate::store) fn fold_one(
    folded: &mut FoldedKeys,
    e: &EventRef<'_>,
) -> Result<(), StoreError> {
    let sequence = e.sequence;
    let text = |bytes| {
        std::str::from_utf8(bytes)
            .map_err(|err| StoreError::Corrupt(format!("sequence {sequence}: {err}")))
    };
    let key_id = KeyId::parse(text(e.key_id)?)
        .map_err(|err| StoreError::Corrupt(format!("sequence {sequence}: key_id {err}")))?;
    let event = events::decode_event(text(e.event_type)?, e.schema_version, e.payload)
        .map_err(|err| StoreError::Corrupt(format!("sequence {sequence}: {err}")))?;
    let recorded = Recorded {
        event,
        actor: text(e.actor)?.to_owned(),
        recorded_at_ms: e.recorded_at_ms,
        stream_version: e.stream_version,
    };
    let previous = folded.take(&key_id).map_err(StoreError::Invariant)?;
    let state = domain::apply(previous, &recorded)
        .map_err(|err| StoreError::Corrupt(format!("sequence {sequence}: {err}")))?;
    if state.key_id != key_id {
        return Err(StoreError::Corrupt(format!(
            "sequence {sequence}: the payload is for {} but the record's stream is {key_id}",
            state.key_id
        )));
    }
    folded.put(&state);
    Ok(())
}

/// A thread for the events of a key: the same thread for every event of one stream.
fn route(key_id: &[u8], threads: usize) -> usize {
    // FNV-1a: key ids end in 16 random characters.
    let hash = key_id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash % threads as u64) as usize
}

/// Every event folded with the domain's `apply`, in log order per key, spread over
/// `workers()` threads by key while this one reads. The events and the number of them, and
/// the last sequence; or the first bad event in log order.
fn fold_log(
    conn: &Connection,
    max_sequence: usize,
) -> Result<(Vec<SortablePart>, u64, i64), StoreError> {
    let threads = workers();
    // At most one key per event: sized so that no map rehashes. Buckets never written are
    // never touched.
    let capacity = max_sequence / threads + 1;
    let failed_at = AtomicU64::new(u64::MAX);
    std::thread::scope(|scope| {
        let mut senders = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (tx, rx) = sync_channel::<EventBatch>(2);
            senders.push(tx);
            let failed_at = &failed_at;
            handles.push(scope.spawn(move || fold_events(rx, capacity, failed_at)));
        }
        let read = (|| -> Result<(u64, i64), StoreError> {
            let mut statement = conn.prepare(
                "SELECT sequence, key_id, stream_version, event_type, schema_version, payload, \
                 actor, recorded_at FROM events ORDER BY sequence",
            )?;
            let mut rows = statement.query([])?;
            let mut batches: Vec<EventBatch> = (0..threads)
                .map(|_| EventBatch::with_capacity(BATCH))
                .collect();
            let (mut events, mut last_sequence) = (0u64, 0i64);
            while let Some(row) = rows.next()? {
                let sequence: i64 = row.get(0)?;
                let sequence_u = u64::try_from(sequence).unwrap_or(0);
                if sequence_u > failed_at.load(Ordering::Relaxed) {
                    // An earlier event already failed: nothing after it matters.
                    break;
                }
                let key_id = row.get_ref(1)?.as_bytes().map_err(rusqlite::Error::from)?;
                let thread = route(key_id, threads);
                batches[thread].push(
                    CopiedEvent {
                        sequence: sequence_u,
                        stream_version: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        schema_version: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
                        recorded_at_ms: row.get(7)?,
                        spans: [(0, 0); 4],
                    },
                    [
                        key_id,
                        row.get_ref(3)?.as_bytes().map_err(rusqlite::Error::from)?,
                        row.get_ref(5)?.as_bytes().map_err(rusqlite::Error::from)?,
                        row.get_ref(6)?.as_bytes().map_err(rusqlite::Error::from)?,
                    ],
                );
                events += 1;
                last_sequence = sequence;
                if batches[thread].events.len() == BATCH {
                    let full =
                        std::mem::replace(&mut batches[thread], EventBatch::with_capacity(BATCH));
                    // A thread that stopped still drains its channel.
                    let _ = senders[thread].send(full);
                }
            }
            for (batch, tx) in batches.into_iter().zip(&senders) {
                if !batch.events.is_empty() {
                    let _ = tx.send(batch);
                }
            }
            Ok((events, last_sequence))
        })();
        drop(senders);
        let mut parts = Vec::with_capacity(threads);
        let mut first: Option<FoldFailure> = None;
        for handle in handles {
            let (folded, outcome) = handle
                .join()
                .map_err(|_| StoreError::Invariant("a folding thread panicked".into()))?;
            parts.push(folded);
            FoldFailure::keep_first(&mut first, outcome.err());
        }
        if let Some(failure) = first {
            return Err(failure.error);
        }
        let (events, last_sequence) = read?;
        Ok((parts, events, last_sequence))
    })
}

/// The log's events, read in order, into the parts of a [`Spill`] in `dir`; each part then
/// folded on one of `workers()` threads and its states written, sorted, to a [`Run`]. The runs,
/// the number of events and the last sequence; or the first bad event in log order.
fn fold_log_spilled(conn: &Connection, dir: &Path) -> Result<(Vec<Run>, u64, i64), StoreError> {
    let spill_error = |e| StoreError::temp_files(dir, e);
    let mut parts = Spill::new(dir).map_err(spill_error)?;
    let mut statement = conn.prepare(
        "SELECT sequence, key_id, stream_version, event_type, schema_version, payload, actor, \
         recorded_at FROM events ORDER BY sequence",
    )?;
    let mut rows = statement.query([])?;
    let (mut events, mut last_sequence) = (0u64, 0i64);
    while let Some(row) = rows.next()? {
        let sequence: i64 = row.get(0)?;
        let bytes = |i| row.get_ref(i)?.as_bytes().map_err(rusqlite::Error::from);
        parts
            .event(&EventRef {
                // Read in the order of their sequences, which the log's key makes unique.
                position: u64::try_from(sequence).unwrap_or(0),
                sequence: u64::try_from(sequence).unwrap_or(0),
                stream_version: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                schema_version: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
                recorded_at_ms: row.get(7)?,
                key_id: bytes(1)?,
                workspace_id: &[],
                event_type: bytes(3)?,
                payload: bytes(5)?,
                actor: bytes(6)?,
            })
            .map_err(spill_error)?;
        events += 1;
        last_sequence = sequence;
    }
    let parts = std::sync::Mutex::new(parts.into_parts().map_err(spill_error)?);
    let next_part = || parts.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers())
            .map(|_| {
                scope.spawn(|| {
                    let mut runs = Vec::new();
                    let mut first: Option<FoldFailure> = None;
                    while let Some(part) = next_part() {
                        match fold_part(part, dir) {
                            Ok(run) => runs.push(run),
                            Err(failure) => FoldFailure::keep_first(&mut first, Some(failure)),
                        }
                    }
                    (runs, first)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join())
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|_| StoreError::Invariant("a folding thread panicked".into()))?;
    let mut runs = Vec::with_capacity(spill::PARTS);
    let mut first: Option<FoldFailure> = None;
    for (thread_runs, failure) in outcomes {
        runs.extend(thread_runs);
        FoldFailure::keep_first(&mut first, failure);
    }
    match first {
        Some(failure) => Err(failure.error),
        None => Ok((runs, events, last_sequence)),
    }
}

/// One part folded, its states sorted into a run in `dir`; or its first bad event (a
/// failure to read or write the files counts as one at sequence 0, before any event).
fn fold_part(part: spill::Part, dir: &Path) -> Result<Run, FoldFailure> {
    let io_failure = |e| FoldFailure {
        sequence: 0,
        error: StoreError::temp_files(dir, e),
    };
    let folded = fold_spilled(part).map_err(io_failure)??;
    Run::write(dir, folded.into_sorted_by_workspace().into_iter()).map_err(io_failure)
}

/// One part of a spilled rebuild folded with [`fold_one`]: its keys' states, or its first bad
/// event. Fails only when the part's file cannot be read.
pub(in crate::store) fn fold_spilled(
    part: spill::Part,
) -> std::io::Result<Result<FoldedKeys, FoldFailure>> {
    let mut folded = FoldedKeys::default();
    let mut failure = None;
    part.for_each(|item| {
        let outcome = match item {
            Item::State(key_id, encoded) => {
                folded.put_encoded(key_id, encoded.into());
                Ok(())
            }
            Item::Event(e) => fold_one(&mut folded, &e).map_err(|error| FoldFailure {
                sequence: e.sequence,
                error,
            }),
        };
        outcome.map_err(|f| failure = Some(f)).is_ok()
    })?;
    Ok(match failure {
        Some(failure) => Err(failure),
        None => Ok(folded),
    })
}

/// Writes the folded states as `keys` rows, in the table's order (so that every row is
/// appended), decoding them on another thread while this one inserts.
fn write_keys(
    conn: &Connection,
    table: &str,
    mut sorted: impl Iterator<Item = Result<Box<[u8]>, String>> + Send,
) -> Result<u64, StoreError> {
    let placeholders = (1..=KEY_COLUMN_COUNT)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut insert = conn.prepare(&format!(
        "INSERT INTO {table} ({KEY_COLUMNS}) VALUES ({placeholders})"
    ))?;
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Result<ValueBatch, String>>(4);
        scope.spawn(move || {
            loop {
                let mut batch = ValueBatch::with_capacity(1024);
                // Each encoding is freed once decoded: memory falls as rows are written.
                let decoded = sorted.by_ref().take(1024).try_for_each(|encoded| {
                    batch.push(&fold::decode(&encoded?)?);
                    Ok(())
                });
                let chunk = decoded.map(|()| batch);
                if chunk.as_ref().is_ok_and(|b| b.rows() == 0) || tx.send(chunk).is_err() {
                    return;
                }
            }
        });
        let mut written = 0u64;
        for chunk in rx {
            let batch = chunk.map_err(StoreError::Invariant)?;
            for row in 0..batch.rows() {
                batch.bind(&mut insert, row)?;
                insert.raw_execute()?;
                written += 1;
            }
        }
        Ok(written)
    })
}

/// The table the rebuilt projection is written to before it takes the place of `keys`.
const REBUILT: &str = "keys_rebuilt";

/// The `keys` table's own `CREATE TABLE` statement, made to create [`REBUILT`] instead, and
/// the `CREATE INDEX` statements of the indexes made on it (not the implicit one of its
/// primary key, which has none): read from the schema, so that what the rebuild makes again
/// is exactly what the migrations made.
fn projection_schema(conn: &Connection) -> Result<(String, Vec<String>), StoreError> {
    let table: String = conn.query_row(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'keys'",
        [],
        |r| r.get(0),
    )?;
    // `CREATE TABLE "keys" (columns…)`: the same columns and constraints under another name.
    let columns = table
        .find('(')
        .map(|at| &table[at..])
        .ok_or_else(|| StoreError::Corrupt(format!("unexpected schema of keys: {table}")))?;
    let create = format!("CREATE TABLE {REBUILT} {columns}");
    let mut statement = conn.prepare(
        "SELECT sql FROM sqlite_schema \
         WHERE type = 'index' AND tbl_name = 'keys' AND sql IS NOT NULL ORDER BY name",
    )?;
    let indexes = statement
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok((create, indexes))
}

/// Recreates the `keys` projection from the log alone, in one transaction, on a database whose
/// lock this process holds and whose other connections are closed. A log of more events than
/// `limits` allows keys in memory is folded in parts through temporary files (by default in
/// the database's directory), and the parts' sorted states merged as they are written.
pub(super) fn rebuild(path: &Path, limits: &FoldLimits) -> Result<RebuildReport, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    // The projection holds no secrets (only hashes of keys); zeroing every freed page of the
    // old table would write it all once more. FAST still zeroes what costs no extra I/O.
    conn.pragma_update(None, "secure_delete", "FAST")?;
    let started = Instant::now();
    // A rebuild rewrites the whole table in one transaction. Through the WAL every page would
    // be written twice (log, then checkpoint); a rollback journal writes the new pages once
    // and journals only pages that held data when the transaction began (see below). Switching modes needs exclusive use of the database,
    // so this also refuses to run beside a live server.
    let mode: Result<String, _> =
        conn.query_row("PRAGMA journal_mode = TRUNCATE", [], |r| r.get(0));
    if !mode.is_ok_and(|m| m.eq_ignore_ascii_case("truncate")) {
        return Err(StoreError::Refused(
            "the database is in use: stop the server before rebuilding".into(),
        ));
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let max_sequence: i64 =
        conn.query_row("SELECT COALESCE(MAX(sequence), 0) FROM events", [], |r| {
            r.get(0)
        })?;
    let max_sequence = usize::try_from(max_sequence).unwrap_or(0);
    let spilled = max_sequence > limits.keys_in_memory;
    let folded;
    let (sorted, events, last_sequence): (Box<dyn Iterator<Item = _> + Send>, _, _) = if spilled {
        // Each part's states are sorted as it is folded; the runs are merged as rows are
        // written.
        let dir = limits.dir_or(path.parent().unwrap_or(Path::new(".")));
        let (runs, events, last_sequence) = fold_log_spilled(&conn, &dir)?;
        folded = started.elapsed();
        let merged = spill::merge(runs).map(|r| r.map_err(|e| format!("a run: {e}")));
        (Box::new(merged), events, last_sequence)
    } else {
        let (parts, events, last_sequence) = fold_log(&conn, max_sequence)?;
        folded = started.elapsed();
        let sorted = fold::sorted_by_workspace(parts).map(Ok);
        (Box::new(sorted), events, last_sequence)
    };
    let sorted_at = started.elapsed();
    // The rows go into a new table that then takes the old one's place, all in this one
    // transaction. Written in place, each page the old rows freed would be read and copied
    // to the rollback journal before being reused (freed in this transaction, its old content
    // must survive a rollback); a new table takes pages that were free before it began, or
    // new ones at the end of the file, which need neither. The cost is disk: the old table's
    // pages stay free in the file, for the next rebuild and for new events. Indexes are made
    // after the rows are in: an index in another order than the table's (keys by expiry)
    // would otherwise take every row as an insert at a random place, where CREATE INDEX
    // sorts them once.
    let (create, indexes) = projection_schema(&conn)?;
    conn.execute_batch(&create)?;
    let keys = write_keys(&conn, REBUILT, sorted)?;
    let inserted = started.elapsed();
    conn.execute_batch(&format!(
        "DROP TABLE keys; ALTER TABLE {REBUILT} RENAME TO keys"
    ))?;
    for sql in &indexes {
        conn.execute_batch(sql)?;
    }
    conn.execute(
        "UPDATE projection_checkpoint SET last_sequence = ?1 WHERE id = 1",
        [last_sequence],
    )?;
    let written = started.elapsed();
    conn.execute_batch("COMMIT")?;
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.close().map_err(|(_, e)| e)?;
    let report = RebuildReport {
        events,
        keys,
        last_sequence,
    };
    let ms = |d: Duration| d.as_millis() as u64;
    tracing::debug!(
        ?report,
        spilled,
        fold_ms = ms(folded),
        sort_ms = ms(sorted_at - folded),
        write_ms = ms(inserted - sorted_at),
        index_ms = ms(written - inserted),
        commit_and_close_ms = ms(started.elapsed() - written),
        "rebuild phases"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routing_spreads_keys_and_keeps_a_key_on_one_thread() {
        let ids: Vec<String> = (0..1000)
            .map(|_| crate::domain::KeyId::generate(1_767_225_600_000).to_string())
            .collect();
        let on_first = ids.iter().filter(|id| route(id.as_bytes(), 2) == 0).count();
        assert!((400..600).contains(&on_first), "{on_first}");
        for id in &ids {
            assert_eq!(route(id.as_bytes(), 3), route(id.as_bytes(), 3));
        }
    }
}
