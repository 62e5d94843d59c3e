//! Storage faults: the real binary, its files made unwritable for a while by a file size limit
//! (RLIMIT_FSIZE set with `prlimit` on the running process: no root needed), and a crash.
//! Every write the server acknowledged must be in the log afterwards; every write it refused
//! must have left nothing; and the writer must recover without a restart.
//!
//! All of it is about SQLite's files (their size limit, lock file and page quota): on
//! PostgreSQL, losing the database is `replicas::replicas_that_lose_the_database_…` and a
//! crash `replicas::a_replica_killed_mid_write_…`. `scripts/sqlite-only-tests` lists these.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kemon_keys::proto::v1 as pb;
use kemon_keys::vault::MasterKey;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::helpers::*;

/// What the test believes about one key, from acknowledged writes only.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    name: String,
    revoked: bool,
    secret: String,
}

/// A refused write must say the storage failed, with a stable reason, and nothing else.
#[track_caller]
fn assert_storage_refusal(status: &tonic::Status) {
    assert!(
        matches!(status.code(), Code::Unavailable | Code::ResourceExhausted),
        "a storage failure must be UNAVAILABLE or RESOURCE_EXHAUSTED: {status:?}"
    );
    let reason = status.get_details_error_info().map(|i| i.reason);
    assert!(
        matches!(
            reason.as_deref(),
            Some("STORAGE_UNAVAILABLE" | "STORAGE_FULL")
        ),
        "reason: {reason:?}"
    );
    assert!(
        status.message().contains("nothing was written"),
        "{status:?}"
    );
}

fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

async fn create_named(client: &mut TestClient, name: &str) -> Result<(pb::Key, String), Status> {
    let request = revealable(private_key(name, &["tickets:read"]));
    client
        .try_create(request)
        .await
        .map(|r| (r.key.expect("key"), r.secret))
}

/// One round of writes: a create, a rename and a revoke of earlier keys. Updates `expected`
/// from acknowledged writes only; returns how many writes the server refused.
async fn write_round(
    client: &mut TestClient,
    round: usize,
    expected: &mut BTreeMap<String, Expected>,
    refused_names: &mut Vec<String>,
) -> usize {
    let mut refused = 0;
    let name = format!("key {round}");
    match create_named(client, &name).await {
        Ok((key, secret)) => {
            expected.insert(
                key.key_id,
                Expected {
                    name,
                    revoked: false,
                    secret,
                },
            );
        }
        Err(status) => {
            assert_storage_refusal(&status);
            refused_names.push(name);
            refused += 1;
        }
    }
    let live: Vec<String> = expected
        .iter()
        .filter(|(_, e)| !e.revoked)
        .map(|(id, _)| id.clone())
        .collect();
    if let Some(id) = live.first() {
        let new_name = format!("renamed in round {round}");
        match client.try_rename(id, &new_name, None).await {
            Ok(key) => {
                assert_eq!(key.name, new_name);
                expected.get_mut(id).unwrap().name = new_name;
            }
            Err(status) => {
                assert_storage_refusal(&status);
                refused += 1;
            }
        }
    }
    if round.is_multiple_of(2)
        && let Some(id) = live.last()
    {
        match client.try_revoke(id, None).await {
            Ok(key) => {
                assert!(key.revoked_at.is_some());
                expected.get_mut(id).unwrap().revoked = true;
            }
            Err(status) => {
                assert_storage_refusal(&status);
                refused += 1;
            }
        }
    }
    refused
}

/// Verify answers what the acknowledged writes say, from the cache.
async fn assert_verify_agrees(client: &mut TestClient, expected: &BTreeMap<String, Expected>) {
    for (id, e) in expected {
        let response = client.verify(&e.secret, &["tickets:read"], "").await;
        let want = if e.revoked {
            pb::VerifyCode::Revoked
        } else {
            pb::VerifyCode::Valid
        };
        assert_eq!(code(&response), want, "key {id}");
    }
}

/// Everything in the workspace, revoked keys included, by key id.
async fn all_keys(client: &mut TestClient) -> BTreeMap<String, pb::Key> {
    let keys = client.list_all().await;
    assert!(keys.len() < 200, "more keys than one page holds");
    keys.into_iter().map(|k| (k.key_id.clone(), k)).collect()
}

