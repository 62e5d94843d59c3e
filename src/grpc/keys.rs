//! `kemon.keys.v1.KeyService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Actor, Permission};
use super::error::{ApiError, KeyRefusal, quote};
use super::paging::{PageSize, PageToken, QueryFingerprint};
use super::{record_key_id, record_workspace_id, timestamp, within_cap};
use crate::cache::{CachedKey, Verdict, VerifyCache};
use crate::clock::Clock;
use crate::domain::key::{KeyShape, NewKeyRequest};
use crate::domain::scope::{Access, CATALOG};
use crate::domain::{
    ApiKey, Command, DomainPattern, Expiration, KeyId, KeyName, KeyState, KeyType, ScopeSet,
    Violation, WorkspaceId,
};
use crate::proto::convert::{
    environment_from_pb, environment_to_pb, key_type_from_pb, key_type_to_pb,
};
use crate::proto::v1 as pb;
use crate::proto::v1::key_service_server::KeyService;
use crate::store::{CreateRequest, ListFilter, SealedSecret, Store, Write};
use crate::vault::MasterKey;

/// Most entries accepted in a `scopes` or `required_scopes` list.
pub const MAX_SCOPES_LISTED: usize = 16;

pub struct KeyApi {
    store: Store,
    cache: Arc<VerifyCache>,
    clock: Arc<dyn Clock>,
    master_key: MasterKey,
}

impl KeyApi {
    pub fn new(
        store: Store,
        cache: Arc<VerifyCache>,
        clock: Arc<dyn Clock>,
        master_key: MasterKey,
    ) -> KeyApi {
        KeyApi {
            store,
            cache,
            clock,
            master_key,
        }
    }

    fn to_pb(&self, s: &KeyState) -> pb::Key {
        key_to_pb(s, self.clock.now_ms())
    }

    /// Writes one command; a refusal names the key it was about.
    async fn write(&self, write: Write) -> Result<KeyState, ApiError> {
        let key_id = write.key_id;
        self.store
            .write(write)
            .await
            .map_err(|e| ApiError::from(e).about(key_id))
    }

    /// Applies a change to an existing key and returns its new state. `command` is `None`
    /// when parsing its fields failed, with the reasons in `violations`.
    async fn change<T>(
        &self,
        request: &Request<T>,
        workspace_id: &str,
        key_id: &str,
        mut violations: Vec<Violation>,
        command: Option<Command>,
    ) -> Result<pb::Key, ApiError> {
        let actor = Actor::authorize(request, Permission::ManageKeys, workspace_id)?;
        let ids = key_ref(workspace_id, key_id, &mut violations);
        let (Some((workspace_id, key_id)), Some(command), true) =
            (ids, command, violations.is_empty())
        else {
            return Err(ApiError::Invalid(violations));
        };
        let state = self
            .write(Write {
                workspace_id,
                key_id,
                command,
                actor: actor.id,
                caller_identity: actor.caller_identity,
                sealed_secret: None,
                create_request: None,
            })
            .await?;
        Ok(self.to_pb(&state))
    }
}

/// A key as the API shows it, with `expired` judged at `now_ms`.
pub fn key_to_pb(s: &KeyState, now: i64) -> pb::Key {
    pb::Key {
        key_id: s.key_id.to_string(),
        workspace_id: s.workspace_id.to_string(),
        name: s.name.as_str().to_owned(),
        r#type: key_type_to_pb(s.key_type) as i32,
        environment: environment_to_pb(s.environment) as i32,
        masked: s.masked.clone(),
        scopes: s.scopes.names(),
        full_access: s.full_access,
        created_at: Some(timestamp(s.created_at_ms)),
        expires_at: s.expires_at_ms.map(timestamp),
        revoked_at: s.revoked_at_ms.map(timestamp),
        revealable: s.revealable(),
        version: s.version,
        created_by: s.created_by.clone(),
        allowed_domains: s
            .allowed_domains
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect(),
        expired: !s.is_revoked() && s.is_expired(now),
        updated_at: Some(timestamp(s.updated_at_ms)),
    }
}

