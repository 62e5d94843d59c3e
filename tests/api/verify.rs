//! VerifyKey: every verify code, origins and environments, scopes, response fields, key string formats.

use kemon_keys::domain::{ApiKey, Environment, KeyType};
use kemon_keys::proto::v1 as pb;

use crate::helpers::*;

fn ms(ts: Option<prost_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Asserts a found key's identity and grants in a VerifyKey response.
#[track_caller]
fn assert_identifies(response: &pb::VerifyKeyResponse, key: &pb::Key) {
    assert_eq!(response.key_id, key.key_id, "{response:?}");
    assert_eq!(response.workspace_id, key.workspace_id, "{response:?}");
    assert_eq!(response.r#type, key.r#type, "{response:?}");
    assert_eq!(response.environment, key.environment, "{response:?}");
    assert_eq!(response.scopes, key.scopes, "{response:?}");
    assert_eq!(response.full_access, key.full_access, "{response:?}");
    assert_eq!(response.expires_at, key.expires_at, "{response:?}");
}

/// Asserts that a response carries no key identity at all.
#[track_caller]
fn assert_anonymous(response: &pb::VerifyKeyResponse) {
    assert!(!response.valid, "{response:?}");
    assert_eq!(response.key_id, "", "{response:?}");
    assert_eq!(response.workspace_id, "", "{response:?}");
    assert_eq!(response.r#type, 0, "{response:?}");
    assert_eq!(response.environment, 0, "{response:?}");
    assert!(response.scopes.is_empty(), "{response:?}");
    assert!(!response.full_access, "{response:?}");
    assert_eq!(response.expires_at, None, "{response:?}");
    assert!(response.missing_scopes.is_empty(), "{response:?}");
}

/// Asserts the code of a verification, and that `valid` agrees with it.
async fn assert_code(
    client: &mut TestClient,
    secret: &str,
    required: &[&str],
    origin: &str,
    expected: pb::VerifyCode,
) -> pb::VerifyKeyResponse {
    let response = client.verify(secret, required, origin).await;
    assert_eq!(
        code(&response),
        expected,
        "origin {origin:?}, required {required:?}: {response:?}"
    );
    assert_eq!(
        response.valid,
        expected == pb::VerifyCode::Valid,
        "{response:?}"
    );
    response
}

#[tokio::test]
async fn a_valid_key_is_valid_and_identified() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(private_key("server", &["tickets:read", "labels:read"]))
        .await;
    let response = assert_code(
        &mut client,
        &secret,
        &["tickets:read"],
        "https://anywhere.example",
        pb::VerifyCode::Valid,
    )
    .await;
    assert_identifies(&response, &key);
    assert!(response.missing_scopes.is_empty());
    assert_eq!(response.r#type, pb::KeyType::Private as i32);
    assert_eq!(response.environment, pb::Environment::Production as i32);
    assert_eq!(ms(response.expires_at), Some(T0_MS + 90 * DAY_MS));

    assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Valid).await;
}

#[tokio::test]
async fn malformed_strings_are_malformed_and_anonymous() {
    let (_server, mut client) = TestServer::with_client().await;
    let (_, secret) = client.create(private_key("real", &[])).await;
    let (_, test_secret) = client.create(test_env(private_key("real test", &[]))).await;

    // One character of the random part changed: the checksum no longer matches.
    let changed = {
        let mut bytes = secret.clone().into_bytes();
        let i = 3 + 10;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    // One character of the checksum changed.
    let changed_checksum = {
        let mut bytes = secret.clone().into_bytes();
        let i = bytes.len() - 1;
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(bytes).unwrap()
    };
    let wrong_prefix = secret.replacen("sk_", "xk_", 1);
    let other_type = secret.replacen("sk_", "pk_", 1);
    let other_env = secret.replacen("sk_", "sk_test_", 1);
    let test_as_prod = test_secret.replacen("sk_test_", "sk_", 1);
    let truncated = secret[..secret.len() - 1].to_owned();
    let extended = format!("{secret}0");
    let bearer = format!("Bearer {secret}");
    let ten_thousand = "a".repeat(10_000);
    let long_key_like = format!("sk_{}", "A".repeat(10_000));

    let cases = [
        "garbage",
        "",
        "sk_",
        "sk_test_",
        changed.as_str(),
        changed_checksum.as_str(),
        wrong_prefix.as_str(),
        other_type.as_str(),
        other_env.as_str(),
        test_as_prod.as_str(),
        truncated.as_str(),
        extended.as_str(),
        bearer.as_str(),
        ten_thousand.as_str(),
        long_key_like.as_str(),
    ];
    for candidate in cases {
        assert_ne!(candidate, secret);
        let response = client.verify(candidate, &[], "").await;
        assert_eq!(
            code(&response),
            pb::VerifyCode::Malformed,
            "{candidate:.60}: {response:?}"
        );
        assert_anonymous(&response);
    }
    // The real ones still verify.
    assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Valid).await;
    assert_code(
        &mut client,
        &test_secret,
        &[],
        "localhost",
        pb::VerifyCode::Valid,
    )
    .await;
}

#[tokio::test]
async fn a_well_formed_key_never_issued_is_not_found() {
    let (_server, mut client) = TestServer::with_client().await;
    client.create(private_key("some other key", &[])).await;
    for key_type in [KeyType::Private, KeyType::Public] {
        for environment in [Environment::Production, Environment::Test] {
            let invented = ApiKey::generate(key_type, environment);
            let response = client.verify(invented.expose(), &[], "localhost").await;
            assert_eq!(
                code(&response),
                pb::VerifyCode::NotFound,
                "{key_type:?} {environment:?}: {response:?}"
            );
            assert_anonymous(&response);
        }
    }
}

#[tokio::test]
async fn a_key_expires_at_its_exact_instant() {
    let (server, mut client) = TestServer::with_client().await;
    let mut request = private_key("monthly", &["tickets:read"]);
    request.expiration = pb::Expiration::Expiration30Days as i32;
    let (key, secret) = client.create(request).await;
    let expires_at = T0_MS + 30 * DAY_MS;
    assert_eq!(ms(key.expires_at), Some(expires_at));

    server.clock.set_ms(expires_at - 1);
    let response = assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Valid).await;
    assert_identifies(&response, &key);
    let seen = client.get_key(&key.key_id).await;
    assert!(!seen.expired);

    server.clock.set_ms(expires_at);
    let response = assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Expired).await;
    assert_identifies(&response, &key);
    let seen = client.get_key(&key.key_id).await;
    assert!(seen.expired);

    server.clock.set_ms(expires_at + 365 * DAY_MS);
    assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Expired).await;
}

