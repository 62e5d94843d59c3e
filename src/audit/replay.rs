//! Replaying log records through the service's own `apply`: for verification, for point in
//! time views, for anything that must agree with what the service did.

use std::collections::BTreeMap;

use crate::domain::{self, KeyId, KeyState, Recorded};
use crate::log::chain::LogRecord;
use crate::log::events;
use crate::log::fold::FoldedKeys;

/// Why a record could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError {
    pub sequence: u64,
    pub reason: String,
}

/// Folds one record into its key's previous state: decodes (upcasting old schema versions),
/// applies, and checks that the result belongs to the record's stream and workspace.
pub fn fold_record(
    previous: Option<KeyState>,
    record: &LogRecord,
) -> Result<KeyState, ReplayError> {
    let fail = |reason: String| ReplayError {
        sequence: record.sequence,
        reason,
    };
    let event = events::decode_event(&record.event_type, record.schema_version, &record.payload)
        .map_err(fail)?;
    let recorded = Recorded {
        event,
        actor: record.actor.clone(),
        recorded_at_ms: record.recorded_at_ms,
        stream_version: record.stream_version,
    };
    let state = domain::apply(previous, &recorded).map_err(fail)?;
    if state.key_id.to_string() != record.key_id {
        return Err(fail(format!(
            "the payload is for {} but the record's stream is {}",
            state.key_id, record.key_id
        )));
    }
    if state.workspace_id.as_str() != record.workspace_id {
        return Err(fail(format!(
            "the key belongs to workspace {} but the record says {}",
            state.workspace_id, record.workspace_id
        )));
    }
    Ok(state)
}

/// Key states built by folding records in log order.
#[derive(Debug, Default)]
pub struct Replay {
    pub keys: BTreeMap<String, KeyState>,
    pub last_sequence: u64,
    /// When the last folded record was recorded.
    pub last_recorded_at_ms: i64,
}

impl Replay {
    /// Folds one record: decodes (upcasting old schema versions) and applies it.
    pub fn apply(&mut self, record: &LogRecord) -> Result<(), ReplayError> {
        let previous = self.keys.remove(&record.key_id);
        let state = fold_record(previous, record)?;
        self.keys.insert(record.key_id.clone(), state);
        self.last_sequence = record.sequence;
        self.last_recorded_at_ms = record.recorded_at_ms;
        Ok(())
    }
}

/// [`Replay`] for a whole log: the same fold, with each key's state held compactly
/// ([`FoldedKeys`]), about a third of the memory.
#[derive(Debug, Default)]
pub struct CompactReplay {
    pub keys: FoldedKeys,
}

impl CompactReplay {
    /// Folds one record, as [`Replay::apply`] does.
    pub fn apply(&mut self, record: &LogRecord) -> Result<(), ReplayError> {
        // Only a record whose stream is a key id's canonical spelling can follow an earlier
        // one: every state kept was checked to be that of its record's stream.
        let previous = match stream_key(&record.key_id) {
            Some(key_id) => self.keys.take(&key_id).map_err(|reason| ReplayError {
                sequence: record.sequence,
                reason,
            })?,
            None => None,
        };
        let state = fold_record(previous, record)?;
        self.keys.put(&state);
        Ok(())
    }
}

/// The key id a stream name spells, when it is that id's one canonical spelling (the only one
/// [`KeyId::parse`] accepts).
fn stream_key(stream: &str) -> Option<KeyId> {
    KeyId::parse(stream).ok()
}
