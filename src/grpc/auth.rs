//! Who a call acts for. The calling service authenticates its user and names them in request
//! metadata; this service decides what the role may do.
//!
//! Without mutual TLS the metadata is trusted as sent (development, loopback sidecars). Under
//! mutual TLS the calling service is known ([`Caller`], from its certificate and the policy):
//! it may act only with the roles its policy entry lists, and, when the entry says so, only
//! through a signed assertion of the user's role in the request's workspace
//! ([`super::assertion`]) instead of the headers.

use tonic::Request;
use tonic::metadata::MetadataMap;

use super::assertion::{ASSERTION_HEADER, AssertionError};
use super::error::ApiError;
use super::policy::Caller;

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
    /// A role as `x-kemon-role` spells it.
    pub fn parse(text: &str) -> Option<Role> {
        Some(match text {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "auditor" => Role::Auditor,
            "member" => Role::Member,
            _ => return None,
        })
    }

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
    /// The calling service's identity under mutual TLS, recorded with every event beside the
    /// actor.
    pub caller_identity: Option<String>,
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
    /// The actor of `request`, about `workspace` (the request's `workspace_id` as sent; empty
    /// when it names none), checked to be allowed `permission`.
    pub fn authorize<T>(
        request: &Request<T>,
        permission: Permission,
        workspace: &str,
    ) -> Result<Actor, ApiError> {
        let metadata = request.metadata();
        let Some(caller) = request.extensions().get::<Caller>() else {
            return Actor::authorize_headers(metadata, permission);
        };
        let actor = if caller.grant.require_assertion {
            let token = metadata
                .get(ASSERTION_HEADER)
                .ok_or(ApiError::Assertion(AssertionError::Missing))?
                .to_str()
                .map_err(|_| ApiError::Assertion(AssertionError::Invalid("format")))?;
            let verifier = caller
                .assertions
                .as_ref()
                .ok_or(ApiError::Assertion(AssertionError::Invalid("key")))?;
            let asserted = verifier
                .verify(token, workspace)
                .map_err(ApiError::Assertion)?;
            Actor {
                id: asserted.actor,
                role: asserted.role,
                caller_identity: None,
            }
        } else {
            Actor::from_metadata(metadata).map_err(ApiError::Unauthenticated)?
        };
        if !caller.grant.roles.contains(&actor.role) {
            return Err(ApiError::RoleNotGranted {
                identity: caller.identity.to_string(),
                role: actor.role,
            });
        }
        let actor = Actor::permitted(actor, permission)?;
        Ok(Actor {
            caller_identity: Some(caller.identity.to_string()),
            ..actor
        })
    }

    /// Reads the actor from metadata and checks it may do `permission`.
    fn authorize_headers(
        metadata: &MetadataMap,
        permission: Permission,
    ) -> Result<Actor, ApiError> {
        let actor = Actor::from_metadata(metadata).map_err(ApiError::Unauthenticated)?;
        Actor::permitted(actor, permission)
    }

    fn permitted(actor: Actor, permission: Permission) -> Result<Actor, ApiError> {
        // On the call's span and line: who the call acts for (a name, never a credential).
        tracing::Span::current().record("actor", actor.id.as_str());
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
        let role = Role::parse(header(
            ROLE_HEADER,
            CallerError::RoleMissing,
            CallerError::RoleUnknown,
        )?)
        .ok_or(CallerError::RoleUnknown)?;
        Ok(Actor {
            id: id.to_owned(),
            role,
            caller_identity: None,
        })
    }
}
