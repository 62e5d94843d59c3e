//! Tampering with a real database (a SQLite file, or a PostgreSQL schema): `kemon-keys audit
//! verify --db|--database-url` names the first bad sequence of every kind of change to the
//! event log, and a changed `keys` row, at the same sequence whichever database holds the log.

use std::collections::HashMap;
use std::sync::Arc;

use kemon_keys::log::chain::{
    Hash, LogRecord, canonical_bytes, chain, log_genesis, workspace_genesis,
};
use kemon_keys::proto::v1 as pb;
use prost::Message as _;
use sha3::{Digest, Sha3_256};
use tempfile::TempDir;

use crate::helpers::*;
use crate::inspect::{Db, Events};
use crate::story::Story;

/// A stopped server's database, populated through the API.
struct Populated {
    /// Keeps the server's data directory alive.
    _data: Option<Arc<TempDir>>,
    db: Db,
    /// The head from GetLogHead before the server stopped.
    head_sequence: u64,
    head_hash: Vec<u8>,
    /// Every event, in log order, as stored.
    records: Vec<LogRecord>,
}

/// The long story (fifteen events over two workspaces: keys created, renamed, rescoped,
/// revealed and revoked), then a clean stop.
async fn populated() -> Populated {
    let server = TestServer::start().await;
    Story::write_long(&server).await;
    let head = log_head(&mut server.audit().await, "").await;
    assert_eq!(head.sequence, 15);
    let db = server.db();
    let data = server.shut_down().await;

    let records = db.read_only().records().await;
    assert_eq!(records.len(), 15);
    assert_eq!(records.last().unwrap().hash[..], head.hash[..]);
    Populated {
        _data: data,
        db,
        head_sequence: head.sequence,
        head_hash: head.hash,
        records,
    }
}

impl Populated {
    /// A fresh copy of the database (see [`Db::copy`]).
    async fn copy(&self) -> Db {
        self.db.copy().await
    }

    /// A copy, for tampering with the append-only guards taken away.
    async fn unguarded_copy(&self) -> Db {
        let db = self.copy().await;
        db.drop_append_only_guards().await;
        db
    }

    /// A middle sequence.
    fn middle(&self) -> u64 {
        self.records.len() as u64 / 2
    }

    fn record(&self, sequence: u64) -> &LogRecord {
        &self.records[usize::try_from(sequence - 1).unwrap()]
    }

    fn head_arg(&self) -> String {
        head_arg(self.head_sequence, &self.head_hash)
    }
}

async fn verify_db(db: &Db, expect_head: Option<&str>) -> Ran {
    Cli::kemon(&["audit", "verify"])
        .args(db.source_args())
        .args(
            expect_head
                .map(|head| ["--expect-head", head])
                .into_iter()
                .flatten(),
        )
        .run()
        .await
}

#[tokio::test]
async fn the_untouched_database_and_a_copy_of_it_verify() {
    let p = populated().await;
    let out = verify_db(&p.db, None).await;
    let stdout = out.assert_verified();
    assert!(
        stdout.contains(&format!("head {}", p.head_arg())),
        "the printed head is GetLogHead's: {stdout}"
    );
    assert!(stdout.contains("15 events"), "{stdout}");

    let copy = p.copy().await;
    verify_db(&copy, None).await.assert_verified();
    verify_db(&copy, Some(&p.head_arg()))
        .await
        .assert_verified();
}

#[tokio::test]
async fn the_events_table_refuses_update_and_delete() {
    let p = populated().await;
    let db = p.copy().await;

    let update = db
        .set_actor(Events::Sequence(1), "user_mallory")
        .await
        .expect_err("UPDATE of an event must be refused");
    assert!(update.contains("append-only"), "{update}");
    let delete = db
        .delete_events(Events::Sequence(15))
        .await
        .expect_err("DELETE of an event must be refused");
    assert!(delete.contains("append-only"), "{delete}");
    let wholesale = db
        .delete_events(Events::All)
        .await
        .expect_err("DELETE of every event must be refused");
    assert!(wholesale.contains("append-only"), "{wholesale}");

    assert_eq!(db.records().await, p.records, "nothing changed");
    verify_db(&db, Some(&p.head_arg())).await.assert_verified();
}

#[tokio::test]
async fn a_flipped_payload_byte_is_the_first_bad_sequence() {
    let p = populated().await;
    let k = p.middle();
    let db = p.unguarded_copy().await;
    let mut payload = p.record(k).payload.clone();
    let last = payload.len() - 1;
    payload[last] ^= 0x01;
    assert_eq!(db.set_payload(k, &payload).await, Ok(1));

    verify_db(&db, None).await.assert_first_bad(k);
}