#[tokio::test]
async fn a_never_expiring_key_is_valid_ten_years_on() {
    let (server, mut client) = TestServer::with_client().await;
    let mut request = private_key("forever", &[]);
    request.expiration = pb::Expiration::Never as i32;
    let (key, secret) = client.create(request).await;
    assert_eq!(key.expires_at, None);

    server.clock.set_ms(T0_MS + 10 * 366 * DAY_MS);
    let response = assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Valid).await;
    assert_identifies(&response, &key);
    assert_eq!(response.expires_at, None);
}

#[tokio::test]
async fn a_revoked_key_is_revoked_at_once() {
    let (server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(private_key("soon gone", &["teams:read"]))
        .await;
    assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Valid).await;

    client.revoke(&key.key_id).await;
    let response = assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Revoked).await;
    assert_identifies(&response, &key);

    // Still revoked, not expired, long after the expiry date.
    server.clock.set_ms(T0_MS + 400 * DAY_MS);
    assert_code(&mut client, &secret, &[], "", pb::VerifyCode::Revoked).await;
    let seen = client.get_key(&key.key_id).await;
    assert!(seen.revoked_at.is_some());
    assert!(
        !seen.expired,
        "revoked keys say false and are told apart by revoked_at"
    );
}

/// A private and a public test key, with their secrets.
async fn create_test_keys(client: &mut TestClient) -> [(pb::Key, String); 2] {
    [
        client.create(test_env(private_key("local", &[]))).await,
        client
            .create(test_env(public_key("local public", &["tickets:read"], &[])))
            .await,
    ]
}

#[tokio::test]
async fn test_keys_verify_only_from_localhost() {
    let (_server, mut client) = TestServer::with_client().await;
    let [(private, sk), (public, pk)] = create_test_keys(&mut client).await;
    assert!(sk.starts_with("sk_test_"), "{sk}");
    assert!(pk.starts_with("pk_test_"), "{pk}");

    for (key, secret) in [(&private, &sk), (&public, &pk)] {
        for origin in [
            "localhost",
            "http://localhost:3000",
            "127.0.0.1",
            "127.5.5.5:80",
            "[::1]:8080",
            "http://[::1]/",
            "::1",
            "https://app.localhost",
            "HTTP://LocalHost:5173",
        ] {
            let response =
                assert_code(&mut client, secret, &[], origin, pb::VerifyCode::Valid).await;
            assert_identifies(&response, key);
        }
        for origin in [
            "https://example.com",
            "",
            "localhost.evil.com",
            "https://localhost.evil.com",
            "10.0.0.1",
            "128.0.0.1",
            "127.0.0.1.evil.com",
            "http://localhost@evil.com",
            "https://evil.com/localhost",
            "http://[::1]/x",
            "ftp://localhost",
            "null",
        ] {
            let response = assert_code(
                &mut client,
                secret,
                &[],
                origin,
                pb::VerifyCode::EnvironmentNotAllowed,
            )
            .await;
            assert_identifies(&response, key);
        }
    }
}

