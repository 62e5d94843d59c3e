//! `kemon.keys.v1.KeyService`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::{Actor, Permission};
use super::error::{ApiError, KeyRefusal, quote};
use super::paging::{PageSize, PageToken, QueryFingerprint};
use super::{record_key_id, record_workspace_id, timestamp, within_cap};
use crate::cache::{CachedKey, LastUsed, USAGE_MINUTE_MS, Verdict, VerifyCache};
use crate::clock::Clock;
use crate::domain::key::{KeyShape, NewKeyRequest};
use crate::domain::scope::{Access, CATALOG};
use crate::domain::{
    ApiKey, Command, DomainPattern, Expiration, GracePeriod, KeyId, KeyName, KeyState, KeyType,
    OriginClass, Roll, ScopeSet, Violation, WorkspaceId,
};
use crate::proto::convert::{
    duration_ms, environment_from_pb, environment_to_pb, key_type_from_pb, key_type_to_pb,
    timestamp_ms,
};
use crate::proto::v1 as pb;
use crate::proto::v1::key_service_server::KeyService;
use crate::store::{CreateRequest, ListFilter, SealedSecret, Store, Write, Written};
use crate::vault::MasterKey;

fn random_failed(e: getrandom::Error) -> ApiError {
    ApiError::Internal(format!("random source failed: {e}"))
}

/// Most entries accepted in a `scopes` or `required_scopes` list.
pub const MAX_SCOPES_LISTED: usize = 16;

pub struct KeyApi {
    store: Store,
    cache: Arc<VerifyCache>,
    clock: Arc<dyn Clock>,
    master_key: MasterKey,
    /// Turns true when the server begins to shut down: WatchExpiring streams then end.
    stopping: watch::Receiver<bool>,
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
            stopping: watch::channel(false).1,
        }
    }

    /// Ends WatchExpiring streams (UNAVAILABLE, SHUTTING_DOWN) once `stopping` turns true, so
    /// that they do not hold a graceful shutdown open.
    pub fn stopping_on(mut self, stopping: watch::Receiver<bool>) -> KeyApi {
        self.stopping = stopping;
        self
    }

    fn to_pb(&self, s: &KeyState) -> pb::Key {
        key_to_pb(s, self.clock.now_ms())
    }

    /// [`KeyApi::to_pb`] with the key's last use from `usage`.
    fn to_pb_used(&self, s: &KeyState, usage: &HashMap<KeyId, LastUsed>) -> pb::Key {
        let mut key = self.to_pb(s);
        if let Some(used) = usage.get(&s.key_id) {
            key.last_used_at = Some(timestamp(used.at_ms));
            key.last_used_origin = origin_class_to_pb(used.origin) as i32;
        }
        key
    }

    /// The last use of each of `states`: the later of what the database holds and what this
    /// process has seen and not written yet.
    async fn usage_of(&self, states: &[KeyState]) -> Result<HashMap<KeyId, LastUsed>, ApiError> {
        let ids: Vec<KeyId> = states.iter().map(|s| s.key_id).collect();
        let mut usage: HashMap<KeyId, LastUsed> = self
            .store
            .key_usage(&ids)
            .await?
            .into_iter()
            .map(|u| {
                (
                    u.key_id,
                    LastUsed {
                        at_ms: u.last_used_at_ms,
                        origin: u.origin,
                    },
                )
            })
            .collect();
        for s in states {
            if let Some(seen) = self.cache.last_used(&s.secret_hash)
                && usage
                    .get(&s.key_id)
                    .is_none_or(|stored| stored.at_ms < seen.at_ms)
            {
                usage.insert(s.key_id, seen);
            }
        }
        Ok(usage)
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
        // As it now stands: its last use too, as GetKey shows it.
        let usage = self.usage_of(std::slice::from_ref(&state)).await?;
        Ok(self.to_pb_used(&state, &usage))
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
        rolled_to_key_id: s.rolled_to.map(|k| k.to_string()).unwrap_or_default(),
        rolled_from_key_id: s.rolled_from.map(|k| k.to_string()).unwrap_or_default(),
        last_used_at: None,
        last_used_origin: pb::OriginClass::Unspecified as i32,
    }
}

