//! Replaying log records through the service's own `apply`: for verification, for point in
//! time views, for anything that must agree with what the service did.

use std::collections::BTreeMap;

use crate::domain::{self, KeyState, Recorded};
use crate::log::chain::LogRecord;
use crate::log::events;

/// Why a record could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError {
    pub sequence: u64,
    pub reason: String,
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
        let fail = |reason: String| ReplayError {
            sequence: record.sequence,
            reason,
        };
        let event =
            events::decode_event(&record.event_type, record.schema_version, &record.payload)
                .map_err(fail)?;
        let recorded = Recorded {
            event,
            actor: record.actor.clone(),
            recorded_at_ms: record.recorded_at_ms,
            stream_version: record.stream_version,
        };
        let previous = self.keys.remove(&record.key_id);
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
        self.keys.insert(record.key_id.clone(), state);
        self.last_sequence = record.sequence;
        self.last_recorded_at_ms = record.recorded_at_ms;
        Ok(())
    }
}
