//! The access policy under mutual TLS: which client identities (see [`super::tls`]) may use
//! which surface of the API, which roles each may assert, and whether it must prove its users'
//! roles with signed assertions ([`super::assertion`]).
//!
//! The policy is a TOML file, reloaded when it changes:
//!
//! ```toml
//! [identities."spiffe://kemon.internal/ns/edge/sa/envoy"]
//! surfaces = ["verify"]
//!
//! [identities."spiffe://kemon.internal/ns/app/sa/web"]
//! surfaces = ["verify", "manage"]
//! roles = ["owner", "admin", "auditor", "member"]
//! require_assertion = true
//! ```
//!
//! Surfaces: `verify` (VerifyKey and Envoy's `Authorization/Check`), `manage` (the other
//! KeyService calls, RollKey and WatchExpiring among them: a notifier watching expiries reads
//! keys for users, with their roles), `audit` (AuditService). ListScopes, health and reflection reveal no key
//! and are open to every identity in the policy. An identity not in the policy gets nothing.
//!
//! [`AccessLayer`] enforces the surfaces on every call before any handler runs, and hands the
//! handlers the caller ([`Caller`], a request extension), whose roles and assertions
//! [`super::auth`] checks once the request names its workspace. Without mutual TLS there is no
//! layer work: calls keep the header trust model (development and loopback sidecars).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use futures::future::{Either, Ready};
use serde::Deserialize;
use tonic::Status;

use super::assertion::AssertionVerifier;
use super::auth::Role;
use super::connections::ConnectionInfo;
use super::error::ApiError;
use crate::reload::Watched;

/// A part of the API granted as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Surface {
    /// VerifyKey and Envoy's Check.
    Verify,
    /// Creating, reading, changing, revealing and revoking keys.
    Manage,
    /// AuditService.
    Audit,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Verify => "verify",
            Surface::Manage => "manage",
            Surface::Audit => "audit",
        }
    }

    /// The surface a call (its path, `/package.Service/Method`) belongs to; `None` for the
    /// calls every known identity may make (ListScopes, health, reflection).
    pub fn of_path(path: &str) -> Option<Surface> {
        use crate::proto::v1::audit_service_server::SERVICE_NAME as AUDIT;
        use crate::proto::v1::key_service_server::SERVICE_NAME as KEYS;
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        match (service, method) {
            (KEYS, "VerifyKey") | ("envoy.service.auth.v3.Authorization", _) => {
                Some(Surface::Verify)
            }
            (KEYS, "ListScopes") => None,
            (KEYS, _) => Some(Surface::Manage),
            (AUDIT, _) => Some(Surface::Audit),
            _ => None,
        }
    }
}

/// What one identity may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub surfaces: BTreeSet<Surface>,
    /// The roles its calls may act with (through `x-kemon-role` or an assertion).
    pub roles: Vec<Role>,
    /// Roles must come in a signed `x-kemon-assertion`; the role headers are not read.
    pub require_assertion: bool,
}

/// The policy file's form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    identities: BTreeMap<String, GrantFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    surfaces: Vec<Surface>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    require_assertion: bool,
}

/// Identities and their grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    identities: BTreeMap<String, Arc<Grant>>,
}

