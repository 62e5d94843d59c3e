//! Key states to and from the SQLite `keys` projection's rows: one row encoding, bound by
//! sqlx on the live path and by rusqlite in bulk ([`super::bulk`]). Reading re-validates every
//! value: a row that would not pass the API's own checks is reported as corrupt, not trusted.

use std::borrow::Cow;

use crate::domain::{
    DomainPattern, Environment, KeyId, KeyName, KeyState, KeyType, Scope, ScopeSet, SecretHash,
    VerifyState, WorkspaceId,
};

/// A `keys` row as read by sqlx, before validation: the columns verification reads, and the
/// others.
#[derive(sqlx::FromRow)]
pub struct KeyRow {
    #[sqlx(flatten)]
    pub verify: VerifyRow,
    pub name: String,
    pub masked: String,
    pub public_key: Option<String>,
    pub created_at: i64,
    pub reveal_later: bool,
    pub stream_version: i64,
    pub created_by: String,
    pub updated_at: i64,
    pub last_revealed_at: Option<i64>,
    pub rolled_from_key_id: Option<String>,
}

impl KeyRow {
    pub fn into_state(self) -> Result<KeyState, String> {
        KeyRowRef {
            verify: self.verify.as_ref(),
            name: &self.name,
            masked: &self.masked,
            public_key: self.public_key.as_deref(),
            created_at: self.created_at,
            reveal_later: self.reveal_later,
            stream_version: self.stream_version,
            created_by: &self.created_by,
            updated_at: self.updated_at,
            last_revealed_at: self.last_revealed_at,
            rolled_from_key_id: self.rolled_from_key_id.as_deref(),
        }
        .to_state()
    }
}

/// A `keys` row borrowed from the driver's buffers, before validation: the columns
/// verification reads, and the others.
pub struct KeyRowRef<'a> {
    pub verify: VerifyRowRef<'a>,
    pub name: &'a str,
    pub masked: &'a str,
    pub public_key: Option<&'a str>,
    pub created_at: i64,
    pub reveal_later: bool,
    pub stream_version: i64,
    pub created_by: &'a str,
    pub updated_at: i64,
    pub last_revealed_at: Option<i64>,
    pub rolled_from_key_id: Option<&'a str>,
}

impl KeyRowRef<'_> {
    /// The state the row holds, every value validated: the columns verification reads as
    /// [`VerifyRowRef`] checks them, the others here.
    pub fn to_state(&self) -> Result<KeyState, String> {
        let verify = self.verify.to_verify_state()?;
        Ok(KeyState {
            key_id: verify.key_id,
            workspace_id: WorkspaceId::parse(verify.workspace_id)?,
            name: KeyName::parse(self.name)?,
            key_type: verify.key_type,
            environment: verify.environment,
            scopes: verify.scopes,
            full_access: verify.full_access,
            secret_hash: verify.secret_hash,
            masked: self.masked.to_owned(),
            public_key: self.public_key.map(str::to_owned),
            allowed_domains: verify.allowed_domains.into_vec(),
            created_at_ms: self.created_at,
            expires_at_ms: verify.expires_at_ms,
            revoked_at_ms: self.verify.revoked_at,
            reveal_later: self.reveal_later,
            version: verify.version,
            stream_version: u64::try_from(self.stream_version)
                .map_err(|_| "negative stream_version")?,
            last_revealed_at_ms: self.last_revealed_at,
            created_by: self.created_by.to_owned(),
            updated_at_ms: self.updated_at,
            rolled_from: self.rolled_from_key_id.map(KeyId::parse).transpose()?,
            rolled_to: verify.rolled_to,
        })
    }
}

/// The column list of `keys`, in the order of [`values`] and [`row_ref`].
pub const KEY_COLUMNS: &str = "key_id, workspace_id, name, key_type, environment, scopes, \
    full_access, secret_hash, masked, public_key, allowed_domains, created_at, expires_at, \
    revoked_at, reveal_later, version, stream_version, created_by, updated_at, last_revealed_at, \
    rolled_from_key_id, rolled_to_key_id";