#[tokio::test]
async fn no_acknowledged_write_is_lost_when_storage_fails_and_recovers() {
    sqlite_only();
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let server = ServerProcess::start(tmp.path(), &master_key, &[]).await;
    let mut client = server.client().await;
    let mut expected = BTreeMap::new();
    let mut refused_names = Vec::new();
    for round in 0..6 {
        assert_eq!(
            write_round(&mut client, round, &mut expected, &mut refused_names).await,
            0
        );
    }

    // Files stop growing: every write past their current size fails (EFBIG, an I/O error).
    server.limit_file_size(Some(1));
    let mut refused = 0;
    for round in 6..30 {
        refused += write_round(&mut client, round, &mut expected, &mut refused_names).await;
        // Verify goes on from the cache, and agrees with what was acknowledged.
        assert_verify_agrees(&mut client, &expected).await;
    }
    assert!(
        refused >= 24,
        "the file size limit refused only {refused} writes"
    );
    server
        .wait_for_health(
            kemon_keys::app::WRITES_HEALTH_SERVICE,
            ServingStatus::NotServing,
        )
        .await;
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));

    // Storage works again: the writer recovers by itself, no restart.
    server.limit_file_size(None);
    for round in 30..40 {
        assert_eq!(
            write_round(&mut client, round, &mut expected, &mut refused_names).await,
            0,
            "writes must succeed once storage works again (round {round})"
        );
    }
    server
        .wait_for_health(
            kemon_keys::app::WRITES_HEALTH_SERVICE,
            ServingStatus::Serving,
        )
        .await;
    assert_verify_agrees(&mut client, &expected).await;

    // A crash, then a new server on the same files: exactly the acknowledged writes.
    drop(client);
    server.kill();
    let server = ServerProcess::start(tmp.path(), &master_key, &[]).await;
    let mut client = server.client().await;
    let keys = all_keys(&mut client).await;
    assert_eq!(
        keys.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the keys after the crash are exactly the acknowledged creates"
    );
    for (id, e) in &expected {
        let key = &keys[id];
        assert_eq!(key.name, e.name, "key {id}");
        assert_eq!(key.revoked_at.is_some(), e.revoked, "key {id}");
    }
    for name in &refused_names {
        assert!(
            keys.values().all(|k| &k.name != name),
            "a refused create left {name}"
        );
    }
    assert_verify_agrees(&mut client, &expected).await;
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    sqlite_only();
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let first = ServerProcess::start(tmp.path(), &master_key, &[]).await;

    let output = Cli::kemon(&["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .env("KEMON_MASTER_KEY", &master_key)
        .env("NO_COLOR", "1")
        .run()
        .await;
    assert!(!output.status.success(), "a second server started");
    assert!(
        output
            .stderr
            .contains("in use by another kemon-keys process"),
        "{}",
        output.stderr
    );

    // The same with a development master key: the refused start leaves no key behind.
    let output = Cli::kemon(&["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .run()
        .await;
    assert!(!output.status.success(), "a second server started");
    assert!(
        !tmp.path()
            .join(kemon_keys::app::DEV_MASTER_KEY_FILE)
            .exists(),
        "a refused start left a development master key"
    );

    // rebuild writes too: refused while the server runs.
    let output = Cli::kemon(&["rebuild", "--data-dir"])
        .arg(tmp.path())
        .run()
        .await;
    assert!(!output.status.success(), "rebuild ran beside a server");
    assert!(
        output
            .stderr
            .contains("in use by another kemon-keys process")
    );

    // The first server is unaffected, and once it stops the directory is free again.
    let mut client = first.client().await;
    client.create(private_key("still writable", &[])).await;
    drop(client);
    first.stop().await;
    let files = data_files(tmp.path());
    assert!(
        files.iter().all(|f| !f.to_string_lossy().ends_with("-wal")),
        "a clean stop leaves no WAL: {files:?}"
    );
    let second = ServerProcess::start(tmp.path(), &master_key, &[]).await;
    let mut client = second.client().await;
    client.create(private_key("second", &[])).await;
    drop(client);
    second.stop().await;
}

#[tokio::test]
async fn a_full_database_refuses_writes_as_resource_exhausted_and_keeps_verifying() {
    sqlite_only();
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    // SQLite's max_page_count: past 1 MiB every write fails with SQLITE_FULL.
    let server = ServerProcess::start(tmp.path(), &master_key, &["--max-database-mib", "1"]).await;
    let mut client = server.client().await;
    let mut acknowledged = Vec::new();
    let full = loop {
        assert!(acknowledged.len() < 20_000, "1 MiB never filled");
        let name = format!("filler {}", acknowledged.len());
        match create_named(&mut client, &name).await {
            Ok((key, secret)) => acknowledged.push((key.key_id, secret)),
            Err(status) => break status,
        }
    };
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert_eq!(
        full.get_details_error_info().map(|i| i.reason).as_deref(),
        Some("STORAGE_FULL")
    );
    assert!(full.message().contains("nothing was written"), "{full:?}");
    assert!(
        acknowledged.len() > 100,
        "only {} keys fit",
        acknowledged.len()
    );

    // Still full on the next try, and Verify goes on from the cache meanwhile.
    let again = create_named(&mut client, "one more").await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    for (_, secret) in acknowledged.iter().step_by(50) {
        let response = client.verify(secret, &["tickets:read"], "").await;
        assert_eq!(code(&response), pb::VerifyCode::Valid);
    }
    server
        .wait_for_health(
            kemon_keys::app::WRITES_HEALTH_SERVICE,
            ServingStatus::NotServing,
        )
        .await;
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));
    drop(client);
    server.stop().await;

    // With room again: every acknowledged key is there, nothing refused is, writes work.
    let server = ServerProcess::start(tmp.path(), &master_key, &["--max-database-mib", "64"]).await;
    let mut client = server.client().await;
    let keys = client.list_all().await;
    assert_eq!(keys.len(), acknowledged.len());
    assert!(keys.iter().all(|k| k.name.starts_with("filler ")));
    create_named(&mut client, "after the quota was raised")
        .await
        .expect("writes once there is room");
    drop(client);
    server.stop().await;
}
