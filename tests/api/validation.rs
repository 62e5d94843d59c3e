//! Input rules over gRPC: field violations for bad requests (nothing written), caps on repeated fields and the size of errors, values never repeated in errors, defaults, and the scope catalog.

use kemon_keys::domain::Event;
use kemon_keys::proto::v1 as pb;
use tonic::{Code, Status};

use crate::helpers::*;

/// Asserts that CreateKey refuses `request` with INVALID_ARGUMENT naming `field`, and that no
/// key was written. Returns the reasons given for `field`.
async fn refused(
    client: &mut TestClient,
    request: pb::CreateKeyRequest,
    field: &str,
) -> Vec<String> {
    let before = client.list_all().await;
    let shown = format!("{request:?}");
    let result = client.try_create(request).await;
    let status = result.as_ref().err().cloned();
    let reasons = assert_invalid(result, field);
    assert_eq!(
        client.list_all().await,
        before,
        "a refused create wrote something: {shown} -> {status:?}"
    );
    reasons
}

/// The violated field names of a status, in order.
fn fields(status: &tonic::Status) -> Vec<String> {
    field_violations(status)
        .into_iter()
        .map(|(field, _)| field)
        .collect()
}

fn ms(ts: Option<prost_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

#[tokio::test]
async fn bad_names_are_refused_naming_name() {
    let (_server, mut client) = TestServer::with_client().await;
    let too_long = "a".repeat(101);
    let too_long_multibyte = "é".repeat(101);
    for name in [
        "",
        "   ",
        "\t \n",
        too_long.as_str(),
        too_long_multibyte.as_str(),
        "CI\u{0}deploy",
        "CI\ndeploy",
        "CI\u{7f}deploy",
        "CI\u{1b}[31mdeploy",
    ] {
        let reasons = refused(&mut client, private_key(name, &[]), "name").await;
        assert_eq!(reasons.len(), 1, "{name:?}: {reasons:?}");
    }
    assert!(client.list_all().await.is_empty());
}

#[tokio::test]
async fn names_of_up_to_100_characters_are_accepted_after_trimming() {
    let (_server, mut client) = TestServer::with_client().await;

    let hundred = "a".repeat(100);
    let (key, _) = client.create(private_key(&hundred, &[])).await;
    assert_eq!(key.name, hundred);

    let hundred_multibyte = "é".repeat(100);
    let (key, _) = client.create(private_key(&hundred_multibyte, &[])).await;
    assert_eq!(key.name, hundred_multibyte);

    let (key, _) = client.create(private_key("  CI deploy \t", &[])).await;
    assert_eq!(key.name, "CI deploy", "surrounding whitespace is trimmed");

    let padded = format!("   {hundred}   ");
    let (key, _) = client.create(private_key(&padded, &[])).await;
    assert_eq!(key.name, hundred, "the limit applies after trimming");

    assert_eq!(client.list_all().await.len(), 4);
}

#[tokio::test]
async fn type_and_environment_are_required() {
    let (_server, mut client) = TestServer::with_client().await;

    let mut request = private_key("no type", &[]);
    request.r#type = pb::KeyType::Unspecified as i32;
    refused(&mut client, request, "type").await;

    let mut request = private_key("unknown type", &[]);
    request.r#type = 7;
    refused(&mut client, request, "type").await;

    let mut request = private_key("no environment", &[]);
    request.environment = pb::Environment::Unspecified as i32;
    refused(&mut client, request, "environment").await;

    let mut request = private_key("unknown environment", &[]);
    request.environment = 42;
    refused(&mut client, request, "environment").await;
}

#[tokio::test]
async fn an_unknown_expiration_value_is_refused() {
    let (_server, mut client) = TestServer::with_client().await;
    for value in [7, 99, -1] {
        let mut request = private_key("odd expiry", &[]);
        request.expiration = value;
        refused(&mut client, request, "expiration").await;
    }
}

#[tokio::test]
async fn each_unknown_scope_gets_its_own_violation() {
    let (_server, mut client) = TestServer::with_client().await;

    let reasons = refused(
        &mut client,
        private_key(
            "bad scopes",
            &["tickets:read", "tickets:delete", "Tickets:read"],
        ),
        "scopes",
    )
    .await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("tickets:delete"), "{reasons:?}");
    assert!(reasons[1].contains("Tickets:read"), "{reasons:?}");

    let reasons = refused(
        &mut client,
        private_key("write teams", &["teams:write"]),
        "scopes",
    )
    .await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("teams:write"), "{reasons:?}");
}

