//! Validated values: each can only be built through `parse`, so one that exists is valid.
//! A parse error is the reason, in words a caller can act on; the gRPC layer adds the field.

use std::fmt;
use std::net::IpAddr;

/// `key_` followed by a ULID (26 characters of Crockford base32, upper case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(ulid::Ulid);

impl KeyId {
    /// A new id: the creation time in milliseconds and 80 random bits, so ids sort by age.
    /// Panics if the random source fails; request paths use [`KeyId::try_generate`].
    pub fn generate(now_ms: i64) -> KeyId {
        KeyId::try_generate(now_ms).expect("the operating system's random source failed")
    }

    pub fn try_generate(now_ms: i64) -> Result<KeyId, getrandom::Error> {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random)?;
        let ms = u64::try_from(now_ms).unwrap_or(0);
        Ok(KeyId(ulid::Ulid::from_parts(
            ms,
            u128::from_be_bytes(random),
        )))
    }

    pub fn parse(s: &str) -> Result<KeyId, String> {
        s.strip_prefix("key_")
            // The canonical (upper case) spelling only, so one id has one string.
            .filter(|u| {
                u.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            })
            .and_then(|u| ulid::Ulid::from_string(u).ok())
            .map(KeyId)
            .ok_or_else(|| "must be `key_` followed by a 26-character ULID".to_owned())
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_bytes()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key_{}", self.0)
    }
}

/// A workspace id as the calling services know it: 1 to 64 of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<WorkspaceId, String> {
        if s.is_empty() {
            return Err("is required".into());
        }
        if s.len() > Self::MAX_LEN {
            return Err(format!("must be at most {} characters", Self::MAX_LEN));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err("may contain only letters, digits, `_` and `-`".into());
        }
        Ok(WorkspaceId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key's display name: 1 to 100 characters once surrounding whitespace is trimmed, with no
/// control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

impl KeyName {
    pub const MAX_CHARS: usize = 100;

    pub fn parse(s: &str) -> Result<KeyName, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("is required".into());
        }
        if s.chars().count() > Self::MAX_CHARS {
            return Err(format!("must be at most {} characters", Self::MAX_CHARS));
        }
        if s.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(KeyName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An allowed domain of a production public key: an exact host (`app.example.com`) or a
/// wildcard for every subdomain at any depth (`*.example.com` matches `a.example.com` and
/// `a.b.example.com`, not `example.com` itself). Stored lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern(String);

impl DomainPattern {
    pub const MAX_PER_KEY: usize = 20;

    pub fn parse(s: &str) -> Result<DomainPattern, String> {
        let lower = s.trim().to_ascii_lowercase();
        let host = lower.strip_prefix("*.").unwrap_or(&lower);
        if host.contains('*') {
            return Err("a wildcard may only be a leading `*.`".into());
        }
        if !is_host_name(host) {
            return Err(
                "must be a host name such as `app.example.com` or `*.example.com`, without \
                 scheme, port or path"
                    .into(),
            );
        }
        if lower.starts_with("*.") && !host.contains('.') {
            return Err("a wildcard must cover a domain with at least two labels".into());
        }
        Ok(DomainPattern(lower))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a lower-case host is allowed by this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => self.0 == host,
        }
    }
}

fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The host of a request's origin, lower case, from a URL (`https://app.example.com:8443/x`),
/// a host and port (`localhost:3000`, `[::1]:8080`) or a bare host. `None` when empty or
/// unparseable.
pub fn origin_host(origin: &str) -> Option<String> {
    let rest = origin.trim();
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split_once(']')?.0
    } else if authority.matches(':').count() > 1 {
        authority // a bare IPv6 address
    } else {
        authority.split(':').next().unwrap_or("")
    };
    let host = host.trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// `localhost`, `*.localhost`, any 127.0.0.0/8 address or `::1`: where test keys work.
pub fn is_localhost(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// How long a new key lives: the product's options only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expiration {
    Days30,
    Days60,
    #[default]
    Days90,
    Days180,
    Days365,
    Never,
}

impl Expiration {
    pub fn days(self) -> Option<i64> {
        match self {
            Expiration::Days30 => Some(30),
            Expiration::Days60 => Some(60),
            Expiration::Days90 => Some(90),
            Expiration::Days180 => Some(180),
            Expiration::Days365 => Some(365),
            Expiration::Never => None,
        }
    }

    /// The expiry instant of a key created at `now_ms`.
    pub fn expires_at(self, now_ms: i64) -> Option<i64> {
        self.days().map(|d| now_ms + d * 86_400_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_round_trip_and_reject_other_forms() {
        let id = KeyId::generate(1_700_000_000_000);
        assert_eq!(KeyId::parse(&id.to_string()), Ok(id));
        assert!(KeyId::parse("01HZX").is_err());
        assert!(
            KeyId::parse(&id.to_string()[4..]).is_err(),
            "prefix required"
        );
        assert!(
            KeyId::parse(&id.to_string().to_lowercase()).is_err(),
            "canonical form only"
        );
        assert!(KeyId::parse("key_").is_err());
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(
            KeyName::parse("  CI deploy ").unwrap().as_str(),
            "CI deploy"
        );
        assert!(KeyName::parse("   ").is_err());
        assert!(KeyName::parse(&"é".repeat(100)).is_ok());
        assert!(KeyName::parse(&"é".repeat(101)).is_err());
        assert!(KeyName::parse("a\nb").is_err());
        assert!(KeyName::parse("a\u{7f}b").is_err());
    }

    #[test]
    fn workspace_ids_are_restricted() {
        assert!(WorkspaceId::parse("ws_01-A").is_ok());
        assert!(WorkspaceId::parse("").is_err());
        assert!(WorkspaceId::parse("ws 1").is_err());
        assert!(WorkspaceId::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn domain_patterns_match_exactly_or_subdomains() {
        let exact = DomainPattern::parse("App.Example.com").unwrap();
        assert_eq!(exact.as_str(), "app.example.com");
        assert!(exact.matches("app.example.com"));
        assert!(!exact.matches("x.app.example.com"));
        let wild = DomainPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(!wild.matches(".example.com"));
        for bad in [
            "",
            "https://a.com",
            "a.com:443",
            "a.com/x",
            "*.com",
            "a.*.com",
            "-a.com",
            "*",
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn origin_hosts_are_extracted_from_urls_and_host_ports() {
        let cases = [
            (
                "https://App.Example.com:8443/path?q",
                Some("app.example.com"),
            ),
            ("app.example.com", Some("app.example.com")),
            ("localhost:3000", Some("localhost")),
            ("http://user@localhost", Some("localhost")),
            ("[::1]:8080", Some("::1")),
            ("http://[::1]/", Some("::1")),
            ("::1", Some("::1")),
            ("127.0.0.2", Some("127.0.0.2")),
            ("example.com.", Some("example.com")),
            ("", None),
            ("https://", None),
        ];
        for (origin, host) in cases {
            assert_eq!(origin_host(origin).as_deref(), host, "{origin}");
        }
    }

    #[test]
    fn localhost_is_loopback_only() {
        for host in [
            "localhost",
            "app.localhost",
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_localhost(host), "{host}");
        }
        for host in [
            "example.com",
            "localhost.example.com",
            "10.0.0.1",
            "128.0.0.1",
            "::2",
        ] {
            assert!(!is_localhost(host), "{host}");
        }
    }

    #[test]
    fn expirations_are_whole_days() {
        assert_eq!(Expiration::default(), Expiration::Days90);
        assert_eq!(Expiration::Days30.expires_at(0), Some(30 * 86_400_000));
        assert_eq!(Expiration::Never.expires_at(5), None);
    }
}
