//! The access policy under mutual TLS and signed role assertions: each surface allowed and
//! denied by identity, roles an identity may not assert, the policy and the JWKS reloaded while
//! clients keep calling, assertions forged, expired, for another audience or workspace, and the
//! caller identity recorded with every event beside the actor (the log still verifying).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::audit_service_client::AuditServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{
    Caller, Cli, OTHER_WORKSPACE, TestClient, TestServer, WORKSPACE, assert_reason, auditor,
    path_str, private_key,
};
use crate::pki::{Ca, Claims, Issued, SecureFiles, Signer, eventually, jwks, policy, tls_channel};

const EDGE: &str = "spiffe://kemon.test/ns/edge/sa/envoy";
const WEB: &str = "spiffe://kemon.test/ns/app/sa/web";
const EXPORTER: &str = "spiffe://kemon.test/ns/audit/sa/exporter";
const STRANGER: &str = "spiffe://kemon.test/ns/other/sa/unknown";

/// A mutual-TLS server with the three identities above in its policy: the sidecar verifies,
/// the web app manages keys as admin (not owner), the exporter audits.
struct Secured {
    server: TestServer,
    ca: Ca,
    files: SecureFiles,
}

const POLICY: &[(&str, &str)] = &[
    (EDGE, "surfaces = [\"verify\"]"),
    (
        WEB,
        "surfaces = [\"verify\", \"manage\"]\nroles = [\"admin\", \"auditor\"]",
    ),
    (EXPORTER, "surfaces = [\"audit\"]\nroles = [\"auditor\"]"),
];

impl Secured {
    async fn start(policy_entries: &[(&str, &str)], jwks_json: Option<&str>) -> Secured {
        let ca = Ca::new("kemon CA");
        let files = SecureFiles::new();
        files.server_cert(&ca.server());
        files.write("client-ca.pem", &ca.pem);
        files.write("policy.toml", &policy(policy_entries));
        if let Some(jwks_json) = jwks_json {
            files.write("jwks.json", jwks_json);
        }
        let server = TestServer::start_configured(|s| files.apply(s)).await;
        Secured { server, ca, files }
    }

    fn cert(&self, identity: &str) -> Issued {
        self.ca.client(identity)
    }

    async fn channel(&self, identity: &str) -> Channel {
        tls_channel(self.server.addr, &self.ca.pem, Some(&self.cert(identity))).await
    }

    async fn client(&self, identity: &str) -> TestClient {
        TestClient::on(self.channel(identity).await)
    }

    async fn audit(&self, identity: &str) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel(identity).await)
    }
}

/// Asserts a PERMISSION_DENIED naming `identity` and the `surface` it lacks.
#[track_caller]
fn assert_lacks(status: &Status, identity: &str, surface: &str) {
    let metadata = assert_reason(status, Code::PermissionDenied, "SURFACE_NOT_GRANTED");
    assert_eq!(metadata["identity"], identity, "{status:?}");
    assert_eq!(metadata["surface"], surface, "{status:?}");
    assert!(status.message().contains(identity), "{status:?}");
}