/// The number of columns in [`KEY_COLUMNS`].
pub const KEY_COLUMN_COUNT: usize = 22;

/// One value of a row, as SQLite stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    Int(i64),
    Blob(&'a [u8]),
    Null,
}

impl<'a> Value<'a> {
    fn text(s: &'a str) -> Value<'a> {
        Value::Text(Cow::Borrowed(s))
    }

    fn int_or_null(v: Option<i64>) -> Value<'a> {
        v.map_or(Value::Null, Value::Int)
    }
}

/// The values of a state's `keys` row, in [`KEY_COLUMNS`] order: the one row encoding of the
/// projection, written by the live path and by the rebuild alike.
pub fn values(s: &KeyState) -> [Value<'_>; KEY_COLUMN_COUNT] {
    let domains: Vec<&str> = s
        .allowed_domains
        .iter()
        .map(DomainPattern::as_str)
        .collect();
    [
        Value::Text(Cow::Owned(s.key_id.to_string())),
        Value::text(s.workspace_id.as_str()),
        Value::text(s.name.as_str()),
        Value::text(s.key_type.as_str()),
        Value::text(s.environment.as_str()),
        Value::Text(Cow::Owned(s.scopes.names().join(" "))),
        Value::Int(i64::from(s.full_access)),
        Value::Blob(&s.secret_hash.0),
        Value::text(&s.masked),
        s.public_key.as_deref().map_or(Value::Null, Value::text),
        Value::Text(Cow::Owned(domains.join(" "))),
        Value::Int(s.created_at_ms),
        Value::int_or_null(s.expires_at_ms),
        Value::int_or_null(s.revoked_at_ms),
        Value::Int(i64::from(s.reveal_later)),
        Value::Int(i64::try_from(s.version).unwrap_or(i64::MAX)),
        Value::Int(i64::try_from(s.stream_version).unwrap_or(i64::MAX)),
        Value::text(&s.created_by),
        Value::Int(s.updated_at_ms),
        Value::int_or_null(s.last_revealed_at_ms),
        s.rolled_from
            .map_or(Value::Null, |k| Value::Text(Cow::Owned(k.to_string()))),
        s.rolled_to
            .map_or(Value::Null, |k| Value::Text(Cow::Owned(k.to_string()))),
    ]
}

/// Binds a state's row values to a sqlx query, in [`KEY_COLUMNS`] order.
pub fn bind_state<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    s: &'q KeyState,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    for value in values(s) {
        query = match value {
            Value::Text(Cow::Borrowed(text)) => query.bind(text),
            Value::Text(Cow::Owned(text)) => query.bind(text),
            Value::Int(v) => query.bind(v),
            Value::Blob(bytes) => query.bind(bytes),
            Value::Null => query.bind(None::<i64>),
        };
    }
    query
}

