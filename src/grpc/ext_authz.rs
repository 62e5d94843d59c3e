//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`), so that
//! Envoy, Istio's CUSTOM authorization and Envoy Gateway ask kemon-keys directly, with no
//! sidecar glue. Served on the same port as KeyService; decisions come from the same
//! verification cache, with the same verify codes, as VerifyKey.
//!
//! What a Check reads from the HTTP request Envoy describes:
//! - the key: `authorization: Bearer <key>`, else the API key header (`x-api-key` unless
//!   configured otherwise);
//! - the origin: the `origin` header;
//! - the required scopes: the route's `context_extensions` entry `kemon_scopes`, scope names
//!   separated by commas or spaces (none: any valid key passes).
//!
//! What it answers:
//! - allowed: upstream headers `x-kemon-key-id`, `x-kemon-workspace-id`, `x-kemon-key-type`,
//!   `x-kemon-scopes`, `x-kemon-environment`; the credential header removed, so the key never
//!   reaches the upstream; every client-sent `x-kemon-*` header removed, so none can be forged;
//! - denied: 401 with `WWW-Authenticate: Bearer` for a missing, malformed, unknown, expired or
//!   revoked key; 403 for insufficient scope, a wrong origin or environment; a small JSON
//!   body with the reason; dynamic metadata `verify_code` (under the filter's namespace,
//!   `envoy.filters.http.ext_authz`) for Envoy's access log; 400 for a request whose
//!   credential, origin or `x-kemon-*` header name is not UTF-8;
//! - a route whose `kemon_scopes` names an unknown scope, or a server still loading its
//!   cache: a gRPC error, which Envoy turns into its configured failure mode (deny, with
//!   `failure_mode_allow: false`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, HttpStatusCode,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Code, Status};

use super::record_key_id;
use crate::cache::{CachedKey, Verdict, VerifyCache};
use crate::domain::{Scope, ScopeSet};
use crate::proto::v1::VerifyCode;

mod wire;

pub use wire::{AuthorizationService, CheckInput};

/// The route setting (`context_extensions`) that names the scopes a route requires.
pub const SCOPES_EXTENSION: &str = "kemon_scopes";

/// Headers the service sets on allowed requests; clients may never send them.
const FORWARDED_PREFIX: &str = "x-kemon-";

/// The headers an allowed request carries upstream. Setting them overwrites a forged value;
/// they must not also be listed for removal, because Envoy removes after it sets.
const FORWARDED: [&str; 5] = [
    "x-kemon-key-id",
    "x-kemon-workspace-id",
    "x-kemon-key-type",
    "x-kemon-scopes",
    "x-kemon-environment",
];

/// The Check service.
pub struct ExtAuthzApi {
    cache: Arc<VerifyCache>,
    ready: Arc<AtomicBool>,
    /// The header a key may come in besides `authorization: Bearer`, lower case.
    api_key_header: String,
}

/// What a Check reads from the request's headers, found in one pass over them (Envoy sends
/// header names in lower case).
#[derive(Debug, Default)]
struct Presented<'r> {
    authorization: Option<&'r str>,
    api_key: Option<&'r str>,
    origin: Option<&'r str>,
    /// The W3C trace context of the request, for the call's line.
    traceparent: Option<&'r str>,
    /// Whether any client-sent `x-kemon-*` header must be removed.
    forged: bool,
}

impl ExtAuthzApi {
    pub fn new(cache: Arc<VerifyCache>, ready: Arc<AtomicBool>, api_key_header: &str) -> Self {
        ExtAuthzApi {
            cache,
            ready,
            api_key_header: api_key_header.to_ascii_lowercase(),
        }
    }

