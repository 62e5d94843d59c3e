//! TLS and mutual TLS on the gRPC port: handshakes with and without client certificates,
//! from another CA, expired; who a certificate names; rotating the certificate and the client
//! CA while clients keep calling; the health-only admin listener; and the plaintext rule for
//! non-loopback addresses, on the real binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kemon_keys::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{
    Cli, ServerProcess, TestClient, TestServer, assert_reason, connect, health_of, private_key,
};
use crate::pki::{Ca, SecureFiles, eventually, health_over, policy, tls_channel};

const WEB: &str = "spiffe://kemon.test/ns/app/sa/web";

/// A server with mutual TLS, its CA also signing its certificate, and a policy that lets
/// [`WEB`] do everything as an admin or owner.
async fn mutual_tls(ca: &Ca) -> (TestServer, SecureFiles) {
    let files = SecureFiles::new();
    files.server_cert(&ca.server());
    files.write("client-ca.pem", &ca.pem);
    files.write(
        "policy.toml",
        &policy(&[(
            WEB,
            "surfaces = [\"verify\", \"manage\", \"audit\"]\nroles = [\"owner\", \"admin\"]",
        )]),
    );
    let server = TestServer::start_configured(|s| files.apply(s)).await;
    (server, files)
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_plaintext_clients_get_nothing() {
    let ca = Ca::new("server CA");
    let files = SecureFiles::new();
    files.server_cert(&ca.server());
    let server = TestServer::start_configured(|s| files.apply(s)).await;

    // TLS without a client CA keeps the header trust model: any client, roles as sent.
    let mut client = TestClient::on(tls_channel(server.addr, &ca.pem, None).await);
    let (key, secret) = client
        .create(private_key("over TLS", &["tickets:read"]))
        .await;
    let verified = client.verify(&secret, &["tickets:read"], "").await;
    assert!(verified.valid, "{verified:?}");
    assert_eq!(verified.key_id, key.key_id);

    // A plaintext client on the TLS port gets no answer, and one that trusts another CA
    // does not complete a handshake.
    let plaintext = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .ok()?;
        health_of(&channel, "").await
    })
    .await
    .ok()
    .flatten();
    assert_eq!(plaintext, None);
    assert!(!health_over(server.addr, &Ca::new("another CA").pem, None).await);
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_good_certificate_from_its_ca() {
    let ca = Ca::new("kemon CA");
    let (server, _files) = mutual_tls(&ca).await;

    assert!(health_over(server.addr, &ca.pem, Some(&ca.client(WEB))).await);
    assert!(
        !health_over(server.addr, &ca.pem, None).await,
        "no client certificate"
    );
    let stranger = Ca::new("another CA");
    assert!(
        !health_over(server.addr, &ca.pem, Some(&stranger.client(WEB))).await,
        "a certificate from another CA naming the same identity"
    );
    assert!(
        !health_over(server.addr, &ca.pem, Some(&ca.expired_client(WEB))).await,
        "an expired certificate"
    );
}

#[tokio::test]
async fn a_client_is_named_by_its_uri_san_else_its_dns_san() {
    let ca = Ca::new("kemon CA");
    let files = SecureFiles::new();
    files.server_cert(&ca.server());
    files.write("client-ca.pem", &ca.pem);
    files.write(
        "policy.toml",
        &policy(&[("sidecar.kemon.test", "surfaces = [\"verify\"]")]),
    );
    let server = TestServer::start_configured(|s| files.apply(s)).await;

    let mut by_dns = TestClient::on(
        tls_channel(
            server.addr,
            &ca.pem,
            Some(&ca.client_dns("sidecar.kemon.test")),
        )
        .await,
    );
    let answer = by_dns.verify("sk_not_a_key", &[], "").await;
    assert_eq!(answer.code, pb::VerifyCode::Malformed as i32);

    let mut nameless =
        TestClient::on(tls_channel(server.addr, &ca.pem, Some(&ca.client_without_names())).await);
    let status = nameless
        .try_verify("sk_not_a_key", &[], "")
        .await
        .unwrap_err();
    assert_reason(&status, Code::Unauthenticated, "CLIENT_IDENTITY_MISSING");
}