#[tokio::test]
async fn production_public_keys_verify_only_from_allowed_domains() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(public_key(
            "browser",
            &["tickets:read"],
            &["app.example.com", "*.example.org"],
        ))
        .await;
    assert!(secret.starts_with("pk_") && !secret.starts_with("pk_test_"));

    for origin in [
        "https://app.example.com",
        "app.example.com:443",
        "https://a.example.org",
        "https://a.b.example.org",
        "HTTPS://App.Example.COM",
        "https://app.example.com:8443",
        "https://app.example.com/",
        "https://app.example.com.",
        "app.example.com",
    ] {
        let response = assert_code(
            &mut client,
            &secret,
            &["tickets:read"],
            origin,
            pb::VerifyCode::Valid,
        )
        .await;
        assert_identifies(&response, &key);
    }
    for origin in [
        "https://example.org",
        "https://evil.com",
        "",
        "https://app.example.com.evil.com",
        "https://app.example.com@evil.com",
        "https://x.app.example.com",
        "https://badexample.org",
        "localhost",
        // Allowed domains name hosts only, but a production key needs a secured page.
        "http://app.example.com",
        "https://app.example.com/login",
    ] {
        let response = assert_code(
            &mut client,
            &secret,
            &["tickets:read"],
            origin,
            pb::VerifyCode::OriginNotAllowed,
        )
        .await;
        assert_identifies(&response, &key);
    }
}

/// Origins that a lenient parser once read as localhost or as an allowed domain: each
/// hides a different host behind an escape, a separator or a bracket.
fn hostile_origins(scheme: &str, host: &str) -> Vec<String> {
    let mut origins: Vec<String> = [
        "{s}://evil.com\\@{h}",
        "{s}://evil.com;.{h}",
        "{s}://evil.com%2f.{h}",
        "{s}://evil.com .{h}",
        "{s}://evil.com\\.{h}",
        "{s}://evil.com/.{h}",
        "{s}://evil.com?.{h}",
        "{s}://evil.com#.{h}",
        "{s}://evil.com@{h}",
        "{s}://{h}@evil.com",
        "{s}://{h}:pass@evil.com",
        "{s}://{h}/evil",
        "{s}://{h}:0",
        "{s}://{h}:65536",
        "{s}://{h}:",
        "ftp://{h}",
        "{h} ",
        "{h}/",
    ]
    .iter()
    .map(|t| t.replace("{s}", scheme).replace("{h}", host))
    .collect();
    // The review's findings, verbatim.
    origins.extend(
        [
            "http://evil.com\\@localhost",
            "http://evil.com;.localhost",
            "http://evil.com%2f.localhost",
            "http://[::1].evil.com",
            "https://evil.com .example.com",
            "https://[::1].example.com",
            "null",
        ]
        .map(String::from),
    );
    origins
}

#[tokio::test]
async fn origins_that_are_not_hosts_are_refused_for_test_keys() {
    let (_server, mut client) = TestServer::with_client().await;
    let [(private, sk), (public, pk)] = create_test_keys(&mut client).await;
    for (key, secret) in [(&private, &sk), (&public, &pk)] {
        for scheme in ["http", "https"] {
            for origin in hostile_origins(scheme, "localhost") {
                let response = assert_code(
                    &mut client,
                    secret,
                    &[],
                    &origin,
                    pb::VerifyCode::EnvironmentNotAllowed,
                )
                .await;
                assert_identifies(&response, key);
            }
            // The same key still verifies from the host each hostile origin dressed up as.
            let origin = format!("{scheme}://localhost:3000");
            assert_code(&mut client, secret, &[], &origin, pb::VerifyCode::Valid).await;
        }
    }
}

#[tokio::test]
async fn origins_that_are_not_hosts_are_refused_for_production_public_keys() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(public_key(
            "browser",
            &["tickets:read"],
            &["example.com", "*.example.com", "localhost"],
        ))
        .await;
    for host in ["example.com", "app.example.com", "localhost"] {
        for origin in hostile_origins("https", host) {
            let response = assert_code(
                &mut client,
                &secret,
                &["tickets:read"],
                &origin,
                pb::VerifyCode::OriginNotAllowed,
            )
            .await;
            assert_identifies(&response, &key);
        }
        for origin in [
            format!("https://{host}"),
            format!("https://{host}:8443/"),
            host.to_owned(),
        ] {
            assert_code(
                &mut client,
                &secret,
                &["tickets:read"],
                &origin,
                pb::VerifyCode::Valid,
            )
            .await;
        }
    }
}