pub fn origin_class_to_pb(class: OriginClass) -> pb::OriginClass {
    match class {
        OriginClass::None => pb::OriginClass::None,
        OriginClass::Localhost => pb::OriginClass::Localhost,
        OriginClass::Browser => pb::OriginClass::Browser,
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
        let sealed_secret = (key_type == KeyType::Private && req.reveal_later)
            .then(|| self.seal(key_id, &secret))
            .transpose()?;
        let (written, secret) = self
            .write_new_key(
                Write {
                    workspace_id,
                    key_id,
                    command: Command::Create(Box::new(new_key)),
                    actor: actor.id,
                    caller_identity: actor.caller_identity,
                    sealed_secret,
                    create_request: None,
                },
                request_id.map(|id| (id, create_digest(req))),
                (key_id, &secret),
            )
            .await?;
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
        let usage = self.usage_of(std::slice::from_ref(&state)).await?;
        Ok(self.to_pb_used(&state, &usage))
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
        // Uses are kept to the minute: a use in the minute of `unused_since` counts as one
        // since then, so that a key in use is never listed as unused.
        let unused_since_ms = match &req.unused_since {
            None => Some(None),
            Some(t) => parse_instant("unused_since", t, &mut violations)
                .map(|ms| Some(ms.div_euclid(USAGE_MINUTE_MS) * USAGE_MINUTE_MS)),
        };
        let expires_before_ms = match &req.expires_before {
            None => Some(None),
            Some(t) => parse_instant("expires_before", t, &mut violations).map(Some),
        };
        let (Some(workspace_id), Some(unused_since_ms), Some(expires_before_ms), true) = (
            workspace_id,
            unused_since_ms,
            expires_before_ms,
            violations.is_empty(),
        ) else {
            return Err(ApiError::Invalid(violations));
        };
        let filter = ListFilter {
            key_type,
            environment,
            include_revoked: req.include_revoked,
            unused_since_ms,
            never_used: req.never_used,
            expires_before_ms,
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
        let usage = self.usage_of(&states).await?;
        // The database holds uses up to about a minute old; drop the keys this process has
        // seen used since (the page may then be short: the token still resumes after the
        // last key read).
        if filter.never_used || filter.unused_since_ms.is_some() {
            let since = filter.unused_since_ms.unwrap_or(i64::MIN);
            states.retain(|s| usage.get(&s.key_id).is_none_or(|u| u.at_ms < since));
            if filter.never_used {
                states.retain(|s| !usage.contains_key(&s.key_id));
            }
        }
        Ok(pb::ListKeysResponse {
            keys: states.iter().map(|s| self.to_pb_used(s, &usage)).collect(),
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

    /// `secret` sealed with the master key for `key_id`, as revealable copies are kept.
    fn seal(&self, key_id: KeyId, secret: &ApiKey) -> Result<SealedSecret, ApiError> {
        Ok(SealedSecret {
            sealed: self
                .master_key
                .seal(key_id, secret.expose())
                .map_err(random_failed)?,
            master_key_id: self.master_key.fingerprint(),
        })
    }

    /// Writes a new key (CreateKey's, or RollKey's successor) `new_key_id` whose key string
    /// is `secret`, and gives back the key string to answer with. With a request id (and the
    /// digest of the request without it), the secret is kept sealed with the request, so that
    /// a retry is answered with the same key string: a retry's answer carries the first
    /// call's.
    async fn write_new_key(
        &self,
        mut write: Write,
        request: Option<(String, [u8; 32])>,
        (new_key_id, secret): (KeyId, &ApiKey),
    ) -> Result<(Written, String), ApiError> {
        let key_id = write.key_id;
        write.create_request = match request {
            None => None,
            Some((request_id, digest)) => Some(CreateRequest {
                request_id,
                digest,
                sealed_secret: self.seal(new_key_id, secret)?.sealed,
            }),
        };
        let written = self
            .store
            .create(write)
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
        Ok((written, secret))
    }

    async fn roll(
        &self,
        request: &Request<pb::RollKeyRequest>,
    ) -> Result<pb::RollKeyResponse, ApiError> {
        let actor = Actor::authorize(
            request,
            Permission::ManageKeys,
            &request.get_ref().workspace_id,
        )?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        let ids = key_ref(&req.workspace_id, &req.key_id, &mut violations);
        let grace = parse_duration(
            "grace_period",
            req.grace_period.as_ref(),
            (0, GracePeriod::MAX_MS),
            "0s (the old key stops at once) to 7 days (604800s)",
            &mut violations,
        )
        .and_then(|ms| GracePeriod::from_ms(ms).ok());
        let request_id = parse_request_id(&req.request_id, &mut violations);
        let (Some((workspace_id, key_id)), Some(grace), true) = (ids, grace, violations.is_empty())
        else {
            return Err(ApiError::Invalid(violations));
        };
        // The successor's key string carries the old key's type and environment in its
        // prefix: read them first. Neither ever changes, so the read cannot go stale; every
        // rule that can (revoked, expired, rolled, the version) is decided by the writer.
        let old = self
            .store
            .get_key(&workspace_id, key_id)
            .await?
            .ok_or(ApiError::key(KeyRefusal::NotFound, key_id))?;
        let now = self.clock.now_ms();
        let successor_key_id = KeyId::try_generate(now).map_err(random_failed)?;
        let secret = ApiKey::try_generate(old.key_type, old.environment).map_err(random_failed)?;
        // Sealed whatever the old key says: the writer keeps the copy only if the old key,
        // as it stands when the roll is decided, was created with reveal_later.
        let sealed_secret = (old.key_type == KeyType::Private)
            .then(|| self.seal(successor_key_id, &secret))
            .transpose()?;
        let roll = Roll {
            successor_key_id,
            secret_hash: secret.hash(),
            masked: secret.masked(),
            public_key: (old.key_type == KeyType::Public).then(|| secret.expose().to_owned()),
            grace,
            now_ms: now,
            expected_version: req.expected_version,
        };
        let (written, secret) = self
            .write_new_key(
                Write {
                    workspace_id,
                    key_id,
                    command: Command::Roll(Box::new(roll)),
                    actor: actor.id,
                    caller_identity: actor.caller_identity,
                    sealed_secret,
                    create_request: None,
                },
                request_id.map(|id| (id, roll_digest(req))),
                (successor_key_id, &secret),
            )
            .await?;
        tracing::info!(successor = %written.state.key_id, grace_ms = grace.as_ms(), "key rolled");
        let states: Vec<KeyState> = [Some(&written.state), written.previous.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let usage = self.usage_of(&states).await?;
        Ok(pb::RollKeyResponse {
            key: Some(self.to_pb_used(&written.state, &usage)),
            secret,
            previous: written
                .previous
                .as_ref()
                .map(|s| self.to_pb_used(s, &usage)),
            replayed: written.replayed.is_some(),
        })
    }

    async fn watch_expiring(
        &self,
        request: &Request<pb::WatchExpiringRequest>,
    ) -> Result<KeyStream<pb::WatchExpiringResponse>, ApiError> {
        Actor::authorize(
            request,
            Permission::ReadKeys,
            &request.get_ref().workspace_id,
        )?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        let workspace_id = if req.workspace_id.is_empty() {
            Some(None)
        } else {
            WorkspaceId::parse(&req.workspace_id)
                .map_err(|r| violations.push(Violation::new("workspace_id", r)))
                .ok()
                .map(Some)
        };
        let within_ms = parse_duration(
            "within",
            req.within.as_ref(),
            (1_000, MAX_WATCH_WINDOW_MS),
            "1s to 365 days (31536000s)",
            &mut violations,
        );
        let (Some(workspace_id), Some(within_ms), true) =
            (workspace_id, within_ms, violations.is_empty())
        else {
            return Err(ApiError::Invalid(violations));
        };
        let (tx, rx) = mpsc::channel(64);
        let watch = ExpiryWatch {
            store: self.store.clone(),
            clock: self.clock.clone(),
            workspace_id,
            within_ms,
            told_up_to: 0,
            tx,
        };
        // Subscribed before the first scan, so that no key created meanwhile is missed.
        let commits = self.store.subscribe();
        tokio::spawn(watch.run(commits, self.stopping.clone()));
        Ok(Box::pin(ReceiverStream::new(rx)))
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

/// A request's Timestamp as Unix milliseconds; `None` (with a violation) for one outside the
/// range a Timestamp may hold (years 1 to 9999) or with nanos out of range.
fn parse_instant(
    field: &str,
    t: &prost_types::Timestamp,
    violations: &mut Vec<Violation>,
) -> Option<i64> {
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        violations.push(Violation::new(
            field,
            "is not a valid Timestamp (years 1 to 9999, nanos 0 to 999,999,999)",
        ));
        return None;
    }
    Some(timestamp_ms(t))
}

/// A request's Duration as whole milliseconds within `min_ms..=max_ms`; `None` (with a
/// violation saying `rule`) otherwise, or when it is missing.
fn parse_duration(
    field: &str,
    d: Option<&prost_types::Duration>,
    (min_ms, max_ms): (i64, i64),
    rule: &str,
    violations: &mut Vec<Violation>,
) -> Option<i64> {
    let Some(d) = d else {
        violations.push(Violation::new(field, format!("is required: {rule}")));
        return None;
    };
    match duration_ms(d) {
        Some(ms) if (min_ms..=max_ms).contains(&ms) => Some(ms),
        Some(_) => {
            violations.push(Violation::new(field, format!("must be {rule}")));
            None
        }
        None => {
            violations.push(Violation::new(
                field,
                format!("must be a valid Duration in whole milliseconds: {rule}"),
            ));
            None
        }
    }
}

/// What makes two RollKey calls "the same request": every field but the request id. Domain
/// separated from [`create_digest`], whose request ids share the namespace.
fn roll_digest(request: &pb::RollKeyRequest) -> [u8; 32] {
    use prost::Message;
    use sha3::Digest;
    let without_id = pb::RollKeyRequest {
        request_id: String::new(),
        ..request.clone()
    };
    let mut h = sha3::Sha3_256::new();
    h.update(b"kemon-keys/roll-key/v1\0");
    h.update(without_id.encode_to_vec());
    h.finalize().into()
}

/// Longest WatchExpiring window.
const MAX_WATCH_WINDOW_MS: i64 = 365 * 86_400_000;

/// How often a WatchExpiring stream looks whether time has moved keys into its window.
const WATCH_TICK: Duration = Duration::from_millis(250);

/// Keys per query of a WatchExpiring scan.
const WATCH_PAGE: u32 = 500;

type KeyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One WatchExpiring stream: what it watches and how far it has told.
struct ExpiryWatch {
    store: Store,
    clock: Arc<dyn Clock>,
    workspace_id: Option<WorkspaceId>,
    within_ms: i64,
    /// Every live key expiring at or before this instant has been sent.
    told_up_to: i64,
    tx: mpsc::Sender<Result<pb::WatchExpiringResponse, Status>>,
}

impl ExpiryWatch {
    /// Sends every live key expiring in `(after, up_to]` and after now. False once the client
    /// has gone.
    async fn send_range(&self, after: i64, up_to: i64) -> Result<bool, ApiError> {
        let now = self.clock.now_ms();
        let mut cursor = (after.max(now), None);
        loop {
            let page = self
                .store
                .expiring(self.workspace_id.as_ref(), cursor, up_to, WATCH_PAGE)
                .await?;
            for state in &page {
                if !self.send(state, now).await {
                    return Ok(false);
                }
            }
            match page.last() {
                Some(last) if page.len() == WATCH_PAGE as usize => {
                    cursor = (last.expires_at_ms.unwrap_or(up_to), Some(last.key_id));
                }
                _ => return Ok(true),
            }
        }
    }

    async fn send(&self, state: &KeyState, now: i64) -> bool {
        let message = pb::WatchExpiringResponse {
            event: Some(pb::watch_expiring_response::Event::Expiring(key_to_pb(
                state, now,
            ))),
        };
        self.tx.send(Ok(message)).await.is_ok()
    }

    /// A committed record: a new key (a successor among them) may expire inside the window
    /// already told.
    async fn committed(&self, record: &crate::log::chain::LogRecord) -> Result<bool, ApiError> {
        if record.event_type != "KeyCreated"
            || self
                .workspace_id
                .as_ref()
                .is_some_and(|w| w.as_str() != record.workspace_id)
        {
            return Ok(true);
        }
        let (Ok(workspace_id), Ok(key_id)) = (
            WorkspaceId::parse(&record.workspace_id),
            KeyId::parse(&record.key_id),
        ) else {
            return Ok(true);
        };
        let Some(state) = self.store.get_key(&workspace_id, key_id).await? else {
            return Ok(true);
        };
        let now = self.clock.now_ms();
        let inside = state
            .expires_at_ms
            .is_some_and(|at| at > now && at <= self.told_up_to);
        if inside && !state.is_revoked() && state.rolled_to.is_none() {
            return Ok(self.send(&state, now).await);
        }
        Ok(true)
    }

    /// Sends the window, then `caught_up`, then keys as they enter it, until the client goes
    /// or the server stops.
    async fn run(
        mut self,
        mut commits: broadcast::Receiver<Arc<crate::log::chain::LogRecord>>,
        mut stopping: watch::Receiver<bool>,
    ) {
        let result: Result<(), ApiError> = async {
            let now = self.clock.now_ms();
            self.told_up_to = now.saturating_add(self.within_ms);
            if !self.send_range(now, self.told_up_to).await? {
                return Ok(());
            }
            let caught_up = pb::WatchExpiringResponse {
                event: Some(pb::watch_expiring_response::Event::CaughtUp(
                    pb::watch_expiring_response::CaughtUp {},
                )),
            };
            if self.tx.send(Ok(caught_up)).await.is_err() {
                return Ok(());
            }
            let mut tick = tokio::time::interval(WATCH_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let open = tokio::select! {
                    _ = tick.tick() => {
                        let up_to = self.clock.now_ms().saturating_add(self.within_ms);
                        if up_to > self.told_up_to {
                            let after = self.told_up_to;
                            self.told_up_to = up_to;
                            self.send_range(after, up_to).await?
                        } else {
                            true
                        }
                    }
                    record = commits.recv() => match record {
                        Ok(record) => self.committed(&record).await?,
                        // Fell behind the commits: send the whole window again (at least once).
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let now = self.clock.now_ms();
                            self.send_range(now, self.told_up_to).await?
                        }
                        Err(broadcast::error::RecvError::Closed) => false,
                    },
                    changed = stopping.changed() => {
                        let stop = changed.is_err() || *stopping.borrow_and_update();
                        if stop {
                            let _ = self.tx.send(Err(Status::from(ApiError::Stopping))).await;
                        }
                        !stop
                    }
                    () = self.tx.closed() => false,
                };
                if !open {
                    return Ok(());
                }
            }
        }
        .await;
        if let Err(e) = result {
            let _ = self.tx.send(Err(Status::from(e))).await;
        }
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

    async fn roll_key(
        &self,
        request: Request<pb::RollKeyRequest>,
    ) -> Result<Response<pb::RollKeyResponse>, Status> {
        Ok(Response::new(self.roll(&request).await?))
    }

    type WatchExpiringStream = KeyStream<pb::WatchExpiringResponse>;

    async fn watch_expiring(
        &self,
        request: Request<pb::WatchExpiringRequest>,
    ) -> Result<Response<Self::WatchExpiringStream>, Status> {
        Ok(Response::new(self.watch_expiring(&request).await?))
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
