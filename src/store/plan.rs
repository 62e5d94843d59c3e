//! The batch planner: what a batch of commands writes, decided purely.
//!
//! [`load`] reads what the batch needs (each touched key's stream, each create request id
//! already answered) through the writer's session; [`plan`] then decides every command
//! against the state the commands before it left, applies the events with the domain's own
//! `apply`, chooses each event's side effects by an exhaustive match, encodes and chains the
//! records. No I/O happens in [`plan`], so a batch is planned the same way whatever backend
//! stores it.

use std::collections::HashMap;

use super::backend::{Answered, Effects, WriteSession};
use super::writer::{Outcome, Request};
use super::{CREATE_REQUEST_WINDOW_MS, Replayed, StoreError, Written};
use crate::domain::{self, Command, Event, KeyId, KeyState, Recorded};
use crate::log::chain::{Chains, Hash, LogRecord};
use crate::log::events;

/// What the batch needs from storage, read before planning.
pub(super) struct Loaded {
    /// Each key a command changes, folded from its stream (or why it could not be read).
    streams: HashMap<KeyId, Result<Option<KeyState>, StoreError>>,
    /// Create request ids answered before this batch, by (workspace id, request id).
    answered: HashMap<(String, String), Answered>,
}

/// Reads what planning `batch` needs. A storage fault fails the batch; another failure to
/// read one key fails only the commands on that key.
pub(super) async fn load(
    session: &mut dyn WriteSession,
    batch: &[Request],
    now: i64,
) -> Result<Loaded, StoreError> {
    let mut loaded = Loaded {
        streams: HashMap::new(),
        answered: HashMap::new(),
    };
    let mut wanted: Vec<KeyId> = Vec::new();
    for request in batch {
        let write = &request.write;
        if let Some(create) = &write.create_request {
            let slot = (write.workspace_id.to_string(), create.request_id.clone());
            if !loaded.answered.contains_key(&slot)
                && let Some(earlier) = session
                    .answered_create(&slot.0, &slot.1, now - CREATE_REQUEST_WINDOW_MS)
                    .await?
            {
                match KeyId::parse(&earlier.key_id) {
                    Ok(key_id) => wanted.push(key_id),
                    Err(e) => {
                        return Err(StoreError::Corrupt(format!(
                            "create_requests key_id {}: {e}",
                            earlier.key_id
                        )));
                    }
                }
                loaded.answered.insert(slot, earlier);
            }
        }
        // A create's key id is new: nothing to read.
        if !matches!(write.command, Command::Create(_)) {
            wanted.push(write.key_id);
        }
    }
    for key_id in wanted {
        if loaded.streams.contains_key(&key_id) {
            continue;
        }
        let stream = match session.load_stream(key_id).await {
            Err(e) if e.is_storage_fault() => return Err(e),
            other => other,
        };
        loaded.streams.insert(key_id, stream);
    }
    Ok(loaded)
}

