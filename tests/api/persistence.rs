//! Durability: restarts, the event log, projection rebuilds, secrets at rest and master keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kemon_keys::app::{Application, MasterKeySource};
use kemon_keys::clock::ManualClock;
use kemon_keys::proto::v1 as pb;
use kemon_keys::vault::MasterKey;
use sha3::Digest;
use tonic::Code;

use crate::helpers::*;
use crate::inspect::{Events, StoredEvent, all_files};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The error `Application::build` fails with (on the suite's backend), with its whole
/// context chain.
async fn build_error(dir: &Path, master_key: MasterKeySource) -> String {
    let settings = kemon_keys::app::Settings {
        database_url: suite_database_url(dir).await,
        ..settings(dir, master_key)
    };
    let error = Application::build(settings, Arc::new(ManualClock::new(T0_MS)))
        .await
        .expect_err("the server must refuse to start");
    format!("{error:#}")
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let (server, mut client) = TestServer::with_client().await;

    let (plain, plain_secret) = client.create(private_key("plain", &["tickets:read"])).await;
    let mut request = private_key("reveal later", &[]);
    request.reveal_later = true;
    let (revealable, revealable_secret) = client.create(request).await;
    let (public, public_secret) = client
        .create(public_key(
            "widget",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    let (revoked, revoked_secret) = client.create(private_key("to revoke", &[])).await;
    client.revoke(&revoked.key_id).await;
    let (renamed, renamed_secret) = client.create(private_key("old name", &[])).await;
    assert_eq!(client.rename(&renamed.key_id, "new name").await.version, 2);
    let (test_key, test_secret) = client.create(test_env(private_key("local dev", &[]))).await;
    let mut request = private_key("short lived", &[]);
    request.expiration = pb::Expiration::Expiration30Days as i32;
    let (short, short_secret) = client.create(request).await;
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
        before.push(client.verify(key, scopes, origin).await);
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
        keys_before.push(client.try_get_key(id).await.expect("get_key"));
    }
    assert_eq!(keys_before[4].name, "new name");
    assert!(keys_before[3].revoked_at.is_some());
    let listed_before = client.list_all().await;
    assert_eq!(listed_before.len(), ids.len());

    let server = server.restart().await;
    let mut client = server.client().await;

    let mut after = Vec::new();
    for (key, scopes, origin) in &probes {
        after.push(client.verify(key, scopes, origin).await);
    }
    assert_eq!(after, before, "VerifyKey answers changed across a restart");
    let mut keys_after = Vec::new();
    for id in ids {
        keys_after.push(client.try_get_key(id).await.expect("get_key after restart"));
    }
    assert_eq!(
        keys_after, keys_before,
        "GetKey answers changed across a restart"
    );
    assert_eq!(client.list_all().await, listed_before);

    assert_eq!(client.reveal(&revealable.key_id).await, revealable_secret);
    assert_eq!(client.reveal(&public.key_id).await, public_secret);
    assert_eq!(
        client.try_reveal(&revoked.key_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        client.try_reveal(&plain.key_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Stream versions continue where they were.
    let again = client.rename(&renamed.key_id, "newer name").await;
    assert_eq!(again.version, 3);
}

/// Creates a mix of keys and changes, with the clock moving between them.
async fn populate(server: &TestServer) -> usize {
    let mut client = server.client().await;
    let step = || server.clock.advance(Duration::from_millis(1_234));
    let (a, _) = client.create(private_key("full access", &[])).await;
    step();
    let (b, _) = client
        .create(private_key("scoped", &["tickets:read", "teams:read"]))
        .await;
    step();
    let mut request = private_key("revealable", &["labels:read"]);
    request.reveal_later = true;
    request.expiration = pb::Expiration::Never as i32;
    let (c, _) = client.create(request).await;
    step();
    let (d, _) = client
        .create(public_key(
            "public",
            &["tickets:read"],
            &["app.example.com", "*.example.org"],
        ))
        .await;
    step();
    let (e, _) = client.create(test_env(private_key("test", &[]))).await;
    step();
    client.rename(&a.key_id, "full access, renamed").await;
    step();
    client.rescope(&a.key_id, &["members:read"]).await;
    step();
    client.rescope(&b.key_id, &["tickets:write"]).await;
    step();
    client.rename(&c.key_id, "revealable, renamed").await;
    step();
    client.revoke(&c.key_id).await;
    step();
    client.revoke(&d.key_id).await;
    step();
    client.rename(&e.key_id, "test, renamed").await;
    client.rename(&e.key_id, "test, renamed twice").await;
    5
}

/// A stopped server's data and what it takes to use it again: the database, the command-line
/// tools' arguments for it, and a new server on it with the same clock and master key.
struct Stopped {
    db: crate::inspect::Db,
    data_args: Vec<String>,
    data_dir: PathBuf,
    clock: ManualClock,
    master_key: String,
    /// Keeps the data directory until the test ends.
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl Stopped {
    async fn of(server: TestServer) -> Stopped {
        let (db, data_args) = (server.db(), server.data_args());
        let (data_dir, clock) = (server.data_dir.clone(), server.clock.clone());
        let master_key = server.master_key_hex.clone();
        Stopped {
            db,
            data_args,
            data_dir,
            clock,
            master_key,
            _tmp: server.shut_down().await,
        }
    }

    /// A server on the same data.
    async fn restart(&self) -> anyhow::Result<TestServer> {
        TestServer::start_in(
            &self.data_dir,
            self.clock.clone(),
            MasterKeySource::Hex(self.master_key.clone()),
        )
        .await
    }
}

#[tokio::test]
async fn rebuild_recreates_the_projection_exactly() {
    let server = TestServer::start().await;
    let keys = populate(&server).await;
    let stopped = Stopped::of(server).await;
    let (db, data_args) = (&stopped.db, &stopped.data_args);

    let original = db.projection().await;
    let schema = if db.is_sqlite() {
        Some(db.keys_schema().await)
    } else {
        None
    };
    if let Some(schema) = &schema {
        assert!(
            schema
                .iter()
                .any(|(_, _, sql)| sql.as_deref().is_some_and(|s| s.contains("WITHOUT ROWID"))),
            "the projection is clustered by workspace: {schema:?}"
        );
        // The rebuild drops this index and makes it again: it must be there after.
        assert!(
            schema
                .iter()
                .any(|(kind, name, _)| kind == "index" && name == "keys_by_expiry"),
            "{schema:?}"
        );
    }
    let events = db.event_count(None).await;
    assert_eq!(original.rows.len(), keys);
    assert_eq!(events, 13);
    assert_eq!(original.checkpoint, events, "checkpoint = last sequence");

    // Rebuilding an intact projection changes nothing.
    let report = db.rebuild().await.expect("rebuild");
    assert_eq!(report.events, events as u64);
    assert_eq!(report.keys, keys as u64);
    assert_eq!(report.last_sequence, original.checkpoint);
    assert_eq!(db.projection().await, original);

    // An emptied projection comes back exactly.
    db.delete_key_rows(None).await;
    db.set_checkpoint(0).await;
    assert_ne!(db.projection().await, original);
    db.rebuild().await.expect("rebuild");
    assert_eq!(db.projection().await, original);

    // So does a tampered one.
    db.rename_key_rows(None, "tampered").await;
    db.unrevoke_and_bump_key_rows().await;
    db.delete_key_rows(Some("public")).await;
    assert_ne!(db.projection().await, original);
    db.rebuild().await.expect("rebuild");
    assert_eq!(db.projection().await, original);

    // And the command-line tool does the same.
    db.grant_full_access_to_key_rows().await;
    db.rename_key_rows(None, "tampered again").await;
    db.set_checkpoint(1).await;
    assert_ne!(db.projection().await, original);
    let output = Cli::kemon(&["rebuild"]).args(data_args).run().await;
    assert!(
        output.status.success(),
        "kemon-keys rebuild failed: {:?}\n{}",
        output.status,
        output.stderr
    );
    assert_eq!(db.projection().await, original);
    assert_eq!(db.event_count(None).await, events, "the log is untouched");

    // The schema is as the migrations left it (a rebuild recreates what it drops), and a
    // SQLite database is back in WAL.
    if db.is_sqlite() {
        assert_eq!(Some(db.keys_schema().await), schema);
        assert_eq!(db.journal_mode().await.as_deref(), Some("wal"));
    } else {
        assert_eq!(
            db.key_indexes().await,
            ["keys_by_expiry", "keys_by_workspace"]
        );
    }

    // The server starts on the rebuilt projection.
    let server = stopped.restart().await.expect("start after rebuild");
    let mut client = server.client().await;
    assert_eq!(client.list_all().await.len(), keys);

    if db.is_sqlite() {
        // A rebuild beside the live server is refused and changes nothing.
        let error = db
            .rebuild()
            .await
            .expect_err("rebuild must refuse a database in use");
        assert!(
            error.to_string().contains("stop the server"),
            "unexpected error: {error}"
        );
    } else {
        // PostgreSQL is shared by live replicas: a rebuild beside them waits for the log's
        // lock, as a writer does, and writes the same projection.
        let report = db.rebuild().await.expect("rebuild beside a live replica");
        assert_eq!(report.keys, keys as u64);
        assert_eq!(db.projection().await, original);
    }
    assert_eq!(client.list_all().await.len(), keys);
    drop(client);
    server.shut_down().await;
    assert_eq!(db.projection().await, original);
}

/// Whether the projection is the clustered table of migration 3.
async fn clustered(db: &crate::inspect::Db) -> bool {
    db.keys_schema()
        .await
        .iter()
        .any(|(_, _, sql)| sql.as_deref().is_some_and(|s| s.contains("WITHOUT ROWID")))
}

#[tokio::test]
async fn a_database_from_before_the_clustered_projection_keeps_every_row() {
    sqlite_only();
    let server = TestServer::start().await;
    let keys = populate(&server).await;
    let stopped = Stopped::of(server).await;
    let db = &stopped.db;
    let original = db.projection().await;
    db.unmigrate_clustered_keys().await;
    assert!(!clustered(db).await);
    assert_eq!(
        db.projection().await,
        original,
        "the same rows, laid out as before"
    );

    let server = stopped.restart().await.expect("start on the old layout");
    let mut client = server.client().await;
    assert_eq!(client.list_all().await.len(), keys);
    drop(client);
    server.shut_down().await;
    assert!(clustered(db).await, "migrated");
    assert_eq!(db.projection().await, original);
    Cli::kemon(&["audit", "verify"])
        .args(db.source_args())
        .run()
        .await
        .assert_verified();
}

#[tokio::test]
async fn a_projection_behind_its_log_is_refused_at_start() {
    sqlite_only();
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, secret) = client.create(private_key("soon revoked", &[])).await;
    client.revoke(&key.key_id).await;
    drop(client);
    let stopped = Stopped::of(server).await;
    let (db, dir) = (&stopped.db, &stopped.data_dir);

    // As if the revocation had reached the log but not the keys table: a server starting
    // on it would accept the revoked key. It refuses to serve instead.
    db.set_checkpoint(1).await;
    let out = serve_refused(&stopped).await;
    assert!(
        out.stderr.contains("kemon-keys rebuild"),
        "names the remedy: {}",
        out.report()
    );

    Cli::kemon(&["rebuild", "--data-dir"])
        .arg(dir)
        .run()
        .await
        .assert_success();
    let server = stopped.restart().await.expect("start after the rebuild");
    let mut client = server.client().await;
    let verdict = client.verify(&secret, &[], "").await;
    assert_eq!(code(&verdict), pb::VerifyCode::Revoked);
    drop(client);
    server.shut_down().await;
}

/// The start-up load reads the columns verification uses, copies their text as bytes and
/// checks it on the loading threads: a row whose workspace id is not UTF-8 stops the start,
/// naming the problem, and nothing is served.
#[tokio::test]
async fn a_key_row_that_is_not_utf8_is_refused_at_start() {
    sqlite_only();
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, _) = client.create(private_key("soon corrupt", &[])).await;
    drop(client);
    let stopped = Stopped::of(server).await;
    assert_eq!(
        stopped
            .db
            .corrupt_key_row_text(&key.key_id, "workspace_id")
            .await,
        1
    );
    let out = serve_refused(&stopped).await;
    assert!(
        out.stderr.contains("utf-8") && out.stderr.contains(&key.key_id),
        "names the problem and the row: {}",
        out.report()
    );
}

/// A column verification does not read (the name) is not read at start-up: the server
/// starts and the key verifies, and the corrupt value is reported by the calls and the audit
/// that read it.
#[tokio::test]
async fn a_corrupt_name_leaves_verification_serving() {
    sqlite_only();
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, secret) = client.create(private_key("soon corrupt", &[])).await;
    drop(client);
    let stopped = Stopped::of(server).await;
    assert_eq!(
        stopped.db.corrupt_key_row_text(&key.key_id, "name").await,
        1
    );
    let audit = Cli::kemon(&["audit", "verify"])
        .args(stopped.db.source_args())
        .run()
        .await;
    audit.assert_failure();
    assert!(
        audit.stderr.contains("corrupt data")
            && audit.stderr.contains("utf-8")
            && audit.stderr.contains(&key.key_id),
        "names the problem and the row: {}",
        audit.report()
    );
    let server = stopped.restart().await.expect("starts");
    let mut client = server.client().await;
    let verdict = client.verify(&secret, &[], "").await;
    assert_eq!(code(&verdict), pb::VerifyCode::Valid);
    let status = client
        .try_get_key(&key.key_id)
        .await
        .expect_err("a corrupt row is not served");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    drop(client);
    server.shut_down().await;
}

/// `kemon-keys serve` on a stopped server's data, which must refuse to start.
async fn serve_refused(stopped: &Stopped) -> Ran {
    let out = Cli::kemon(&["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&stopped.data_dir)
        .env("KEMON_MASTER_KEY", &stopped.master_key)
        .run()
        .await;
    out.assert_failure();
    out
}

/// More events and keys than one batch of the bulk paths holds (4096), over many workspaces,
/// with streams of several events: the rebuild, the start-up load and `audit verify` read
/// them on several threads and must agree with the live projection row for row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_keys_rebuild_load_and_verify_exactly() {
    const TASKS: usize = 16;
    const PER_TASK: usize = 400;
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for (t, client) in server.clients(TASKS).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let workspace = format!("ws_bulk_{t}");
            let mut client = client.in_workspace(&workspace);
            let mut kept = Vec::new();
            for i in 0..PER_TASK {
                let (key, secret) = client
                    .create(in_workspace(
                        &workspace,
                        private_key(&format!("key {i}"), &["tickets:read"]),
                    ))
                    .await;
                let revoked = i % 5 == 0;
                if i % 3 == 0 {
                    client
                        .rename(&key.key_id, &format!("key {i}, renamed"))
                        .await;
                }
                if revoked {
                    client.revoke(&key.key_id).await;
                }
                if i % 40 == 0 {
                    kept.push((secret, revoked, key.key_id));
                }
            }
            (client, kept)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        let (_, kept) = task.await.expect("writer task");
        samples.extend(kept);
    }
    let stopped = Stopped::of(server).await;
    let (db, data) = (&stopped.db, &stopped.data_args);
    let live = db.projection().await;
    assert_eq!(live.rows.len(), TASKS * PER_TASK);
    let events = db.event_count(None).await;
    assert!(events > 2 * 4096, "{events} events");

    // The rebuild writes what the live path wrote, from a full table and from an empty one,
    // and `audit verify` finds the log and the projection agree. With room for a thousand
    // keys in memory, both fold the log in parts through temporary files, and agree all the
    // same; the files are gone afterwards.
    let temp = tempfile::tempdir().expect("temporary directory");
    let cli = |command: &[&str], in_parts: bool| {
        let cli = Cli::kemon(command).timeout(Duration::from_secs(120));
        match in_parts {
            true => cli
                .args(["--keys-in-memory", "1000", "--temp-dir"])
                .arg(temp.path()),
            false => cli,
        }
    };
    for in_parts in [false, true] {
        let rebuild = || async {
            cli(&["rebuild"], in_parts)
                .args(data)
                .run()
                .await
                .assert_success();
        };
        rebuild().await;
        assert_eq!(db.projection().await, live, "in parts: {in_parts}");
        db.delete_key_rows(None).await;
        rebuild().await;
        assert_eq!(db.projection().await, live, "in parts: {in_parts}");

        let verified = cli(&["audit", "verify"], in_parts)
            .args(db.source_args())
            .run()
            .await;
        let stdout = verified.assert_verified();
        assert!(
            stdout.contains(&format!("{events} events, {} keys", TASKS * PER_TASK)),
            "{stdout}"
        );
    }
    // A projection row changed behind the log: the same key named, in parts or not.
    let tampered = samples[7].2.clone();
    assert_eq!(db.rename_key_rows(Some(&tampered), "tampered").await, 1);
    let in_memory = cli(&["audit", "verify"], false)
        .args(db.source_args())
        .run()
        .await;
    let in_parts = cli(&["audit", "verify"], true)
        .args(db.source_args())
        .run()
        .await;
    in_memory.assert_failure();
    in_parts.assert_failure();
    assert!(
        in_memory.stdout.contains(&format!("{tampered} differs")),
        "{}",
        in_memory.report()
    );
    assert_eq!(in_parts.stdout, in_memory.stdout);
    assert_eq!(
        std::fs::read_dir(temp.path()).expect("read").count(),
        0,
        "no temporary file is left"
    );
    cli(&["rebuild"], true)
        .args(data)
        .run()
        .await
        .assert_success();
    assert_eq!(db.projection().await, live);

    // Every key is loaded at start, revocations included.
    let server = stopped.restart().await.expect("restart");
    let mut client = server.client().await;
    for (secret, revoked, _) in &samples {
        let verdict = client.verify(secret, &["tickets:read"], "").await;
        let expected = if *revoked {
            pb::VerifyCode::Revoked
        } else {
            pb::VerifyCode::Valid
        };
        assert_eq!(code(&verdict), expected);
    }
    drop(client);
    server.shut_down().await;
}

/// A replay in parts whose temporary files cannot be made stops with the directory named,
/// and a rebuild leaves the projection as it was.
#[tokio::test]
async fn a_replay_in_parts_without_its_temporary_files_changes_nothing() {
    let server = TestServer::start().await;
    populate(&server).await;
    let stopped = Stopped::of(server).await;
    let (db, data) = (&stopped.db, &stopped.data_args);
    let original = db.projection().await;
    let temp = tempfile::tempdir().expect("temporary directory");
    let nowhere = temp.path().join("no such directory");
    let in_parts = |command: &[&str]| {
        Cli::kemon(command)
            .args(["--keys-in-memory", "1", "--temp-dir"])
            .arg(&nowhere)
    };

    db.rename_key_rows(None, "to be rebuilt").await;
    let tampered = db.projection().await;
    let out = in_parts(&["rebuild"]).args(data).run().await;
    out.assert_failure();
    let named = format!("temporary files in {}", nowhere.display());
    assert!(out.stderr.contains(&named), "{}", out.report());
    assert_eq!(db.projection().await, tampered, "nothing half written");

    let out = in_parts(&["audit", "verify"])
        .args(db.source_args())
        .run()
        .await;
    out.assert_failure();
    assert!(out.stderr.contains(&named), "{}", out.report());
    assert!(!out.stdout.contains("OK"), "{}", out.report());

    // With the files, the same rebuild restores the projection, and it verifies.
    std::fs::create_dir(&nowhere).expect("create the directory");
    in_parts(&["rebuild"])
        .args(data)
        .run()
        .await
        .assert_success();
    assert_eq!(db.projection().await, original);
    in_parts(&["audit", "verify"])
        .args(db.source_args())
        .run()
        .await
        .assert_verified();
}

#[tokio::test]
async fn the_event_log_refuses_update_and_delete() {
    let (server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("log", &[])).await;
    client.rename(&key.key_id, "log, renamed").await;

    let db = server.db();
    let before = db.events(None).await;
    assert_eq!(before.len(), 2);

    let update = db
        .set_actor(Events::All, "mallory")
        .await
        .expect_err("UPDATE on events must fail");
    assert!(update.contains("append-only"), "{update}");
    let delete = db
        .delete_events(Events::All)
        .await
        .expect_err("DELETE on events must fail");
    assert!(delete.contains("append-only"), "{delete}");
    let delete_one = db
        .delete_events(Events::Key(&key.key_id))
        .await
        .expect_err("DELETE on events must fail");
    assert!(delete_one.contains("append-only"), "{delete_one}");

    assert_eq!(db.events(None).await, before);
}

#[tokio::test]
async fn the_event_log_records_each_change_once() {
    let (server, mut client) = TestServer::with_client().await;
    let (other, _) = client.create(private_key("another key", &[])).await;
    let (created, _) = client
        .acting("user_carol", "admin")
        .create(private_key("logged", &[]))
        .await;
    let id = created.key_id.clone();
    let renamed = client
        .acting("user_bob", "admin")
        .try_rename(&id, "logged, renamed", Some(1))
        .await
        .expect("rename_key");
    assert_eq!(renamed.version, 2);
    let revoked = client.acting("user_dave", "admin").revoke(&id).await;
    assert_eq!(revoked.version, 3);

    let db = server.db();
    let events = db.events(Some(&id)).await;
    assert_eq!(events.len(), 3);
    let summary: Vec<(String, i64, String, String, i64)> = events
        .into_iter()
        .map(|e: StoredEvent| {
            (
                e.workspace_id,
                e.stream_version,
                e.event_type,
                e.actor,
                e.recorded_at,
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
    let max = db.max_sequence().await;
    let checkpoint = db.checkpoint().await;
    assert_eq!(checkpoint, max);
    assert_eq!(max, 4, "one event for the other key, three for this one");

    // Revoking again answers the same key and records nothing.
    let again = client.revoke(&id).await;
    assert_eq!(again, revoked);
    let again = client
        .try_revoke(&id, Some(3))
        .await
        .expect("revoke_key at the current version");
    assert_eq!(again.version, 3);
    assert_eq!(db.event_count(Some(&id)).await, 3);
    assert_eq!(db.event_count(None).await, 4);
    assert_eq!(db.event_count(Some(&other.key_id)).await, 1);
    assert_eq!(db.checkpoint().await, 4);
}

#[tokio::test]
async fn private_secrets_are_never_stored() {
    let (server, mut client) = TestServer::with_client().await;
    let (plain, plain_secret) = client.create(private_key("plain", &["tickets:read"])).await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (revealable, revealable_secret) = client.create(request).await;
    let (test_key, test_secret) = client.create(test_env(private_key("test", &[]))).await;
    let mut request = test_env(private_key("test, revealable", &[]));
    request.reveal_later = true;
    let (test_revealable, test_revealable_secret) = client.create(request).await;
    let (_, public_secret) = client
        .create(public_key(
            "public",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    assert_eq!(client.reveal(&revealable.key_id).await, revealable_secret);
    assert_eq!(
        client.reveal(&test_revealable.key_id).await,
        test_revealable_secret
    );
    client.rename(&plain.key_id, "plain, renamed").await;

    let private = [
        (&plain.key_id, &plain_secret),
        (&revealable.key_id, &revealable_secret),
        (&test_key.key_id, &test_secret),
        (&test_revealable.key_id, &test_revealable_secret),
    ];
    // Every file of the data directory, or every text and bytea value of the schema.
    let db = server.db();
    let scan = async || {
        let stored = db.stored_bytes().await;
        // The scan finds what is there: public keys are stored in the clear on purpose.
        assert!(
            stored
                .iter()
                .any(|(_, bytes)| contains(bytes, public_secret.as_bytes())),
            "public key string not found: the scan is broken"
        );
        for (_, secret) in &private {
            for (place, bytes) in &stored {
                assert!(
                    !contains(bytes, secret.as_bytes()),
                    "a private secret is stored in {place}"
                );
            }
        }
    };
    // While running (the WAL holds the recent writes) ...
    scan().await;
    for (id, secret) in &private {
        let hash = db.secret_hash(id).await;
        assert_eq!(hash, sha3::Sha3_256::digest(secret.as_bytes()).to_vec());
    }
    // ... and after a clean stop.
    let tmp = server.shut_down().await;
    scan().await;
    drop(tmp);
}

#[tokio::test]
async fn revoking_destroys_the_encrypted_copy() {
    let (server, mut client) = TestServer::with_client().await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (key, secret) = client.create(request).await;
    let (kept, _) = client.create(revealable(private_key("kept", &[]))).await;
    let (plain, _) = client.create(private_key("plain", &[])).await;
    assert_eq!(server.db().sealed_count(&key.key_id).await, 1);
    assert_eq!(server.db().sealed_count(&plain.key_id).await, 0);
    assert_eq!(client.reveal(&key.key_id).await, secret);

    let destroyed = server.db().sealed_copy(&key.key_id).await;
    let still_kept = server.db().sealed_copy(&kept.key_id).await;

    client.revoke(&key.key_id).await;
    assert_eq!(server.db().sealed_count(&key.key_id).await, 0);
    assert_eq!(server.db().sealed_count(&kept.key_id).await, 1);
    assert_eq!(
        client.try_reveal(&key.key_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // Gone from everything stored once RevokeKey has answered (every file, WAL included;
    // every value of the schema, the idempotency table's included); the kept copy is found,
    // so the scan can see a copy where there is one.
    let db = server.db();
    let stored = db.stored_bytes().await;
    assert!(stored.iter().any(|(_, bytes)| contains(bytes, &still_kept)));
    for (place, bytes) in &stored {
        assert!(
            !contains(bytes, &destroyed),
            "the revoked key's encrypted copy is still in {place}"
        );
    }

    drop(client);
    let tmp = server.shut_down().await;
    if let Some(file) = db.sqlite_file() {
        // A clean stop leaves one self-contained database file: no WAL to copy along.
        let names: Vec<String> = all_files(file.parent().unwrap())
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.ends_with("-wal") || n.ends_with("-shm")),
            "{names:?}"
        );
    }
    // A copy of the stopped server's database has the kept copy and not the destroyed one.
    let copy = db.copy().await;
    assert_eq!(copy.sealed_count(&kept.key_id).await, 1);
    assert_eq!(copy.sealed_count(&key.key_id).await, 0);
    for (place, bytes) in db.stored_bytes().await {
        assert!(!contains(&bytes, &destroyed), "{place}");
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
    let output = Cli::kemon(&["serve", "--listen", "127.0.0.1:0"])
        .args(suite_data_args(tmp.path()).await)
        .env("KEMON_MASTER_KEY", "nothex")
        .run()
        .await;
    assert!(!output.status.success(), "exited with {:?}", output.status);
    let stderr = &output.stderr;
    assert!(stderr.contains("64 hexadecimal characters"), "{stderr}");
}

#[tokio::test]
async fn a_different_master_key_is_refused() {
    let (server, mut client) = TestServer::with_client().await;
    let mut request = private_key("revealable", &[]);
    request.reveal_later = true;
    let (key, secret) = client.create(request).await;
    let data_dir = server.data_dir.clone();
    let clock = server.clock.clone();
    let original = server.master_key_hex.clone();
    let tmp = server.shut_down().await;

    let other = MasterKey::generate().to_hex();
    let error = build_error(&data_dir, MasterKeySource::Hex(other)).await;
    assert!(error.contains("fingerprint"), "{error}");
    assert!(error.contains("original master key"), "{error}");

    // The original key still works, and still opens the copy.
    let server = TestServer::start_in(&data_dir, clock, MasterKeySource::Hex(original))
        .await
        .expect("start with the original master key");
    let mut client = server.client().await;
    assert_eq!(client.reveal(&key.key_id).await, secret);
    server.shut_down().await;
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
    let (key, secret) = client.create(request).await;
    server.shut_down().await;

    let server = TestServer::start_in(dir, clock, MasterKeySource::Development)
        .await
        .expect("restart with the development key");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        contents,
        "the development key was replaced"
    );
    let mut client = server.client().await;
    assert_eq!(client.reveal(&key.key_id).await, secret);
    assert_eq!(
        code(&client.verify(&secret, &[], "").await),
        pb::VerifyCode::Valid
    );
    server.shut_down().await;
}

#[tokio::test]
async fn a_start_that_fails_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");

    // A malformed master key.
    let output = Cli::kemon(&["serve", "--listen", "127.0.0.1:0"])
        .args(suite_data_args(&data_dir).await)
        .env("KEMON_MASTER_KEY", "nothex")
        .run()
        .await;
    assert!(!output.status.success());
    assert!(!data_dir.exists(), "the data directory was created");

    // A port that is taken (by a listener of this test), with a development master key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = Cli::kemon(&["serve", "--listen", &format!("localhost:{port}")])
        .args(suite_data_args(&data_dir).await)
        .run()
        .await;
    assert!(!output.status.success());
    let stderr = &output.stderr;
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
    client.create(private_key("over a host name", &[])).await;
    drop(client);
    server.stop().await;
}

/// A rebuild that fails partway leaves the database as it was. The file may not grow (a file
/// size limit on the process, with SIGXFSZ ignored, so that writes past it fail) while the
/// rebuilt table needs new pages: the rebuild fails, and the projection,
/// its schema and the log are unchanged; the server starts on them, and a rebuild with room
/// then succeeds.
#[tokio::test]
async fn a_rebuild_that_runs_out_of_disk_leaves_the_database_as_it_was() {
    sqlite_only();
    let server = TestServer::start().await;
    let mut keys = populate(&server).await;
    // Enough rows that the rebuilt table needs more pages than the file has free.
    let mut client = server.client().await;
    for i in 0..200 {
        client
            .create(private_key(
                &format!("a key with a longer name, number {i}"),
                &["tickets:read"],
            ))
            .await;
        keys += 1;
    }
    drop(client);
    let db_path = server.db_path();
    let stopped = Stopped::of(server).await;
    let (db, data_args) = (&stopped.db, &stopped.data_args);

    let original = db.projection().await;
    let schema = db.keys_schema().await;
    let events = db.event_count(None).await;
    assert_eq!(original.rows.len(), keys);
    let size = std::fs::metadata(&db_path).expect("database file").len();

    let output = Cli::program("sh")
        .arg("-c")
        .arg(r#"trap '' XFSZ; exec prlimit --fsize="$0" -- "$@""#)
        .arg(size.to_string())
        .arg(SERVER_BIN)
        .arg("rebuild")
        .args(data_args)
        .run()
        .await;
    output.assert_failure();
    // SQLite reports a write past the limit (EFBIG) as an I/O error.
    assert!(
        output
            .stderr
            .contains("storage unavailable: disk I/O error"),
        "the rebuild should fail on the refused write: {}",
        output.report()
    );
    assert_eq!(
        std::fs::metadata(&db_path).expect("database file").len(),
        size,
        "the file is back to its size"
    );
    assert_eq!(db.projection().await, original);
    assert_eq!(db.keys_schema().await, schema);
    assert_eq!(db.event_count(None).await, events);

    let server = stopped
        .restart()
        .await
        .expect("start after the failed rebuild");
    let mut client = server.client().await;
    assert_eq!(client.list_all().await.len(), keys);
    drop(client);
    server.shut_down().await;

    Cli::kemon(&["rebuild"])
        .args(data_args)
        .run()
        .await
        .assert_success();
    assert_eq!(db.projection().await, original);
    assert_eq!(db.keys_schema().await, schema);
}
