//! Several replicas on one PostgreSQL schema: any replica takes any write, every replica
//! applies every change in order, revocations reach every replica at once and are confirmed,
//! a replica that cannot confirm it is caught up refuses Verify, and the log stays one
//! gap-free, append-only chain. Needs the PostgreSQL server of `postgres_server()`: these
//! tests fail, never skip, when it is unreachable.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use kemon_keys::proto::v1 as pb;
use pb::subscribe_events_response::Message;
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::*;

/// Three replicas on a fresh schema, with one master key.
async fn three_replicas(max_staleness: Duration) -> (String, Vec<TestServer>) {
    let url = fresh_postgres_schema().await;
    let key = kemon_keys::vault::MasterKey::generate().to_hex();
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        replicas.push(TestServer::start_replica(&url, &key, name, max_staleness).await);
    }
    (url, replicas)
}

/// A live subscription to a replica's log from the start.
async fn subscribe(server: &TestServer) -> tonic::Streaming<pb::SubscribeEventsResponse> {
    server
        .audit()
        .await
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: None,
        }))
        .await
        .expect("subscribe")
        .into_inner()
}

/// The sequences of the next `n` events of a subscription, failing after 10 s.
async fn next_sequences(
    stream: &mut tonic::Streaming<pb::SubscribeEventsResponse>,
    n: usize,
) -> Vec<u64> {
    let mut sequences = Vec::with_capacity(n);
    tokio::time::timeout(Duration::from_secs(10), async {
        while sequences.len() < n {
            let message = stream.next().await.expect("stream open").expect("message");
            if let Some(Message::Event(event)) = message.message {
                sequences.push(event.sequence);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} events within 10 s", sequences.len()));
    sequences
}

async fn verify_code(server: &TestServer, secret: &str) -> Result<pb::VerifyCode, tonic::Status> {
    let mut client = server.client().await;
    client.try_verify(secret, &[], "").await.map(|r| code(&r))
}

#[tokio::test]
async fn writes_spread_over_three_replicas_reach_every_replica_once_and_in_order() {
    let (_url, replicas) = three_replicas(Duration::from_secs(5)).await;
    let mut streams = Vec::new();
    for replica in &replicas {
        streams.push(subscribe(replica).await);
    }

    // Each replica writes concurrently: creates, renames and revokes.
    let mut writers = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        let mut client = replica.client().await;
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..15 {
                let (key, secret) = client
                    .create(private_key(&format!("r{r} key {i}"), &["tickets:read"]))
                    .await;
                client
                    .rename(&key.key_id, &format!("r{r} renamed {i}"))
                    .await;
                let revoked = i % 3 == 0;
                if revoked {
                    client.revoke(&key.key_id).await;
                }
                written.push((key.key_id, secret, revoked));
            }
            written
        }));
    }
    let mut written = Vec::new();
    for writer in writers {
        written.extend(writer.await.expect("writer"));
    }
    // 45 creates, 45 renames, 15 revokes.
    let events = 45 + 45 + 15;

    let expected: Vec<u64> = (1..=events as u64).collect();
    for (r, stream) in streams.iter_mut().enumerate() {
        assert_eq!(
            next_sequences(stream, events).await,
            expected,
            "replica r{} delivered the log out of order, with a gap or twice",
            r + 1
        );
    }
    // Every replica's cache holds every change, whichever replica made it.
    for (r, replica) in replicas.iter().enumerate() {
        for (key_id, secret, revoked) in &written {
            let want = if *revoked {
                pb::VerifyCode::Revoked
            } else {
                pb::VerifyCode::Valid
            };
            assert_eq!(
                verify_code(replica, secret).await.expect("verify"),
                want,
                "{key_id} on replica r{}",
                r + 1
            );
        }
    }
    // Reads go to the database: a key written on one replica reads the same on every other.
    let (key_id, _, _) = &written[0];
    let mut names = Vec::new();
    for replica in &replicas {
        names.push(replica.client().await.get_key(key_id).await.name);
    }
    assert!(names.iter().all(|n| n == &names[0]), "{names:?}");
}

