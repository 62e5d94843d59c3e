//! Durability: restarts, the event log, projection rebuilds, secrets at rest and master keys.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kemon_keys::app::{Application, MasterKeySource, Settings};
use kemon_keys::clock::ManualClock;
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;
use kemon_keys::vault::MasterKey;
use sha3::Digest;
use sqlx::{Connection, Row, SqliteConnection};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_kemon-keys");

/// A request acting as `actor` with the admin role.
fn by<T>(actor: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-kemon-actor", actor.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-kemon-role", "admin".parse().unwrap());
    request
}

/// Graceful stop, failing (instead of hanging) if it does not finish within 10 s. Keeps the
/// data directory alive through the returned handle.
async fn stop(server: TestServer) -> Option<Arc<tempfile::TempDir>> {
    let (tmp, result) = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("graceful stop did not finish within 10 s");
    result.expect("clean shutdown");
    tmp
}

/// [`TestServer::restart`], failing (instead of hanging) if it takes more than 10 s.
async fn restart(server: TestServer) -> TestServer {
    tokio::time::timeout(Duration::from_secs(10), server.restart())
        .await
        .expect("restart (graceful stop, then start) did not finish within 10 s")
}

async fn get(client: &mut KeyServiceClient<Channel>, key_id: &str) -> Result<pb::Key, Status> {
    client
        .get_key(admin(pb::GetKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

async fn reveal(client: &mut KeyServiceClient<Channel>, key_id: &str) -> Result<String, Status> {
    client
        .reveal_key(admin(pb::RevealKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
        }))
        .await
        .map(|r| r.into_inner().secret)
}

async fn rename(client: &mut KeyServiceClient<Channel>, key_id: &str, name: &str) -> pb::Key {
    client
        .rename_key(admin(pb::RenameKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
            name: name.into(),
            expected_version: None,
        }))
        .await
        .expect("rename_key")
        .into_inner()
}

async fn rescope(client: &mut KeyServiceClient<Channel>, key_id: &str, scopes: &[&str]) -> pb::Key {
    client
        .update_key_scopes(admin(pb::UpdateKeyScopesRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expected_version: None,
        }))
        .await
        .expect("update_key_scopes")
        .into_inner()
}

async fn revoke(client: &mut KeyServiceClient<Channel>, key_id: &str) -> pb::Key {
    client
        .revoke_key(admin(pb::RevokeKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
            expected_version: None,
        }))
        .await
        .expect("revoke_key")
        .into_inner()
}

async fn list_all(client: &mut KeyServiceClient<Channel>) -> Vec<pb::Key> {
    client
        .list_keys(admin(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            page_size: 200,
            include_revoked: true,
            ..Default::default()
        }))
        .await
        .expect("list_keys")
        .into_inner()
        .keys
}

fn test_private_key(name: &str) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        environment: pb::Environment::Test as i32,
        ..private_key(name, &[])
    }
}

async fn db(path: &Path) -> SqliteConnection {
    kemon_keys::store::connect(path)
        .await
        .expect("open database")
}

/// Every row of `keys` (every column, SQL-quoted) in key id order, and the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Projection {
    rows: Vec<Vec<String>>,
    checkpoint: i64,
}

async fn snapshot(path: &Path) -> Projection {
    let mut conn = db(path).await;
    let columns: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info('keys') ORDER BY cid")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(columns.len() >= 18, "keys columns: {columns:?}");
    let select = columns
        .iter()
        .map(|c| format!("quote(\"{c}\")"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {select} FROM keys ORDER BY key_id"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(|row| {
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}={}", row.get::<String, _>(i)))
            .collect()
    })
    .collect();
    let checkpoint = sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoint")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    Projection { rows, checkpoint }
}

async fn event_count(path: &Path, key_id: Option<&str>) -> i64 {
    let mut conn = db(path).await;
    let n = match key_id {
        Some(id) => sqlx::query_scalar("SELECT count(*) FROM events WHERE key_id = ?")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap(),
        None => sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut conn)
            .await
            .unwrap(),
    };
    conn.close().await.unwrap();
    n
}