/// Decides, applies, encodes and chains `batch`. Each outcome is a command's new state or
/// why it was refused; the effects are what the backend writes. Errors only for a bug
/// (decide and apply disagree): then nothing of the batch may be written.
pub(super) fn plan(
    loaded: Loaded,
    heads: &mut Heads,
    now: i64,
    batch: &[Request],
) -> Result<(Vec<Outcome>, Effects), StoreError> {
    let Loaded {
        mut streams,
        mut answered,
    } = loaded;
    // Keys this batch changed, by key id, in first-touched order.
    let mut touched: HashMap<KeyId, KeyState> = HashMap::new();
    let mut order: Vec<KeyId> = Vec::new();
    let mut effects = Effects::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch {
        let write = &request.write;
        if let Some(create) = &write.create_request {
            let slot = (write.workspace_id.to_string(), create.request_id.clone());
            if let Some(earlier) = answered.get(&slot) {
                let rolled = matches!(write.command, Command::Roll(_)).then_some(write.key_id);
                outcomes.push(replay(&streams, &touched, earlier, &create.digest, rolled));
                continue;
            }
        }
        let key_id = write.key_id;
        let current = match touched.get(&key_id) {
            Some(state) => Some(state.clone()),
            None if matches!(write.command, Command::Create(_)) => None,
            None => match streams.get(&key_id) {
                Some(Ok(state)) => state.clone(),
                Some(Err(e)) => {
                    outcomes.push(Err(e.clone()));
                    continue;
                }
                None => None,
            },
        };
        // A key of another workspace does not exist for this caller.
        let visible = current.filter(|s| s.workspace_id == write.workspace_id);
        let decided = match domain::decide(visible.as_ref(), &write.command) {
            Ok(events) => events,
            Err(e) => {
                outcomes.push(Err(e.into()));
                continue;
            }
        };
        let changed = !decided.is_empty();
        let mut state = visible;
        // A roll first creates the successor, in a stream of its own, so that the old key's
        // KeyRolled names a key the log already holds.
        let mut successor = None;
        if let (Command::Roll(roll), Some(old), true) = (&write.command, &state, changed) {
            let created = Event::KeyCreated(Box::new(roll.successor(old)));
            let new_state = append(
                heads,
                &mut effects,
                write,
                roll.successor_key_id,
                None,
                created,
                now,
            )?;
            successor = Some(new_state);
        }
        for event in decided {
            state = Some(append(
                heads,
                &mut effects,
                write,
                key_id,
                state.take(),
                event,
                now,
            )?);
        }
        let Some(state) = state else {
            outcomes.push(Err(StoreError::Domain(domain::DomainError::NotFound)));
            continue;
        };
        // The key a request id answers with: the created key, or a roll's successor.
        let answer_key = successor.as_ref().map_or(key_id, |s| s.key_id).to_string();
        if let Some(create) = write.create_request.as_ref().filter(|_| changed) {
            answered.insert(
                (write.workspace_id.to_string(), create.request_id.clone()),
                Answered {
                    digest: create.digest.to_vec(),
                    key_id: answer_key.clone(),
                    sealed_secret: Some(create.sealed_secret.clone()),
                },
            );
            effects.create_requests.push((
                write.workspace_id.to_string(),
                answer_key,
                create.clone(),
            ));
        }
        if changed {
            for changed_state in successor.iter().chain([&state]) {
                let id = changed_state.key_id;
                if !touched.contains_key(&id) {
                    order.push(id);
                }
                touched.insert(id, changed_state.clone());
                // Later commands of the batch see this state, not the stored one.
                streams.remove(&id);
            }
        }
        outcomes.push(Ok(match successor {
            Some(successor) => Written {
                state: successor,
                replayed: None,
                previous: Some(state),
            },
            None => Written {
                state,
                replayed: None,
                previous: None,
            },
        }));
    }
    effects.changed = order
        .iter()
        .filter_map(|k| touched.get(k).cloned())
        .collect();
    Ok((outcomes, effects))
}