    /// One pass over the headers, which the forged-header scan needs anyway. Names are
    /// compared as bytes; the values read, and the `x-kemon-*` names, must be UTF-8 (the
    /// error names the first header that is not); the other headers are never read, and may
    /// hold any bytes. A trace context that is not text is ignored.
    fn presented<'r>(&self, input: &'r CheckInput) -> Result<Presented<'r>, String> {
        let mut presented = Presented::default();
        for (name, value) in input.raw_headers() {
            let text = || {
                std::str::from_utf8(value)
                    .map(Some)
                    .map_err(|_| not_utf8(name))
            };
            if name == b"authorization" {
                presented.authorization = text()?;
            }
            if name == self.api_key_header.as_bytes() {
                presented.api_key = text()?;
            }
            if name == b"origin" {
                presented.origin = text()?;
            }
            if name == b"traceparent" {
                presented.traceparent = std::str::from_utf8(value).ok();
            }
            if name.starts_with(FORWARDED_PREFIX.as_bytes()) {
                let name = std::str::from_utf8(name).map_err(|_| not_utf8(name))?;
                presented.forged |= is_forged(name);
            }
        }
        Ok(presented)
    }

    /// The key a request carries: `authorization: Bearer <key>`, else the API key header.
    fn credential<'r>(presented: &Presented<'r>) -> Option<&'r str> {
        if let Some(value) = presented.authorization
            && let Some((scheme, token)) = value.trim().split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Some(token.trim());
        }
        presented.api_key.map(str::trim)
    }

    fn decide(&self, input: &CheckInput) -> Result<CheckAnswer, Status> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "starting: the key cache is still loading",
            ));
        }
        let required = match input.route_scopes() {
            Some(names) => required_scopes(names)?,
            None => ScopeSet::EMPTY,
        };
        let presented = match self.presented(input) {
            Ok(presented) => presented,
            Err(header) => return Ok(CheckAnswer::Message(Box::new(unreadable(&header)))),
        };
        if let Some(traceparent) = presented.traceparent {
            super::calls::record_request_trace(traceparent);
        }
        let verdict = match Self::credential(&presented) {
            Some(key) if !key.is_empty() => {
                self.cache
                    .verify(key, required, presented.origin.unwrap_or(""))
            }
            _ => {
                return Ok(CheckAnswer::Message(Box::new(denied(
                    None,
                    VerifyCode::Unspecified,
                ))));
            }
        };
        let (code, key) = match verdict {
            Verdict::Valid(k) => (VerifyCode::Valid, Some(k)),
            Verdict::Malformed => (VerifyCode::Malformed, None),
            Verdict::NotFound => (VerifyCode::NotFound, None),
            Verdict::Expired(k) => (VerifyCode::Expired, Some(k)),
            Verdict::Revoked(k) => (VerifyCode::Revoked, Some(k)),
            Verdict::EnvironmentNotAllowed(k) => (VerifyCode::EnvironmentNotAllowed, Some(k)),
            Verdict::OriginNotAllowed(k) => (VerifyCode::OriginNotAllowed, Some(k)),
            Verdict::InsufficientScope { key, .. } => (VerifyCode::InsufficientScope, Some(key)),
        };
        if let Some(k) = &key {
            record_key_id(k.key_id);
            super::record_workspace_id(&k.workspace_id);
        }
        if code == VerifyCode::Valid {
            // A denial records its code where it is built.
            super::calls::record_verify_code(code as i32, verify_code_name(code));
        }
        match key {
            Some(k) if code == VerifyCode::Valid => Ok(CheckAnswer::Encoded(wire::allowed(
                &k,
                Some(input).filter(|_| presented.forged),
                &self.api_key_header,
            ))),
            other => Ok(CheckAnswer::Message(Box::new(denied(
                other.as_deref(),
                code,
            )))),
        }
    }
}

/// A client-sent header of the service's own prefix that the service does not set itself:
/// removed, so that the upstream never sees it.
fn is_forged(name: &str) -> bool {
    name.starts_with(FORWARDED_PREFIX) && !FORWARDED.contains(&name)
}