/// A row of `SELECT {KEY_COLUMNS}` read through rusqlite, borrowed.
pub fn row_ref<'a>(row: &'a rusqlite::Row<'_>) -> rusqlite::Result<KeyRowRef<'a>> {
    fn text<'a>(row: &'a rusqlite::Row<'_>, i: usize) -> rusqlite::Result<&'a str> {
        Ok(row.get_ref(i)?.as_str()?)
    }
    fn int(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<i64> {
        Ok(row.get_ref(i)?.as_i64()?)
    }
    fn int_or_null(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<i64>> {
        Ok(row.get_ref(i)?.as_i64_or_null()?)
    }
    Ok(KeyRowRef {
        verify: VerifyRowRef {
            key_id: text(row, 0)?,
            workspace_id: text(row, 1)?,
            key_type: text(row, 3)?,
            environment: text(row, 4)?,
            scopes: text(row, 5)?,
            full_access: int(row, 6)? != 0,
            secret_hash: row.get_ref(7)?.as_blob()?,
            allowed_domains: text(row, 10)?,
            expires_at: int_or_null(row, 12)?,
            revoked_at: int_or_null(row, 13)?,
            version: int(row, 15)?,
            rolled_to_key_id: row.get_ref(21)?.as_str_or_null()?,
        },
        name: text(row, 2)?,
        masked: text(row, 8)?,
        public_key: row.get_ref(9)?.as_str_or_null()?,
        created_at: int(row, 11)?,
        reveal_later: int(row, 14)? != 0,
        stream_version: int(row, 16)?,
        created_by: text(row, 17)?,
        updated_at: int(row, 18)?,
        last_revealed_at: int_or_null(row, 19)?,
        rolled_from_key_id: row.get_ref(20)?.as_str_or_null()?,
    })
}

/// Many states' row values (as [`values`] gives them), in one allocation: made on one thread
/// and bound on another, so that the thread running the inserts only binds and steps.
#[derive(Default)]
pub struct ValueBatch {
    bytes: Vec<u8>,
    values: Vec<Flat>,
}

/// A [`Value`] whose bytes are a span of [`ValueBatch::bytes`].
enum Flat {
    Text(u32, u32),
    Blob(u32, u32),
    Int(i64),
    Null,
}

impl ValueBatch {
    pub fn with_capacity(rows: usize) -> ValueBatch {
        ValueBatch {
            bytes: Vec::with_capacity(rows * 192),
            values: Vec::with_capacity(rows * KEY_COLUMN_COUNT),
        }
    }

    pub fn rows(&self) -> usize {
        self.values.len() / KEY_COLUMN_COUNT
    }

    fn span(&mut self, bytes: &[u8]) -> (u32, u32) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        // A batch holds at most a few MB.
        (
            u32::try_from(at).unwrap_or(u32::MAX),
            u32::try_from(bytes.len()).unwrap_or(0),
        )
    }

    pub fn push(&mut self, s: &KeyState) {
        for value in values(s) {
            let flat = match value {
                Value::Text(text) => {
                    let (at, len) = self.span(text.as_bytes());
                    Flat::Text(at, len)
                }
                Value::Blob(bytes) => {
                    let (at, len) = self.span(bytes);
                    Flat::Blob(at, len)
                }
                Value::Int(v) => Flat::Int(v),
                Value::Null => Flat::Null,
            };
            self.values.push(flat);
        }
    }

    /// Binds row `row`'s values to `statement`, from parameter 1.
    pub fn bind(
        &self,
        statement: &mut rusqlite::Statement<'_>,
        row: usize,
    ) -> rusqlite::Result<()> {
        let first = row * KEY_COLUMN_COUNT;
        let bytes = |at: u32, len: u32| &self.bytes[at as usize..(at + len) as usize];
        for (i, value) in self.values[first..first + KEY_COLUMN_COUNT]
            .iter()
            .enumerate()
        {
            match *value {
                Flat::Text(at, len) => {
                    // Pushed from a `str`: the span is whole characters.
                    let text = std::str::from_utf8(bytes(at, len))
                        .map_err(|e| rusqlite::Error::Utf8Error(i + 1, e))?;
                    statement.raw_bind_parameter(i + 1, text)?
                }
                Flat::Blob(at, len) => statement.raw_bind_parameter(i + 1, bytes(at, len))?,
                Flat::Int(v) => statement.raw_bind_parameter(i + 1, v)?,
                Flat::Null => statement.raw_bind_parameter(i + 1, rusqlite::types::Null)?,
            }
        }
        Ok(())
    }
}

/// The columns of `keys` that verification reads, for loading the cache at start-up; the
/// others are read by the calls that serve them.
pub const VERIFY_COLUMNS: &str = "key_id, workspace_id, key_type, environment, scopes, \
    full_access, secret_hash, allowed_domains, expires_at, revoked_at, version, rolled_to_key_id";

/// Many `keys` rows, selected as [`VERIFY_COLUMNS`], copied out of the driver's buffers into
/// one allocation, to hand to another thread for validation without an allocation per value.
#[derive(Default)]
pub struct RowBatch {
    bytes: Vec<u8>,
    rows: Vec<CopiedRow>,
}

/// Spans of [`RowBatch::bytes`]: key_id, workspace_id, key_type, environment, scopes,
/// secret_hash, allowed_domains, rolled_to_key_id.
struct CopiedRow {
    spans: [(u32, u32); 8],
    has_rolled_to: bool,
    full_access: bool,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    version: i64,
}

impl RowBatch {
    pub fn with_capacity(rows: usize) -> RowBatch {
        RowBatch {
            bytes: Vec::with_capacity(rows * 128),
            rows: Vec::with_capacity(rows),
        }
    }

    /// Empties the batch, keeping its memory for the next rows.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.rows.clear();
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn copy(&mut self, value: &[u8]) -> (u32, u32) {
        let start = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        self.bytes.extend_from_slice(value);
        (start, u32::try_from(value.len()).unwrap_or(u32::MAX))
    }

    /// Copies a row selected as [`VERIFY_COLUMNS`]. Text is copied as bytes: the reading
    /// thread is the one the others wait on, so checking that it is UTF-8 is left to
    /// [`RowBatch::iter`], on the threads that validate the rest of the row.
    pub fn push(&mut self, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
        use rusqlite::types::{FromSqlError, Type, ValueRef};
        let refused = |i: usize, found: Type| {
            rusqlite::Error::FromSqlConversionFailure(i, found, Box::new(FromSqlError::InvalidType))
        };
        let text_or_null = |i: usize| match row.get_ref(i)? {
            ValueRef::Text(bytes) => Ok(Some(bytes)),
            ValueRef::Null => Ok(None),
            other => Err(refused(i, other.data_type())),
        };
        let text = |i: usize| text_or_null(i)?.ok_or_else(|| refused(i, Type::Null));
        let int = |i: usize| row.get_ref(i)?.as_i64().map_err(rusqlite::Error::from);
        let int_or_null = |i: usize| {
            row.get_ref(i)?
                .as_i64_or_null()
                .map_err(rusqlite::Error::from)
        };
        let rolled_to = text_or_null(11)?;
        let spans = [
            self.copy(text(0)?),
            self.copy(text(1)?),
            self.copy(text(2)?),
            self.copy(text(3)?),
            self.copy(text(4)?),
            self.copy(row.get_ref(6)?.as_blob()?),
            self.copy(text(7)?),
            self.copy(rolled_to.unwrap_or_default()),
        ];
        self.rows.push(CopiedRow {
            spans,
            has_rolled_to: rolled_to.is_some(),
            full_access: int(5)? != 0,
            expires_at: int_or_null(8)?,
            revoked_at: int_or_null(9)?,
            version: int(10)?,
        });
        Ok(())
    }

    /// The rows, borrowed from the batch, every value validated as the API would (a text
    /// column that is not UTF-8 is refused here): what verification needs of each key.
    pub fn iter(&self) -> impl Iterator<Item = Result<VerifyState<'_>, String>> {
        self.rows.iter().map(|row| {
            let bytes = |i: usize| {
                let (start, len) = row.spans[i];
                &self.bytes[start as usize..start as usize + len as usize]
            };
            // A row that is not valid is named by its key id as stored.
            Self::verify_row(row, bytes)
                .and_then(|r| r.to_verify_state())
                .map_err(|e| format!("keys row {:?}: {e}", String::from_utf8_lossy(bytes(0))))
        })
    }

    /// One copied row's values, text checked as UTF-8; `bytes(i)` is the row's span `i`.
    fn verify_row<'b>(
        row: &CopiedRow,
        bytes: impl Fn(usize) -> &'b [u8],
    ) -> Result<VerifyRowRef<'b>, String> {
        let text = |i: usize| std::str::from_utf8(bytes(i)).map_err(|e| e.to_string());
        Ok(VerifyRowRef {
            key_id: text(0)?,
            workspace_id: text(1)?,
            key_type: text(2)?,
            environment: text(3)?,
            scopes: text(4)?,
            full_access: row.full_access,
            secret_hash: bytes(5),
            allowed_domains: text(6)?,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
            version: row.version,
            rolled_to_key_id: if row.has_rolled_to {
                Some(text(7)?)
            } else {
                None
            },
        })
    }
}