#[tokio::test]
async fn at_most_16_scope_entries() {
    let (_server, mut client) = TestServer::with_client().await;

    let seventeen = vec!["tickets:read"; 17];
    refused(&mut client, private_key("too many", &seventeen), "scopes").await;

    // Sixteen entries are fine, and duplicates collapse.
    let sixteen = vec!["tickets:read"; 16];
    let (key, _) = client.create(private_key("sixteen", &sixteen)).await;
    assert_eq!(key.scopes, ["tickets:read"]);
    assert!(!key.full_access);
}

#[tokio::test]
async fn bad_workspace_ids_are_refused() {
    let (_server, mut client) = TestServer::with_client().await;
    let long = "a".repeat(65);
    for workspace_id in [
        "",
        "ws acme",
        " ws_acme",
        "ws/acme",
        "ws.acme",
        "wś",
        long.as_str(),
    ] {
        let mut request = private_key("ws", &[]);
        request.workspace_id = workspace_id.into();
        refused(&mut client, request, "workspace_id").await;

        let status = client
            .try_list(pb::ListKeysRequest {
                workspace_id: workspace_id.into(),
                ..Default::default()
            })
            .await;
        assert_invalid(status, "workspace_id");
    }

    let longest = "a".repeat(64);
    let mut request = private_key("ws", &[]);
    request.workspace_id = longest.clone();
    let (key, _) = client.create(request).await;
    assert_eq!(key.workspace_id, longest);
}

#[tokio::test]
async fn bad_key_ids_are_refused_on_get_and_rename() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("target", &[])).await;
    let lower = key.key_id.to_lowercase();
    let bare = key.key_id.trim_start_matches("key_").to_owned();
    let longer = format!("{}0", key.key_id);
    for key_id in [
        "",
        "nope",
        "key_",
        "key_123",
        lower.as_str(),
        bare.as_str(),
        longer.as_str(),
    ] {
        let result = client.try_get_key(key_id).await;
        assert_invalid(result, "key_id");

        let result = client.try_rename(key_id, "renamed", None).await;
        assert_invalid(result, "key_id");
    }
    assert_eq!(client.get_key(&key.key_id).await, key, "nothing changed");
}

#[tokio::test]
async fn bad_names_are_refused_on_rename_and_change_nothing() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("original", &[])).await;
    let too_long = "x".repeat(101);
    for name in ["", "   ", too_long.as_str(), "a\u{0}b"] {
        let result = client.try_rename(&key.key_id, name, None).await;
        assert_invalid(result, "name");
    }
    assert_eq!(client.get_key(&key.key_id).await, key);
}

#[tokio::test]
async fn public_key_rules() {
    let (_server, mut client) = TestServer::with_client().await;

    let reasons = refused(
        &mut client,
        public_key(
            "writer",
            &["tickets:read", "tickets:write"],
            &["app.example.com"],
        ),
        "scopes",
    )
    .await;
    assert!(
        reasons.iter().any(|r| r.contains("tickets:write")),
        "{reasons:?}"
    );

    refused(
        &mut client,
        public_key("reserved writer", &["labels:write"], &["app.example.com"]),
        "scopes",
    )
    .await;

    refused(
        &mut client,
        public_key("no scopes", &[], &["app.example.com"]),
        "scopes",
    )
    .await;

    let mut request = public_key("reveal", &["tickets:read"], &["app.example.com"]);
    request.reveal_later = true;
    refused(&mut client, request, "reveal_later").await;

    refused(
        &mut client,
        public_key("no domains", &["tickets:read"], &[]),
        "allowed_domains",
    )
    .await;

    let mut request = public_key("test with domains", &["tickets:read"], &["app.example.com"]);
    request.environment = pb::Environment::Test as i32;
    refused(&mut client, request, "allowed_domains").await;

    // The valid forms, for contrast.
    let (prod, _) = client
        .create(public_key("ok", &["tickets:read"], &["app.example.com"]))
        .await;
    assert_eq!(prod.allowed_domains, ["app.example.com"]);
    let mut request = public_key("ok test", &["tickets:read"], &[]);
    request.environment = pb::Environment::Test as i32;
    let (test, _) = client.create(request).await;
    assert!(test.allowed_domains.is_empty());
    assert_eq!(client.list_all().await.len(), 2);
}