/// Records one event of `write` in the stream of `key_id`, whose state is `state`: its side
/// effects, its chained record, and the state it leaves (folded with the domain's `apply`).
fn append(
    heads: &mut Heads,
    effects: &mut Effects,
    write: &super::Write,
    key_id: KeyId,
    state: Option<KeyState>,
    event: Event,
    now: i64,
) -> Result<KeyState, StoreError> {
    let key = key_id.to_string();
    let stream_version = state.as_ref().map_or(1, |s| s.stream_version + 1);
    // Every event says what it does beside the log; a new event must say too.
    match &event {
        Event::KeyCreated(new) => {
            // Cloned, not taken: if this batch fails, the command is retried alone and must
            // still carry its copy. A roll's successor keeps one only if the old key did.
            if let Some(sealed) = write.sealed_secret.as_ref().filter(|_| new.reveal_later) {
                effects.sealed_inserts.push((key.clone(), sealed.clone()));
            }
        }
        Event::KeyRevoked => effects.sealed_deletes.push(key.clone()),
        Event::KeyRenamed { .. }
        | Event::KeyScopesChanged { .. }
        | Event::KeyRevealed
        | Event::KeyRolled { .. } => {}
    }
    let encoded = events::encode_event(&event);
    let mut record = LogRecord {
        sequence: 0,
        key_id: key,
        workspace_id: write.workspace_id.to_string(),
        stream_version,
        event_type: encoded.event_type.to_owned(),
        schema_version: encoded.schema_version,
        payload: encoded.payload,
        actor: write.actor.clone(),
        recorded_at_ms: now,
        caller_identity: write.caller_identity.clone(),
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
    // decide and apply disagreeing is a bug, never a partial write: the whole batch is
    // abandoned so no record of this command is kept.
    domain::apply(state, &recorded)
        .map_err(|e| StoreError::Invariant(format!("apply refused a decided event: {e}")))
}

/// The answer to a create whose request id was answered before: that key as it is now, or a
/// refusal when the id came with another request. For a roll, `previous` is the key it was
/// asked to roll, as it is now.
fn replay(
    streams: &HashMap<KeyId, Result<Option<KeyState>, StoreError>>,
    touched: &HashMap<KeyId, KeyState>,
    earlier: &Answered,
    digest: &[u8; 32],
    previous: Option<KeyId>,
) -> Outcome {
    if earlier.digest != digest {
        return Err(StoreError::RequestIdReused);
    }
    let key_id = KeyId::parse(&earlier.key_id).map_err(|e| {
        StoreError::Corrupt(format!("create_requests key_id {}: {e}", earlier.key_id))
    })?;
    let state = match touched.get(&key_id) {
        Some(state) => state.clone(),
        None => match streams.get(&key_id) {
            Some(Ok(Some(state))) => state.clone(),
            Some(Err(e)) => return Err(e.clone()),
            Some(Ok(None)) | None => {
                return Err(StoreError::Corrupt(format!(
                    "create request of {} names no key in the log",
                    earlier.key_id
                )));
            }
        },
    };
    let previous = match previous {
        None => None,
        Some(key_id) => match touched.get(&key_id) {
            Some(state) => Some(state.clone()),
            None => match streams.get(&key_id) {
                Some(Ok(state)) => state.clone(),
                Some(Err(e)) => return Err(e.clone()),
                None => None,
            },
        },
    };
    Ok(Written {
        state,
        replayed: Some(Replayed {
            sealed_secret: earlier.sealed_secret.clone(),
        }),
        previous,
    })
}

/// The chains' heads as of the last appended record (committed or, inside a batch, not
/// yet). Changes made in a batch are journaled so a rolled-back command or batch restores
/// exactly what it changed.
pub(crate) struct Heads {
    pub chains: Chains,
    journal: Vec<(String, Option<Hash>)>,
}

/// A point to roll [`Heads`] back to.
#[derive(Clone, Copy)]
pub(super) struct Mark {
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

    pub(super) fn mark(&self) -> Mark {
        Mark {
            journal: self.journal.len(),
            last_sequence: self.chains.last_sequence,
            last_hash: self.chains.log,
        }
    }

    pub(super) fn rollback(&mut self, mark: Mark) {
        while self.journal.len() > mark.journal {
            let (workspace, previous) = self.journal.pop().expect("journal entry");
            self.chains.restore_workspace(workspace, previous);
        }
        self.chains.last_sequence = mark.last_sequence;
        self.chains.log = mark.last_hash;
    }

    pub(super) fn settle(&mut self) {
        self.journal.clear();
    }

    /// Assigns the next sequence to `record` and chains its hashes.
    fn append(&mut self, record: &mut LogRecord) {
        let previous = self.chains.append(record);
        self.journal.push((record.workspace_id.clone(), previous));
    }

    pub(super) fn head(&self) -> (u64, Hash) {
        (self.chains.last_sequence, self.chains.log)
    }
}