/// The name of a header Check reads, or of its own prefix, whose value or name is not UTF-8.
fn not_utf8(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// The scopes a route requires, from its `kemon_scopes` setting. An unknown name is the
/// route's configuration error: refused as a gRPC error, so that Envoy fails closed.
fn required_scopes(names: &str) -> Result<ScopeSet, Status> {
    let names = || names.split([',', ' ']).filter(|n| !n.is_empty());
    let mut required = ScopeSet::EMPTY;
    for name in names() {
        match Scope::parse(name) {
            Some(scope) => required.insert(scope),
            None => {
                let unknown: Vec<&str> = names().filter(|n| Scope::parse(n).is_none()).collect();
                tracing::error!(
                    ?unknown,
                    "a route's {SCOPES_EXTENSION} names unknown scopes"
                );
                return Err(Status::invalid_argument(format!(
                    "context_extensions.{SCOPES_EXTENSION} names unknown scopes {unknown:?}"
                )));
            }
        }
    }
    Ok(required)
}

/// A header for Envoy to set, with `action` when it exists already. Empty values are dropped
/// by Envoy (`keep_empty_value: false`).
fn header(key: &str, value: String, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: action.into(),
        keep_empty_value: false,
        ..Default::default()
    }
}

/// `status` as the gRPC status a Check answer carries (Envoy reads only its code).
fn check_status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code.into(),
        message: message.to_owned(),
        details: Vec::new(),
    })
}

/// What Check answers: an allowed request's answer already encoded (the common case, written
/// straight to the wire by [`wire::allowed`]), or any other answer as a message.
#[derive(Debug)]
pub enum CheckAnswer {
    Encoded(Vec<u8>),
    /// Boxed: a denial is the uncommon answer, and the message is ten times the vector.
    Message(Box<CheckResponse>),
}

impl CheckAnswer {
    /// The answer as a message, for tests to read.
    #[cfg(test)]
    fn into_response(self) -> CheckResponse {
        use prost::Message;
        match self {
            CheckAnswer::Message(m) => *m,
            CheckAnswer::Encoded(bytes) => {
                CheckResponse::decode(bytes.as_slice()).expect("a valid CheckResponse")
            }
        }
    }
}

/// The headers removed from an allowed request: every client-sent `x-kemon-*` header the
/// service does not set itself (when `forged` holds the request), then the credential headers.
fn headers_to_remove<'a>(forged: Option<&'a CheckInput>, api_key_header: &'a str) -> Vec<&'a str> {
    let mut remove: Vec<&str> = Vec::with_capacity(2);
    for (name, _) in forged.into_iter().flat_map(CheckInput::raw_headers) {
        // Every `x-kemon-*` name was checked as UTF-8 by `presented`, which `decide` calls
        // before it allows anything: a request with one that is not is never allowed.
        if name.starts_with(FORWARDED_PREFIX.as_bytes())
            && let Ok(name) = std::str::from_utf8(name)
            && is_forged(name)
            && !remove.contains(&name)
        {
            remove.push(name);
        }
    }
    remove.push("authorization");
    remove.push(api_key_header);
    remove
}

/// An allowed request as a message: what the upstream learns of the key, and the headers it
/// must not see. The reference [`wire::allowed`] is held to: both must encode the same message.
#[cfg(test)]
fn allowed(key: &CachedKey, forged: Option<&CheckInput>, api_key_header: &str) -> CheckResponse {
    let headers_to_remove: Vec<String> = headers_to_remove(forged, api_key_header)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd;
    let upstream = vec![
        header("x-kemon-key-id", key_id(key), overwrite),
        header(
            "x-kemon-workspace-id",
            key.workspace_id.as_ref().to_owned(),
            overwrite,
        ),
        header(
            "x-kemon-key-type",
            key.key_type.as_str().to_owned(),
            overwrite,
        ),
        header("x-kemon-scopes", scope_names(key.granted()), overwrite),
        header(
            "x-kemon-environment",
            key.environment.as_str().to_owned(),
            overwrite,
        ),
    ];
    CheckResponse {
        status: check_status(Code::Ok, "allowed"),
        http_response: Some(HttpResponse::OkResponse(
            envoy_types::ext_authz::v3::pb::OkHttpResponse {
                headers: upstream,
                headers_to_remove,
                ..Default::default()
            },
        )),
        dynamic_metadata: Some(verify_metadata(VerifyCode::Valid)),
    }
}

