//! Folding a log whose keys do not fit in memory: its events routed by key into parts kept in
//! temporary files, and each part folded on its own.
//!
//! Every event of a key lands in the same part, in log order, and a key's fold depends only on
//! the key's own events. So folding the parts one after another gives every key the state a
//! fold of the whole log gives it, while holding one part's keys at a time. A fold that began
//! in memory and outgrew it moves its states into the parts first, each before its key's later
//! events. A part stops at its first bad event; the first of those in the order the events were
//! read (their [`EventRef::position`]), across the parts, is where a fold of the whole log
//! would have stopped.
//!
//! With [`PARTS`] parts and [`DEFAULT_KEYS_IN_MEMORY`] keys in memory, memory stays bounded up
//! to 32 million keys; past that, each part holds a 128th of the keys (a 100-million-key log
//! needs about 160 MB for a part). The temporary files take about as much disk as the log's
//! events, plus the states for a rebuild.
//!
//! The files are made with [`tempfile::tempfile_in`], which unlinks them at once: nothing is
//! left behind however the process ends. They hold what the database holds (a key's hash,
//! never the key) and are gone when dropped.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::domain::KeyId;
use crate::log::chain::LogRecord;
use crate::log::fold;

/// How many parts a spilled fold has.
pub const PARTS: usize = 128;

/// Buffer of each part's file, both ways.
const BUFFER: usize = 64 * 1024;

/// How much of a fold may stay in memory, and where the rest goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldLimits {
    /// Key states held at once (a rebuild, which knows the log's length before it starts,
    /// counts events: a log has at least as many events as keys).
    pub keys_in_memory: usize,
    /// Where the temporary files go; `None` for the tool's default (next to a SQLite
    /// database, or the system's temporary directory).
    pub temp_dir: Option<PathBuf>,
}

/// A quarter of a million states, about 50 MB. Folding in parts costs no time measured at a
/// million keys (BENCHMARKS.md, "Folds in parts"): the parts' maps are small enough to stay
/// in the processor's caches, which pays for writing the log once more and reading it back.
pub const DEFAULT_KEYS_IN_MEMORY: usize = 250_000;

impl Default for FoldLimits {
    fn default() -> FoldLimits {
        FoldLimits {
            keys_in_memory: DEFAULT_KEYS_IN_MEMORY,
            temp_dir: None,
        }
    }
}

impl FoldLimits {
    /// The directory for temporary files: the one configured, else `default`.
    pub fn dir_or(&self, default: &Path) -> PathBuf {
        self.temp_dir.clone().unwrap_or_else(|| default.to_owned())
    }
}

/// The part that holds a key's states and events. Key ids end in 80 random bits.
pub fn part_of(key_id: &KeyId) -> usize {
    let bytes = key_id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..].try_into().unwrap_or([0; 8]));
    (low % PARTS as u64) as usize
}

/// The part for an event's stream: its key's, or the first part for a stream that is not a
/// key id (its first event fails to fold wherever it goes).
fn part_of_stream(key_id: &[u8]) -> usize {
    std::str::from_utf8(key_id)
        .ok()
        .and_then(|s| KeyId::parse(s).ok())
        .map_or(0, |k| part_of(&k))
}

/// An event as a fold needs it, borrowed from wherever it was read.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// Its place in the order the events were read: what orders failures found in different
    /// parts. Read from a database in log order, that is the sequence; a file being verified
    /// may hold sequences out of order, so the verifier counts.
    pub position: u64,
    pub sequence: u64,
    pub stream_version: u64,
    pub schema_version: u32,
    pub recorded_at_ms: i64,
    pub key_id: &'a [u8],
    pub workspace_id: &'a [u8],
    pub event_type: &'a [u8],
    pub payload: &'a [u8],
    pub actor: &'a [u8],
}