#[tokio::test]
async fn production_private_keys_verify_from_any_origin() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client.create(private_key("server", &[])).await;
    for origin in [
        "",
        "https://evil.com",
        "localhost",
        "10.0.0.1",
        "[::1]:8080",
        "not a url at all",
        "http://evil.com\\@localhost",
        "null",
    ] {
        let response = assert_code(&mut client, &secret, &[], origin, pb::VerifyCode::Valid).await;
        assert_identifies(&response, &key);
    }
}

#[tokio::test]
async fn missing_scopes_are_listed_exactly() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(private_key("scoped", &["tickets:read", "labels:read"]))
        .await;

    let response = assert_code(
        &mut client,
        &secret,
        &["tickets:read", "tickets:write", "members:read"],
        "",
        pb::VerifyCode::InsufficientScope,
    )
    .await;
    assert_identifies(&response, &key);
    let mut missing = response.missing_scopes.clone();
    missing.sort();
    assert_eq!(missing, ["members:read", "tickets:write"]);

    let response = assert_code(
        &mut client,
        &secret,
        &["projects:write"],
        "",
        pb::VerifyCode::InsufficientScope,
    )
    .await;
    assert_eq!(response.missing_scopes, ["projects:write"]);

    let response = assert_code(
        &mut client,
        &secret,
        &["labels:read", "tickets:read", "labels:read"],
        "",
        pb::VerifyCode::Valid,
    )
    .await;
    assert!(response.missing_scopes.is_empty());

    // A public key's read scopes do not stretch to writes.
    let (public, pk) = client
        .create(public_key(
            "browser",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    let response = assert_code(
        &mut client,
        &pk,
        &["tickets:write"],
        "https://app.example.com",
        pb::VerifyCode::InsufficientScope,
    )
    .await;
    assert_identifies(&response, &public);
    assert_eq!(response.missing_scopes, ["tickets:write"]);
}

#[tokio::test]
async fn a_full_access_key_passes_any_required_scopes() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client.create(private_key("everything", &[])).await;
    let all = [
        "tickets:read",
        "tickets:write",
        "projects:read",
        "projects:write",
        "teams:read",
        "labels:read",
        "labels:write",
        "members:read",
    ];
    let response = assert_code(&mut client, &secret, &all, "", pb::VerifyCode::Valid).await;
    assert_identifies(&response, &key);
    assert!(response.full_access);
    assert!(response.scopes.is_empty());
    assert!(response.missing_scopes.is_empty());
}

#[tokio::test]
async fn unknown_or_too_many_required_scopes_are_invalid_argument() {
    let (_server, mut client) = TestServer::with_client().await;
    let (_, secret) = client.create(private_key("everything", &[])).await;
    for (key, required) in [
        (secret.as_str(), vec!["tickets:delete".to_owned()]),
        (
            secret.as_str(),
            vec!["tickets:read".into(), "Teams:read".into()],
        ),
        ("garbage", vec!["nope".into()]),
        (secret.as_str(), vec!["tickets:read".into(); 17]),
    ] {
        let required: Vec<&str> = required.iter().map(String::as_str).collect();
        let result = client.try_verify(key, &required, "").await;
        assert_invalid(result, "required_scopes");
    }
}

#[tokio::test]
async fn key_strings_carry_their_type_and_environment() {
    let (_server, mut client) = TestServer::with_client().await;
    let cases = [
        (private_key("sk", &[]), "sk_"),
        (test_env(private_key("sk test", &[])), "sk_test_"),
        (
            public_key("pk", &["tickets:read"], &["app.example.com"]),
            "pk_",
        ),
        (
            test_env(public_key("pk test", &["tickets:read"], &[])),
            "pk_test_",
        ),
    ];
    for (request, prefix) in cases {
        let (r#type, environment) = (request.r#type, request.environment);
        let (key, secret) = client.create(request).await;
        assert!(secret.starts_with(prefix), "{secret}");
        assert_eq!(secret.len(), prefix.len() + 38, "{secret}");
        assert!(
            secret[prefix.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric()),
            "{secret}"
        );
        assert_eq!(key.r#type, r#type);
        assert_eq!(key.environment, environment);
        assert_eq!(
            key.masked,
            format!("{prefix}…{}", &secret[secret.len() - 4..])
        );
        assert!(!key.masked.contains(&secret[prefix.len()..secret.len() - 4]));

        let origin = if prefix.contains("test") {
            "localhost"
        } else {
            "https://app.example.com"
        };
        let response = assert_code(&mut client, &secret, &[], origin, pb::VerifyCode::Valid).await;
        assert_identifies(&response, &key);
    }
}
