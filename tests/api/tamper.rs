//! Tampering with a real database file: `kemon-keys audit verify --db` names the first bad sequence of every kind of change to the event log, and a changed `keys` row.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use kemon_keys::log::chain::{
    Hash, LogRecord, canonical_bytes, chain, log_genesis, workspace_genesis,
};
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::audit_service_client::AuditServiceClient;
use kemon_keys::store::{self, RecordFilter};
use prost::Message as _;
use sha3::{Digest, Sha3_256};
use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use tonic::Request;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_kemon-keys");
const OTHER_WORKSPACE: &str = "ws_globex";

/// A stopped server's database, populated through the API.
struct Populated {
    /// Keeps the server's data directory alive.
    _data: Option<Arc<TempDir>>,
    db: PathBuf,
    /// The head from GetLogHead before the server stopped.
    head_sequence: u64,
    head_hash: Vec<u8>,
    /// Every event, in log order, as stored.
    records: Vec<LogRecord>,
}

fn acting<T>(actor: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-kemon-actor", actor.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-kemon-role", "admin".parse().unwrap());
    request
}

fn rename(workspace: &str, key_id: &str, name: &str) -> pb::RenameKeyRequest {
    pb::RenameKeyRequest {
        workspace_id: workspace.into(),
        key_id: key_id.into(),
        name: name.into(),
        expected_version: None,
    }
}

fn revoke(workspace: &str, key_id: &str) -> pb::RevokeKeyRequest {
    pb::RevokeKeyRequest {
        workspace_id: workspace.into(),
        key_id: key_id.into(),
        expected_version: None,
    }
}

/// Fifteen events over two workspaces (keys created, renamed, rescoped, revealed and
/// revoked), then a clean stop.
async fn populated() -> Populated {
    let server = TestServer::start().await;
    let mut keys = server.client().await;
    let tick = || server.clock.advance(Duration::from_secs(1));
    let other = |mut request: pb::CreateKeyRequest| {
        request.workspace_id = OTHER_WORKSPACE.into();
        request
    };

    let (a1, _) = create(&mut keys, private_key("Deploy", &["tickets:read"])).await;
    tick();
    let (b1, _) = create(
        &mut keys,
        other(public_key(
            "Widget",
            &["tickets:read"],
            &["app.example.com"],
        )),
    )
    .await;
    tick();
    keys.rename_key(acting(
        "user_bob",
        rename(WORKSPACE, &a1.key_id, "Deploy v2"),
    ))
    .await
    .expect("rename");
    tick();
    let mut revealable = private_key("Backup", &[]);
    revealable.reveal_later = true;
    let (a2, _) = create(&mut keys, revealable).await;
    tick();
    keys.update_key_scopes(acting(
        "user_bob",
        pb::UpdateKeyScopesRequest {
            workspace_id: WORKSPACE.into(),
            key_id: a1.key_id.clone(),
            scopes: vec!["tickets:write".into()],
            expected_version: None,
        },
    ))
    .await
    .expect("rescope");
    tick();
    keys.rename_key(acting(
        "user_carol",
        rename(OTHER_WORKSPACE, &b1.key_id, "Widget v2"),
    ))
    .await
    .expect("rename");
    tick();
    let (b2, _) = create(&mut keys, other(private_key("Ingest", &[]))).await;
    tick();
    keys.reveal_key(acting(
        "user_dana",
        pb::RevealKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: a2.key_id.clone(),
        },
    ))
    .await
    .expect("reveal");
    tick();
    keys.rename_key(acting(
        "user_bob",
        rename(WORKSPACE, &a2.key_id, "Backup (cold)"),
    ))
    .await
    .expect("rename");
    tick();
    keys.revoke_key(acting("user_carol", revoke(OTHER_WORKSPACE, &b1.key_id)))
        .await
        .expect("revoke");
    tick();
    keys.rename_key(acting(
        "user_carol",
        rename(OTHER_WORKSPACE, &b2.key_id, "Ingest v2"),
    ))
    .await
    .expect("rename");
    tick();
    let (a3, _) = create(&mut keys, private_key("Temporary", &[])).await;
    tick();
    keys.revoke_key(acting("user_bob", revoke(WORKSPACE, &a3.key_id)))
        .await
        .expect("revoke");
    tick();
    keys.rename_key(acting(
        "user_bob",
        rename(WORKSPACE, &a1.key_id, "Deploy v3"),
    ))
    .await
    .expect("rename");
    tick();
    keys.revoke_key(acting("user_dana", revoke(WORKSPACE, &a2.key_id)))
        .await
        .expect("revoke");

    let head = AuditServiceClient::new(server.channel().await)
        .get_log_head(as_role("auditor", pb::GetLogHeadRequest::default()))
        .await
        .expect("get_log_head")
        .into_inner();
    drop(keys);
    assert_eq!(head.sequence, 15);
    let db = server.db_path();
    let (data, result) = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("the server did not stop within 10 s");
    result.expect("clean shutdown");

    let mut conn = store::open_read_only(&db).await.expect("open the database");
    let records = read_all(&mut conn).await;
    conn.close().await.expect("close");
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