async fn sealed_count(path: &Path, key_id: &str) -> i64 {
    let mut conn = db(path).await;
    let n = sqlx::query_scalar("SELECT count(*) FROM sealed_secrets WHERE key_id = ?")
        .bind(key_id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}

/// Every file under `dir`, recursively, with its bytes.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read data dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files.extend(all_files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            files.push((path, bytes));
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn settings(dir: &Path, master_key: MasterKeySource) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        master_key,
        write_batch_max: 64,
        audit_live_buffer: 4096,
        connection_limits: Default::default(),
    }
}

/// The error `Application::build` fails with, with its whole context chain.
async fn build_error(dir: &Path, master_key: MasterKeySource) -> String {
    let error = Application::build(settings(dir, master_key), Arc::new(ManualClock::new(T0_MS)))
        .await
        .expect_err("the server must refuse to start");
    format!("{error:#}")
}

/// Runs the real binary; kills it and fails if it has not exited within 10 s.
fn run_binary(configure: impl FnOnce(&mut Command)) -> std::process::Output {
    let mut command = Command::new(BIN);
    command
        .env_remove("KEMON_MASTER_KEY")
        .env_remove("KEMON_MASTER_KEY_FILE")
        .env_remove("KEMON_DATA_DIR")
        .env_remove("KEMON_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut command);
    let mut child = command.spawn().expect("spawn kemon-keys");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kemon-keys did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let (plain, plain_secret) = create(&mut client, private_key("plain", &["tickets:read"])).await;
    let mut request = private_key("reveal later", &[]);
    request.reveal_later = true;
    let (revealable, revealable_secret) = create(&mut client, request).await;
    let (public, public_secret) = create(
        &mut client,
        public_key("widget", &["tickets:read"], &["app.example.com"]),
    )
    .await;
    let (revoked, revoked_secret) = create(&mut client, private_key("to revoke", &[])).await;
    revoke(&mut client, &revoked.key_id).await;
    let (renamed, renamed_secret) = create(&mut client, private_key("old name", &[])).await;
    assert_eq!(
        rename(&mut client, &renamed.key_id, "new name")
            .await
            .version,
        2
    );
    let (test_key, test_secret) = create(&mut client, test_private_key("local dev")).await;
    let mut request = private_key("short lived", &[]);
    request.expiration = pb::Expiration::Expiration30Days as i32;
    let (short, short_secret) = create(&mut client, request).await;
    server
        .clock
        .advance(Duration::from_millis((31 * DAY_MS) as u64));

    let probes: Vec<(&str, Vec<&str>, &str)> = vec![
        (plain_secret.as_str(), vec!["tickets:read"], ""),
        (plain_secret.as_str(), vec!["tickets:write"], ""),
        (revealable_secret.as_str(), vec![], ""),
        (
            public_secret.as_str(),
            vec!["tickets:read"],
            "https://app.example.com",
        ),
        (public_secret.as_str(), vec![], "https://evil.example.net"),
        (revoked_secret.as_str(), vec![], ""),
        (renamed_secret.as_str(), vec![], ""),
        (test_secret.as_str(), vec![], "localhost:3000"),
        (test_secret.as_str(), vec![], "https://app.example.com"),
        (short_secret.as_str(), vec![], ""),
        ("sk_not_a_key", vec![], ""),
    ];
    let mut before = Vec::new();
    for (key, scopes, origin) in &probes {
        before.push(verify(&mut client, key, scopes, origin).await);
    }
    use pb::VerifyCode as C;
    assert_eq!(
        before.iter().map(code).collect::<Vec<_>>(),
        [
            C::Valid,
            C::InsufficientScope,
            C::Valid,
            C::Valid,
            C::OriginNotAllowed,
            C::Revoked,
            C::Valid,
            C::Valid,
            C::EnvironmentNotAllowed,
            C::Expired,
            C::Malformed,
        ]
    );
    let ids = [
        &plain.key_id,
        &revealable.key_id,
        &public.key_id,
        &revoked.key_id,
        &renamed.key_id,
        &test_key.key_id,
        &short.key_id,
    ];
    let mut keys_before = Vec::new();
    for id in ids {
        keys_before.push(get(&mut client, id).await.expect("get_key"));
    }
    assert_eq!(keys_before[4].name, "new name");
    assert!(keys_before[3].revoked_at.is_some());
    let listed_before = list_all(&mut client).await;
    assert_eq!(listed_before.len(), ids.len());

    let server = restart(server).await;
    let mut client = server.client().await;

    let mut after = Vec::new();
    for (key, scopes, origin) in &probes {
        after.push(verify(&mut client, key, scopes, origin).await);
    }
    assert_eq!(after, before, "VerifyKey answers changed across a restart");
    let mut keys_after = Vec::new();
    for id in ids {
        keys_after.push(get(&mut client, id).await.expect("get_key after restart"));
    }
    assert_eq!(
        keys_after, keys_before,
        "GetKey answers changed across a restart"
    );
    assert_eq!(list_all(&mut client).await, listed_before);

    assert_eq!(
        reveal(&mut client, &revealable.key_id).await.unwrap(),
        revealable_secret
    );
    assert_eq!(
        reveal(&mut client, &public.key_id).await.unwrap(),
        public_secret
    );
    assert_eq!(
        reveal(&mut client, &revoked.key_id)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        reveal(&mut client, &plain.key_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Stream versions continue where they were.
    let again = rename(&mut client, &renamed.key_id, "newer name").await;
    assert_eq!(again.version, 3);
}

/// Creates a mix of keys and changes, with the clock moving between them.
async fn populate(server: &TestServer) -> usize {
    let mut client = server.client().await;
    let step = || server.clock.advance(Duration::from_millis(1_234));
    let (a, _) = create(&mut client, private_key("full access", &[])).await;
    step();
    let (b, _) = create(
        &mut client,
        private_key("scoped", &["tickets:read", "teams:read"]),
    )
    .await;
    step();
    let mut request = private_key("revealable", &["labels:read"]);
    request.reveal_later = true;
    request.expiration = pb::Expiration::Never as i32;
    let (c, _) = create(&mut client, request).await;
    step();
    let (d, _) = create(
        &mut client,
        public_key(
            "public",
            &["tickets:read"],
            &["app.example.com", "*.example.org"],
        ),
    )
    .await;
    step();
    let (e, _) = create(&mut client, test_private_key("test")).await;
    step();
    rename(&mut client, &a.key_id, "full access, renamed").await;
    step();
    rescope(&mut client, &a.key_id, &["members:read"]).await;
    step();
    rescope(&mut client, &b.key_id, &["tickets:write"]).await;
    step();
    rename(&mut client, &c.key_id, "revealable, renamed").await;
    step();
    revoke(&mut client, &c.key_id).await;
    step();
    revoke(&mut client, &d.key_id).await;
    step();
    rename(&mut client, &e.key_id, "test, renamed").await;
    rename(&mut client, &e.key_id, "test, renamed twice").await;
    5
}

#[tokio::test]
async fn rebuild_recreates_the_projection_exactly() {
    let server = TestServer::start().await;
    let keys = populate(&server).await;
    let db_path = server.db_path();
    let data_dir = server.data_dir.clone();
    let clock = server.clock.clone();
    let master_key = server.master_key_hex.clone();
    let tmp = stop(server).await;

    let original = snapshot(&db_path).await;
    let events = event_count(&db_path, None).await;
    assert_eq!(original.rows.len(), keys);
    assert_eq!(events, 13);
    assert_eq!(original.checkpoint, events, "checkpoint = last sequence");

    // Rebuilding an intact projection changes nothing.
    let report = kemon_keys::store::rebuild(&db_path).await.expect("rebuild");
    assert_eq!(report.events, events as u64);
    assert_eq!(report.keys, keys as u64);
    assert_eq!(report.last_sequence, original.checkpoint);
    assert_eq!(snapshot(&db_path).await, original);

    // An emptied projection comes back exactly.
    let mut conn = db(&db_path).await;
    sqlx::query("DELETE FROM keys")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE projection_checkpoint SET last_sequence = 0")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_ne!(snapshot(&db_path).await, original);
    kemon_keys::store::rebuild(&db_path).await.expect("rebuild");
    assert_eq!(snapshot(&db_path).await, original);

    // So does a tampered one.
    let mut conn = db(&db_path).await;
    sqlx::query("UPDATE keys SET name = 'tampered', version = version + 7, revoked_at = NULL")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM keys WHERE key_type = 'public'")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_ne!(snapshot(&db_path).await, original);
    kemon_keys::store::rebuild(&db_path).await.expect("rebuild");
    assert_eq!(snapshot(&db_path).await, original);

    // And the command-line tool does the same.
    let mut conn = db(&db_path).await;
    sqlx::query("UPDATE keys SET scopes = '', full_access = 1, name = 'tampered again'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE projection_checkpoint SET last_sequence = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_ne!(snapshot(&db_path).await, original);
    let output = run_binary(|c| {
        c.arg("rebuild").arg("--data-dir").arg(&data_dir);
    });
    assert!(
        output.status.success(),
        "kemon-keys rebuild failed: {:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(snapshot(&db_path).await, original);
    assert_eq!(
        event_count(&db_path, None).await,
        events,
        "the log is untouched"
    );

    // The schema is as the migrations left it: the rebuild recreates the index it drops,
    // and returns the database to WAL.
    let mut conn = db(&db_path).await;
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'keys' \
         AND name NOT LIKE 'sqlite_autoindex%' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(indexes, ["keys_by_workspace"]);
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    conn.close().await.unwrap();

    // The server starts on the rebuilt projection.
    let server = TestServer::start_in(&data_dir, clock, MasterKeySource::Hex(master_key))
        .await
        .expect("start after rebuild");
    let mut client = server.client().await;
    assert_eq!(list_all(&mut client).await.len(), keys);

    // A rebuild beside the live server is refused and changes nothing.
    let error = kemon_keys::store::rebuild(&db_path)
        .await
        .expect_err("rebuild must refuse a database in use");
    assert!(
        error.to_string().contains("stop the server"),
        "unexpected error: {error}"
    );
    assert_eq!(list_all(&mut client).await.len(), keys);
    drop(client);
    stop(server).await;
    assert_eq!(snapshot(&db_path).await, original);
    drop(tmp);
}

#[tokio::test]
async fn the_event_log_refuses_update_and_delete() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, _) = create(&mut client, private_key("log", &[])).await;
    rename(&mut client, &key.key_id, "log, renamed").await;

    let mut conn = db(&server.db_path()).await;
    let before: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT sequence, event_type, actor FROM events ORDER BY sequence")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(before.len(), 2);

    let update = sqlx::query("UPDATE events SET actor = 'mallory'")
        .execute(&mut conn)
        .await
        .expect_err("UPDATE on events must fail");
    assert!(update.to_string().contains("append-only"), "{update}");
    let delete = sqlx::query("DELETE FROM events")
        .execute(&mut conn)
        .await
        .expect_err("DELETE on events must fail");
    assert!(delete.to_string().contains("append-only"), "{delete}");
    let delete_one = sqlx::query("DELETE FROM events WHERE key_id = ?")
        .bind(&key.key_id)
        .execute(&mut conn)
        .await
        .expect_err("DELETE on events must fail");
    assert!(
        delete_one.to_string().contains("append-only"),
        "{delete_one}"
    );

    let after: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT sequence, event_type, actor FROM events ORDER BY sequence")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(after, before);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn the_event_log_records_each_change_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (other, _) = create(&mut client, private_key("another key", &[])).await;
    let created = client
        .create_key(by("user_carol", private_key("logged", &[])))
        .await
        .expect("create_key")
        .into_inner()
        .key
        .unwrap();
    let id = created.key_id.clone();
    let renamed = client
        .rename_key(by(
            "user_bob",
            pb::RenameKeyRequest {
                workspace_id: WORKSPACE.into(),
                key_id: id.clone(),
                name: "logged, renamed".into(),
                expected_version: Some(1),
            },
        ))
        .await
        .expect("rename_key")
        .into_inner();
    assert_eq!(renamed.version, 2);
    let revoked = client
        .revoke_key(by(
            "user_dave",
            pb::RevokeKeyRequest {
                workspace_id: WORKSPACE.into(),
                key_id: id.clone(),
                expected_version: None,
            },
        ))
        .await
        .expect("revoke_key")
        .into_inner();
    assert_eq!(revoked.version, 3);

    let mut conn = db(&server.db_path()).await;
    let rows = sqlx::query(
        "SELECT workspace_id, stream_version, event_type, actor, recorded_at \
         FROM events WHERE key_id = ? ORDER BY sequence",
    )
    .bind(&id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3);
    let summary: Vec<(String, i64, String, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get("workspace_id"),
                r.get("stream_version"),
                r.get("event_type"),
                r.get("actor"),
                r.get("recorded_at"),
            )
        })
        .collect();
    let row = |v: i64, t: &str, actor: &str| {
        (
            WORKSPACE.to_owned(),
            v,
            t.to_owned(),
            actor.to_owned(),
            T0_MS,
        )
    };
    assert_eq!(
        summary,
        [
            row(1, "KeyCreated", "user_carol"),
            row(2, "KeyRenamed", "user_bob"),
            row(3, "KeyRevoked", "user_dave"),
        ]
    );
    assert_eq!(created.created_by, "user_carol");
    let max: i64 = sqlx::query_scalar("SELECT max(sequence) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let checkpoint: i64 = sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoint")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(checkpoint, max);
    assert_eq!(max, 4, "one event for the other key, three for this one");
    conn.close().await.unwrap();

    // Revoking again answers the same key and records nothing.
    let again = revoke(&mut client, &id).await;
    assert_eq!(again, revoked);
    let again = client
        .revoke_key(admin(pb::RevokeKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: id.clone(),
            expected_version: Some(3),
        }))
        .await
        .expect("revoke_key at the current version")
        .into_inner();
    assert_eq!(again.version, 3);
    assert_eq!(event_count(&server.db_path(), Some(&id)).await, 3);
    assert_eq!(event_count(&server.db_path(), None).await, 4);
    assert_eq!(event_count(&server.db_path(), Some(&other.key_id)).await, 1);
    let mut conn = db(&server.db_path()).await;
    let checkpoint: i64 = sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoint")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(checkpoint, 4);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn private_secrets_are_never_stored() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (plain, plain_secret) = create(&mut client, private_key("plain", &["tickets:read"])).await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (revealable, revealable_secret) = create(&mut client, request).await;
    let (test_key, test_secret) = create(&mut client, test_private_key("test")).await;
    let mut request = test_private_key("test, revealable");
    request.reveal_later = true;
    let (test_revealable, test_revealable_secret) = create(&mut client, request).await;
    let (_, public_secret) = create(
        &mut client,
        public_key("public", &["tickets:read"], &["app.example.com"]),
    )
    .await;
    assert_eq!(
        reveal(&mut client, &revealable.key_id).await.unwrap(),
        revealable_secret
    );
    assert_eq!(
        reveal(&mut client, &test_revealable.key_id).await.unwrap(),
        test_revealable_secret
    );
    rename(&mut client, &plain.key_id, "plain, renamed").await;

    let private = [
        (&plain.key_id, &plain_secret),
        (&revealable.key_id, &revealable_secret),
        (&test_key.key_id, &test_secret),
        (&test_revealable.key_id, &test_revealable_secret),
    ];
    let scan = |dir: &Path| {
        let files = all_files(dir);
        assert!(
            files
                .iter()
                .any(|(p, _)| p.file_name().unwrap() == kemon_keys::store::DATABASE_FILE),
            "the database file is in the data dir"
        );
        // The scan finds what is there: public keys are stored in the clear on purpose.
        assert!(
            files
                .iter()
                .any(|(_, bytes)| contains(bytes, public_secret.as_bytes())),
            "public key string not found: the scan is broken"
        );
        for (_, secret) in &private {
            for (path, bytes) in &files {
                assert!(
                    !contains(bytes, secret.as_bytes()),
                    "a private secret is stored in {}",
                    path.display()
                );
            }
        }
    };
    // While running (the WAL holds the recent writes) ...
    scan(&server.data_dir);
    for (id, secret) in &private {
        let mut conn = db(&server.db_path()).await;
        let hash: Vec<u8> = sqlx::query_scalar("SELECT secret_hash FROM keys WHERE key_id = ?")
            .bind(id.as_str())
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        assert_eq!(hash, sha3::Sha3_256::digest(secret.as_bytes()).to_vec());
    }
    // ... and after a clean stop.
    let data_dir = server.data_dir.clone();
    let tmp = stop(server).await;
    scan(&data_dir);
    drop(tmp);
}

