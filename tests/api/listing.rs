//! Reading and changing keys: ListKeys paging and filters, GetKey, RevealKey, and the preconditions of rename, rescope and revoke.

use std::collections::HashSet;
use std::time::Duration;

use kemon_keys::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

fn list_request(page_size: u32, page_token: &str) -> pb::ListKeysRequest {
    pb::ListKeysRequest {
        workspace_id: WORKSPACE.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    }
}

/// Every page of a listing from the request's page_token on, following next_page_token until
/// it is empty.
async fn all_pages(client: &mut TestClient, request: pb::ListKeysRequest) -> Vec<Vec<pb::Key>> {
    let mut pages = Vec::new();
    let mut token = request.page_token.clone();
    loop {
        let response = client
            .try_list(pb::ListKeysRequest {
                page_token: token.clone(),
                ..request.clone()
            })
            .await
            .expect("list_keys");
        pages.push(response.keys);
        if response.next_page_token.is_empty() {
            return pages;
        }
        assert!(pages.len() <= 100, "paging does not end");
        token = response.next_page_token;
    }
}

fn ids(keys: &[pb::Key]) -> Vec<String> {
    keys.iter().map(|k| k.key_id.clone()).collect()
}

/// Creates `n` private keys one millisecond apart, oldest first.
async fn create_many(server: &TestServer, client: &mut TestClient, n: usize) -> Vec<pb::Key> {
    let mut keys = Vec::new();
    for i in 0..n {
        let (key, _) = client.create(private_key(&format!("key {i}"), &[])).await;
        keys.push(key);
        server.clock.advance(Duration::from_millis(1));
    }
    keys
}

#[tokio::test]
async fn pages_of_three_walk_seven_keys_oldest_first() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 7).await;

    let pages = all_pages(&mut client, list_request(3, "")).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 1]);
    let listed: Vec<pb::Key> = pages.into_iter().flatten().collect();
    let listed_ids = ids(&listed);
    assert_eq!(
        listed_ids.iter().collect::<HashSet<_>>().len(),
        7,
        "ids are distinct: {listed_ids:?}"
    );
    assert_eq!(listed_ids, ids(&created), "oldest first");
    assert_eq!(listed, created, "listed keys are the created ones");
}

#[tokio::test]
async fn the_last_page_has_no_token_even_when_it_is_full() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 6).await;

    let first = client.try_list(list_request(3, "")).await.unwrap();
    assert_eq!(ids(&first.keys), ids(&created[..3]));
    assert!(!first.next_page_token.is_empty());
    let second = client
        .try_list(list_request(3, &first.next_page_token))
        .await
        .unwrap();
    assert_eq!(ids(&second.keys), ids(&created[3..]));
    assert_eq!(second.next_page_token, "", "empty on the last page");

    let whole = client.try_list(list_request(6, "")).await.unwrap();
    assert_eq!(whole.keys.len(), 6);
    assert_eq!(whole.next_page_token, "");
}

#[tokio::test]
async fn page_size_zero_means_fifty() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 51).await;

    let first = client.try_list(list_request(0, "")).await.unwrap();
    assert_eq!(first.keys.len(), 50);
    assert_eq!(ids(&first.keys), ids(&created[..50]));
    assert!(!first.next_page_token.is_empty());
    let second = client
        .try_list(list_request(0, &first.next_page_token))
        .await
        .unwrap();
    assert_eq!(ids(&second.keys), ids(&created[50..]));
    assert_eq!(second.next_page_token, "");
}

#[tokio::test]
async fn page_size_above_200_is_served_as_200() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 250).await;

    // AIP-158: a page size over the maximum is coerced down, not refused.
    let pages = all_pages(&mut client, list_request(1000, "")).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [200, 50]);
    let listed: Vec<pb::Key> = pages.into_iter().flatten().collect();
    assert_eq!(ids(&listed), ids(&created));

    for size in [201, u32::MAX] {
        let first = client.try_list(list_request(size, "")).await.unwrap();
        assert_eq!(ids(&first.keys), ids(&created[..200]), "page_size {size}");
        assert!(!first.next_page_token.is_empty());
    }
    let largest = client.try_list(list_request(200, "")).await.unwrap();
    assert_eq!(ids(&largest.keys), ids(&created[..200]));
    let smallest = client.try_list(list_request(1, "")).await.unwrap();
    assert_eq!(ids(&smallest.keys), ids(&created[..1]));
    assert!(!smallest.next_page_token.is_empty());
}