#[tokio::test]
async fn private_keys_take_no_allowed_domains() {
    let (_server, mut client) = TestServer::with_client().await;

    let mut request = private_key("prod", &[]);
    request.allowed_domains = vec!["app.example.com".into()];
    refused(&mut client, request, "allowed_domains").await;

    let mut request = private_key("test", &["tickets:read"]);
    request.environment = pb::Environment::Test as i32;
    request.allowed_domains = vec!["app.example.com".into()];
    refused(&mut client, request, "allowed_domains").await;
}

#[tokio::test]
async fn malformed_and_too_many_domains_are_refused() {
    let (_server, mut client) = TestServer::with_client().await;

    for domain in [
        "https://a.com",
        "a.com:443",
        "*.com",
        "a.com/path",
        "a.*.com",
        "*",
        "",
    ] {
        let reasons = refused(
            &mut client,
            public_key("bad domain", &["tickets:read"], &["ok.example.com", domain]),
            "allowed_domains",
        )
        .await;
        assert_eq!(reasons.len(), 1, "{domain:?}: {reasons:?}");
    }

    let hosts: Vec<String> = (0..21).map(|i| format!("h{i}.example.com")).collect();
    let too_many: Vec<&str> = hosts.iter().map(String::as_str).collect();
    refused(
        &mut client,
        public_key("many", &["tickets:read"], &too_many),
        "allowed_domains",
    )
    .await;

    let (key, _) = client
        .create(public_key("twenty", &["tickets:read"], &too_many[..20]))
        .await;
    assert_eq!(key.allowed_domains.len(), 20);

    let (key, _) = client
        .create(public_key(
            "case",
            &["tickets:read"],
            &["App.Example.COM", "*.Example.Org"],
        ))
        .await;
    assert_eq!(
        key.allowed_domains,
        ["app.example.com", "*.example.org"],
        "lower-cased on the way in"
    );
}

#[tokio::test]
async fn update_scopes_needs_at_least_one_known_scope() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("full", &[])).await;
    assert!(key.full_access);

    for scopes in [vec![], vec!["tickets:read", "nope:read"]] {
        let result = client.try_rescope(&key.key_id, &scopes, None).await;
        assert_invalid(result, "scopes");
    }
    let after = client.get_key(&key.key_id).await;
    assert_eq!(after, key, "still full access, version 1");
}

