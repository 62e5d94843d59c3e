//! Envoy's ext_authz Check over a real gRPC connection, as Envoy calls it: the decisions, the
//! headers the upstream gets and loses, the denial statuses and bodies. (`envoy.rs` runs the
//! same through a real Envoy.)

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use kemon_keys::domain::{ApiKey, Environment, KeyType};
use kemon_keys::proto::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

/// A Check for an HTTP request with `headers`, on a route requiring `scopes`.
fn check_request(headers: &[(&str, &str)], scopes: Option<&str>) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/tickets".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: scopes
                .map(|s| HashMap::from([("kemon_scopes".to_owned(), s.to_owned())]))
                .unwrap_or_default(),
            ..Default::default()
        }),
    }
}

async fn check(
    channel: &Channel,
    headers: &[(&str, &str)],
    scopes: Option<&str>,
) -> Result<CheckResponse, tonic::Status> {
    AuthorizationClient::new(channel.clone())
        .check(check_request(headers, scopes))
        .await
        .map(tonic::Response::into_inner)
}

/// The verify code in the response's dynamic metadata.
fn verify_code(response: &CheckResponse) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    match response
        .dynamic_metadata
        .as_ref()
        .and_then(|m| m.fields.get("verify_code"))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(code)) => code.clone(),
        other => panic!("no verify_code: {other:?}"),
    }
}

/// The HTTP status, headers and body of a denial.
fn denial(response: &CheckResponse) -> (i32, HashMap<String, String>, serde_json::Value) {
    assert_ne!(response.status.as_ref().map(|s| s.code), Some(0), "denied");
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not a denial: {response:?}");
    };
    let headers = denied
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let body = serde_json::from_str(&denied.body).expect("a JSON body");
    (denied.status.as_ref().map_or(0, |s| s.code), headers, body)
}

#[tokio::test]
async fn check_allows_valid_keys_and_strips_credentials_and_forged_headers() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let (key, secret) = client
        .create(private_key("behind envoy", &["tickets:read"]))
        .await;

    let bearer = format!("Bearer {secret}");
    for headers in [
        vec![
            ("authorization", bearer.as_str()),
            ("x-kemon-key-id", "forged"),
            ("x-kemon-role", "admin"),
        ],
        vec![("x-api-key", secret.as_str())],
    ] {
        let response = check(&channel, &headers, Some("tickets:read"))
            .await
            .unwrap();
        assert_eq!(response.status.as_ref().map(|s| s.code), Some(0));
        assert_eq!(verify_code(&response), "VERIFY_CODE_VALID");
        let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
            panic!("not allowed: {response:?}");
        };
        let added: HashMap<String, String> = ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        assert_eq!(added["x-kemon-key-id"], key.key_id);
        assert_eq!(added["x-kemon-workspace-id"], WORKSPACE);
        assert_eq!(added["x-kemon-key-type"], "private");
        assert_eq!(added["x-kemon-environment"], "production");
        assert_eq!(added["x-kemon-scopes"], "tickets:read");
        // The credential never reaches the upstream, in either header.
        assert!(ok.headers_to_remove.contains(&"authorization".to_owned()));
        assert!(ok.headers_to_remove.contains(&"x-api-key".to_owned()));
        // No header of the secret's anywhere in what the upstream is given.
        assert!(added.values().all(|v| !v.contains(&secret)));
        // Removed: both credential headers, and any other x-kemon-* header the client sent. A
        // forged header of the service's own is overwritten instead (set, not removed: Envoy
        // removes after it sets, so removing it would lose the real value too).
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        if headers.iter().any(|(h, _)| *h == "x-kemon-key-id") {
            assert_eq!(removed, ["authorization", "x-api-key", "x-kemon-role"]);
        } else {
            assert_eq!(removed, ["authorization", "x-api-key"]);
        }
    }

    // No scopes named by the route: any valid key passes.
    let response = check(&channel, &[("x-api-key", &secret)], None)
        .await
        .unwrap();
    assert_eq!(verify_code(&response), "VERIFY_CODE_VALID");
}