#[tokio::test]
async fn a_deleted_event_is_the_first_bad_sequence() {
    let p = populated().await;
    let k = p.middle();
    let db = p.unguarded_copy().await;
    assert_eq!(db.delete_events(Events::Sequence(k)).await, Ok(1));

    verify_db(&db, None).await.assert_first_bad(k);
}

#[tokio::test]
async fn swapped_payloads_fail_at_the_earlier_of_the_two() {
    let p = populated().await;
    let renames: Vec<&LogRecord> = p
        .records
        .iter()
        .filter(|r| r.event_type == "KeyRenamed")
        .collect();
    assert!(renames.len() >= 2);
    let (i, j) = (renames[0], renames[renames.len() - 1]);
    assert!(i.sequence < j.sequence);
    assert_ne!(i.payload, j.payload);
    let db = p.unguarded_copy().await;
    for (sequence, payload) in [(i.sequence, &j.payload), (j.sequence, &i.payload)] {
        db.set_payload(sequence, payload).await.expect("tamper");
    }

    verify_db(&db, None).await.assert_first_bad(i.sequence);
}

#[tokio::test]
async fn a_forged_row_after_the_last_is_the_first_bad_sequence() {
    let p = populated().await;
    let last = p.records.last().unwrap();
    let forged_sequence = last.sequence + 1;
    let db = p.unguarded_copy().await;
    let forged = LogRecord {
        sequence: forged_sequence,
        key_id: p.records[0].key_id.clone(),
        workspace_id: p.records[0].workspace_id.clone(),
        stream_version: 1000,
        event_type: "KeyRenamed".into(),
        schema_version: 1,
        payload: pb::KeyRenamed {
            schema_version: 1,
            name: "Forged".into(),
        }
        .encode_to_vec(),
        actor: "user_mallory".into(),
        recorded_at_ms: last.recorded_at_ms + 1000,
        caller_identity: None,
        hash: Sha3_256::digest(b"forged hash").into(),
        workspace_hash: Sha3_256::digest(b"forged workspace hash").into(),
    };
    db.insert_event(&forged).await.expect("forge");
    assert_eq!(db.records().await.len(), p.records.len() + 1);

    verify_db(&db, None).await.assert_first_bad(forged_sequence);
}

#[tokio::test]
async fn a_tail_rewritten_with_recomputed_hashes_is_caught_only_by_the_kept_head() {
    let p = populated().await;
    // An event the projection does not hold the actor of (created_by comes from KeyCreated).
    let k = p
        .records
        .iter()
        .find(|r| r.sequence >= p.middle() && r.event_type != "KeyCreated")
        .expect("a non-creation event in the second half")
        .sequence;
    let db = p.unguarded_copy().await;
    db.set_actor(Events::Sequence(k), "user_mallory")
        .await
        .expect("tamper");

    // Recompute both chains from the genesis over the rows as they are now.
    let mut log: Hash = log_genesis();
    let mut workspaces: HashMap<String, Hash> = HashMap::new();
    let mut rewritten = Vec::new();
    for mut r in db.records().await {
        let canonical = canonical_bytes(&r);
        log = chain(&log, &canonical);
        let previous = workspaces
            .get(&r.workspace_id)
            .copied()
            .unwrap_or_else(|| workspace_genesis(&r.workspace_id));
        let workspace_hash = chain(&previous, &canonical);
        workspaces.insert(r.workspace_id.clone(), workspace_hash);
        if (log, workspace_hash) != (r.hash, r.workspace_hash) {
            r.hash = log;
            r.workspace_hash = workspace_hash;
            db.set_hashes(r.sequence, &r.hash, &r.workspace_hash)
                .await
                .expect("rewrite hashes");
            rewritten.push(r.sequence);
        }
    }
    assert_eq!(
        rewritten,
        (k..=p.head_sequence).collect::<Vec<_>>(),
        "every hash from the changed row on"
    );

    // Self-consistent: verifies on its own, with a different head.
    let out = verify_db(&db, None).await;
    let stdout = out.assert_verified();
    assert!(!stdout.contains(&p.head_arg()), "{stdout}");
    // The head kept elsewhere exposes it.
    verify_db(&db, Some(&p.head_arg())).await.assert_refused();
}

#[tokio::test]
async fn a_changed_keys_row_fails_the_projection_check() {
    let p = populated().await;
    let key_id = p.records[0].key_id.clone();
    let copy = p.copy().await;
    let changed = copy
        .rename_key_rows(Some(&key_id), "Renamed behind the log")
        .await;
    assert_eq!(changed, 1);

    let out = verify_db(&copy, Some(&p.head_arg())).await;
    let stdout = out.assert_refused();
    assert!(stdout.contains("keys table"), "{}", out.report());
    assert!(stdout.contains(&key_id), "{}", out.report());
}