#[tokio::test]
async fn revoking_destroys_the_encrypted_copy() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (key, secret) = create(&mut client, request).await;
    let (kept, _) = create(&mut client, {
        let mut r = private_key("kept", &[]);
        r.reveal_later = true;
        r
    })
    .await;
    let (plain, _) = create(&mut client, private_key("plain", &[])).await;
    assert_eq!(sealed_count(&server.db_path(), &key.key_id).await, 1);
    assert_eq!(sealed_count(&server.db_path(), &plain.key_id).await, 0);
    assert_eq!(reveal(&mut client, &key.key_id).await.unwrap(), secret);

    let sealed_of = |key_id: String| {
        let path = server.db_path();
        async move {
            let mut conn = db(&path).await;
            let bytes: Vec<u8> =
                sqlx::query_scalar("SELECT sealed FROM sealed_secrets WHERE key_id = ?")
                    .bind(key_id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            conn.close().await.unwrap();
            bytes
        }
    };
    let destroyed = sealed_of(key.key_id.clone()).await;
    let still_kept = sealed_of(kept.key_id.clone()).await;

    revoke(&mut client, &key.key_id).await;
    assert_eq!(sealed_count(&server.db_path(), &key.key_id).await, 0);
    assert_eq!(sealed_count(&server.db_path(), &kept.key_id).await, 1);
    assert_eq!(
        reveal(&mut client, &key.key_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // Gone from every file once RevokeKey has answered, WAL included; the kept copy is
    // found, so the scan can see a copy where there is one.
    let files = all_files(&server.data_dir);
    assert!(files.iter().any(|(_, bytes)| contains(bytes, &still_kept)));
    for (path, bytes) in &files {
        assert!(
            !contains(bytes, &destroyed),
            "the revoked key's encrypted copy is still in {}",
            path.display()
        );
    }

    // A clean stop leaves one self-contained database file: no WAL to copy along.
    drop(client);
    let data_dir = server.data_dir.clone();
    let tmp = stop(server).await;
    let names: Vec<String> = all_files(&data_dir)
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("-wal") || n.ends_with("-shm")),
        "{names:?}"
    );
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("copy.db");
    std::fs::copy(data_dir.join(kemon_keys::store::DATABASE_FILE), &copied).unwrap();
    assert_eq!(sealed_count(&copied, &kept.key_id).await, 1);
    assert_eq!(sealed_count(&copied, &key.key_id).await, 0);
    for (path, bytes) in all_files(&data_dir) {
        assert!(!contains(&bytes, &destroyed), "{}", path.display());
    }
    drop(tmp);
}