/// The [`VERIFY_COLUMNS`] of a `keys` row, borrowed, before validation: the start-up load's
/// one validation, for SQLite's [`RowBatch`] and PostgreSQL's [`VerifyRow`] alike.
pub struct VerifyRowRef<'a> {
    pub key_id: &'a str,
    pub workspace_id: &'a str,
    pub key_type: &'a str,
    pub environment: &'a str,
    pub scopes: &'a str,
    pub full_access: bool,
    pub secret_hash: &'a [u8],
    pub allowed_domains: &'a str,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub version: i64,
    pub rolled_to_key_id: Option<&'a str>,
}

impl<'a> VerifyRowRef<'a> {
    /// What verification needs of the row, every value checked as the API would.
    pub fn to_verify_state(&self) -> Result<VerifyState<'a>, String> {
        WorkspaceId::check(self.workspace_id)?;
        let mut granted = ScopeSet::EMPTY;
        for name in self.scopes.split_whitespace() {
            granted.insert(Scope::parse(name).ok_or_else(|| format!("unknown scope {name:?}"))?);
        }
        Ok(VerifyState {
            key_id: KeyId::parse(self.key_id)?,
            workspace_id: self.workspace_id,
            key_type: KeyType::parse(self.key_type)
                .ok_or_else(|| format!("unknown key_type {:?}", self.key_type))?,
            environment: Environment::parse(self.environment)
                .ok_or_else(|| format!("unknown environment {:?}", self.environment))?,
            scopes: granted,
            full_access: self.full_access,
            secret_hash: SecretHash::from_slice(self.secret_hash)
                .ok_or("secret_hash is not 32 bytes")?,
            expires_at_ms: self.expires_at,
            revoked: self.revoked_at.is_some(),
            allowed_domains: self
                .allowed_domains
                .split_whitespace()
                .map(DomainPattern::parse)
                .collect::<Result<_, _>>()?,
            version: u64::try_from(self.version).map_err(|_| "negative version")?,
            rolled_to: self.rolled_to_key_id.map(KeyId::parse).transpose()?,
        })
    }
}