/// Parses the workspace and key id of a request, recording them on the call's span.
fn key_ref(
    workspace_id: &str,
    key_id: &str,
    violations: &mut Vec<Violation>,
) -> Option<(WorkspaceId, KeyId)> {
    let workspace = WorkspaceId::parse(workspace_id)
        .map_err(|r| violations.push(Violation::new("workspace_id", r)))
        .ok();
    let key = KeyId::parse(key_id)
        .map_err(|r| violations.push(Violation::new("key_id", r)))
        .ok();
    if let Some(key) = key {
        record_key_id(key);
    }
    if let Some(workspace) = &workspace {
        record_workspace_id(workspace);
    }
    Some((workspace?, key?))
}

/// The scopes named in `field`; `None` when the list is over its cap or names an unknown
/// scope, with the reasons in `violations`.
fn parse_scopes(
    field: &str,
    names: &[String],
    violations: &mut Vec<Violation>,
) -> Option<ScopeSet> {
    if !within_cap(field, names, MAX_SCOPES_LISTED, violations) {
        return None;
    }
    ScopeSet::parse(names)
        .map_err(|unknown| {
            for name in unknown {
                violations.push(Violation::new(
                    field,
                    format!(
                        "unknown scope {}; ListScopes gives the catalog",
                        quote(&name)
                    ),
                ));
            }
        })
        .ok()
}

/// The allowed domains of a CreateKey request, duplicates dropped; `None` when the list is
/// over its cap or has a malformed entry, with the reasons in `violations`.
fn parse_allowed_domains(
    domains: &[String],
    violations: &mut Vec<Violation>,
) -> Option<Vec<DomainPattern>> {
    const FIELD: &str = "allowed_domains";
    if !within_cap(FIELD, domains, DomainPattern::MAX_PER_KEY, violations) {
        return None;
    }
    let mut parsed: Vec<DomainPattern> = Vec::new();
    let mut all_parsed = true;
    for domain in domains {
        match DomainPattern::parse(domain) {
            Ok(d) if !parsed.contains(&d) => parsed.push(d),
            Ok(_) => {}
            Err(r) => {
                all_parsed = false;
                violations.push(Violation::new(FIELD, format!("{} {r}", quote(domain))));
            }
        }
    }
    all_parsed.then_some(parsed)
}

fn parse_name(name: &str, violations: &mut Vec<Violation>) -> Option<KeyName> {
    KeyName::parse(name)
        .map_err(|r| violations.push(Violation::new("name", r)))
        .ok()
}

fn parse_expiration(v: i32) -> Option<Expiration> {
    Some(match pb::Expiration::try_from(v).ok()? {
        pb::Expiration::Unspecified | pb::Expiration::Expiration90Days => Expiration::Days90,
        pb::Expiration::Expiration30Days => Expiration::Days30,
        pb::Expiration::Expiration60Days => Expiration::Days60,
        pb::Expiration::Expiration180Days => Expiration::Days180,
        pb::Expiration::Expiration365Days => Expiration::Days365,
        pb::Expiration::Never => Expiration::Never,
    })
}

fn verify_response(verdict: Verdict) -> pb::VerifyKeyResponse {
    use pb::VerifyCode as C;
    let (code, key, missing) = match verdict {
        Verdict::Valid(k) => (C::Valid, Some(k), ScopeSet::EMPTY),
        Verdict::Malformed => (C::Malformed, None, ScopeSet::EMPTY),
        Verdict::NotFound => (C::NotFound, None, ScopeSet::EMPTY),
        Verdict::Expired(k) => (C::Expired, Some(k), ScopeSet::EMPTY),
        Verdict::Revoked(k) => (C::Revoked, Some(k), ScopeSet::EMPTY),
        Verdict::EnvironmentNotAllowed(k) => (C::EnvironmentNotAllowed, Some(k), ScopeSet::EMPTY),
        Verdict::OriginNotAllowed(k) => (C::OriginNotAllowed, Some(k), ScopeSet::EMPTY),
        Verdict::InsufficientScope { key, missing } => (C::InsufficientScope, Some(key), missing),
    };
    let mut response = pb::VerifyKeyResponse {
        valid: code == C::Valid,
        code: code as i32,
        missing_scopes: missing.names(),
        ..Default::default()
    };
    // The call's log line, span and metrics say what Verify decided, not only that the RPC
    // succeeded.
    super::calls::record_verify_code(code as i32, code.as_str_name());
    if let Some(k) = key {
        record_key_id(k.key_id);
        record_workspace_id(&k.workspace_id);
        fill_key(&mut response, &k);
    }
    response
}

