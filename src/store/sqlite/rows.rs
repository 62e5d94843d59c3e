//! Key states to and from the SQLite `keys` projection's rows. Reading re-validates every
//! value: a row that would not pass the API's own checks is reported as corrupt, not trusted.

use crate::domain::{
    DomainPattern, Environment, KeyId, KeyName, KeyState, KeyType, ScopeSet, SecretHash,
    WorkspaceId,
};

/// A `keys` row as read from SQLite, before validation.
#[derive(sqlx::FromRow)]
pub struct KeyRow {
    pub key_id: String,
    pub workspace_id: String,
    pub name: String,
    pub key_type: String,
    pub environment: String,
    pub scopes: String,
    pub full_access: bool,
    pub secret_hash: Vec<u8>,
    pub masked: String,
    pub public_key: Option<String>,
    pub allowed_domains: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub reveal_later: bool,
    pub version: i64,
    pub stream_version: i64,
    pub created_by: String,
    pub updated_at: i64,
    pub last_revealed_at: Option<i64>,
}

impl KeyRow {
    pub fn into_state(self) -> Result<KeyState, String> {
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        Ok(KeyState {
            key_id: KeyId::parse(&self.key_id)?,
            workspace_id: WorkspaceId::parse(&self.workspace_id)?,
            name: KeyName::parse(&self.name)?,
            key_type: KeyType::parse(&self.key_type)
                .ok_or_else(|| format!("unknown key_type {:?}", self.key_type))?,
            environment: Environment::parse(&self.environment)
                .ok_or_else(|| format!("unknown environment {:?}", self.environment))?,
            scopes: ScopeSet::parse(&words(&self.scopes))
                .map_err(|unknown| format!("unknown scopes {unknown:?}"))?,
            full_access: self.full_access,
            secret_hash: SecretHash::from_slice(&self.secret_hash)
                .ok_or("secret_hash is not 32 bytes")?,
            masked: self.masked,
            public_key: self.public_key,
            allowed_domains: words(&self.allowed_domains)
                .iter()
                .map(|d| DomainPattern::parse(d))
                .collect::<Result<_, _>>()?,
            created_at_ms: self.created_at,
            expires_at_ms: self.expires_at,
            revoked_at_ms: self.revoked_at,
            reveal_later: self.reveal_later,
            version: u64::try_from(self.version).map_err(|_| "negative version")?,
            stream_version: u64::try_from(self.stream_version)
                .map_err(|_| "negative stream_version")?,
            last_revealed_at_ms: self.last_revealed_at,
            created_by: self.created_by,
            updated_at_ms: self.updated_at,
        })
    }
}

/// The column list of `keys`, in [`KeyRow`]'s order.
pub const KEY_COLUMNS: &str = "key_id, workspace_id, name, key_type, environment, scopes, \
    full_access, secret_hash, masked, public_key, allowed_domains, created_at, expires_at, \
    revoked_at, reveal_later, version, stream_version, created_by, updated_at, last_revealed_at";

/// Values of a `keys` row for a state, bound in [`KEY_COLUMNS`] order.
pub fn bind_state<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    s: &KeyState,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let domains: Vec<&str> = s
        .allowed_domains
        .iter()
        .map(DomainPattern::as_str)
        .collect();
    query
        .bind(s.key_id.to_string())
        .bind(s.workspace_id.to_string())
        .bind(s.name.as_str().to_owned())
        .bind(s.key_type.as_str())
        .bind(s.environment.as_str())
        .bind(s.scopes.names().join(" "))
        .bind(s.full_access)
        .bind(s.secret_hash.0.to_vec())
        .bind(s.masked.clone())
        .bind(s.public_key.clone())
        .bind(domains.join(" "))
        .bind(s.created_at_ms)
        .bind(s.expires_at_ms)
        .bind(s.revoked_at_ms)
        .bind(s.reveal_later)
        .bind(i64::try_from(s.version).unwrap_or(i64::MAX))
        .bind(i64::try_from(s.stream_version).unwrap_or(i64::MAX))
        .bind(s.created_by.clone())
        .bind(s.updated_at_ms)
        .bind(s.last_revealed_at_ms)
}