impl<'a> EventRef<'a> {
    /// `record`, read at `position`.
    pub fn at(record: &'a LogRecord, position: u64) -> EventRef<'a> {
        EventRef {
            position,
            sequence: record.sequence,
            stream_version: record.stream_version,
            schema_version: record.schema_version,
            recorded_at_ms: record.recorded_at_ms,
            key_id: record.key_id.as_bytes(),
            workspace_id: record.workspace_id.as_bytes(),
            event_type: record.event_type.as_bytes(),
            payload: &record.payload,
            actor: record.actor.as_bytes(),
        }
    }

    /// The event as a record with the fields a fold reads (no hashes, no caller). Fails on
    /// text that is not UTF-8, which only a record read from a database can hold.
    pub fn to_record(&self) -> Result<LogRecord, String> {
        let text = |what: &str, bytes: &[u8]| {
            String::from_utf8(bytes.to_vec()).map_err(|e| format!("{what}: {e}"))
        };
        Ok(LogRecord {
            sequence: self.sequence,
            key_id: text("key_id", self.key_id)?,
            workspace_id: text("workspace_id", self.workspace_id)?,
            stream_version: self.stream_version,
            event_type: text("event_type", self.event_type)?,
            schema_version: self.schema_version,
            payload: self.payload.to_vec(),
            actor: text("actor", self.actor)?,
            recorded_at_ms: self.recorded_at_ms,
            caller_identity: None,
            hash: [0; 32],
            workspace_hash: [0; 32],
        })
    }
}

/// What a part holds, in the order it was written.
#[derive(Debug)]
pub enum Item<'a> {
    /// A key's state, as [`fold::encode`] made it.
    State(KeyId, &'a [u8]),
    Event(EventRef<'a>),
}

const STATE: u8 = 0;
const EVENT: u8 = 1;

/// Parts being written.
pub struct Spill {
    parts: Vec<BufWriter<File>>,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl Spill {
    /// [`PARTS`] empty parts, as files in `dir`.
    pub fn new(dir: &Path) -> io::Result<Spill> {
        let parts = (0..PARTS)
            .map(|_| {
                Ok(BufWriter::with_capacity(
                    BUFFER,
                    tempfile::tempfile_in(dir)?,
                ))
            })
            .collect::<io::Result<_>>()?;
        Ok(Spill { parts })
    }

    /// Adds a key's state (an encoding) to the key's part.
    pub fn state(&mut self, key_id: KeyId, encoded: &[u8]) -> io::Result<()> {
        let out = &mut self.parts[part_of(&key_id)];
        out.write_all(&[STATE])?;
        out.write_all(&key_id.to_bytes())?;
        write_bytes(out, encoded)
    }

    /// Adds an event to its key's part.
    pub fn event(&mut self, e: &EventRef<'_>) -> io::Result<()> {
        let out = &mut self.parts[part_of_stream(e.key_id)];
        out.write_all(&[EVENT])?;
        out.write_all(&e.position.to_le_bytes())?;
        out.write_all(&e.sequence.to_le_bytes())?;
        out.write_all(&e.stream_version.to_le_bytes())?;
        out.write_all(&e.schema_version.to_le_bytes())?;
        out.write_all(&e.recorded_at_ms.to_le_bytes())?;
        for bytes in [e.key_id, e.workspace_id, e.event_type, e.payload, e.actor] {
            write_bytes(out, bytes)?;
        }
        Ok(())
    }

    /// The parts, ready to be read back.
    pub fn into_parts(self) -> io::Result<Vec<Part>> {
        self.parts
            .into_iter()
            .map(|writer| {
                let mut file = writer.into_inner().map_err(|e| e.into_error())?;
                file.rewind()?;
                Ok(Part {
                    reader: BufReader::with_capacity(BUFFER, file),
                })
            })
            .collect()
    }
}

fn write_bytes(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a value over 4 GiB"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(bytes)
}

/// One part, read back.
pub struct Part {
    reader: BufReader<File>,
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Part")
    }
}

impl Part {
    /// Hands every item to `each`, in the order written, until `each` returns false.
    pub fn for_each(mut self, mut each: impl FnMut(Item<'_>) -> bool) -> io::Result<()> {
        let mut fields: [Vec<u8>; 5] = Default::default();
        let mut tag = [0u8; 1];
        loop {
            if self.reader.read(&mut tag)? == 0 {
                return Ok(());
            }
            let go_on = match tag[0] {
                STATE => {
                    let key_id = KeyId::from_bytes(read_array(&mut self.reader)?);
                    read_bytes(&mut self.reader, &mut fields[0])?;
                    each(Item::State(key_id, &fields[0]))
                }
                EVENT => {
                    let r = &mut self.reader;
                    let position = u64::from_le_bytes(read_array(r)?);
                    let sequence = u64::from_le_bytes(read_array(r)?);
                    let stream_version = u64::from_le_bytes(read_array(r)?);
                    let schema_version = u32::from_le_bytes(read_array(r)?);
                    let recorded_at_ms = i64::from_le_bytes(read_array(r)?);
                    for field in &mut fields {
                        read_bytes(r, field)?;
                    }
                    let [key_id, workspace_id, event_type, payload, actor] = &fields;
                    each(Item::Event(EventRef {
                        position,
                        sequence,
                        stream_version,
                        schema_version,
                        recorded_at_ms,
                        key_id,
                        workspace_id,
                        event_type,
                        payload,
                        actor,
                    }))
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a temporary file holds an item of unknown kind {other}"),
                    ));
                }
            };
            if !go_on {
                return Ok(());
            }
        }
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_bytes(r: &mut impl Read, into: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::from_le_bytes(read_array(r)?) as usize;
    into.clear();
    into.resize(len, 0);
    r.read_exact(into)
}

// ---------------------------------------------------------------------------------------------
// Sorted runs, merged

/// Encodings in the projection's order ([`fold::projection_order`]), kept in a file.
pub struct Run {
    reader: BufReader<File>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Run")
    }
}

impl Run {
    /// Writes `sorted` (already in the projection's order) to a file in `dir`.
    pub fn write(dir: &Path, sorted: impl Iterator<Item = Box<[u8]>>) -> io::Result<Run> {
        let mut out = BufWriter::with_capacity(BUFFER, tempfile::tempfile_in(dir)?);
        for encoded in sorted {
            write_bytes(&mut out, &encoded)?;
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        Ok(Run {
            reader: BufReader::with_capacity(BUFFER, file),
        })
    }

    fn next_encoding(&mut self) -> io::Result<Option<Box<[u8]>>> {
        // The end of the run is the end of the file before a length; a length cut short is
        // an error, not the end.
        let mut len = [0u8; 4];
        if self.reader.read(&mut len[..1])? == 0 {
            return Ok(None);
        }
        self.reader.read_exact(&mut len[1..])?;
        let mut encoded = vec![0u8; u32::from_le_bytes(len) as usize];
        self.reader.read_exact(&mut encoded)?;
        Ok(Some(encoded.into()))
    }
}

/// The head of one run in the merge: ordered so that the heap's greatest is the projection's
/// least.
struct Head {
    encoded: Box<[u8]>,
    run: usize,
}

impl Ord for Head {
    fn cmp(&self, other: &Head) -> Ordering {
        fold::projection_order(&other.encoded, &self.encoded)
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Head) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Head) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Head {}

/// Every encoding of `runs` (which hold different keys), in the projection's order.
pub struct Merged {
    runs: Vec<Run>,
    heads: BinaryHeap<Head>,
    started: bool,
}

impl std::fmt::Debug for Merged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merged")
            .field("runs", &self.runs.len())
            .finish()
    }
}

pub fn merge(runs: Vec<Run>) -> Merged {
    Merged {
        heads: BinaryHeap::with_capacity(runs.len()),
        runs,
        started: false,
    }
}

impl Merged {
    fn refill(&mut self, run: usize) -> io::Result<()> {
        if let Some(encoded) = self.runs[run].next_encoding()? {
            self.heads.push(Head { encoded, run });
        }
        Ok(())
    }
}

impl Iterator for Merged {
    type Item = io::Result<Box<[u8]>>;