fn fill_key(response: &mut pb::VerifyKeyResponse, k: &CachedKey) {
    response.key_id = k.key_id.to_string();
    response.workspace_id = k.workspace_id.to_string();
    response.r#type = key_type_to_pb(k.key_type) as i32;
    response.environment = environment_to_pb(k.environment) as i32;
    response.scopes = k.scopes.names();
    response.full_access = k.full_access;
    response.expires_at = k.expires_at_ms.map(timestamp);
}

/// The calls, each in the service's own error type; the [`KeyService`] impl below only wraps
/// their answers in responses and their errors in statuses.
impl KeyApi {
    async fn create(
        &self,
        request: &Request<pb::CreateKeyRequest>,
    ) -> Result<pb::CreateKeyResponse, ApiError> {
        let actor = Actor::authorize(
            request,
            Permission::ManageKeys,
            &request.get_ref().workspace_id,
        )?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        let workspace_id = WorkspaceId::parse(&req.workspace_id)
            .map_err(|r| violations.push(Violation::new("workspace_id", r)))
            .ok();
        if let Some(workspace) = &workspace_id {
            record_workspace_id(workspace);
        }
        let name = parse_name(&req.name, &mut violations);
        let key_type = key_type_from_pb(req.r#type);
        if key_type.is_none() {
            violations.push(Violation::new(
                "type",
                "must be KEY_TYPE_PRIVATE or KEY_TYPE_PUBLIC",
            ));
        }
        let environment = environment_from_pb(req.environment);
        if environment.is_none() {
            violations.push(Violation::new(
                "environment",
                "must be ENVIRONMENT_PRODUCTION or ENVIRONMENT_TEST",
            ));
        }
        let expiration = parse_expiration(req.expiration);
        if expiration.is_none() {
            violations.push(Violation::new(
                "expiration",
                "must be 30, 60, 90, 180 or 365 days, or never",
            ));
        }
        let scopes = parse_scopes("scopes", &req.scopes, &mut violations);
        let request_id = parse_request_id(&req.request_id, &mut violations);
        let allowed_domains = parse_allowed_domains(&req.allowed_domains, &mut violations);
        // The rules that tie fields together, on the fields that parsed, so that one
        // answer lists every problem of the request.
        if let Some(key_type) = key_type {
            violations.extend(
                KeyShape {
                    key_type,
                    environment,
                    scopes,
                    reveal_later: req.reveal_later,
                    allowed_domains: allowed_domains.as_deref(),
                }
                .violations(),
            );
        }
        let (
            Some(workspace_id),
            Some(name),
            Some(key_type),
            Some(environment),
            Some(expiration),
            Some(scopes),
            Some(allowed_domains),
            true,
        ) = (
            workspace_id,
            name,
            key_type,
            environment,
            expiration,
            scopes,
            allowed_domains,
            violations.is_empty(),
        )
        else {
            return Err(ApiError::Invalid(violations));
        };

        let now = self.clock.now_ms();
        let random_failed =
            |e: getrandom::Error| ApiError::Internal(format!("random source failed: {e}"));
        let key_id = KeyId::try_generate(now).map_err(random_failed)?;
        record_key_id(key_id);
        let secret = ApiKey::try_generate(key_type, environment).map_err(random_failed)?;
        let new_key = NewKeyRequest {
            key_id,
            workspace_id: workspace_id.clone(),
            name,
            key_type,
            environment,
            expiration,
            scopes,
            reveal_later: req.reveal_later,
            allowed_domains,
            secret_hash: secret.hash(),
            masked: secret.masked(),
            public_key: (key_type == KeyType::Public).then(|| secret.expose().to_owned()),
        }
        .validate(now)?;
        let sealed_secret = if key_type == KeyType::Private && req.reveal_later {
            Some(SealedSecret {
                sealed: self
                    .master_key
                    .seal(key_id, secret.expose())
                    .map_err(random_failed)?,
                master_key_id: self.master_key.fingerprint(),
            })
        } else {
            None
        };
        let create_request = match request_id {
            None => None,
            Some(request_id) => Some(CreateRequest {
                request_id,
                digest: create_digest(req),
                sealed_secret: self
                    .master_key
                    .seal(key_id, secret.expose())
                    .map_err(random_failed)?,
            }),
        };
        let written = self
            .store
            .create(Write {
                workspace_id,
                key_id,
                command: Command::Create(Box::new(new_key)),
                actor: actor.id,
                caller_identity: actor.caller_identity,
                sealed_secret,
                create_request,
            })
            .await
            .map_err(|e| ApiError::from(e).about(key_id))?;
        let secret = match &written.replayed {
            None => secret.expose().to_owned(),
            Some(replayed) => replayed
                .sealed_secret
                .as_ref()
                .and_then(|sealed| self.master_key.open(written.state.key_id, sealed))
                .unwrap_or_default(),
        };
        if written.replayed.is_some() {
            record_key_id(written.state.key_id);
        }
        Ok(pb::CreateKeyResponse {
            key: Some(self.to_pb(&written.state)),
            secret,
            replayed: written.replayed.is_some(),
        })
    }

    async fn get(&self, request: &Request<pb::GetKeyRequest>) -> Result<pb::Key, ApiError> {
        Actor::authorize(
            request,
            Permission::ReadKeys,
            &request.get_ref().workspace_id,
        )?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        let Some((workspace_id, key_id)) = key_ref(&req.workspace_id, &req.key_id, &mut violations)
        else {
            return Err(ApiError::Invalid(violations));
        };
        let state = self
            .store
            .get_key(&workspace_id, key_id)
            .await?
            .ok_or(ApiError::key(KeyRefusal::NotFound, key_id))?;
        Ok(self.to_pb(&state))
    }

    async fn list(
        &self,
        request: &Request<pb::ListKeysRequest>,
    ) -> Result<pb::ListKeysResponse, ApiError> {
        Actor::authorize(
            request,
            Permission::ReadKeys,
            &request.get_ref().workspace_id,
        )?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        let workspace_id = WorkspaceId::parse(&req.workspace_id)
            .map_err(|r| violations.push(Violation::new("workspace_id", r)))
            .ok();
        if let Some(workspace) = &workspace_id {
            record_workspace_id(workspace);
        }
        let page_size = PageSize::from_request(req.page_size).get();
        // Decoded before the query is known, so a malformed token is reported with the
        // other field errors; whether it belongs to this query is checked below.
        let token = if req.page_token.is_empty() {
            None
        } else {
            PageToken::parse(&req.page_token)
                .map_err(|e| violations.push(Violation::new("page_token", e.to_string())))
                .ok()
        };
        let key_type = match req.r#type {
            0 => None,
            v => {
                let t = key_type_from_pb(v);
                if t.is_none() {
                    violations.push(Violation::new("type", "unknown key type"));
                }
                t
            }
        };
        let environment = match req.environment {
            0 => None,
            v => {
                let e = environment_from_pb(v);
                if e.is_none() {
                    violations.push(Violation::new("environment", "unknown environment"));
                }
                e
            }
        };
        let (Some(workspace_id), true) = (workspace_id, violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let filter = ListFilter {
            key_type,
            environment,
            include_revoked: req.include_revoked,
        };
        let query = QueryFingerprint::of(&workspace_id, &filter);
        let after = token
            .map(|t| t.resume_after(query))
            .transpose()
            .map_err(|e| ApiError::invalid("page_token", e.to_string()))?;
        // One more than a page, to know without a second query whether another follows.
        let mut states = self
            .store
            .list_keys(&workspace_id, &filter, after, page_size + 1)
            .await?;
        let next_page_token = if states.len() > page_size as usize {
            states.truncate(page_size as usize);
            states
                .last()
                .map(|s| PageToken::new(s.key_id, query).encode())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListKeysResponse {
            keys: states.iter().map(|s| self.to_pb(s)).collect(),
            next_page_token,
        })
    }

    async fn rename(&self, request: &Request<pb::RenameKeyRequest>) -> Result<pb::Key, ApiError> {
        let req = request.get_ref();
        let mut violations = Vec::new();
        let name = parse_name(&req.name, &mut violations);
        let command = name.map(|name| Command::Rename {
            name,
            expected_version: req.expected_version,
        });
        self.change(request, &req.workspace_id, &req.key_id, violations, command)
            .await
    }

    async fn rescope(
        &self,
        request: &Request<pb::UpdateKeyScopesRequest>,
    ) -> Result<pb::Key, ApiError> {
        let req = request.get_ref();
        let mut violations = Vec::new();
        let scopes = parse_scopes("scopes", &req.scopes, &mut violations);
        if req.scopes.is_empty() {
            violations.push(Violation::new("scopes", "at least one scope is required"));
        }
        let command = scopes.map(|scopes| Command::UpdateScopes {
            scopes,
            expected_version: req.expected_version,
        });
        self.change(request, &req.workspace_id, &req.key_id, violations, command)
            .await
    }

    async fn revoke(&self, request: &Request<pb::RevokeKeyRequest>) -> Result<pb::Key, ApiError> {
        let req = request.get_ref();
        let command = Command::Revoke {
            expected_version: req.expected_version,
        };
        self.change(
            request,
            &req.workspace_id,
            &req.key_id,
            vec![],
            Some(command),
        )
        .await
    }

    async fn reveal(
        &self,
        request: &Request<pb::RevealKeyRequest>,
    ) -> Result<pb::RevealKeyResponse, ApiError> {
        let actor = Actor::authorize(
            request,
            Permission::ManageKeys,
            &request.get_ref().workspace_id,
        )?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        let Some((workspace_id, key_id)) = key_ref(&req.workspace_id, &req.key_id, &mut violations)
        else {
            return Err(ApiError::Invalid(violations));
        };
        // The reveal is recorded (durably) before the secret leaves the service; the
        // domain refuses revoked keys and private keys without a copy.
        let state = self
            .write(Write {
                workspace_id,
                key_id,
                command: Command::Reveal,
                actor: actor.id.clone(),
                caller_identity: actor.caller_identity.clone(),
                sealed_secret: None,
                create_request: None,
            })
            .await?;
        let secret = match state.public_key {
            Some(public) => public,
            None => {
                // Revoked since the reveal was recorded: the copy is gone.
                let sealed = self
                    .store
                    .sealed_secret(key_id)
                    .await?
                    .ok_or(ApiError::key(KeyRefusal::Revoked, key_id))?;
                self.master_key.open(key_id, &sealed).ok_or_else(|| {
                    ApiError::Internal(format!("the sealed copy of {key_id} does not open"))
                })?
            }
        };
        tracing::info!(actor = %actor.id, "secret revealed");
        Ok(pb::RevealKeyResponse { secret })
    }

    fn verify(
        &self,
        request: &Request<pb::VerifyKeyRequest>,
    ) -> Result<pb::VerifyKeyResponse, ApiError> {
        let req = request.get_ref();
        let mut violations = Vec::new();
        let Some(required) = parse_scopes("required_scopes", &req.required_scopes, &mut violations)
        else {
            return Err(ApiError::Invalid(violations));
        };
        Ok(verify_response(self.cache.verify(
            &req.key,
            required,
            &req.origin,
        )))
    }
}

/// The scope catalog, as ListScopes gives it.
fn scope_catalog() -> pb::ListScopesResponse {
    pb::ListScopesResponse {
        scopes: CATALOG
            .iter()
            .map(|s| pb::Scope {
                name: s.name.to_owned(),
                resource: s.resource.to_owned(),
                access: match s.access {
                    Access::Read => pb::scope::Access::Read,
                    Access::Write => pb::scope::Access::Write,
                } as i32,
                reserved: s.reserved,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        Ok(Response::new(self.create(&request).await?))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        Ok(Response::new(self.get(&request).await?))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        Ok(Response::new(self.list(&request).await?))
    }

    async fn rename_key(
        &self,
        request: Request<pb::RenameKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        Ok(Response::new(self.rename(&request).await?))
    }

    async fn update_key_scopes(
        &self,
        request: Request<pb::UpdateKeyScopesRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        Ok(Response::new(self.rescope(&request).await?))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let key = self.revoke(&request).await?;
        let mut response = Response::new(key);
        if request.get_ref().wait_for_replicas {
            // The revocation is committed and answered whatever the confirmation says; a
            // failure to read the replicas' positions is logged, and the answer then says
            // that none confirmed.
            let (confirmed, live) = match self.store.confirm_replicas().await {
                Ok(Some(counts)) => counts,
                Ok(None) => (1, 1),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the replicas' positions");
                    (0, 0)
                }
            };
            let metadata = response.metadata_mut();
            metadata.insert(REPLICAS_CONFIRMED_HEADER, confirmed.into());
            metadata.insert(REPLICAS_LIVE_HEADER, live.into());
        }
        Ok(response)
    }

    async fn reveal_key(
        &self,
        request: Request<pb::RevealKeyRequest>,
    ) -> Result<Response<pb::RevealKeyResponse>, Status> {
        Ok(Response::new(self.reveal(&request).await?))
    }

    async fn verify_key(
        &self,
        request: Request<pb::VerifyKeyRequest>,
    ) -> Result<Response<pb::VerifyKeyResponse>, Status> {
        Ok(Response::new(self.verify(&request)?))
    }

    async fn list_scopes(
        &self,
        _request: Request<pb::ListScopesRequest>,
    ) -> Result<Response<pb::ListScopesResponse>, Status> {
        Ok(Response::new(scope_catalog()))
    }
}

/// RevokeKey with `wait_for_replicas`: how many live replicas had applied the revocation
/// when it answered, and how many were live.
pub const REPLICAS_CONFIRMED_HEADER: &str = "x-kemon-replicas-confirmed";
pub const REPLICAS_LIVE_HEADER: &str = "x-kemon-replicas-live";

/// Longest CreateKey request id.
const MAX_REQUEST_ID_CHARS: usize = 64;

/// A CreateKey request id: `None` when absent. Request ids are the caller's, not secrets,
/// but are not echoed anyway: an error names the rule.
fn parse_request_id(request_id: &str, violations: &mut Vec<Violation>) -> Option<String> {
    if request_id.is_empty() {
        return None;
    }
    let valid = request_id.len() <= MAX_REQUEST_ID_CHARS
        && request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if !valid {
        violations.push(Violation::new(
            "request_id",
            format!("must be 1 to {MAX_REQUEST_ID_CHARS} of [A-Za-z0-9._:-], e.g. a UUID"),
        ));
        return None;
    }
    Some(request_id.to_owned())
}

/// What makes two CreateKey calls "the same request": every field but the request id, in
/// their protobuf encoding.
fn create_digest(request: &pb::CreateKeyRequest) -> [u8; 32] {
    use prost::Message;
    use sha3::Digest;
    let without_id = pb::CreateKeyRequest {
        request_id: String::new(),
        ..request.clone()
    };
    sha3::Sha3_256::digest(without_id.encode_to_vec()).into()
}
