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
//!   `envoy.filters.http.ext_authz`) for Envoy's access log;
//! - a route whose `kemon_scopes` names an unknown scope, or a server still loading its
//!   cache: a gRPC error, which Envoy turns into its configured failure mode (deny, with
//!   `failure_mode_allow: false`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use envoy_types::ext_authz::v3::pb::{
    self as authz, Authorization, CheckRequest, CheckResponse, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tonic::{Request, Response, Status};

use super::record_key_id;
use crate::cache::{CachedKey, Verdict, VerifyCache};
use crate::domain::ScopeSet;
use crate::proto::v1::VerifyCode;

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

impl ExtAuthzApi {
    pub fn new(cache: Arc<VerifyCache>, ready: Arc<AtomicBool>, api_key_header: &str) -> Self {
        ExtAuthzApi {
            cache,
            ready,
            api_key_header: api_key_header.to_ascii_lowercase(),
        }
    }

    /// The key a request carries, and the header it came in.
    fn credential<'h>(
        &self,
        headers: &'h HashMap<String, String>,
    ) -> Option<(&'static str, &'h str)> {
        if let Some(value) = headers.get("authorization") {
            let value = value.trim();
            if let Some((scheme, token)) = value.split_once(' ')
                && scheme.eq_ignore_ascii_case("bearer")
            {
                return Some(("authorization", token.trim()));
            }
        }
        headers
            .get(&self.api_key_header)
            .map(|v| ("api-key", v.trim()))
    }

    fn decide(&self, request: &CheckRequest) -> Result<CheckResponse, Status> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "starting: the key cache is still loading",
            ));
        }
        let empty = HashMap::new();
        let headers = request.get_client_headers().unwrap_or(&empty);
        let extensions = request
            .attributes
            .as_ref()
            .map(|a| &a.context_extensions)
            .unwrap_or(&empty);
        let required = required_scopes(extensions)?;
        let origin = headers.get("origin").map_or("", String::as_str);
        let credential = self.credential(headers);
        let verdict = match credential {
            Some((_, key)) if !key.is_empty() => self.cache.verify(key, required, origin),
            _ => return Ok(denied(None, VerifyCode::Unspecified)),
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
        }
        match key {
            Some(k) if code == VerifyCode::Valid => Ok(allowed(&k, headers, &self.api_key_header)),
            other => Ok(denied(other.as_deref(), code)),
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.decide(request.get_ref()).map(Response::new)
    }
}

/// The scopes a route requires, from its `kemon_scopes` setting. An unknown name is the
/// route's configuration error: refused as a gRPC error, so that Envoy fails closed.
fn required_scopes(extensions: &HashMap<String, String>) -> Result<ScopeSet, Status> {
    let Some(names) = extensions.get(SCOPES_EXTENSION) else {
        return Ok(ScopeSet::EMPTY);
    };
    let names: Vec<&str> = names.split([',', ' ']).filter(|n| !n.is_empty()).collect();
    ScopeSet::parse(&names).map_err(|unknown| {
        tracing::error!(
            ?unknown,
            "a route's {SCOPES_EXTENSION} names unknown scopes"
        );
        Status::invalid_argument(format!(
            "context_extensions.{SCOPES_EXTENSION} names unknown scopes {unknown:?}"
        ))
    })
}

/// An allowed request: what the upstream learns of the key, and the headers it must not see.
fn allowed(
    key: &CachedKey,
    headers: &HashMap<String, String>,
    api_key_header: &str,
) -> CheckResponse {
    let overwrite = Some(authz::HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut ok = OkHttpResponseBuilder::new();
    let forged = headers
        .keys()
        .filter(|h| h.starts_with(FORWARDED_PREFIX) && !FORWARDED.contains(&h.as_str()));
    for name in forged {
        ok.remove_header(name.clone());
    }
    ok.remove_header("authorization")
        .remove_header(api_key_header)
        .add_header("x-kemon-key-id", key.key_id.to_string(), overwrite, false)
        .add_header(
            "x-kemon-workspace-id",
            key.workspace_id.to_string(),
            overwrite,
            false,
        )
        .add_header("x-kemon-key-type", key.key_type.as_str(), overwrite, false)
        .add_header(
            "x-kemon-scopes",
            key.granted().names().join(" "),
            overwrite,
            false,
        )
        .add_header(
            "x-kemon-environment",
            key.environment.as_str(),
            overwrite,
            false,
        );
    let mut response = CheckResponse::with_status(Status::ok("allowed"));
    response
        .set_http_response(ok)
        .set_dynamic_metadata(Some(verify_metadata(VerifyCode::Valid)));
    response
}

/// A denied request: 401 when no usable key was presented, 403 when the key may not do this.
fn denied(key: Option<&CachedKey>, code: VerifyCode) -> CheckResponse {
    let (status, http, reason) = match code {
        VerifyCode::Unspecified => (
            Status::unauthenticated("no API key"),
            HttpStatusCode::Unauthorized,
            "an API key is required: Authorization: Bearer <key>",
        ),
        VerifyCode::Malformed | VerifyCode::NotFound => (
            Status::unauthenticated("invalid API key"),
            HttpStatusCode::Unauthorized,
            "the API key is not valid",
        ),
        VerifyCode::Expired => (
            Status::unauthenticated("expired API key"),
            HttpStatusCode::Unauthorized,
            "the API key has expired",
        ),
        VerifyCode::Revoked => (
            Status::unauthenticated("revoked API key"),
            HttpStatusCode::Unauthorized,
            "the API key was revoked",
        ),
        VerifyCode::InsufficientScope => (
            Status::permission_denied("insufficient scope"),
            HttpStatusCode::Forbidden,
            "the API key lacks a scope this route requires",
        ),
        VerifyCode::OriginNotAllowed => (
            Status::permission_denied("origin not allowed"),
            HttpStatusCode::Forbidden,
            "the API key may not be used from this origin",
        ),
        VerifyCode::EnvironmentNotAllowed | VerifyCode::Valid => (
            Status::permission_denied("environment not allowed"),
            HttpStatusCode::Forbidden,
            "test keys work only from localhost",
        ),
    };
    let code_name = if code == VerifyCode::Unspecified {
        "VERIFY_CODE_MISSING"
    } else {
        code.as_str_name()
    };
    tracing::Span::current().record("verify_code", code_name);
    let body = serde_json::json!({
        "error": reason,
        "code": code_name,
        "key_id": key.map(|k| k.key_id.to_string()),
    });
    let mut deny = DeniedHttpResponseBuilder::new();
    deny.set_http_status(http)
        .add_header("content-type", "application/json", None, false)
        .set_body(body.to_string());
    if http == HttpStatusCode::Unauthorized {
        deny.add_header(
            "www-authenticate",
            "Bearer realm=\"kemon\", error=\"invalid_token\"",
            None,
            false,
        );
    }
    let mut response = CheckResponse::with_status(status);
    response
        .set_http_response(deny)
        .set_dynamic_metadata(Some(verify_metadata(code)));
    response
}

/// `{"verify_code": "VERIFY_CODE_…"}` for Envoy's access log.
fn verify_metadata(code: VerifyCode) -> Struct {
    let name = if code == VerifyCode::Unspecified {
        "VERIFY_CODE_MISSING"
    } else {
        code.as_str_name()
    };
    Struct {
        fields: [(
            "verify_code".to_owned(),
            Value {
                kind: Some(Kind::StringValue(name.to_owned())),
            },
        )]
        .into(),
    }
}