#[tokio::test]
async fn several_bad_fields_give_several_violations() {
    let (_server, mut client) = TestServer::with_client().await;
    let request = pb::CreateKeyRequest {
        workspace_id: "bad workspace".into(),
        name: "   ".into(),
        r#type: 0,
        environment: 0,
        expiration: 99,
        scopes: vec!["bogus".into()],
        reveal_later: false,
        allowed_domains: vec!["https://a.com".into()],
        request_id: "not an id".into(),
    };
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut got = fields(&status);
    got.sort();
    assert_eq!(
        got,
        [
            "allowed_domains",
            "environment",
            "expiration",
            "name",
            "request_id",
            "scopes",
            "type",
            "workspace_id"
        ],
        "{status:?}"
    );
    assert!(client.list_all().await.is_empty());

    let mut request = public_key("public", &["tickets:write"], &[]);
    request.reveal_later = true;
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut got = fields(&status);
    got.sort();
    assert_eq!(
        got,
        ["allowed_domains", "reveal_later", "scopes"],
        "{status:?}"
    );

    let status = client
        .in_workspace("")
        .try_rename("nope", "", None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut got = fields(&status);
    got.sort();
    assert_eq!(got, ["key_id", "name", "workspace_id"], "{status:?}");
    assert!(client.list_all().await.is_empty());
}

#[tokio::test]
async fn expiration_options_set_exact_expiry_instants() {
    let (server, mut client) = TestServer::with_client().await;
    let now = T0_MS + 1_234;
    server.clock.set_ms(now);
    let cases = [
        (pb::Expiration::Unspecified, Some(90)),
        (pb::Expiration::Expiration30Days, Some(30)),
        (pb::Expiration::Expiration60Days, Some(60)),
        (pb::Expiration::Expiration90Days, Some(90)),
        (pb::Expiration::Expiration180Days, Some(180)),
        (pb::Expiration::Expiration365Days, Some(365)),
        (pb::Expiration::Never, None),
    ];
    for (expiration, days) in cases {
        let mut request = private_key("expiring", &[]);
        request.expiration = expiration as i32;
        let (key, secret) = client.create(request).await;
        assert_eq!(ms(key.created_at), Some(now), "{expiration:?}");
        assert_eq!(
            ms(key.expires_at),
            days.map(|d| now + d * DAY_MS),
            "{expiration:?}"
        );
        assert!(!key.expired);
        let verified = client.verify(&secret, &[], "").await;
        assert_eq!(code(&verified), pb::VerifyCode::Valid);
        assert_eq!(
            ms(verified.expires_at),
            ms(key.expires_at),
            "{expiration:?}"
        );
    }
}

#[tokio::test]
async fn a_private_key_without_scopes_has_full_access() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("everything", &[])).await;
    assert!(key.full_access);
    assert!(key.scopes.is_empty());
    assert!(client.get_key(&key.key_id).await.full_access);

    let (scoped, _) = client.create(private_key("scoped", &["teams:read"])).await;
    assert!(!scoped.full_access);
    assert_eq!(scoped.scopes, ["teams:read"]);
}

#[tokio::test]
async fn reserved_scopes_are_accepted_on_private_keys() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(private_key("reserved", &["projects:write", "labels:write"]))
        .await;
    assert!(!key.full_access);
    let mut scopes = key.scopes.clone();
    scopes.sort();
    assert_eq!(scopes, ["labels:write", "projects:write"]);
    let verified = client
        .verify(&secret, &["projects:write", "labels:write"], "")
        .await;
    assert_eq!(code(&verified), pb::VerifyCode::Valid);
}

#[tokio::test]
async fn list_scopes_returns_the_catalog_without_metadata() {
    let (_server, mut client) = TestServer::with_client().await;
    let scopes = client
        .list_scopes(pb::ListScopesRequest {})
        .await
        .expect("list_scopes needs no actor")
        .into_inner()
        .scopes;
    use pb::scope::Access::{Read, Write};
    let mut got: Vec<(String, String, pb::scope::Access, bool)> = scopes
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.resource.clone(),
                pb::scope::Access::try_from(s.access).expect("known access"),
                s.reserved,
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = [
        ("labels:read", "labels", Read, false),
        ("labels:write", "labels", Write, true),
        ("members:read", "members", Read, false),
        ("projects:read", "projects", Read, false),
        ("projects:write", "projects", Write, true),
        ("teams:read", "teams", Read, false),
        ("tickets:read", "tickets", Read, false),
        ("tickets:write", "tickets", Write, false),
    ]
    .map(|(n, r, a, res)| (n.to_owned(), r.to_owned(), a, res));
    assert_eq!(got, expected);
}

// ----------------------------------------------------------------------------------------------
// Caps on repeated fields, bounded errors, and values that are never repeated

/// ReadEvents and SubscribeEvents, as an auditor, filtered to `event_types`: the status of
/// each, or `None` for a call that was accepted.
async fn filter_by_types(server: &TestServer, event_types: &[String]) -> [Option<Status>; 2] {
    let mut audit = server.audit().await;
    let filter = pb::EventFilter {
        event_types: event_types.to_vec(),
        ..Default::default()
    };
    let read = audit
        .read_events(auditor(pb::ReadEventsRequest {
            after_sequence: 0,
            limit: 0,
            filter: Some(filter.clone()),
        }))
        .await
        .err();
    let subscribe = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: Some(filter),
        }))
        .await
        .err();
    [read, subscribe]
}