impl Policy {
    /// Parses and checks a policy file. `assertions` says whether assertions can be checked
    /// (a JWKS is configured): an identity that requires them without one is refused.
    pub fn parse(text: &str, assertions: bool) -> anyhow::Result<Policy> {
        let file: PolicyFile = toml::from_str(text).context("not a valid policy file")?;
        let mut identities = BTreeMap::new();
        for (identity, g) in file.identities {
            if identity.trim().is_empty() || identity.trim() != identity {
                bail!("identity {identity:?}: must not be blank or padded with spaces");
            }
            let surfaces: BTreeSet<Surface> = g.surfaces.into_iter().collect();
            let roles = g
                .roles
                .iter()
                .map(|r| {
                    Role::parse(r).with_context(|| {
                        format!("identity {identity:?}: unknown role {r:?} (owner, admin, auditor or member)")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let acts_for_users =
                surfaces.contains(&Surface::Manage) || surfaces.contains(&Surface::Audit);
            if acts_for_users && roles.is_empty() {
                bail!(
                    "identity {identity:?}: `manage` and `audit` need `roles`, the roles it may act with"
                );
            }
            if !acts_for_users && (!roles.is_empty() || g.require_assertion) {
                bail!(
                    "identity {identity:?}: `roles` and `require_assertion` apply to `manage` and `audit` only"
                );
            }
            if g.require_assertion && !assertions {
                bail!("identity {identity:?} requires assertions, but no --assertion-jwks is set");
            }
            identities.insert(
                identity,
                Arc::new(Grant {
                    surfaces,
                    roles,
                    require_assertion: g.require_assertion,
                }),
            );
        }
        Ok(Policy { identities })
    }

    pub fn grant(&self, identity: &str) -> Option<&Arc<Grant>> {
        self.identities.get(identity)
    }
}

/// Everything a call is checked against under mutual TLS.
#[derive(Debug)]
pub struct Access {
    pub policy: Arc<Watched<Policy>>,
    /// Set when a JWKS is configured.
    pub assertions: Option<Arc<AssertionVerifier>>,
}

/// The authenticated caller of a call under mutual TLS, for the handlers (a request
/// extension set by [`AccessLayer`]).
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Arc<str>,
    pub grant: Arc<Grant>,
    pub assertions: Option<Arc<AssertionVerifier>>,
}

/// Refuses calls whose client identity lacks the call's surface; see the module documentation.
#[derive(Debug, Clone)]
pub struct AccessLayer {
    access: Option<Arc<Access>>,
}

impl AccessLayer {
    /// `None`: no mutual TLS, nothing to check here.
    pub fn new(access: Option<Arc<Access>>) -> AccessLayer {
        AccessLayer { access }
    }
}

impl<S> tower_layer::Layer<S> for AccessLayer {
    type Service = AccessCheck<S>;

    fn layer(&self, inner: S) -> AccessCheck<S> {
        AccessCheck {
            inner,
            access: self.access.clone(),
        }
    }
}

/// A service behind [`AccessLayer`].
#[derive(Debug, Clone)]
pub struct AccessCheck<S> {
    inner: S,
    access: Option<Arc<Access>>,
}

impl Access {
    /// The caller of a call to `path` from `identity`, or why it is refused.
    pub fn admit(&self, identity: Option<&str>, path: &str) -> Result<Caller, ApiError> {
        let identity = identity.ok_or(ApiError::IdentityMissing)?;
        let policy = self.policy.current();
        let grant = policy
            .grant(identity)
            .ok_or_else(|| ApiError::IdentityUnknown {
                identity: identity.to_owned(),
            })?;
        if let Some(surface) = Surface::of_path(path)
            && !grant.surfaces.contains(&surface)
        {
            return Err(ApiError::SurfaceNotGranted {
                identity: identity.to_owned(),
                surface,
            });
        }
        Ok(Caller {
            identity: identity.into(),
            grant: grant.clone(),
            assertions: self.assertions.clone(),
        })
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for AccessCheck<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<ResBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let Some(access) = &self.access else {
            return Either::Right(self.inner.call(request));
        };
        let identity = request
            .extensions()
            .get::<ConnectionInfo>()
            .and_then(ConnectionInfo::identity);
        match access.admit(identity, request.uri().path()) {
            Ok(caller) => {
                tracing::Span::current().record("caller", &*caller.identity);
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(refusal) => {
                if let Some(identity) = identity {
                    tracing::Span::current().record("caller", identity);
                }
                let response = Status::from(refusal).into_http::<ResBody>();
                Either::Left(futures::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_belong_to_their_surface() {
        for (path, surface) in [
            ("/kemon.keys.v1.KeyService/VerifyKey", Some(Surface::Verify)),
            (
                "/envoy.service.auth.v3.Authorization/Check",
                Some(Surface::Verify),
            ),
            ("/kemon.keys.v1.KeyService/CreateKey", Some(Surface::Manage)),
            ("/kemon.keys.v1.KeyService/GetKey", Some(Surface::Manage)),
            ("/kemon.keys.v1.KeyService/RevealKey", Some(Surface::Manage)),
            ("/kemon.keys.v1.KeyService/RollKey", Some(Surface::Manage)),
            (
                "/kemon.keys.v1.KeyService/WatchExpiring",
                Some(Surface::Manage),
            ),
            (
                "/kemon.keys.v1.AuditService/ReadEvents",
                Some(Surface::Audit),
            ),
            ("/kemon.keys.v1.KeyService/ListScopes", None),
            ("/grpc.health.v1.Health/Check", None),
        ] {
            assert_eq!(Surface::of_path(path), surface, "{path}");
        }
    }

    #[test]
    fn a_policy_names_identities_surfaces_and_roles() {
        let policy = Policy::parse(
            r#"
            [identities."spiffe://k/edge"]
            surfaces = ["verify"]
            [identities."spiffe://k/web"]
            surfaces = ["verify", "manage"]
            roles = ["admin", "member"]
            require_assertion = true
            "#,
            true,
        )
        .unwrap();
        let edge = policy.grant("spiffe://k/edge").unwrap();
        assert_eq!(edge.surfaces, BTreeSet::from([Surface::Verify]));
        let web = policy.grant("spiffe://k/web").unwrap();
        assert_eq!(web.roles, [Role::Admin, Role::Member]);
        assert!(web.require_assertion);
        assert!(policy.grant("spiffe://k/other").is_none());
    }

    #[test]
    fn the_example_policy_under_deploy_loads() {
        let policy = Policy::parse(include_str!("../../deploy/policy.example.toml"), true)
            .expect("deploy/policy.example.toml");
        let web = policy
            .grant("spiffe://kemon.internal/ns/app/sa/web")
            .unwrap();
        assert!(web.require_assertion);
        assert!(Policy::parse(include_str!("../../deploy/policy.example.toml"), false).is_err());
    }

    #[test]
    fn mistakes_in_a_policy_are_refused() {
        for (text, why) in [
            (
                "[identities.a]\nsurfaces = [\"manage\"]",
                "manage without roles",
            ),
            (
                "[identities.a]\nsurfaces = [\"verify\"]\nroles = [\"admin\"]",
                "roles on verify",
            ),
            (
                "[identities.a]\nsurfaces = [\"sign\"]",
                "an unknown surface",
            ),
            (
                "[identities.a]\nsurfaces = [\"audit\"]\nroles = [\"root\"]",
                "an unknown role",
            ),
            ("[identities.a]\nsurface = [\"verify\"]", "an unknown field"),
            (
                "[identities.a]\nsurfaces = [\"manage\"]\nroles = [\"admin\"]\nrequire_assertion = true",
                "assertions without a JWKS",
            ),
        ] {
            assert!(Policy::parse(text, false).is_err(), "{why}");
        }
        assert_eq!(Policy::parse("", false).unwrap(), Policy::default());
    }
}