/// Request headers, the route's scopes, the HTTP status and verify code expected.
type Case<'a> = (Vec<(&'a str, String)>, Option<&'a str>, i32, &'a str);

#[tokio::test]
async fn check_denies_with_401_or_403_a_reason_and_the_verify_code() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let (_, reader) = client
        .create(private_key("reader", &["tickets:read"]))
        .await;
    let (_, test_key) = client
        .create(test_env(private_key("local", &["tickets:read"])))
        .await;
    let (short, short_lived) = client
        .create(pb::CreateKeyRequest {
            expiration: pb::Expiration::Expiration30Days as i32,
            ..private_key("short", &["tickets:read"])
        })
        .await;
    let (revoked, revoked_secret) = client.create(private_key("gone", &[])).await;
    client.revoke(&revoked.key_id).await;
    server
        .clock
        .advance(std::time::Duration::from_secs(31 * 86_400));
    let unknown = ApiKey::generate(KeyType::Private, Environment::Production);
    // The last character changed (to one it is not), so the checksum no longer matches.
    let (body, last) = reader.split_at(reader.len() - 1);
    let malformed = format!("{body}{}", if last == "x" { 'y' } else { 'x' });

    let bearer = |s: &str| format!("Bearer {s}");
    let cases: Vec<Case> = vec![
        (vec![], Some("tickets:read"), 401, "VERIFY_CODE_MISSING"),
        (
            vec![("authorization", "Basic abc".into())],
            None,
            401,
            "VERIFY_CODE_MISSING",
        ),
        (
            vec![("authorization", bearer(&malformed))],
            None,
            401,
            "VERIFY_CODE_MALFORMED",
        ),
        (
            vec![("authorization", bearer(unknown.expose()))],
            None,
            401,
            "VERIFY_CODE_NOT_FOUND",
        ),
        (
            vec![("authorization", bearer(&short_lived))],
            None,
            401,
            "VERIFY_CODE_EXPIRED",
        ),
        (
            vec![("authorization", bearer(&revoked_secret))],
            None,
            401,
            "VERIFY_CODE_REVOKED",
        ),
        (
            vec![("authorization", bearer(&reader))],
            Some("tickets:write"),
            403,
            "VERIFY_CODE_INSUFFICIENT_SCOPE",
        ),
        (
            vec![
                ("authorization", bearer(&test_key)),
                ("origin", "https://app.example.com".into()),
            ],
            None,
            403,
            "VERIFY_CODE_ENVIRONMENT_NOT_ALLOWED",
        ),
    ];
    for (headers, scopes, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = check(&channel, &headers, scopes).await.unwrap();
        let (http, denied_headers, body) = denial(&response);
        assert_eq!(http, status, "{code}");
        assert_eq!(verify_code(&response), code);
        assert_eq!(body["code"], code, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert_eq!(
            denied_headers.contains_key("www-authenticate"),
            status == 401,
            "{code}: {denied_headers:?}"
        );
        // A denial repeats no part of what was presented.
        for (_, value) in &headers {
            if value.len() > 20 {
                assert!(!body.to_string().contains(&value[7..]), "{code}");
            }
        }
    }
    // The expired key's id is given (it is safe to log), its secret never.
    let response = check(&channel, &[("x-api-key", &short_lived)], None)
        .await
        .unwrap();
    assert_eq!(denial(&response).2["key_id"], short.key_id);
}

#[tokio::test]
async fn a_revoked_key_is_denied_at_the_next_check() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let (key, secret) = client.create(private_key("soon gone", &[])).await;
    let allowed = check(&channel, &[("x-api-key", &secret)], None)
        .await
        .unwrap();
    assert_eq!(verify_code(&allowed), "VERIFY_CODE_VALID");
    client.revoke(&key.key_id).await;
    let denied = check(&channel, &[("x-api-key", &secret)], None)
        .await
        .unwrap();
    assert_eq!(denial(&denied).0, 401);
    assert_eq!(verify_code(&denied), "VERIFY_CODE_REVOKED");
}