#[tokio::test]
async fn malformed_master_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = "64 hexadecimal characters";

    let error = build_error(tmp.path(), MasterKeySource::Hex("abc".into())).await;
    assert!(error.contains(expected), "{error}");
    let error = build_error(tmp.path(), MasterKeySource::Hex("g".repeat(64))).await;
    assert!(error.contains(expected), "{error}");
    let almost = format!("{}x", &MasterKey::generate().to_hex()[..63]);
    let error = build_error(tmp.path(), MasterKeySource::Hex(almost)).await;
    assert!(error.contains(expected), "{error}");

    let file = tmp.path().join("master.key");
    std::fs::write(&file, "this is not a master key\n").unwrap();
    let error = build_error(tmp.path(), MasterKeySource::File(file)).await;
    assert!(error.contains(expected), "{error}");
}

#[tokio::test]
async fn the_binary_exits_on_a_malformed_master_key() {
    let tmp = tempfile::tempdir().unwrap();
    let output = run_binary(|c| {
        c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path())
            .env("KEMON_MASTER_KEY", "nothex");
    });
    assert!(!output.status.success(), "exited with {:?}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("64 hexadecimal characters"), "{stderr}");
}

#[tokio::test]
async fn a_different_master_key_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (key, secret) = create(&mut client, request).await;
    let data_dir = server.data_dir.clone();
    let clock = server.clock.clone();
    let original = server.master_key_hex.clone();
    let tmp = stop(server).await;

    let other = MasterKey::generate().to_hex();
    let error = build_error(&data_dir, MasterKeySource::Hex(other)).await;
    assert!(error.contains("fingerprint"), "{error}");
    assert!(error.contains("original master key"), "{error}");

    // The original key still works, and still opens the copy.
    let server = TestServer::start_in(&data_dir, clock, MasterKeySource::Hex(original))
        .await
        .expect("start with the original master key");
    let mut client = server.client().await;
    assert_eq!(reveal(&mut client, &key.key_id).await.unwrap(), secret);
    stop(server).await;
    drop(tmp);
}