/// The reasons an INVALID_ARGUMENT gives for `field`, after checking that the whole error (its
/// message and its encoded details) is small.
#[track_caller]
fn small_invalid(status: &Status, field: &str) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() < 1024, "{}", status.message().len());
    assert!(status.details().len() < 2048, "{}", status.details().len());
    assert_invalid(Err::<(), _>(status.clone()), field)
}

#[tokio::test]
async fn event_type_lists_are_capped_before_any_entry_is_checked() {
    let server = TestServer::start().await;

    // Far more entries than SQLite has variables: the request is over the size every
    // request is held to, refused before it is decoded, and not INTERNAL.
    let many = vec!["KeyCreated".to_owned(); 40_000];
    for status in filter_by_types(&server, &many).await {
        let status = status.expect("40,000 event types are refused");
        assert!(
            matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{status:?}"
        );
        assert!(status.message().len() < 200, "{}", status.message());
    }

    // A list that fits the size limit but not the cap: refused as a list.
    let many = vec!["KeyCreated".to_owned(); 1_000];
    for status in filter_by_types(&server, &many).await {
        let status = status.expect("1,000 event types are refused");
        assert_eq!(
            field_violations(&status),
            [(
                "filter.event_types".to_owned(),
                "at most 16 entries (got 1000)".to_owned()
            )],
        );
        assert!(status.message().len() < 100, "{}", status.message());
    }

    // Unknown names are not each reported: the list is refused before they are looked at.
    let unknown: Vec<String> = (0..700).map(|i| format!("KeyDeleted{i}")).collect();
    for status in filter_by_types(&server, &unknown).await {
        let status = status.expect("700 unknown event types are refused");
        let reasons = small_invalid(&status, "filter.event_types");
        assert_eq!(reasons, ["at most 16 entries (got 700)"]);
    }

    // Within the cap, each unknown name is a violation, but only a few are listed.
    let unknown: Vec<String> = (0..16).map(|i| format!("Key{i}")).collect();
    for status in filter_by_types(&server, &unknown).await {
        let status = status.expect("unknown event types are refused");
        let reasons = small_invalid(&status, "filter.event_types");
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].contains("`Key0`"), "{reasons:?}");
        assert!(reasons[2].contains("`Key2`"), "{reasons:?}");
        assert!(reasons[3].contains("13 more"), "{reasons:?}");
    }

    // Sixteen entries, repeats included, are a filter; seventeen are not.
    let mut sixteen: Vec<String> = vec!["KeyRenamed".to_owned(); 16 - Event::TYPE_NAMES.len()];
    sixteen.extend(Event::TYPE_NAMES.iter().map(|t| t.to_string()));
    for status in filter_by_types(&server, &sixteen).await {
        assert!(status.is_none(), "{status:?}");
    }
    sixteen.push("KeyRevoked".to_owned());
    for status in filter_by_types(&server, &sixteen).await {
        let reasons = small_invalid(&status.expect("refused"), "filter.event_types");
        assert_eq!(reasons, ["at most 16 entries (got 17)"]);
    }
}

#[tokio::test]
async fn many_bad_entries_are_listed_a_few_at_a_time() {
    let (_server, mut client) = TestServer::with_client().await;

    let hosts: Vec<String> = (0..20)
        .map(|i| format!("https://h{i}.example.com"))
        .collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let request = public_key("bad hosts", &["tickets:read"], &hosts);
    let status = client.try_create(request).await.unwrap_err();
    let reasons = small_invalid(&status, "allowed_domains");
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons[0].contains("`https://h0.example.com`"),
        "{reasons:?}"
    );
    assert!(reasons[3].contains("17 more"), "{reasons:?}");

    let status = client
        .verify_key(pb::VerifyKeyRequest {
            key: String::new(),
            required_scopes: (0..16).map(|i| format!("tickets:{i}")).collect(),
            origin: String::new(),
        })
        .await
        .unwrap_err();
    let reasons = small_invalid(&status, "required_scopes");
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[3].contains("13 more"), "{reasons:?}");
    assert!(client.list_all().await.is_empty());
}