async fn read_all(conn: &mut SqliteConnection) -> Vec<LogRecord> {
    store::read_records(conn, 0, 10_000, &RecordFilter::default())
        .await
        .expect("read the events")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

impl Populated {
    /// A fresh copy of the database in its own directory (with its WAL and shared memory
    /// files, should the server have left any).
    fn copy(&self) -> (TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = dir.path().join("copy.db");
        std::fs::copy(&self.db, &copy).expect("copy the database");
        for suffix in ["-wal", "-shm"] {
            let source = with_suffix(&self.db, suffix);
            if source.exists() {
                std::fs::copy(&source, with_suffix(&copy, suffix)).expect("copy");
            }
        }
        (dir, copy)
    }

    /// A middle sequence.
    fn middle(&self) -> u64 {
        self.records.len() as u64 / 2
    }

    fn record(&self, sequence: u64) -> &LogRecord {
        &self.records[usize::try_from(sequence - 1).unwrap()]
    }

    fn head_arg(&self) -> String {
        format!("{}:{}", self.head_sequence, hex::encode(&self.head_hash))
    }
}

/// Opens a copy for tampering, with the append-only triggers dropped.
async fn open_without_triggers(db: &Path) -> SqliteConnection {
    let mut conn = store::connect(db).await.expect("open the copy");
    sqlx::query("DROP TRIGGER events_no_update")
        .execute(&mut conn)
        .await
        .expect("drop events_no_update");
    sqlx::query("DROP TRIGGER events_no_delete")
        .execute(&mut conn)
        .await
        .expect("drop events_no_delete");
    conn
}

async fn verify_db(db: &Path, expect_head: Option<&str>) -> Output {
    let mut args: Vec<String> = vec![
        "audit".into(),
        "verify".into(),
        "--db".into(),
        db.to_str().expect("UTF-8 path").into(),
    ];
    if let Some(head) = expect_head {
        args.extend(["--expect-head".into(), head.into()]);
    }
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .output()
            .expect("run kemon-keys")
    })
    .await
    .expect("cli task")
}

fn report(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[track_caller]
fn assert_verified(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", report(output));
    assert!(stdout.starts_with("OK"), "{}", report(output));
    stdout
}

/// Asserts that verification failed, and returns what it printed.
#[track_caller]
fn assert_refused(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!output.status.success(), "{}", report(output));
    assert!(!stdout.starts_with("OK"), "{}", report(output));
    stdout
}

