//! The scope catalog and sets of granted scopes.
//!
//! The catalog is the product's table of resources: tickets, projects and labels can be read
//! and written, teams and members only read. `projects:write` and `labels:write` are accepted
//! on keys but reserved: no tool requires them yet.

use std::fmt;

/// Whether a scope reads or writes its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// One entry of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    bit: u8,
    pub name: &'static str,
    pub resource: &'static str,
    pub access: Access,
    pub reserved: bool,
}

const fn scope(
    bit: u8,
    name: &'static str,
    resource: &'static str,
    access: Access,
    reserved: bool,
) -> Scope {
    Scope {
        bit,
        name,
        resource,
        access,
        reserved,
    }
}

/// Every scope, in the order the product lists them.
pub const CATALOG: [Scope; 8] = [
    scope(0, "tickets:read", "tickets", Access::Read, false),
    scope(1, "tickets:write", "tickets", Access::Write, false),
    scope(2, "projects:read", "projects", Access::Read, false),
    scope(3, "projects:write", "projects", Access::Write, true),
    scope(4, "teams:read", "teams", Access::Read, false),
    scope(5, "labels:read", "labels", Access::Read, false),
    scope(6, "labels:write", "labels", Access::Write, true),
    scope(7, "members:read", "members", Access::Read, false),
];

impl Scope {
    /// The catalog entry with this exact name (names are case-sensitive, as documented).
    pub fn parse(name: &str) -> Option<Scope> {
        CATALOG.iter().copied().find(|s| s.name == name)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// A set of catalog scopes, one bit each: cheap to copy and to test on the Verify path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ScopeSet(u8);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet(0);

    /// Every scope of the catalog: what a full-access key holds.
    pub const ALL: ScopeSet = ScopeSet(u8::MAX);

    /// Parses scope names, ignoring duplicates. The error lists every unknown name, in the
    /// order given, so the caller can name each one.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<ScopeSet, Vec<String>> {
        let mut set = ScopeSet::EMPTY;
        let mut unknown = Vec::new();
        for name in names {
            match Scope::parse(name.as_ref()) {
                Some(scope) => set.insert(scope),
                None => unknown.push(name.as_ref().to_owned()),
            }
        }
        if unknown.is_empty() {
            Ok(set)
        } else {
            Err(unknown)
        }
    }

    /// The set as one bit per catalog scope, for compact encodings (see
    /// [`ScopeSet::from_bits`]).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The inverse of [`ScopeSet::bits`]. The catalog has a scope for every bit, so any value
    /// is a set of catalog scopes.
    pub fn from_bits(bits: u8) -> ScopeSet {
        ScopeSet(bits)
    }

    pub fn insert(&mut self, scope: Scope) {
        self.0 |= 1 << scope.bit;
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & (1 << scope.bit) != 0
    }

    /// True when every scope of `other` is in `self`.
    pub fn is_superset(self, other: ScopeSet) -> bool {
        other.0 & !self.0 == 0
    }

    /// The scopes of `self` that `granted` lacks.
    pub fn difference(self, granted: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & !granted.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        CATALOG.into_iter().filter(move |s| self.contains(*s))
    }

    /// Scope names in catalog order.
    pub fn names(self) -> Vec<String> {
        self.iter().map(|s| s.name.to_owned()).collect()
    }

    /// Write scopes in the set, which public keys may not hold.
    pub fn writes(self) -> impl Iterator<Item = Scope> {
        self.iter().filter(|s| s.access == Access::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_bits_are_distinct_and_names_unique() {
        let mut all = ScopeSet::EMPTY;
        for s in CATALOG {
            assert!(!all.contains(s), "bit of {s} reused");
            all.insert(s);
            assert_eq!(Scope::parse(s.name), Some(s));
        }
        assert!(ScopeSet::ALL.is_superset(all));
    }

    #[test]
    fn parse_dedupes_and_reports_every_unknown_name() {
        let set = ScopeSet::parse(&["tickets:read", "tickets:read", "teams:read"]).unwrap();
        assert_eq!(set.names(), ["tickets:read", "teams:read"]);
        let err = ScopeSet::parse(&["tickets:read", "teams:write", "Tickets:read"]).unwrap_err();
        assert_eq!(err, ["teams:write", "Tickets:read"]);
    }

    #[test]
    fn reserved_scopes_are_the_documented_two() {
        let reserved: Vec<_> = CATALOG
            .iter()
            .filter(|s| s.reserved)
            .map(|s| s.name)
            .collect();
        assert_eq!(reserved, ["projects:write", "labels:write"]);
    }

    #[test]
    fn difference_names_what_is_missing() {
        let granted = ScopeSet::parse(&["tickets:read"]).unwrap();
        let required = ScopeSet::parse(&["tickets:read", "labels:read"]).unwrap();
        assert!(!granted.is_superset(required));
        assert_eq!(required.difference(granted).names(), ["labels:read"]);
        assert!(ScopeSet::ALL.is_superset(required));
    }
}