/// Asserts that no 8 characters in a row of `body` (a key's random part and checksum) appear
/// in the status message or its encoded details.
#[track_caller]
fn assert_not_repeated(status: &Status, body: &str) {
    for part in body.as_bytes().windows(8) {
        let shown = |bytes: &[u8]| bytes.windows(8).any(|w| w == part);
        assert!(
            !shown(status.message().as_bytes()),
            "message repeats part of the key: {status:?}"
        );
        assert!(
            !shown(status.details()),
            "details repeat part of the key: {status:?}"
        );
    }
}

#[tokio::test]
async fn a_key_pasted_into_a_scope_list_is_never_repeated() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, secret) = client.create(private_key("pasted", &[])).await;
    // What follows `sk_`: 32 random characters, then the 6 of the checksum.
    let body = secret.rsplit('_').next().unwrap().to_owned();
    assert_eq!(body.len(), 38, "{secret}");
    let random = &body[..32];

    for pasted in [
        random.to_owned(),
        format!("{random}:read"),
        format!("tickets:{random}"),
        body.clone(),
        secret.clone(),
    ] {
        // The typo next to it is still shown, so the caller can fix it.
        let scopes = ["tickets:reed", pasted.as_str()];
        let status = client
            .try_create(private_key("pasted", &scopes))
            .await
            .unwrap_err();
        let reasons = small_invalid(&status, "scopes");
        assert!(reasons[0].contains("`tickets:reed`"), "{reasons:?}");
        assert_not_repeated(&status, &body);

        let status = client
            .try_rescope(&key.key_id, &scopes, None)
            .await
            .unwrap_err();
        small_invalid(&status, "scopes");
        assert_not_repeated(&status, &body);

        let status = client
            .try_verify(&secret, &["tickets:writee", &pasted], "")
            .await
            .unwrap_err();
        let reasons = small_invalid(&status, "required_scopes");
        assert!(reasons[0].contains("`tickets:writee`"), "{reasons:?}");
        assert_not_repeated(&status, &body);
    }
    assert_eq!(client.list_all().await, [key]);
}

// ----------------------------------------------------------------------------------------------
// Several bad fields: one INVALID_ARGUMENT names each of them

#[tokio::test]
async fn create_key_names_every_bad_field() {
    let (_server, mut client) = TestServer::with_client().await;
    let request = pb::CreateKeyRequest {
        workspace_id: String::new(),
        name: "CI\ndeploy".into(),
        r#type: 7,
        environment: pb::Environment::Production as i32,
        scopes: vec!["tickets:delete".into()],
        ..Default::default()
    };
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["name", "scopes", "type", "workspace_id"]
    );
    assert!(client.list_all().await.is_empty());
}

#[tokio::test]
async fn create_key_names_bad_fields_and_broken_rules_together() {
    let (_server, mut client) = TestServer::with_client().await;

    // Bad fields and the rules a public key breaks, in one answer.
    let mut request = public_key("", &["tickets:write"], &[]);
    request.workspace_id = "ws acme".into();
    request.reveal_later = true;
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "allowed_domains",
            "name",
            "reveal_later",
            "scopes",
            "workspace_id"
        ]
    );
    let reasons = assert_invalid(Err::<(), _>(status), "scopes");
    assert!(reasons[0].contains("`tickets:write`"), "{reasons:?}");

    let mut request = public_key("test with domains", &["tickets:read"], &["app.example.com"]);
    request.environment = pb::Environment::Test as i32;
    request.expiration = 99;
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["allowed_domains", "expiration"]);

    let mut request = private_key("private with domains", &["tickets:read", "nope:read"]);
    request.allowed_domains = vec!["app.example.com".into()];
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["allowed_domains", "scopes"]);
    assert!(client.list_all().await.is_empty());
}