/// Asserts that verification failed with `first bad sequence {sequence}`.
#[track_caller]
fn assert_first_bad(output: &Output, sequence: u64) {
    let stdout = assert_refused(output);
    let marker = "first bad sequence ";
    let reported = stdout.find(marker).and_then(|at| {
        let digits: String = stdout[at + marker.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u64>().ok()
    });
    assert_eq!(reported, Some(sequence), "{}", report(output));
}

#[tokio::test]
async fn the_untouched_database_and_a_copy_of_it_verify() {
    let p = populated().await;
    let out = verify_db(&p.db, None).await;
    let stdout = assert_verified(&out);
    assert!(
        stdout.contains(&format!("head {}", p.head_arg())),
        "the printed head is GetLogHead's: {stdout}"
    );
    assert!(stdout.contains("15 events"), "{stdout}");

    let (_dir, copy) = p.copy();
    assert_verified(&verify_db(&copy, None).await);
    assert_verified(&verify_db(&copy, Some(&p.head_arg())).await);
}

#[tokio::test]
async fn the_events_table_refuses_update_and_delete() {
    let p = populated().await;
    let (_dir, copy) = p.copy();
    let mut conn = store::connect(&copy).await.expect("open the copy");

    let update = sqlx::query("UPDATE events SET actor = 'user_mallory' WHERE sequence = 1")
        .execute(&mut conn)
        .await
        .expect_err("UPDATE of an event must be refused");
    assert!(update.to_string().contains("append-only"), "{update}");
    let delete = sqlx::query("DELETE FROM events WHERE sequence = 15")
        .execute(&mut conn)
        .await
        .expect_err("DELETE of an event must be refused");
    assert!(delete.to_string().contains("append-only"), "{delete}");
    let wholesale = sqlx::query("DELETE FROM events")
        .execute(&mut conn)
        .await
        .expect_err("DELETE of every event must be refused");
    assert!(wholesale.to_string().contains("append-only"), "{wholesale}");

    assert_eq!(read_all(&mut conn).await, p.records, "nothing changed");
    conn.close().await.expect("close");
    assert_verified(&verify_db(&copy, Some(&p.head_arg())).await);
}

#[tokio::test]
async fn a_flipped_payload_byte_is_the_first_bad_sequence() {
    let p = populated().await;
    let k = p.middle();
    let (_dir, copy) = p.copy();
    let mut conn = open_without_triggers(&copy).await;
    let mut payload = p.record(k).payload.clone();
    let last = payload.len() - 1;
    payload[last] ^= 0x01;
    let changed = sqlx::query("UPDATE events SET payload = ? WHERE sequence = ?")
        .bind(payload)
        .bind(i64::try_from(k).unwrap())
        .execute(&mut conn)
        .await
        .expect("tamper");
    assert_eq!(changed.rows_affected(), 1);
    conn.close().await.expect("close");

    assert_first_bad(&verify_db(&copy, None).await, k);
}

#[tokio::test]
async fn a_deleted_event_is_the_first_bad_sequence() {
    let p = populated().await;
    let k = p.middle();
    let (_dir, copy) = p.copy();
    let mut conn = open_without_triggers(&copy).await;
    let deleted = sqlx::query("DELETE FROM events WHERE sequence = ?")
        .bind(i64::try_from(k).unwrap())
        .execute(&mut conn)
        .await
        .expect("tamper");
    assert_eq!(deleted.rows_affected(), 1);
    conn.close().await.expect("close");

    assert_first_bad(&verify_db(&copy, None).await, k);
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
    let (_dir, copy) = p.copy();
    let mut conn = open_without_triggers(&copy).await;
    for (sequence, payload) in [(i.sequence, &j.payload), (j.sequence, &i.payload)] {
        sqlx::query("UPDATE events SET payload = ? WHERE sequence = ?")
            .bind(payload.clone())
            .bind(i64::try_from(sequence).unwrap())
            .execute(&mut conn)
            .await
            .expect("tamper");
    }
    conn.close().await.expect("close");

    assert_first_bad(&verify_db(&copy, None).await, i.sequence);
}

#[tokio::test]
async fn a_forged_row_after_the_last_is_the_first_bad_sequence() {
    let p = populated().await;
    let last = p.records.last().unwrap();
    let forged_sequence = last.sequence + 1;
    let (_dir, copy) = p.copy();
    let mut conn = open_without_triggers(&copy).await;
    let payload = pb::KeyRenamed {
        schema_version: 1,
        name: "Forged".into(),
    }
    .encode_to_vec();
    let hash = Sha3_256::digest(b"forged hash").to_vec();
    let workspace_hash = Sha3_256::digest(b"forged workspace hash").to_vec();
    sqlx::query(
        "INSERT INTO events (sequence, key_id, workspace_id, stream_version, event_type, \
         schema_version, payload, actor, recorded_at, hash, workspace_hash) \
         VALUES (?, ?, ?, ?, 'KeyRenamed', 1, ?, 'user_mallory', ?, ?, ?)",
    )
    .bind(i64::try_from(forged_sequence).unwrap())
    .bind(&p.records[0].key_id)
    .bind(&p.records[0].workspace_id)
    .bind(1000_i64)
    .bind(payload)
    .bind(last.recorded_at_ms + 1000)
    .bind(hash)
    .bind(workspace_hash)
    .execute(&mut conn)
    .await
    .expect("forge");
    assert_eq!(read_all(&mut conn).await.len(), p.records.len() + 1);
    conn.close().await.expect("close");

    assert_first_bad(&verify_db(&copy, None).await, forged_sequence);
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
    let (_dir, copy) = p.copy();
    let mut conn = open_without_triggers(&copy).await;
    sqlx::query("UPDATE events SET actor = 'user_mallory' WHERE sequence = ?")
        .bind(i64::try_from(k).unwrap())
        .execute(&mut conn)
        .await
        .expect("tamper");

    // Recompute both chains from the genesis over the rows as they are now.
    let mut log: Hash = log_genesis();
    let mut workspaces: HashMap<String, Hash> = HashMap::new();
    let mut rewritten = Vec::new();
    for mut r in read_all(&mut conn).await {
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
            sqlx::query("UPDATE events SET hash = ?, workspace_hash = ? WHERE sequence = ?")
                .bind(&r.hash[..])
                .bind(&r.workspace_hash[..])
                .bind(i64::try_from(r.sequence).unwrap())
                .execute(&mut conn)
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
    conn.close().await.expect("close");

    // Self-consistent: verifies on its own, with a different head.
    let stdout = assert_verified(&verify_db(&copy, None).await);
    assert!(!stdout.contains(&p.head_arg()), "{stdout}");
    // The head kept elsewhere exposes it.
    let out = verify_db(&copy, Some(&p.head_arg())).await;
    assert_refused(&out);
}

#[tokio::test]
async fn a_changed_keys_row_fails_the_projection_check() {
    let p = populated().await;
    let key_id = p.records[0].key_id.clone();
    let (_dir, copy) = p.copy();
    let mut conn = store::connect(&copy).await.expect("open the copy");
    let changed = sqlx::query("UPDATE keys SET name = 'Renamed behind the log' WHERE key_id = ?")
        .bind(&key_id)
        .execute(&mut conn)
        .await
        .expect("tamper");
    assert_eq!(changed.rows_affected(), 1);
    conn.close().await.expect("close");

    let out = verify_db(&copy, Some(&p.head_arg())).await;
    let stdout = assert_refused(&out);
    assert!(stdout.contains("keys table"), "{}", report(&out));
    assert!(stdout.contains(&key_id), "{}", report(&out));
}