async fn check(channel: &Channel) -> Result<(), Status> {
    AuthorizationClient::new(channel.clone())
        .check(CheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test]
async fn each_surface_is_open_to_the_identities_granted_it_and_to_no_other() {
    let s = Secured::start(POLICY, None).await;
    let mut web = s.client(WEB).await;
    let (key, secret) = web.create(private_key("granted", &["tickets:read"])).await;

    // verify: the sidecar and the web app; not the exporter.
    let mut edge = s.client(EDGE).await;
    assert!(edge.verify(&secret, &["tickets:read"], "").await.valid);
    assert!(web.verify(&secret, &[], "").await.valid);
    check(&s.channel(EDGE).await)
        .await
        .expect("Envoy's Check is verify");
    let mut exporter = s.client(EXPORTER).await;
    assert_lacks(
        &exporter.try_verify(&secret, &[], "").await.unwrap_err(),
        EXPORTER,
        "verify",
    );
    assert_lacks(
        &check(&s.channel(EXPORTER).await).await.unwrap_err(),
        EXPORTER,
        "verify",
    );

    // manage: the web app only, whatever headers the others send.
    assert_eq!(web.get_key(&key.key_id).await.key_id, key.key_id);
    for (client, identity) in [(&mut edge, EDGE), (&mut exporter, EXPORTER)] {
        let status = client
            .try_create(private_key("sidecar", &[]))
            .await
            .unwrap_err();
        assert_lacks(&status, identity, "manage");
        let status = client.try_reveal(&key.key_id).await.unwrap_err();
        assert_lacks(&status, identity, "manage");
    }

    // audit: the exporter only.
    let head = s
        .audit(EXPORTER)
        .await
        .get_log_head(auditor(pb::GetLogHeadRequest::default()))
        .await
        .expect("the exporter audits")
        .into_inner();
    assert_eq!(head.sequence, 1);
    for identity in [EDGE, WEB] {
        let status = s
            .audit(identity)
            .await
            .get_log_head(auditor(pb::GetLogHeadRequest::default()))
            .await
            .unwrap_err();
        assert_lacks(&status, identity, "audit");
    }

    // An identity the policy does not name gets nothing, not even health or ListScopes.
    let stranger = s.channel(STRANGER).await;
    let mut stranger_keys = TestClient::on(stranger.clone());
    for status in [
        stranger_keys
            .try_verify(&secret, &[], "")
            .await
            .unwrap_err(),
        stranger_keys
            .list_scopes(pb::ListScopesRequest::default())
            .await
            .unwrap_err(),
        HealthClient::new(stranger)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err(),
    ] {
        let metadata = assert_reason(&status, Code::PermissionDenied, "IDENTITY_UNKNOWN");
        assert_eq!(metadata["identity"], STRANGER);
    }
    // A known one may read the catalog.
    assert!(
        edge.list_scopes(pb::ListScopesRequest::default())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_identity_acts_only_with_the_roles_its_policy_lists() {
    let s = Secured::start(POLICY, None).await;
    let web = s.client(WEB).await;
    let status = web
        .as_role("owner")
        .try_create(private_key("as owner", &[]))
        .await
        .unwrap_err();
    let metadata = assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_GRANTED");
    assert_eq!(metadata["identity"], WEB);
    assert_eq!(metadata["role"], "owner");
    // A role it may assert still needs the permission: auditors do not create keys.
    let status = web
        .as_role("auditor")
        .try_create(private_key("as auditor", &[]))
        .await
        .unwrap_err();
    assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_PERMITTED");
    web.clone().create(private_key("as admin", &[])).await;
}

#[tokio::test]
async fn events_record_the_caller_identity_beside_the_actor_and_the_log_still_verifies() {
    let s = Secured::start(POLICY, None).await;
    let mut web = s.client(WEB).await.acting("user_bob", "admin");
    let (key, _) = web.create(private_key("recorded", &[])).await;
    web.rename(&key.key_id, "renamed").await;

    let mut events = s
        .audit(EXPORTER)
        .await
        .read_events(auditor(pb::ReadEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = events.message().await.unwrap() {
        seen.push((event.event_type, event.actor, event.caller_identity));
    }
    assert_eq!(
        seen,
        [
            ("KeyCreated".into(), "user_bob".into(), WEB.into()),
            ("KeyRenamed".into(), "user_bob".into(), WEB.into()),
        ]
    );

    let db = s.server.db_path();
    let export = Cli::kemon(&["audit", "export", "--db", path_str(&db)])
        .run()
        .await;
    let lines = export.json_lines();
    assert!(
        lines[1..].iter().all(|l| l["caller_identity"] == WEB),
        "{lines:?}"
    );
    Cli::kemon(&["audit", "verify", "--db", path_str(&db)])
        .run()
        .await
        .assert_verified();

    // The audit tools reach the server over mutual TLS as the exporter.
    let exporter = s.cert(EXPORTER);
    let ca = s.files.write("cli-ca.pem", &s.ca.pem);
    let cert = s.files.write("exporter.pem", &exporter.cert);
    let key = s.files.write("exporter.key", &exporter.key);
    let server = format!("https://127.0.0.1:{}", s.server.addr.port());
    let tls = [
        "--tls-ca",
        path_str(&ca),
        "--tls-cert",
        path_str(&cert),
        "--tls-key",
        path_str(&key),
    ];
    let exported = Cli::kemon(&["audit", "export", "--server", &server])
        .args(tls)
        .run()
        .await
        .json_lines();
    assert_eq!(exported, lines, "the same export through the server");
    Cli::kemon(&["audit", "verify", "--server", &server])
        .args(tls)
        .run()
        .await
        .assert_verified();
    // Without a client certificate there is no answer.
    Cli::kemon(&[
        "audit",
        "verify",
        "--server",
        &server,
        "--tls-ca",
        path_str(&ca),
    ])
    .run()
    .await
    .assert_failure();
}

#[tokio::test]
async fn the_policy_is_reloaded_when_its_file_changes() {
    let s = Secured::start(POLICY, None).await;
    let edge = s.client(EDGE).await;
    let status = edge
        .clone()
        .try_create(private_key("not yet", &[]))
        .await
        .unwrap_err();
    assert_lacks(&status, EDGE, "manage");

    s.files.write(
        "policy.toml",
        &policy(&[(
            EDGE,
            "surfaces = [\"verify\", \"manage\"]\nroles = [\"admin\"]",
        )]),
    );
    eventually("the sidecar may manage keys", || {
        let mut edge = edge.clone();
        async move { edge.try_create(private_key("now", &[])).await.is_ok() }
    })
    .await;
    // WEB left the policy with the same reload: it gets nothing now.
    let status = s
        .client(WEB)
        .await
        .try_verify("sk_x", &[], "")
        .await
        .unwrap_err();
    assert_reason(&status, Code::PermissionDenied, "IDENTITY_UNKNOWN");

    // A broken policy keeps the one in force.
    s.files.write(
        "policy.toml",
        "[identities.x]\nsurfaces = [\"everything\"]\n",
    );
    assert!(
        edge.clone()
            .try_create(private_key("still", &[]))
            .await
            .is_ok()
    );
}

/// The web app must prove its users' roles with assertions.
const ASSERTED: &[(&str, &str)] = &[(
    WEB,
    "surfaces = [\"manage\"]\nroles = [\"owner\", \"admin\"]\nrequire_assertion = true",
)];

fn asserting<T>(token: &str, message: T) -> Request<T> {
    // The role headers say owner: they are not read for this identity.
    let mut request = Caller::acting("user_forged", "owner").request(message);
    request
        .metadata_mut()
        .insert("x-kemon-assertion", token.parse().unwrap());
    request
}

async fn create_with(
    client: &mut TestClient,
    token: &str,
    workspace: &str,
) -> Result<pb::Key, Status> {
    let mut request = private_key("asserted", &[]);
    request.workspace_id = workspace.into();
    client
        .raw()
        .create_key(asserting(token, request))
        .await
        .map(|r| r.into_inner().key.unwrap())
}

#[tokio::test]
async fn assertions_are_checked_for_signature_key_expiry_audience_role_and_workspace() {
    let ed = Signer::ed25519("ed-1");
    let ec = Signer::es256("ec-1");
    let s = Secured::start(ASSERTED, Some(&jwks(&[&ed, &ec]))).await;
    let mut web = s.client(WEB).await;
    let valid = Claims::new("user_carol", "admin", WORKSPACE);

    for signer in [&ed, &ec] {
        let key = create_with(&mut web, &signer.sign(&valid), WORKSPACE)
            .await
            .unwrap();
        assert_eq!(
            key.created_by, "user_carol",
            "the actor is the assertion's subject"
        );
    }

    let status = web
        .clone()
        .try_create(private_key("headers only", &[]))
        .await
        .unwrap_err();
    assert_reason(&status, Code::Unauthenticated, "ASSERTION_MISSING");

    let invalid = |status: Status, problem: &str| {
        let metadata = assert_reason(&status, Code::Unauthenticated, "ASSERTION_INVALID");
        assert_eq!(metadata["problem"], problem, "{status:?}");
    };
    // Forged: signed by a key the JWKS does not hold, under a kid it does.
    let forger = Signer::ed25519("ed-1");
    invalid(
        create_with(&mut web, &forger.sign(&valid), WORKSPACE)
            .await
            .unwrap_err(),
        "signature",
    );
    invalid(
        create_with(&mut web, &Signer::ed25519("ed-9").sign(&valid), WORKSPACE)
            .await
            .unwrap_err(),
        "key",
    );
    invalid(
        create_with(&mut web, "not.a.jwt", WORKSPACE)
            .await
            .unwrap_err(),
        "format",
    );
    invalid(
        create_with(
            &mut web,
            &ed.sign(&Claims {
                aud: "someone-else".into(),
                ..valid.clone()
            }),
            WORKSPACE,
        )
        .await
        .unwrap_err(),
        "audience",
    );
    invalid(
        create_with(
            &mut web,
            &ed.sign(&Claims {
                exp: valid.iat + 3600,
                ..valid.clone()
            }),
            WORKSPACE,
        )
        .await
        .unwrap_err(),
        "lifetime",
    );

    let status = create_with(&mut web, &ed.sign(&valid), OTHER_WORKSPACE)
        .await
        .unwrap_err();
    assert_reason(
        &status,
        Code::PermissionDenied,
        "ASSERTION_WORKSPACE_MISMATCH",
    );

    let as_member = Claims::new("user_carol", "member", WORKSPACE);
    let status = create_with(&mut web, &ed.sign(&as_member), WORKSPACE)
        .await
        .unwrap_err();
    assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_GRANTED");

    // The same assertion, once the service's clock is past its expiry.
    let token = ed.sign(&valid);
    create_with(&mut web, &token, WORKSPACE).await.unwrap();
    s.server.clock.advance(std::time::Duration::from_secs(3600));
    let status = create_with(&mut web, &token, WORKSPACE).await.unwrap_err();
    assert_reason(&status, Code::Unauthenticated, "ASSERTION_EXPIRED");
    // The token never reaches an error.
    assert!(!status.message().contains(&token));
}

#[tokio::test]
async fn the_jwks_rotates_while_clients_keep_calling() {
    let old = Signer::ed25519("2025");
    let s = Secured::start(ASSERTED, Some(&jwks(&[&old]))).await;
    let claims = Claims::new("user_dan", "admin", WORKSPACE);
    let mut web = s.client(WEB).await;
    let (key_id, old_token) = {
        let token = old.sign(&claims);
        (
            create_with(&mut web, &token, WORKSPACE)
                .await
                .unwrap()
                .key_id,
            token,
        )
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let (mut web, token, key_id) = (web.clone(), old_token.clone(), key_id.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = asserting(
                    &token,
                    pb::GetKeyRequest {
                        workspace_id: WORKSPACE.into(),
                        key_id: key_id.clone(),
                    },
                );
                match web.raw().get_key(request).await {
                    Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // The identity service publishes its next key beside the current one...
    let new = Signer::es256("2026");
    let new_token = new.sign(&claims);
    s.files.write("jwks.json", &jwks(&[&old, &new]));
    eventually("an assertion signed by the new key is accepted", || {
        let mut web = web.clone();
        let token = new_token.clone();
        async move { create_with(&mut web, &token, WORKSPACE).await.is_ok() }
    })
    .await;
    let before = calls.load(Ordering::Relaxed);
    eventually("the reader goes on calling with the old key", || {
        let calls = calls.clone();
        async move { calls.load(Ordering::Relaxed) > before + 10 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no call failed during the overlap"
    );

    // ...then retires the old one.
    s.files.write("jwks.json", &jwks(&[&new]));
    eventually("the old key is no longer accepted", || {
        let mut web = web.clone();
        let token = old_token.clone();
        async move { create_with(&mut web, &token, WORKSPACE).await.is_err() }
    })
    .await;
    let status = create_with(&mut web, &old_token, WORKSPACE)
        .await
        .unwrap_err();
    let metadata = assert_reason(&status, Code::Unauthenticated, "ASSERTION_INVALID");
    assert_eq!(metadata["problem"], "key");
    create_with(&mut web, &new_token, WORKSPACE).await.unwrap();
}