#[tokio::test]
async fn a_bad_field_is_not_reported_again_as_a_broken_rule() {
    let (_server, mut client) = TestServer::with_client().await;

    // An unknown scope is not also "no read scope"; a malformed domain is not also "no
    // allowed domain"; a list over its cap is reported once.
    for (scopes, domains, field) in [
        (vec!["tickets:nope"], vec!["app.example.com"], "scopes"),
        (
            vec!["tickets:read"],
            vec!["https://app.example.com"],
            "allowed_domains",
        ),
        (vec!["tickets:read"; 17], vec!["app.example.com"], "scopes"),
    ] {
        let status = client
            .try_create(public_key("public", &scopes, &domains))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field], "{status:?}");
        assert_eq!(field_violations(&status).len(), 1, "{status:?}");
    }

    // An unknown type leaves the rules of both types unjudged.
    let mut request = public_key("typeless", &["tickets:write"], &[]);
    request.r#type = 9;
    let status = client.try_create(request).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["type"]);
    assert!(client.list_all().await.is_empty());
}

#[tokio::test]
async fn rename_key_names_every_bad_field() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("original", &[])).await;

    let status = client
        .try_rename("key_123", "\u{7}", Some(1))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["key_id", "name"]);

    let status = client
        .in_workspace("ws/acme")
        .try_rename(&key.key_id.to_lowercase(), &"x".repeat(101), None)
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["key_id", "name", "workspace_id"]);
    assert_eq!(client.get_key(&key.key_id).await, key, "unchanged");
}

#[tokio::test]
async fn update_key_scopes_names_every_bad_field() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client
        .create(private_key("scoped", &["tickets:read"]))
        .await;

    let status = client
        .in_workspace("")
        .try_rescope("nope", &["tickets:read", "tickets:nope"], None)
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["key_id", "scopes", "workspace_id"]);

    let status = client.try_rescope("", &[], Some(1)).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["key_id", "scopes"]);
    assert_eq!(client.get_key(&key.key_id).await, key, "unchanged");
}

#[tokio::test]
async fn list_keys_names_every_bad_field() {
    let (_server, mut client) = TestServer::with_client().await;
    let status = client
        .try_list(pb::ListKeysRequest {
            workspace_id: " ws_acme".into(),
            // Over the maximum is coerced (AIP-158), not a bad field.
            page_size: 500,
            page_token: "page 2".into(),
            r#type: 9,
            environment: 9,
            include_revoked: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["environment", "page_token", "type", "workspace_id"]
    );
}

#[tokio::test]
async fn calls_about_one_key_name_both_bad_ids() {
    let server = TestServer::start().await;
    let mut client = server.client().await.in_workspace("ws acme");
    let get = client.try_get_key("key_").await.map(drop);
    let revoke = client.try_revoke("key_", None).await.map(drop);
    let reveal = client.try_reveal("key_").await.map(drop);
    for (rpc, result) in [
        ("GetKey", get),
        ("RevokeKey", revoke),
        ("RevealKey", reveal),
    ] {
        let status = result.expect_err(rpc);
        assert_eq!(bad_fields(&status), ["key_id", "workspace_id"], "{rpc}");
    }
}

// ----------------------------------------------------------------------------------------------
// Every refusal carries a google.rpc.ErrorInfo reason (the authentication and role reasons are
// in `auth`, the audit ones in `audit`, the storage ones in `storage`)

/// A key id no key has.
const UNKNOWN_KEY_ID: &str = "key_01ARZ3NDEKTSV4RRFFQ69G5FAV";

/// Calls every RPC that changes or reveals `key_id`, as an admin of [`WORKSPACE`].
async fn every_change(
    client: &mut TestClient,
    key_id: &str,
) -> Vec<(&'static str, Result<(), Status>)> {
    let rename = client.try_rename(key_id, "renamed", None).await.map(drop);
    let update = client
        .try_rescope(key_id, &["teams:read"], None)
        .await
        .map(drop);
    let reveal = client.try_reveal(key_id).await.map(drop);
    vec![
        ("RenameKey", rename),
        ("UpdateKeyScopes", update),
        ("RevealKey", reveal),
    ]
}

#[tokio::test]
async fn a_key_that_is_not_there_is_key_not_found_naming_it() {
    let (_server, mut client) = TestServer::with_client().await;
    let mut outcomes = every_change(&mut client, UNKNOWN_KEY_ID).await;
    outcomes.push(("GetKey", client.try_get_key(UNKNOWN_KEY_ID).await.map(drop)));
    outcomes.push((
        "RevokeKey",
        client.try_revoke(UNKNOWN_KEY_ID, None).await.map(drop),
    ));
    for (rpc, outcome) in outcomes {
        let status = outcome.expect_err(rpc);
        let metadata = assert_reason(&status, Code::NotFound, "KEY_NOT_FOUND");
        assert_eq!(
            metadata,
            [("key_id".to_owned(), UNKNOWN_KEY_ID.to_owned())].into(),
            "{rpc}"
        );
    }
}

#[tokio::test]
async fn changing_or_revealing_a_revoked_key_is_key_revoked() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client
        .create(revealable(private_key("revoked", &["tickets:read"])))
        .await;
    client.revoke(&key.key_id).await;
    for (rpc, outcome) in every_change(&mut client, &key.key_id).await {
        let status = outcome.expect_err(rpc);
        let metadata = assert_reason(&status, Code::FailedPrecondition, "KEY_REVOKED");
        assert_eq!(metadata["key_id"], key.key_id, "{rpc}");
    }
}