#[tokio::test]
async fn a_garbage_page_token_is_refused() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 2).await;
    let token = client
        .try_list(list_request(1, ""))
        .await
        .unwrap()
        .next_page_token;
    let raw_key_id = created[0].key_id.clone();
    for token in [
        "garbage".to_owned(),
        "!!!".into(),
        "key_".into(),
        "01HZXAAAAAAAAAAAAAAAAAAAAA".into(),
        " ".into(),
        // What tokens used to be: a bare key id.
        raw_key_id,
        format!("{token}="),
        token[1..].to_owned(),
        format!("{token}A"),
    ] {
        let reasons = assert_invalid(client.try_list(list_request(1, &token)).await, "page_token");
        assert!(
            reasons[0].contains("not a page token from this service"),
            "{token:?}: {reasons:?}"
        );
    }
}

#[tokio::test]
async fn a_page_token_is_opaque() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 3).await;

    let first = client.try_list(list_request(1, "")).await.unwrap();
    let last_sent = &first.keys[0].key_id;
    assert_eq!(last_sent, &created[0].key_id);
    let token = &first.next_page_token;
    assert_ne!(token, last_sent);
    assert!(!token.contains(last_sent.as_str()), "{token}");
    assert!(!token.contains(&last_sent["key_".len()..]), "{token}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "URL-safe: {token}"
    );
    let second = client.try_list(list_request(1, token)).await.unwrap();
    assert_eq!(ids(&second.keys), ids(&created[1..2]));
}

#[tokio::test]
async fn a_page_token_is_refused_with_other_filters() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 4).await;
    client.revoke(&created[1].key_id).await;
    let mut elsewhere = private_key("elsewhere", &[]);
    elsewhere.workspace_id = "ws_other".into();
    client.create(elsewhere).await;

    let query = list_request(1, "");
    let token = client
        .try_list(query.clone())
        .await
        .unwrap()
        .next_page_token;
    let with_token = |request: pb::ListKeysRequest| pb::ListKeysRequest {
        page_token: token.clone(),
        ..request
    };
    let others = [
        pb::ListKeysRequest {
            include_revoked: true,
            ..query.clone()
        },
        pb::ListKeysRequest {
            r#type: pb::KeyType::Private as i32,
            ..query.clone()
        },
        pb::ListKeysRequest {
            environment: pb::Environment::Production as i32,
            ..query.clone()
        },
        pb::ListKeysRequest {
            workspace_id: "ws_other".into(),
            ..query.clone()
        },
    ];
    for other in others {
        let reasons = assert_invalid(
            client.try_list(with_token(other.clone())).await,
            "page_token",
        );
        assert!(
            reasons[0].contains("issued for a different query"),
            "{other:?}: {reasons:?}"
        );
    }

    // A token of a filtered listing does not continue the unfiltered one either.
    let filtered = pb::ListKeysRequest {
        include_revoked: true,
        r#type: pb::KeyType::Private as i32,
        ..query.clone()
    };
    let filtered_token = client
        .try_list(filtered.clone())
        .await
        .unwrap()
        .next_page_token;
    assert_invalid(
        client.try_list(list_request(1, &filtered_token)).await,
        "page_token",
    );
    let next = client
        .try_list(pb::ListKeysRequest {
            page_token: filtered_token,
            ..filtered
        })
        .await
        .unwrap();
    assert_eq!(ids(&next.keys), ids(&created[1..2]), "the revoked key");

    // With the same filters the token works, and the page size may change (AIP-158).
    let rest = client
        .try_list(pb::ListKeysRequest {
            page_size: 10,
            ..with_token(query)
        })
        .await
        .unwrap();
    assert_eq!(
        ids(&rest.keys),
        [created[2].key_id.clone(), created[3].key_id.clone()]
    );
    assert_eq!(rest.next_page_token, "");
}

#[tokio::test]
async fn page_tokens_survive_a_restart() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 5).await;
    let first = client.try_list(list_request(2, "")).await.unwrap();
    assert_eq!(ids(&first.keys), ids(&created[..2]));
    drop(client);

    let server = server.restart().await;
    let mut client = server.client().await;
    let rest: Vec<pb::Key> = all_pages(&mut client, list_request(2, &first.next_page_token))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(ids(&rest), ids(&created[2..]));
}