#[tokio::test]
async fn the_certificate_and_client_ca_rotate_without_a_restart_while_clients_keep_calling() {
    let old_ca = Ca::new("CA 2025");
    let (server, files) = mutual_tls(&old_ca).await;
    let old_client = old_ca.client(WEB);

    // A client keeps calling on the connection it opened before the rotation.
    let mut steady = TestClient::on(tls_channel(server.addr, &old_ca.pem, Some(&old_client)).await);
    let (_, secret) = steady.create(private_key("steady", &[])).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let caller = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let mut client = steady.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.try_verify(&secret, &[], "").await {
                    Ok(r) if r.valid => calls.fetch_add(1, Ordering::Relaxed),
                    _ => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // Rotate to a new CA: the new server certificate, and a client CA bundle trusting both
    // while clients move over.
    let new_ca = Ca::new("CA 2026");
    let new_client = new_ca.client(WEB);
    files.write("client-ca.pem", &format!("{}{}", old_ca.pem, new_ca.pem));
    files.server_cert(&new_ca.server());
    eventually("a client that trusts only the new CA connects", || {
        health_over(server.addr, &new_ca.pem, Some(&new_client))
    })
    .await;
    assert!(
        !health_over(server.addr, &old_ca.pem, Some(&old_client)).await,
        "new connections get the new certificate"
    );

    // Then the old CA goes from the bundle: its client certificates are refused on new
    // connections.
    files.write("client-ca.pem", &new_ca.pem);
    eventually("a certificate from the old CA is refused", || async {
        !health_over(server.addr, &new_ca.pem, Some(&old_client)).await
    })
    .await;
    assert!(health_over(server.addr, &new_ca.pem, Some(&new_client)).await);

    let before = calls.load(Ordering::Relaxed);
    eventually("the steady client goes on calling", || {
        let calls = calls.clone();
        async move { calls.load(Ordering::Relaxed) > before + 10 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no call failed");
    assert!(calls.load(Ordering::Relaxed) > 10);
}

#[tokio::test]
async fn the_admin_listener_serves_health_and_nothing_about_keys() {
    let ca = Ca::new("kemon CA");
    let (server, _files) = mutual_tls(&ca).await;
    let admin = connect(server.admin_addr.unwrap()).await;

    for service in ["", "kemon.keys.v1.KeyService", "kemon-keys.writes"] {
        assert_eq!(
            health_of(&admin, service).await,
            Some(ServingStatus::Serving),
            "{service:?}"
        );
    }
    let mut health = HealthClient::new(admin.clone());
    assert!(health.check(HealthCheckRequest::default()).await.is_ok());

    let mut keys = TestClient::on(admin.clone());
    let status = keys.try_verify("sk_not_a_key", &[], "").await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = keys.try_create(private_key("no", &[])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = kemon_keys::proto::v1::audit_service_client::AuditServiceClient::new(admin)
        .get_log_head(pb::GetLogHeadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

#[tokio::test]
async fn plaintext_on_a_non_loopback_address_refuses_to_start_unless_insecure_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let master_key = kemon_keys::vault::MasterKey::generate().to_hex();
    let data_dir = tmp.path().join("data");
    let refused = Cli::kemon(&["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(&data_dir)
        .env("KEMON_MASTER_KEY", &master_key)
        .run()
        .await;
    refused.assert_failure();
    assert!(
        refused
            .stderr
            .contains("refusing to serve plaintext gRPC on 0.0.0.0"),
        "{}",
        refused.report()
    );
    assert!(!data_dir.exists(), "a refused start leaves nothing behind");

    // Mutual TLS needs its policy, and the policy its client CA.
    let ran = Cli::kemon(&[
        "serve",
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
        "--client-ca",
        "ca.pem",
    ])
    .run()
    .await;
    ran.assert_failure();
    assert!(ran.stderr.contains("--policy"), "{}", ran.report());

    let server = ServerProcess::start_args(
        &data_dir,
        &master_key,
        &["--listen", "0.0.0.0:0", "--insecure-plaintext"],
    )
    .await;
    assert!(
        server
            .startup
            .iter()
            .any(|line| line.contains("INSECURE: SERVING PLAINTEXT")),
        "{:?}",
        server.startup
    );
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));
    server.stop().await;
}
