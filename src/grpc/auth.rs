//! Who a call acts for. The calling service authenticates its user and names them in request
//! metadata; this service trusts that (it is reached only by internal services) and decides
//! what the role may do.

use tonic::metadata::MetadataMap;

use super::error::ApiError;

pub const ACTOR_HEADER: &str = "x-kemon-actor";
pub const ROLE_HEADER: &str = "x-kemon-role";
const MAX_ACTOR_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Auditor,
    Member,
}

/// The user a call acts for.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: String,
    pub role: Role,
}

/// What a call needs the actor to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// GetKey, ListKeys: owners, admins and auditors.
    ReadKeys,
    /// Create, rename, rescope, revoke, reveal: owners and admins (the product's rule:
    /// managing keys needs the admin or owner role).
    ManageKeys,
    /// The audit API: owners, admins and auditors.
    Audit,
}

impl Actor {
    /// Reads the actor from metadata and checks it may do `permission`.
    pub fn authorize(metadata: &MetadataMap, permission: Permission) -> Result<Actor, ApiError> {
        let actor = Actor::from_metadata(metadata)?;
        let allowed = match (permission, actor.role) {
            (_, Role::Owner | Role::Admin) => true,
            (Permission::ReadKeys | Permission::Audit, Role::Auditor) => true,
            (Permission::ManageKeys, Role::Auditor) | (_, Role::Member) => false,
        };
        if allowed {
            Ok(actor)
        } else {
            Err(ApiError::PermissionDenied(match actor.role {
                Role::Auditor => "auditors may read keys but not change or reveal them".into(),
                _ if permission == Permission::Audit => {
                    "the audit log needs the owner, admin or auditor role".into()
                }
                _ => "managing API keys needs the admin or owner role".into(),
            }))
        }
    }

    fn from_metadata(metadata: &MetadataMap) -> Result<Actor, ApiError> {
        let header = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ApiError::Unauthenticated(format!("metadata `{name}` is required")))
        };
        let id = header(ACTOR_HEADER)?;
        if id.chars().count() > MAX_ACTOR_LEN || id.chars().any(char::is_control) {
            return Err(ApiError::Unauthenticated(format!(
                "metadata `{ACTOR_HEADER}` must be at most {MAX_ACTOR_LEN} printable characters"
            )));
        }
        let role = match header(ROLE_HEADER)? {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "auditor" => Role::Auditor,
            "member" => Role::Member,
            _ => {
                return Err(ApiError::Unauthenticated(format!(
                    "metadata `{ROLE_HEADER}` must be owner, admin, auditor or member"
                )));
            }
        };
        Ok(Actor {
            id: id.to_owned(),
            role,
        })
    }
}