#[tokio::test]
async fn listing_filters_by_type_and_environment() {
    let (server, mut client) = TestServer::with_client().await;
    let requests = [
        private_key("private prod", &[]),
        test_env(private_key("private test", &[])),
        public_key("public prod", &["tickets:read"], &["app.example.com"]),
        test_env(public_key("public test", &["tickets:read"], &[])),
        private_key("private prod 2", &["teams:read"]),
    ];
    let mut created = Vec::new();
    for request in requests {
        created.push(client.create(request).await.0);
        server.clock.advance(Duration::from_millis(1));
    }
    let names = |keys: &[pb::Key]| keys.iter().map(|k| k.name.clone()).collect::<Vec<_>>();

    let cases = [
        (
            pb::KeyType::Unspecified,
            pb::Environment::Unspecified,
            vec![
                "private prod",
                "private test",
                "public prod",
                "public test",
                "private prod 2",
            ],
        ),
        (
            pb::KeyType::Public,
            pb::Environment::Unspecified,
            vec!["public prod", "public test"],
        ),
        (
            pb::KeyType::Private,
            pb::Environment::Unspecified,
            vec!["private prod", "private test", "private prod 2"],
        ),
        (
            pb::KeyType::Unspecified,
            pb::Environment::Test,
            vec!["private test", "public test"],
        ),
        (
            pb::KeyType::Unspecified,
            pb::Environment::Production,
            vec!["private prod", "public prod", "private prod 2"],
        ),
        (
            pb::KeyType::Private,
            pb::Environment::Production,
            vec!["private prod", "private prod 2"],
        ),
        (
            pb::KeyType::Public,
            pb::Environment::Test,
            vec!["public test"],
        ),
    ];
    for (key_type, environment, expected) in cases {
        let request = pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            r#type: key_type as i32,
            environment: environment as i32,
            ..Default::default()
        };
        let whole = client.try_list(request.clone()).await.unwrap();
        assert_eq!(names(&whole.keys), expected, "{key_type:?} {environment:?}");
        assert_eq!(whole.next_page_token, "");
        // Paging one at a time with the same filter gives the same keys.
        let paged: Vec<pb::Key> = all_pages(
            &mut client,
            pb::ListKeysRequest {
                page_size: 1,
                ..request
            },
        )
        .await
        .into_iter()
        .flatten()
        .collect();
        assert_eq!(paged, whole.keys, "{key_type:?} {environment:?}");
    }
    let all = client.try_list(list_request(0, "")).await.unwrap();
    assert_eq!(all.keys, created);
}

#[tokio::test]
async fn revoked_keys_are_listed_only_on_request() {
    let (server, mut client) = TestServer::with_client().await;
    let created = create_many(&server, &mut client, 3).await;
    let revoked = client.revoke(&created[1].key_id).await;
    assert!(revoked.revoked_at.is_some());

    let default = client.try_list(list_request(0, "")).await.unwrap();
    assert_eq!(
        ids(&default.keys),
        [created[0].key_id.clone(), created[2].key_id.clone()]
    );

    let with_revoked = client
        .try_list(pb::ListKeysRequest {
            include_revoked: true,
            ..list_request(0, "")
        })
        .await
        .unwrap();
    assert_eq!(ids(&with_revoked.keys), ids(&created));
    assert_eq!(with_revoked.keys[1], revoked);

    // Paging over revoked keys skips them too.
    let paged: Vec<pb::Key> = all_pages(&mut client, list_request(1, ""))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(ids(&paged), ids(&default.keys));
}