#[tokio::test]
async fn a_route_naming_an_unknown_scope_fails_closed() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let (_, secret) = client.create(private_key("any", &[])).await;
    let status = check(&channel, &[("x-api-key", &secret)], Some("tickets:reed"))
        .await
        .expect_err("a configuration error is a gRPC error, so Envoy applies its failure mode");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("kemon_scopes"), "{status:?}");
}

/// Sends `bytes` as the body of a Check, unchanged.
#[derive(Debug, Clone, Copy)]
struct RawCheck;

impl tonic::codec::Codec for RawCheck {
    type Encode = Vec<u8>;
    type Decode = CheckResponse;
    type Encoder = RawCheck;
    type Decoder = tonic_prost::ProstDecoder<CheckResponse>;

    fn encoder(&mut self) -> RawCheck {
        RawCheck
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl tonic::codec::Encoder for RawCheck {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

async fn check_raw(channel: &Channel, bytes: Vec<u8>) -> Result<CheckResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("connection ready");
    grpc.unary(
        tonic::Request::new(bytes),
        http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check"),
        RawCheck,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_malformed_check_request_is_refused_as_invalid_and_a_well_formed_one_still_answers() {
    use prost::Message;
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let (_, secret) = client.create(private_key("any", &["tickets:read"])).await;
    let whole = check_request(&[("x-api-key", &secret)], Some("tickets:read")).encode_to_vec();

    // Cut short inside the attributes, and a group wire type.
    let entry = [&[0x0a, 9][..], b"x-api-key", &[0x12, 1, 0xff]].concat();
    let nest = |field: u8, inner: &[u8]| [&[field, inner.len() as u8][..], inner].concat();
    let not_utf8 = nest(0x0a, &nest(0x22, &nest(0x12, &nest(0x1a, &entry))));
    for (what, bytes) in [
        ("truncated", whole[..whole.len() - 3].to_vec()),
        ("a group", vec![0x0b]),
    ] {
        let status = check_raw(&channel, bytes)
            .await
            .expect_err("a malformed request is a gRPC error, so Envoy applies its failure mode");
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().starts_with("invalid CheckRequest: "),
            "{what}: {status:?}"
        );
        assert!(!status.message().contains(&secret), "{what}");
    }

    // A credential that is not text (attributes { request { http { headers { key:
    // "x-api-key" value: 0xff } } } }) is denied with an answer (400, MALFORMED), not an
    // error: Envoy denies it whatever its failure mode.
    let denied = check_raw(&channel, not_utf8).await.expect("an answer");
    assert_eq!(verify_code(&denied), "VERIFY_CODE_MALFORMED");
    match &denied.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_eq!(d.status.as_ref().map(|s| s.code), Some(400), "{d:?}");
            assert!(!d.body.contains(&secret));
        }
        other => panic!("not a denial: {other:?}"),
    }

    // A header Check does not read may hold any bytes (a cookie in Latin-1): the request is
    // decided on the headers it reads. (Two encodings of the attributes merge into one.)
    let cookie = [&[0x0a, 6][..], b"cookie", &[0x12, 4], b"caf\xe9"].concat();
    let with_cookie = [
        whole.clone(),
        nest(0x0a, &nest(0x22, &nest(0x12, &nest(0x1a, &cookie)))),
    ]
    .concat();
    let allowed = check_raw(&channel, with_cookie).await.expect("an answer");
    assert_eq!(verify_code(&allowed), "VERIFY_CODE_VALID");

    // The same connection and server still decide a well-formed request, from the same bytes
    // a prost client sends.
    let allowed = check_raw(&channel, whole).await.expect("an answer");
    assert_eq!(verify_code(&allowed), "VERIFY_CODE_VALID");
}