#[tokio::test]
async fn a_revocation_is_refused_on_every_replica_as_soon_as_it_is_confirmed() {
    let (_url, replicas) = three_replicas(Duration::from_secs(5)).await;
    let mut client = replicas[0].client().await;
    let (key, secret) = client.create(private_key("shared", &[])).await;
    for replica in &replicas {
        // Created on r1; eventually VALID everywhere (the others tail it).
        let mut tries = 0;
        while verify_code(replica, &secret).await.expect("verify") != pb::VerifyCode::Valid {
            tries += 1;
            assert!(tries < 500, "the key never reached a replica");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let request = client.request(pb::RevokeKeyRequest {
        workspace_id: WORKSPACE.into(),
        key_id: key.key_id.clone(),
        expected_version: None,
        wait_for_replicas: true,
    });
    let response = client.raw().revoke_key(request).await.expect("revoke");
    let header = |name: &str| {
        response
            .metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("x-kemon-replicas-live").as_deref(), Some("3"));
    assert_eq!(header("x-kemon-replicas-confirmed").as_deref(), Some("3"));
    // Confirmed means applied: no replica answers VALID any more, with no waiting.
    for (r, replica) in replicas.iter().enumerate() {
        assert_eq!(
            verify_code(replica, &secret).await.expect("verify"),
            pb::VerifyCode::Revoked,
            "replica r{}",
            r + 1
        );
    }

    // Without the option, the answer carries no confirmation.
    let (other, _) = client.create(private_key("other", &[])).await;
    let request = client.request(pb::RevokeKeyRequest {
        workspace_id: WORKSPACE.into(),
        key_id: other.key_id,
        expected_version: None,
        wait_for_replicas: false,
    });
    let response = client.raw().revoke_key(request).await.expect("revoke");
    assert!(response.metadata().get("x-kemon-replicas-live").is_none());
}

#[tokio::test]
async fn sqlite_confirms_a_revocation_as_its_one_replica() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("alone", &[])).await;
    let request = client.request(pb::RevokeKeyRequest {
        workspace_id: WORKSPACE.into(),
        key_id: key.key_id,
        expected_version: None,
        wait_for_replicas: true,
    });
    let response = client.raw().revoke_key(request).await.expect("revoke");
    let metadata = response.metadata();
    assert_eq!(metadata.get("x-kemon-replicas-confirmed").unwrap(), "1");
    assert_eq!(metadata.get("x-kemon-replicas-live").unwrap(), "1");
}