    fn next(&mut self) -> Option<io::Result<Box<[u8]>>> {
        if !self.started {
            self.started = true;
            for run in 0..self.runs.len() {
                if let Err(e) = self.refill(run) {
                    return Some(Err(e));
                }
            }
        }
        let Head { encoded, run } = self.heads.pop()?;
        Some(self.refill(run).map(|()| encoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, key_id: &str) -> LogRecord {
        LogRecord {
            sequence,
            key_id: key_id.into(),
            workspace_id: "ws_a".into(),
            stream_version: sequence + 1,
            event_type: "KeyRenamed".into(),
            schema_version: 2,
            payload: vec![1, 2, 3, sequence as u8],
            actor: "user_1".into(),
            recorded_at_ms: -5,
            caller_identity: None,
            hash: [0; 32],
            workspace_hash: [0; 32],
        }
    }

    #[test]
    fn a_key_keeps_its_part_and_its_order_and_items_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<KeyId> = (0..300).map(|_| KeyId::generate(1)).collect();
        let mut spill = Spill::new(dir.path()).unwrap();
        let mut written: Vec<Vec<String>> = vec![Vec::new(); PARTS];
        for (i, key) in keys.iter().enumerate() {
            spill.state(*key, &[i as u8, 7]).unwrap();
            written[part_of(key)].push(format!("state {key} {:?}", [i as u8, 7]));
        }
        let mut records: Vec<LogRecord> = Vec::new();
        for round in 0..3u64 {
            for (i, key) in keys.iter().enumerate() {
                records.push(event(round * 1000 + i as u64, &key.to_string()));
            }
        }
        records.push(event(9999, "not a key id"));
        for (position, r) in records.iter().enumerate() {
            spill.event(&EventRef::at(r, position as u64)).unwrap();
            let part = KeyId::parse(&r.key_id).map_or(0, |k| part_of(&k));
            written[part].push(format!("event {r:?} at {position}"));
        }
        let parts = spill.into_parts().unwrap();
        assert_eq!(parts.len(), PARTS);
        let mut used = 0;
        for (part, expected) in parts.into_iter().zip(&written) {
            let mut read = Vec::new();
            part.for_each(|item| {
                read.push(match item {
                    Item::State(key, encoded) => format!("state {key} {encoded:?}"),
                    Item::Event(e) => {
                        format!("event {:?} at {}", e.to_record().unwrap(), e.position)
                    }
                });
                true
            })
            .unwrap();
            assert_eq!(&read, expected);
            used += usize::from(!read.is_empty());
        }
        // 300 random keys over 128 parts leave few parts empty.
        assert!(used > 100, "{used} parts used");
    }

    #[test]
    fn runs_merge_into_the_projection_order() {
        let dir = tempfile::tempdir().unwrap();
        // Encodings begin with the workspace id (length, bytes), then the key id's 16 bytes.
        let workspaces = ["ws_a", "ws_ab", "ws_a-", "ws_B", "ws_0"];
        let mut states: Vec<Box<[u8]>> = (0..200u32)
            .map(|i| {
                let workspace = workspaces[i as usize % workspaces.len()].as_bytes();
                let mut e = vec![workspace.len() as u8];
                e.extend_from_slice(workspace);
                e.extend_from_slice(&KeyId::generate(i64::from(i % 13)).to_bytes());
                e.push(i as u8);
                e.into()
            })
            .collect();
        let runs = states
            .chunks(30)
            .map(|chunk| {
                let mut chunk = chunk.to_vec();
                chunk.sort_by(|a, b| fold::projection_order(a, b));
                Run::write(dir.path(), chunk.into_iter()).unwrap()
            })
            .collect();
        let merged: Vec<Box<[u8]>> = merge(runs).collect::<io::Result<_>>().unwrap();
        states.sort_by(|a, b| fold::projection_order(a, b));
        assert_eq!(merged.len(), 200);
        assert_eq!(merged, states);
    }
}