#[tokio::test]
async fn revealing_a_key_without_a_copy_is_key_not_revealable() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("no copy", &[])).await;
    let status = client.try_reveal(&key.key_id).await.unwrap_err();
    let metadata = assert_reason(&status, Code::FailedPrecondition, "KEY_NOT_REVEALABLE");
    assert_eq!(metadata["key_id"], key.key_id);
}

#[tokio::test]
async fn editing_a_public_key_s_scopes_is_public_key_scopes_immutable() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client
        .create(public_key(
            "widget",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    let status = client
        .try_rescope(&key.key_id, &["teams:read"], None)
        .await
        .unwrap_err();
    let metadata = assert_reason(
        &status,
        Code::FailedPrecondition,
        "PUBLIC_KEY_SCOPES_IMMUTABLE",
    );
    assert_eq!(metadata["key_id"], key.key_id);
    assert_eq!(client.get_key(&key.key_id).await, key, "unchanged");
}

#[tokio::test]
async fn a_stale_expected_version_is_version_conflict_naming_both_versions_and_the_key() {
    let (_server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("versioned", &[])).await;
    let status = client.try_revoke(&key.key_id, Some(7)).await.unwrap_err();
    let metadata = assert_reason(&status, Code::Aborted, "VERSION_CONFLICT");
    assert_eq!(
        metadata,
        [
            ("key_id".to_owned(), key.key_id.clone()),
            ("expected_version".to_owned(), "7".to_owned()),
            ("actual_version".to_owned(), "1".to_owned()),
        ]
        .into()
    );
}

#[tokio::test]
async fn calls_before_the_cache_is_loaded_are_not_ready() {
    use tonic_health::pb::health_check_response::ServingStatus;

    // A server serving while its cache load is held back, as a large cache's load would be.
    let (server, release) = TestServer::start_loading_held().await;
    let channel = server.channel().await;
    wait_for_health(&channel, "", ServingStatus::NotServing).await;
    let mut client =
        kemon_keys::proto::v1::key_service_client::KeyServiceClient::new(channel.clone());
    let created = client
        .create_key(admin(private_key("early", &[])))
        .await
        .map(drop);
    let verified = client
        .verify_key(pb::VerifyKeyRequest::default())
        .await
        .map(drop);
    for (rpc, outcome) in [("CreateKey", created), ("VerifyKey", verified)] {
        let status = outcome.expect_err(rpc);
        let metadata = assert_reason(&status, Code::Unavailable, "NOT_READY");
        assert!(metadata.is_empty(), "{rpc}: {metadata:?}");
    }
    // What reads no cache answers meanwhile: the scope catalog and the audit log.
    client
        .list_scopes(pb::ListScopesRequest::default())
        .await
        .expect("ListScopes while the cache loads");
    kemon_keys::proto::v1::audit_service_client::AuditServiceClient::new(channel.clone())
        .get_log_head(auditor(pb::GetLogHeadRequest::default()))
        .await
        .expect("GetLogHead while the cache loads");

    release
        .send(())
        .expect("the server waits to load its cache");
    wait_for_health(&channel, "", ServingStatus::Serving).await;
    client
        .create_key(admin(private_key("later", &[])))
        .await
        .expect("CreateKey once the cache is loaded");
}