#[tokio::test]
async fn a_replica_killed_mid_write_loses_nothing_acknowledged_and_catches_up_on_restart() {
    let url = fresh_postgres_schema().await;
    let key = kemon_keys::vault::MasterKey::generate().to_hex();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let start = |dir: &std::path::Path, name: &str| {
        let args = ["--database-url", url.as_str(), "--replica-id", name];
        let key = key.clone();
        let dir = dir.to_owned();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ServerProcess::start(&dir, &key, &args).await
        }
    };
    let doomed = start(dirs[0].path(), "doomed").await;
    let survivor = start(dirs[1].path(), "survivor").await;

    // Writers on the doomed replica until it dies; every acknowledged create is recorded.
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = doomed.client().await;
        let count = count.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                match client
                    .try_create(private_key(&format!("w{w} {i}"), &[]))
                    .await
                {
                    Ok(created) => {
                        acknowledged.push((created.key.unwrap().key_id, created.secret));
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    // Killed while the writers are busy: some batch is in flight.
    tokio::time::timeout(Duration::from_secs(30), async {
        while count.load(std::sync::atomic::Ordering::Relaxed) < 40 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("40 writes acknowledged within 30 s");
    doomed.kill();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    assert!(
        acknowledged.len() >= 40,
        "only {} writes",
        acknowledged.len()
    );

    // The survivor serves every acknowledged write, and takes more.
    let mut client = survivor.client().await;
    for (key_id, secret) in &acknowledged {
        let mut tries = 0;
        loop {
            let response = client.verify(secret, &[], "").await;
            if code(&response) == pb::VerifyCode::Valid {
                break;
            }
            tries += 1;
            assert!(
                tries < 500,
                "acknowledged {key_id} never reached the survivor"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (later, later_secret) = client.create(private_key("after the crash", &[])).await;
    client.revoke(&acknowledged[0].0).await;

    // The killed replica, restarted, has everything: its own writes and the survivor's.
    let restarted = start(dirs[0].path(), "doomed").await;
    let mut client = restarted.client().await;
    assert_eq!(
        code(&client.verify(&later_secret, &[], "").await),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code(&client.verify(&acknowledged[0].1, &[], "").await),
        pb::VerifyCode::Revoked
    );
    for (key_id, secret) in &acknowledged[1..] {
        assert_eq!(
            code(&client.verify(secret, &[], "").await),
            pb::VerifyCode::Valid,
            "{key_id}"
        );
    }
    assert_eq!(client.get_key(&later.key_id).await.name, "after the crash");
    // The log is one chain, whoever wrote it: the auditor's verify agrees.
    Cli::kemon(&["audit", "verify", "--database-url", &url])
        .run()
        .await
        .assert_verified();
    restarted.stop().await;
    survivor.stop().await;
}

/// Connects as the test itself, on the schema of `url`.
async fn connect_schema(url: &str) -> sqlx::PgConnection {
    sqlx::PgConnection::connect(url).await.expect("connect")
}

#[tokio::test]
async fn a_write_held_through_its_commit_is_never_skipped_by_the_tailers() {
    let (url, replicas) = three_replicas(Duration::from_secs(30)).await;
    let mut first = replicas[0].client().await;
    let (before, _) = first.create(private_key("before", &[])).await;
    let mut streams = Vec::new();
    for replica in &replicas {
        streams.push(subscribe(replica).await);
    }
    for stream in &mut streams {
        assert_eq!(next_sequences(stream, 1).await, [1]);
    }

    // A transaction holding the log's lock, as a writer does from its first statement to its
    // COMMIT: every replica's writes wait behind it, while every tailer keeps reading.
    let mut holder = connect_schema(&url).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(kemon_keys::store::postgres::LOG_LOCK_CLASS)
        .execute(&mut holder)
        .await
        .unwrap();
    let mut pending = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        let mut client = replica.client().await;
        pending.push(tokio::spawn(async move {
            client.create(private_key(&format!("held {r}"), &[])).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pending.iter().all(|p| !p.is_finished()),
        "a write committed while another held the log"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let mut secrets = Vec::new();
    for p in pending {
        secrets.push(p.await.expect("write").1);
    }
    for stream in &mut streams {
        assert_eq!(next_sequences(stream, 3).await, [2, 3, 4]);
    }
    for replica in &replicas {
        for secret in &secrets {
            assert_eq!(
                verify_code(replica, secret).await.unwrap(),
                pb::VerifyCode::Valid
            );
        }
    }
    assert_eq!(
        replicas[2]
            .client()
            .await
            .get_key(&before.key_id)
            .await
            .name,
        "before"
    );
}

#[tokio::test]
async fn the_database_refuses_to_rewrite_the_log_or_append_out_of_order() {
    let (url, replicas) = three_replicas(Duration::from_secs(5)).await;
    replicas[0]
        .client()
        .await
        .create(private_key("one", &[]))
        .await;
    let mut conn = connect_schema(&url).await;
    for (statement, refused) in [
        ("UPDATE events SET actor = 'mallory'", "UPDATE refused"),
        ("DELETE FROM events", "DELETE refused"),
        ("TRUNCATE events", "TRUNCATE refused"),
        (
            "INSERT INTO events SELECT sequence + 2, key_id || 'x', workspace_id, stream_version, \
             event_type, schema_version, payload, actor, recorded_at, hash, workspace_hash \
             FROM events WHERE sequence = 1",
            "sequence 3 after 1",
        ),
    ] {
        let error = sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .expect_err(statement);
        assert!(error.to_string().contains(refused), "{statement}: {error}");
    }
}

/// A TCP proxy to PostgreSQL that the test can cut and restore: the database going away and
/// coming back, as the replicas see it, without stopping the server other tests use.
struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut gate = gate.subscribe();
                if !*gate.borrow_and_update() {
                    continue; // refused: dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = gate.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Proxy { addr, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }
}

#[tokio::test]
async fn replicas_that_lose_the_database_refuse_verify_and_recover_by_themselves() {
    let direct = fresh_postgres_schema().await;
    let target: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let server = postgres_server();
    assert!(
        server.contains("127.0.0.1:5432"),
        "this test proxies the local server; KEMON_TEST_POSTGRES is {server}"
    );
    let proxy = Proxy::start(target).await;
    let url = direct.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let key = kemon_keys::vault::MasterKey::generate().to_hex();
    let staleness = Duration::from_millis(600);
    let a = TestServer::start_replica(&url, &key, "a", staleness).await;
    let b = TestServer::start_replica(&url, &key, "b", staleness).await;
    let mut client = a.client().await;
    let (kept, kept_secret) = client.create(private_key("kept", &[])).await;

    // Load while the database goes away: writes fail with UNAVAILABLE, nothing hangs.
    let mut load = b.client().await;
    let writer = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for i in 0..400 {
            if let Ok(created) = load
                .try_create(private_key(&format!("load {i}"), &[]))
                .await
            {
                acknowledged.push(created.secret);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acknowledged
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    for replica in [&a, &b] {
        wait_for_health(&replica.channel().await, "", ServingStatus::NotServing).await;
        let status = verify_code(replica, &kept_secret).await.unwrap_err();
        assert_reason(&status, Code::Unavailable, "REPLICA_STALE");
    }
    let refused = client
        .try_create(private_key("while down", &[]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    proxy.restore();
    for replica in [&a, &b] {
        wait_for_health(&replica.channel().await, "", ServingStatus::Serving).await;
    }
    let acknowledged = writer.await.unwrap();
    assert!(!acknowledged.is_empty());
    client.revoke(&kept.key_id).await;
    for replica in [&a, &b] {
        let mut tries = 0;
        while verify_code(replica, &kept_secret).await.unwrap() != pb::VerifyCode::Revoked {
            tries += 1;
            assert!(tries < 500, "the revocation never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for secret in &acknowledged {
            assert_eq!(
                verify_code(replica, secret).await.unwrap(),
                pb::VerifyCode::Valid,
                "an acknowledged write is missing"
            );
        }
    }
}

#[tokio::test]
async fn rebuild_audit_and_export_work_on_postgres_and_verify_offline() {
    let (url, replicas) = three_replicas(Duration::from_secs(5)).await;
    let mut client = replicas[1].client().await;
    let (key, _) = client
        .create(private_key("exported", &["tickets:read"]))
        .await;
    client.rename(&key.key_id, "exported, renamed").await;
    client.revoke(&key.key_id).await;
    let head = log_head(&mut replicas[0].audit().await, "").await;
    assert_eq!(head.sequence, 3);

    Cli::kemon(&["audit", "verify", "--database-url", &url])
        .run()
        .await
        .assert_verified();
    Cli::kemon(&["rebuild", "--database-url", &url])
        .run()
        .await
        .assert_success();
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("log.ndjson");
    Cli::kemon(&["audit", "export", "--database-url", &url, "--output"])
        .arg(&export)
        .run()
        .await
        .assert_success();
    let expect = format!("{}:{}", head.sequence, hex::encode(&head.hash));
    Cli::kemon(&["audit", "verify", "--file"])
        .arg(&export)
        .args(["--expect-head", &expect])
        .run()
        .await
        .assert_verified();
    // The projection a rebuild wrote reads the same as before it.
    assert_eq!(client.get_key(&key.key_id).await.name, "exported, renamed");
}

#[tokio::test]
async fn replicas_run_as_a_role_that_may_only_append_to_the_log() {
    // The schema's owner starts the first replica (which creates the tables)...
    let owner_url = fresh_postgres_schema().await;
    let key = kemon_keys::vault::MasterKey::generate().to_hex();
    let first = TestServer::start_replica(&owner_url, &key, "owner", Duration::from_secs(5)).await;
    let (kept, kept_secret) = first.client().await.create(private_key("kept", &[])).await;
    drop(first);

    // ...and the others run as a role granted SELECT and INSERT on the log only.
    let schema = owner_url.rsplit('=').next().unwrap().to_owned();
    let mut admin = connect_schema(&owner_url).await;
    for statement in [
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kemon_keys_test_app') \
         THEN CREATE ROLE kemon_keys_test_app LOGIN; END IF; END $$"
            .to_owned(),
        format!("GRANT USAGE ON SCHEMA {schema} TO kemon_keys_test_app"),
        format!("GRANT SELECT, INSERT ON {schema}.events TO kemon_keys_test_app"),
        format!("GRANT SELECT ON {schema}._sqlx_migrations TO kemon_keys_test_app"),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.keys, \
             {schema}.projection_checkpoint, {schema}.sealed_secrets, {schema}.meta, \
             {schema}.create_requests, {schema}.replicas, {schema}.key_usage \
             TO kemon_keys_test_app"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
            .expect("grant");
    }
    let app_url = owner_url.replacen("postgres@", "kemon_keys_test_app@", 1);
    assert_ne!(
        app_url, owner_url,
        "the test server's URL names the user postgres"
    );
    let replica = TestServer::start_replica(&app_url, &key, "app", Duration::from_secs(5)).await;
    let mut client = replica.client().await;
    assert_eq!(
        code(&client.verify(&kept_secret, &[], "").await),
        pb::VerifyCode::Valid
    );
    client.rename(&kept.key_id, "renamed by the app role").await;
    client.revoke(&kept.key_id).await;
    assert_eq!(
        code(&client.verify(&kept_secret, &[], "").await),
        pb::VerifyCode::Revoked
    );
    // The role itself cannot rewrite history, triggers aside.
    let mut app = connect_schema(&app_url).await;
    let error = sqlx::query("UPDATE events SET actor = 'mallory'")
        .execute(&mut app)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("permission denied"), "{error}");
}