/// `key_…`, written once into a string of its final size.
fn key_id(key: &CachedKey) -> String {
    let mut id = String::with_capacity(32);
    let _ = write!(id, "{}", key.key_id);
    id
}

/// The granted scopes' names separated by spaces, in catalog order.
fn scope_names(scopes: ScopeSet) -> String {
    let length = scopes.iter().map(|s| s.name.len() + 1).sum::<usize>();
    let mut names = String::with_capacity(length);
    for scope in scopes.iter() {
        if !names.is_empty() {
            names.push(' ');
        }
        names.push_str(scope.name);
    }
    names
}

/// A denied request: 401 when no usable key was presented, 403 when the key may not do this.
fn denied(key: Option<&CachedKey>, code: VerifyCode) -> CheckResponse {
    let (status, message, http, reason) = match code {
        VerifyCode::Unspecified => (
            Code::Unauthenticated,
            "no API key",
            HttpStatusCode::Unauthorized,
            "an API key is required: Authorization: Bearer <key>",
        ),
        VerifyCode::Malformed | VerifyCode::NotFound => (
            Code::Unauthenticated,
            "invalid API key",
            HttpStatusCode::Unauthorized,
            "the API key is not valid",
        ),
        VerifyCode::Expired => (
            Code::Unauthenticated,
            "expired API key",
            HttpStatusCode::Unauthorized,
            "the API key has expired",
        ),
        VerifyCode::Revoked => (
            Code::Unauthenticated,
            "revoked API key",
            HttpStatusCode::Unauthorized,
            "the API key was revoked",
        ),
        VerifyCode::InsufficientScope => (
            Code::PermissionDenied,
            "insufficient scope",
            HttpStatusCode::Forbidden,
            "the API key lacks a scope this route requires",
        ),
        VerifyCode::OriginNotAllowed => (
            Code::PermissionDenied,
            "origin not allowed",
            HttpStatusCode::Forbidden,
            "the API key may not be used from this origin",
        ),
        VerifyCode::EnvironmentNotAllowed | VerifyCode::Valid => (
            Code::PermissionDenied,
            "environment not allowed",
            HttpStatusCode::Forbidden,
            "test keys work only from localhost",
        ),
    };
    denial(key, code, status, message, http, reason)
}

/// A request whose credential, origin or `x-kemon-*` header name is not UTF-8 (`header`
/// names it): it cannot be checked, so it is denied with 400 and the verify code MALFORMED.
/// An answer rather than a gRPC error, so that it fails closed whatever Envoy's
/// `failure_mode_allow`: a client must not be able to turn a check into an error at will.
fn unreadable(header: &str) -> CheckResponse {
    denial(
        None,
        VerifyCode::Malformed,
        Code::InvalidArgument,
        "unreadable request",
        HttpStatusCode::BadRequest,
        &format!("the request's {header:?} header is not UTF-8"),
    )
}

/// A denial's answer: its gRPC status, HTTP status and headers, JSON body and verify code.
fn denial(
    key: Option<&CachedKey>,
    code: VerifyCode,
    status: Code,
    message: &str,
    http: HttpStatusCode,
    reason: &str,
) -> CheckResponse {
    let code_name = verify_code_name(code);
    super::calls::record_verify_code(code as i32, code_name);
    let body = serde_json::json!({
        "error": reason,
        "code": code_name,
        "key_id": key.map(|k| k.key_id.to_string()),
    });
    // Envoy's default for a header it is given without an action: append, or add.
    let add = HeaderAppendAction::AppendIfExistsOrAdd;
    let mut headers = Vec::with_capacity(2);
    headers.push(header("content-type", "application/json".to_owned(), add));
    if http == HttpStatusCode::Unauthorized {
        headers.push(header(
            "www-authenticate",
            "Bearer realm=\"kemon\", error=\"invalid_token\"".to_owned(),
            add,
        ));
    }
    CheckResponse {
        status: check_status(status, message),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http.into() }),
            headers,
            body: body.to_string(),
        })),
        dynamic_metadata: Some(verify_metadata(code)),
    }
}