#[tokio::test]
async fn a_development_master_key_is_generated_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let clock = ManualClock::new(T0_MS);
    let key_file = dir.join(kemon_keys::app::DEV_MASTER_KEY_FILE);
    assert!(!key_file.exists());

    let server = TestServer::start_in(dir, clock.clone(), MasterKeySource::Development)
        .await
        .expect("start with a development key");
    assert!(key_file.exists(), "dev-master.key not generated");
    let contents = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(contents.trim().len(), 64, "{contents:?}");
    assert!(MasterKey::parse_hex(&contents).is_ok());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let mut client = server.client().await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (key, secret) = create(&mut client, request).await;
    stop(server).await;

    let server = TestServer::start_in(dir, clock, MasterKeySource::Development)
        .await
        .expect("restart with the development key");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        contents,
        "the development key was replaced"
    );
    let mut client = server.client().await;
    assert_eq!(reveal(&mut client, &key.key_id).await.unwrap(), secret);
    assert_eq!(
        code(&verify(&mut client, &secret, &[], "").await),
        pb::VerifyCode::Valid
    );
    stop(server).await;
}

#[tokio::test]
async fn a_start_that_fails_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");

    // A malformed master key.
    let output = run_binary(|c| {
        c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env("KEMON_MASTER_KEY", "nothex");
    });
    assert!(!output.status.success());
    assert!(!data_dir.exists(), "the data directory was created");

    // A port that is taken (by a listener of this test), with a development master key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = run_binary(|c| {
        c.args([
            "serve",
            "--listen",
            &format!("localhost:{port}"),
            "--data-dir",
        ])
        .arg(&data_dir);
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("binding localhost:").count(),
        1,
        "the error is printed once: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes in a pipe: {stderr}"
    );
    assert!(!data_dir.exists(), "the data directory was created");
}

#[tokio::test]
async fn the_listen_address_may_be_a_host_name() {
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let server = ServerProcess::start_listening(tmp.path(), &master_key, "localhost:0").await;
    let mut client = server.client().await;
    create(&mut client, private_key("over a host name", &[])).await;
    drop(client);
    server.stop().await;
}