#[tokio::test]
async fn get_key_returns_the_created_key() {
    let (_server, mut client) = TestServer::with_client().await;
    let mut private = private_key("private", &["tickets:read", "members:read"]);
    private.reveal_later = true;
    for request in [
        private,
        private_key("full", &[]),
        public_key(
            "public",
            &["labels:read"],
            &["app.example.com", "*.example.org"],
        ),
    ] {
        let (key, _) = client.create(request).await;
        assert_eq!(client.get_key(&key.key_id).await, key);
    }

    let missing = kemon_keys::domain::KeyId::generate(T0_MS).to_string();
    let status = client.try_get_key(&missing).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn reveal_returns_public_keys_and_opted_in_private_keys() {
    let (_server, mut client) = TestServer::with_client().await;

    let (public, pk) = client
        .create(public_key(
            "public",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    assert!(public.revealable);
    let revealed = client.reveal(&public.key_id).await;
    assert!(revealed.starts_with("pk_"), "{revealed}");
    assert_eq!(revealed, pk);

    let mut request = public_key("public test", &["tickets:read"], &[]);
    request.environment = pb::Environment::Test as i32;
    let (public_test, pk_test) = client.create(request).await;
    assert!(public_test.revealable);
    assert_eq!(client.reveal(&public_test.key_id).await, pk_test);

    let (hidden, _) = client.create(private_key("no copy", &[])).await;
    assert!(!hidden.revealable);
    let status = client.try_reveal(&hidden.key_id).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let mut request = private_key("copy", &["tickets:read"]);
    request.reveal_later = true;
    let (kept, sk) = client.create(request).await;
    assert!(kept.revealable);
    assert_eq!(client.reveal(&kept.key_id).await, sk);
    assert_eq!(client.reveal(&kept.key_id).await, sk, "again");

    // Revealing records nothing.
    assert_eq!(client.get_key(&kept.key_id).await, kept);
    assert_eq!(client.get_key(&public.key_id).await, public);

    // Revoked keys are not revealable, public ones included.
    for key in [&public, &kept] {
        let revoked = client.revoke(&key.key_id).await;
        assert!(!revoked.revealable);
        let status = client.try_reveal(&key.key_id).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
}

#[tokio::test]
async fn revoked_keys_cannot_be_renamed_or_rescoped() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client
        .create(private_key("doomed", &["tickets:read"]))
        .await;
    let revoked = client.revoke(&key.key_id).await;

    let status = client
        .try_rename(&key.key_id, "new name", None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = client
        .try_rename(&key.key_id, "new name", Some(revoked.version))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = client
        .try_rescope(&key.key_id, &["labels:read"], None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    assert_eq!(client.get_key(&key.key_id).await, revoked);
}

#[tokio::test]
async fn public_key_scopes_cannot_be_edited() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client
        .create(public_key(
            "public",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    for scopes in [
        &["labels:read"][..],
        &["tickets:read"],
        &["tickets:read", "teams:read"],
    ] {
        let status = client
            .try_rescope(&key.key_id, scopes, None)
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{scopes:?}: {status:?}"
        );
    }
    assert_eq!(client.get_key(&key.key_id).await, key);
}

#[tokio::test]
async fn rescoping_a_full_access_key_makes_it_scoped() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client.create(private_key("everything", &[])).await;
    assert!(key.full_access);
    assert_eq!(
        code(&client.verify(&secret, &["members:read"], "").await),
        pb::VerifyCode::Valid
    );

    let rescoped = client
        .try_rescope(&key.key_id, &["tickets:read"], None)
        .await
        .unwrap();
    assert!(!rescoped.full_access);
    assert_eq!(rescoped.scopes, ["tickets:read"]);
    assert_eq!(rescoped.version, 2);
    assert_eq!(client.get_key(&key.key_id).await, rescoped);

    let response = client.verify(&secret, &["members:read"], "").await;
    assert_eq!(code(&response), pb::VerifyCode::InsufficientScope);
    assert!(!response.full_access);
    assert_eq!(response.missing_scopes, ["members:read"]);
    assert_eq!(
        code(&client.verify(&secret, &["tickets:read"], "").await),
        pb::VerifyCode::Valid
    );
}

#[tokio::test]
async fn a_second_revoke_returns_the_key_unchanged() {
    let (server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("twice", &[])).await;
    let first = client.try_revoke(&key.key_id, Some(1)).await.unwrap();
    assert_eq!(first.version, 2);
    assert!(first.revoked_at.is_some());

    server.clock.advance(Duration::from_secs(60));
    let again = client
        .try_revoke(&key.key_id, Some(1))
        .await
        .expect("a stale expected_version on a revoked key is still fine");
    assert_eq!(again.version, first.version);
    assert_eq!(again.revoked_at, first.revoked_at);
    assert_eq!(again.updated_at, first.updated_at);
    let unconditional = client.revoke(&key.key_id).await;
    assert_eq!(unconditional.version, first.version);
    assert_eq!(unconditional.revoked_at, first.revoked_at);
    assert_eq!(client.get_key(&key.key_id).await, unconditional);
}

#[tokio::test]
async fn a_stale_expected_version_is_aborted() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("original", &[])).await;
    let renamed = client
        .try_rename(&key.key_id, "first rename", Some(1))
        .await
        .unwrap();
    assert_eq!(renamed.version, 2);

    let status = client
        .try_rename(&key.key_id, "second rename", Some(1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let status = client
        .try_rename(&key.key_id, "second rename", Some(3))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let after = client.get_key(&key.key_id).await;
    assert_eq!(after.name, "first rename");
    assert_eq!(after, renamed);

    let status = client.try_revoke(&key.key_id, Some(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(client.get_key(&key.key_id).await.revoked_at.is_none());

    let current = client
        .try_rename(&key.key_id, "second rename", Some(2))
        .await
        .unwrap();
    assert_eq!(current.name, "second rename");
    assert_eq!(current.version, 3);
}