/// The verify code's name for logs and Envoy: `VERIFY_CODE_MISSING` when no key was
/// presented at all.
fn verify_code_name(code: VerifyCode) -> &'static str {
    if code == VerifyCode::Unspecified {
        "VERIFY_CODE_MISSING"
    } else {
        code.as_str_name()
    }
}

/// `{"verify_code": "VERIFY_CODE_…"}` for Envoy's access log.
fn verify_metadata(code: VerifyCode) -> Struct {
    Struct {
        fields: [(
            "verify_code".to_owned(),
            Value {
                kind: Some(Kind::StringValue(verify_code_name(code).to_owned())),
            },
        )]
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Request as HttpAttributes,
    };

    use super::*;
    use crate::clock::SystemClock;

    /// A Check service over an empty cache, taking keys from `api_key_header` as well.
    fn api(api_key_header: &str) -> ExtAuthzApi {
        ExtAuthzApi::new(
            Arc::new(VerifyCache::new(Arc::new(SystemClock))),
            Arc::new(AtomicBool::new(true)),
            api_key_header,
        )
    }

    /// A CheckRequest as Envoy would encode it, read as Check reads it.
    fn request(headers: &[(&str, &str)], scopes: Option<&str>) -> CheckInput {
        use prost::Message;
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(HttpAttributes {
                    http: Some(HttpRequest {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: scopes
                    .map(|s| HashMap::from([(SCOPES_EXTENSION.to_owned(), s.to_owned())]))
                    .unwrap_or_default(),
                ..Default::default()
            }),
        };
        CheckInput::parse(request.encode_to_vec().into()).expect("a valid CheckRequest")
    }

    /// The verify code an answer carries for Envoy's access log.
    fn verify_code(response: &CheckResponse) -> &str {
        match response
            .dynamic_metadata
            .as_ref()
            .and_then(|m| m.fields.get("verify_code"))
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::StringValue(code)) => code,
            other => panic!("no verify_code: {other:?}"),
        }
    }

    fn decided(api: &ExtAuthzApi, headers: &[(&str, &str)]) -> String {
        let response = api
            .decide(&request(headers, None))
            .expect("an answer")
            .into_response();
        verify_code(&response).to_owned()
    }

    #[test]
    fn the_key_comes_from_a_bearer_token_else_the_configured_header() {
        // Not a key: MALFORMED shows the string was read as the key; MISSING that none was.
        let api = api("X-Client-Key");
        assert_eq!(
            decided(&api, &[("x-client-key", "not-a-key")]),
            "VERIFY_CODE_MALFORMED"
        );
        assert_eq!(
            decided(&api, &[("x-api-key", "not-a-key")]),
            "VERIFY_CODE_MISSING",
            "only the configured header is read"
        );
        assert_eq!(
            decided(&api, &[("authorization", "bEaReR  not-a-key ")]),
            "VERIFY_CODE_MALFORMED"
        );
        for authorization in ["Basic abc", "Bearer", "Bearer   "] {
            assert_eq!(
                decided(&api, &[("authorization", authorization)]),
                "VERIFY_CODE_MISSING",
                "{authorization}"
            );
            assert_eq!(
                decided(
                    &api,
                    &[("authorization", authorization), ("x-client-key", "k")]
                ),
                "VERIFY_CODE_MALFORMED",
                "{authorization}: falls back to the API key header"
            );
        }
        assert_eq!(
            decided(&api, &[("x-client-key", "  ")]),
            "VERIFY_CODE_MISSING"
        );
        let empty = api
            .decide(&CheckInput::default())
            .expect("an answer")
            .into_response();
        assert_eq!(verify_code(&empty), "VERIFY_CODE_MISSING");
    }

    /// A CheckRequest carrying `headers` as raw bytes, as prost could not encode them.
    fn raw_request(headers: &[(&[u8], &[u8])]) -> CheckInput {
        let nest = |field: u8, inner: &[u8]| {
            let length = u8::try_from(inner.len()).expect("short");
            [&[field, length][..], inner].concat()
        };
        let entries: Vec<u8> = headers
            .iter()
            .flat_map(|(name, value)| nest(0x1a, &[nest(0x0a, name), nest(0x12, value)].concat()))
            .collect();
        let message = nest(0x0a, &nest(0x22, &nest(0x12, &entries)));
        CheckInput::parse(message.into()).expect("a valid CheckRequest")
    }

    #[test]
    fn only_the_headers_check_reads_must_be_utf8() {
        let api = api("x-api-key");
        let answered = |headers: &[(&[u8], &[u8])]| {
            api.decide(&raw_request(headers))
                .expect("an answer, never a gRPC error")
                .into_response()
        };
        // Headers Check does not read may hold any bytes; nor does a trace context decide.
        let read = answered(&[
            (b"cookie", b"caf\xe9"),
            (b"x-\xff", b"1"),
            (b"traceparent", b"\xff"),
            (b"x-api-key", b"not-a-key"),
        ]);
        assert_eq!(verify_code(&read), "VERIFY_CODE_MALFORMED");
        assert_eq!(http_status(&read), 401, "the key was read, and is not one");
        // A request whose credential, origin or x-kemon-* name is not text is denied with
        // 400, an answer: Envoy denies it whatever its failure mode.
        for (name, value) in [
            (&b"x-api-key"[..], &b"sk_\xff"[..]),
            (b"authorization", b"Bearer \xff"),
            (b"origin", b"https://\xff.test"),
            (b"x-kemon-\xff", b"forged"),
        ] {
            let denied = answered(&[(name, value), (b"x-api-key", b"not-a-key")]);
            assert_eq!(verify_code(&denied), "VERIFY_CODE_MALFORMED");
            assert_eq!(http_status(&denied), 400);
            assert_eq!(
                denied.status.as_ref().map(|s| s.code),
                Some(Code::InvalidArgument as i32)
            );
        }
    }

    /// The HTTP status a denial answers with.
    fn http_status(response: &CheckResponse) -> i32 {
        match &response.http_response {
            Some(HttpResponse::DeniedResponse(denied)) => {
                denied.status.as_ref().map_or(0, |s| s.code)
            }
            other => panic!("not a denial: {other:?}"),
        }
    }

    #[test]
    fn forged_headers_are_removed_beside_headers_that_are_not_text() {
        let input = raw_request(&[
            (b"x-kemon-role", b"admin"),
            (b"cookie", b"caf\xe9"),
            (b"x-api-key", b"k"),
        ]);
        let api = api("x-api-key");
        assert!(api.presented(&input).expect("readable").forged);
        use prost::Message;
        let answer = CheckResponse::decode(
            wire::allowed(&cached(&["tickets:read"], false), Some(&input), "x-api-key").as_slice(),
        )
        .expect("decodes");
        let Some(HttpResponse::OkResponse(ok)) = &answer.http_response else {
            panic!("not an OK answer: {answer:?}");
        };
        assert_eq!(
            ok.headers_to_remove,
            ["x-kemon-role", "authorization", "x-api-key"]
        );
    }

    #[test]
    fn a_check_before_the_cache_is_loaded_is_an_error() {
        let api = api("x-api-key");
        api.ready.store(false, Ordering::Release);
        let status = api
            .decide(&request(&[("x-api-key", "k")], None))
            .expect_err("not ready");
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[test]
    fn route_scopes_are_separated_by_commas_or_spaces_and_unknown_ones_named() {
        let both = ScopeSet::parse(&["tickets:read", "tickets:write"]).unwrap();
        for names in [
            "tickets:read,tickets:write",
            " tickets:read tickets:write ",
            "tickets:write, tickets:read,,",
        ] {
            assert_eq!(required_scopes(names).unwrap(), both, "{names}");
        }
        assert_eq!(required_scopes("").unwrap(), ScopeSet::EMPTY);
        assert_eq!(required_scopes(" ").unwrap(), ScopeSet::EMPTY);
        let status = required_scopes("tickets:reed,tickets:read labels:wrote").unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .ends_with(r#"unknown scopes ["tickets:reed", "labels:wrote"]"#),
            "{}",
            status.message()
        );
    }

    /// A cached key of `scopes` (all of them when `full_access`).
    fn cached(scopes: &[&str], full_access: bool) -> CachedKey {
        CachedKey {
            key_id: crate::domain::KeyId::generate(1_767_225_600_000),
            workspace_id: Arc::from("ws_17"),
            key_type: crate::domain::KeyType::Private,
            environment: crate::domain::Environment::Test,
            scopes: ScopeSet::parse(scopes).unwrap(),
            full_access,
            expires_at_ms: None,
            revoked: false,
            allowed_domains: Box::new([]),
            version: 1,
            rolled: false,
            usage: Default::default(),
        }
    }

    #[test]
    fn the_written_allowed_answer_is_the_message_prost_would_write() {
        use prost::Message;
        let keys = [
            cached(&["tickets:read"], false),
            cached(&[], false),
            cached(&[], true),
        ];
        let requests = [
            request(&[("x-api-key", "k")], None),
            request(
                &[
                    ("authorization", "Bearer k"),
                    ("x-kemon-role", "admin"),
                    ("x-kemon-key-id", "key_forged"),
                    ("x-kemon-x", "1"),
                ],
                None,
            ),
        ];
        for key in &keys {
            for input in &requests {
                for header in ["x-api-key", "x-client-key"] {
                    let written = wire::allowed(key, Some(input), header);
                    let message = allowed(key, Some(input), header);
                    assert_eq!(
                        CheckResponse::decode(written.as_slice()).expect("decodes"),
                        message
                    );
                    // Byte for byte, up to the order of the fields prost chooses.
                    assert_eq!(written.len(), message.encoded_len());
                }
            }
        }
        // The forged headers are removed, the ones the service sets are overwritten instead.
        let answer = CheckResponse::decode(
            wire::allowed(&keys[0], Some(&requests[1]), "x-api-key").as_slice(),
        )
        .unwrap();
        let Some(HttpResponse::OkResponse(ok)) = &answer.http_response else {
            panic!("not an OK answer: {answer:?}");
        };
        let (forged, credentials) = ok.headers_to_remove.split_at(2);
        let mut forged = forged.to_vec();
        forged.sort();
        assert_eq!(forged, ["x-kemon-role", "x-kemon-x"]);
        assert_eq!(credentials, ["authorization", "x-api-key"]);
        assert_eq!(verify_code(&answer), "VERIFY_CODE_VALID");
    }

    #[test]
    fn granted_scopes_are_named_in_catalog_order() {
        let some = ScopeSet::parse(&["teams:read", "tickets:read"]).unwrap();
        assert_eq!(scope_names(some), "tickets:read teams:read");
        assert_eq!(scope_names(ScopeSet::EMPTY), "");
        let all: Vec<&str> = crate::domain::scope::CATALOG
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(scope_names(ScopeSet::ALL), all.join(" "));
    }

    #[test]
    fn only_foreign_x_kemon_headers_are_forged() {
        assert!(is_forged("x-kemon-role"));
        assert!(is_forged("x-kemon-"));
        for name in FORWARDED
            .iter()
            .chain(&["x-api-key", "x-kemonkey", "authorization"])
        {
            assert!(!is_forged(name), "{name}");
        }
    }
}
