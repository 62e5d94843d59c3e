//! Who a call acts for. The calling service authenticates its user and names them in request
//! metadata; this service trusts that (it is reached only by internal services) and decides
//! what the role may do.

use tonic::metadata::MetadataMap;

use super::error::ApiError;

pub const ACTOR_HEADER: &str = "x-kemon-actor";
pub const ROLE_HEADER: &str = "x-kemon-role";
pub const MAX_ACTOR_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Auditor,
    Member,
}

impl Role {
    /// The role as `x-kemon-role` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::Member => "member",
        }
    }
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

impl Permission {
    /// The roles that hold this permission.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Permission::ReadKeys | Permission::Audit => &[Role::Owner, Role::Admin, Role::Auditor],
            Permission::ManageKeys => &[Role::Owner, Role::Admin],
        }
    }

    /// The name a PERMISSION_DENIED gives it (`ErrorInfo` metadata `permission`).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ReadKeys => "read_keys",
            Permission::ManageKeys => "manage_keys",
            Permission::Audit => "audit",
        }
    }
}

/// Why a call's metadata names no usable caller: each is its own UNAUTHENTICATED reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerError {
    /// `x-kemon-actor` is absent or blank.
    ActorMissing,
    /// `x-kemon-actor` is too long, or holds characters that are not printable ASCII.
    ActorInvalid,
    /// `x-kemon-role` is absent or blank.
    RoleMissing,
    /// `x-kemon-role` is not one of the four roles.
    RoleUnknown,
}

impl Actor {
    /// Reads the actor from metadata and checks it may do `permission`.
    pub fn authorize(metadata: &MetadataMap, permission: Permission) -> Result<Actor, ApiError> {
        let actor = Actor::from_metadata(metadata).map_err(ApiError::Unauthenticated)?;
        if permission.roles().contains(&actor.role) {
            Ok(actor)
        } else {
            Err(ApiError::PermissionDenied {
                role: actor.role,
                permission,
            })
        }
    }

    fn from_metadata(metadata: &MetadataMap) -> Result<Actor, CallerError> {
        // Absent or blank is missing; present but not visible ASCII is malformed.
        let header = |name: &str, missing: CallerError, malformed: CallerError| {
            let value = metadata.get(name).ok_or(missing)?;
            let value = value.to_str().map_err(|_| malformed)?.trim();
            if value.is_empty() {
                Err(missing)
            } else {
                Ok(value)
            }
        };
        let id = header(
            ACTOR_HEADER,
            CallerError::ActorMissing,
            CallerError::ActorInvalid,
        )?;
        if id.chars().count() > MAX_ACTOR_LEN || id.chars().any(char::is_control) {
            return Err(CallerError::ActorInvalid);
        }
        let role = match header(
            ROLE_HEADER,
            CallerError::RoleMissing,
            CallerError::RoleUnknown,
        )? {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "auditor" => Role::Auditor,
            "member" => Role::Member,
            _ => return Err(CallerError::RoleUnknown),
        };
        Ok(Actor {
            id: id.to_owned(),
            role,
        })
    }
}