/// The [`VERIFY_COLUMNS`] of a `keys` row as sqlx reads them (PostgreSQL's start-up, and
/// part of every [`KeyRow`]).
#[derive(sqlx::FromRow)]
pub struct VerifyRow {
    pub key_id: String,
    pub workspace_id: String,
    pub key_type: String,
    pub environment: String,
    pub scopes: String,
    pub full_access: bool,
    pub secret_hash: Vec<u8>,
    pub allowed_domains: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub version: i64,
    pub rolled_to_key_id: Option<String>,
}

impl VerifyRow {
    /// What verification needs of the row, every value checked; an error names the row.
    pub fn to_verify_state(&self) -> Result<VerifyState<'_>, String> {
        self.as_ref()
            .to_verify_state()
            .map_err(|e| format!("keys row {:?}: {e}", self.key_id))
    }

    fn as_ref(&self) -> VerifyRowRef<'_> {
        VerifyRowRef {
            key_id: &self.key_id,
            workspace_id: &self.workspace_id,
            key_type: &self.key_type,
            environment: &self.environment,
            scopes: &self.scopes,
            full_access: self.full_access,
            secret_hash: &self.secret_hash,
            allowed_domains: &self.allowed_domains,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            version: self.version,
            rolled_to_key_id: self.rolled_to_key_id.as_deref(),
        }
    }
}
