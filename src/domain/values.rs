//! Validated values: each can only be built through `parse`, so one that exists is valid.
//! A parse error is the reason, in words a caller can act on; the gRPC layer adds the field.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

    /// The canonical spelling only, so that one id has one string: upper case, and a first
    /// character of at most `7` (26 characters carry 130 bits, of which a ULID is 128; a
    /// larger first character would spell the same id as a smaller one).
    pub fn parse(s: &str) -> Result<KeyId, String> {
        s.strip_prefix("key_")
            .and_then(|u| {
                let ulid = ulid::Ulid::from_string(u).ok()?;
                let mut spelled = [0u8; ulid::ULID_LEN];
                (ulid.array_to_str(&mut spelled) == u).then_some(KeyId(ulid))
            })
            .ok_or_else(|| "must be `key_` followed by a 26-character ULID".to_owned())
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_bytes()
    }

    /// The inverse of [`KeyId::to_bytes`]. Every 128-bit value is a ULID, so any 16 bytes
    /// make a well-formed id (whether such a key exists is the store's question).
    pub fn from_bytes(bytes: [u8; 16]) -> KeyId {
        KeyId(ulid::Ulid::from_bytes(bytes))
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
        Self::check(s)?;
        Ok(WorkspaceId(s.to_owned()))
    }

    /// What [`WorkspaceId::parse`] checks, without making a `WorkspaceId`.
    pub fn check(s: &str) -> Result<(), String> {
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
        Ok(())
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

    /// Whether an origin's host is allowed by this pattern. A pattern spelled as an IPv4
    /// address allows that address; a wildcard never matches an address (`*.0.0.1` is not a
    /// family of hosts), and no pattern can name an IPv6 address.
    pub fn allows(&self, host: &Host) -> bool {
        match host {
            Host::Domain(name) => self.matches(name),
            Host::Ip(IpAddr::V4(v4)) => self.0.parse::<Ipv4Addr>() == Ok(*v4),
            Host::Ip(IpAddr::V6(_)) => false,
        }
    }

    /// Whether a lower-case host name is allowed by this pattern. Private: callers go through
    /// [`DomainPattern::allows`], whose host has been parsed and normalized.
    fn matches(&self, host: &str) -> bool {
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

/// Where a VerifyKey request came from, as the browser's `Origin` header or a sidecar's `Host`
/// header names it. Built only through [`Origin::parse`], so the host of one that exists is a
/// real host and nothing else: no userinfo, path, query, escapes or stray characters that
/// some other parser might read differently.
///
/// Accepted forms, exactly as sent (no whitespace is trimmed: HTTP libraries hand header
/// values over trimmed, and a padded value is a caller bug better seen than hidden):
/// - the RFC 6454 serialization `scheme "://" host [ ":" port ]`, scheme `http` or `https` in
///   any case, with at most one trailing `/` (some callers build the origin from a root URL,
///   and an empty path names nothing else; any longer path is refused);
/// - a bare `host [ ":" port ]`, as in a `Host` header, with no scheme and no `/`.
///
/// The host is a DNS name in ASCII (internationalized names in their `xn--` form, as
/// browsers send them), an IPv4 dotted quad, or an IPv6 literal in brackets (`[::1]`).
/// An unbracketed IPv6 address (`::1`) is also accepted in the bare form when it is the whole
/// value, without a port, because sidecars that pass a peer address send it that way; it must
/// then parse as an address in full, so it can hide nothing. A port is 1 to 65535, in digits.
/// `null`, the serialization of an opaque origin (sandboxed frames, `file:` pages), is not an
/// origin of any host and is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: Option<Scheme>,
    host: Host,
    port: Option<u16>,
}

/// The scheme of an [`Origin`], when one was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// The host of an [`Origin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Lower case, without a trailing dot; never ends in a numeric label, so never an address
    /// in disguise (`127.1`, `0x7f.1`).
    Domain(String),
    Ip(IpAddr),
}

impl Origin {
    /// `None` when `s` is not one of the forms above. No reason is given: VerifyKey answers
    /// with a code only, and this runs on every call, so it builds nothing it would discard.
    pub fn parse(s: &str) -> Option<Origin> {
        if s.eq_ignore_ascii_case("null") {
            return None;
        }
        let (scheme, authority) = match s.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = if scheme.eq_ignore_ascii_case("https") {
                    Scheme::Https
                } else if scheme.eq_ignore_ascii_case("http") {
                    Scheme::Http
                } else {
                    return None;
                };
                (Some(scheme), rest.strip_suffix('/').unwrap_or(rest))
            }
            None => (None, s),
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (literal, after) = bracketed.split_once(']')?;
            let port = match after {
                "" => None,
                _ => Some(parse_port(after.strip_prefix(':')?)?),
            };
            (
                Host::Ip(IpAddr::V6(literal.parse::<Ipv6Addr>().ok()?)),
                port,
            )
        } else if scheme.is_none() && authority.bytes().filter(|&b| b == b':').count() > 1 {
            (
                Host::Ip(IpAddr::V6(authority.parse::<Ipv6Addr>().ok()?)),
                None,
            )
        } else {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(parse_port(port)?)),
                None => (authority, None),
            };
            (parse_host(host)?, port)
        };
        Some(Origin { scheme, host, port })
    }

    pub fn scheme(&self) -> Option<Scheme> {
        self.scheme
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port as given; a default port (`:443`) is kept, not dropped.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl Host {
    /// `localhost`, `*.localhost`, any 127.0.0.0/8 address, `::1` or an IPv4-mapped loopback
    /// address: where test keys work.
    pub fn is_localhost(&self) -> bool {
        match self {
            Host::Domain(name) => name == "localhost" || name.ends_with(".localhost"),
            Host::Ip(IpAddr::V4(v4)) => v4.is_loopback(),
            Host::Ip(IpAddr::V6(v6)) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        }
    }
}

/// 1 to 65535 in at most five digits: no sign, no spaces, not empty.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&port| port != 0)
}

/// A DNS name or an IPv4 dotted quad, with one optional trailing dot.
fn parse_host(s: &str) -> Option<Host> {
    let s = s.strip_suffix('.').unwrap_or(s);
    // A browser reads a host whose last label is a number as an IPv4 address in any of its
    // old spellings (`127.1`, `0x7f.0.0.1`, `2130706433`) and serializes it as a dotted quad.
    // Only that serialization is taken, so one address has one spelling here.
    let last = s.rsplit('.').next().unwrap_or(s);
    let numeric = (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        || last
            .strip_prefix("0x")
            .or_else(|| last.strip_prefix("0X"))
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return s
            .parse::<Ipv4Addr>()
            .ok()
            .map(|v4| Host::Ip(IpAddr::V4(v4)));
    }
    is_host_name(s).then(|| Host::Domain(s.to_ascii_lowercase()))
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
        assert_eq!(KeyId::from_bytes(id.to_bytes()), id);
        // 26 characters hold 130 bits: a first character past `7` spells, with the top bits
        // dropped, an id that has a shorter spelling.
        let smallest = "key_00000000000000000000000000";
        assert!(KeyId::parse(smallest).is_ok());
        assert!(KeyId::parse("key_80000000000000000000000000").is_err());
        assert!(KeyId::parse("key_7ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_ok());
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

    fn domain(name: &str) -> Host {
        Host::Domain(name.to_owned())
    }

    fn ip(address: &str) -> Host {
        Host::Ip(address.parse().unwrap())
    }

    #[test]
    fn origins_parse_serializations_and_host_headers() {
        use Scheme::{Http, Https};
        let cases = [
            (
                "https://app.example.com",
                Some(Https),
                domain("app.example.com"),
                None,
            ),
            (
                "http://localhost:3000",
                Some(Http),
                domain("localhost"),
                Some(3000),
            ),
            (
                "HTTPS://App.Example.COM:8443",
                Some(Https),
                domain("app.example.com"),
                Some(8443),
            ),
            ("HtTp://LOCALHOST", Some(Http), domain("localhost"), None),
            (
                "https://app.example.com/",
                Some(Https),
                domain("app.example.com"),
                None,
            ),
            (
                "https://example.com.",
                Some(Https),
                domain("example.com"),
                None,
            ),
            (
                "https://example.com.:443/",
                Some(Https),
                domain("example.com"),
                Some(443),
            ),
            (
                "https://xn--bcher-kva.example",
                Some(Https),
                domain("xn--bcher-kva.example"),
                None,
            ),
            (
                "http://127.0.0.1:8080",
                Some(Http),
                ip("127.0.0.1"),
                Some(8080),
            ),
            ("http://[::1]", Some(Http), ip("::1"), None),
            ("http://[::1]:8080/", Some(Http), ip("::1"), Some(8080)),
            (
                "https://[2001:DB8::1]",
                Some(Https),
                ip("2001:db8::1"),
                None,
            ),
            ("app.example.com", None, domain("app.example.com"), None),
            (
                "App.Example.com:443",
                None,
                domain("app.example.com"),
                Some(443),
            ),
            ("localhost:65535", None, domain("localhost"), Some(65535)),
            ("a-b.localhost", None, domain("a-b.localhost"), None),
            ("127.0.0.2", None, ip("127.0.0.2"), None),
            ("127.0.0.1.", None, ip("127.0.0.1"), None),
            ("[::1]:8080", None, ip("::1"), Some(8080)),
            ("[::ffff:127.0.0.1]", None, ip("::ffff:127.0.0.1"), None),
            ("::1", None, ip("::1"), None),
            (
                "127.0.0.1.evil.com",
                None,
                domain("127.0.0.1.evil.com"),
                None,
            ),
        ];
        for (s, scheme, host, port) in cases {
            let origin = Origin::parse(s).unwrap_or_else(|| panic!("{s} refused"));
            assert_eq!(origin.scheme(), scheme, "{s}");
            assert_eq!(origin.host(), &host, "{s}");
            assert_eq!(origin.port(), port, "{s}");
        }
        let longest = format!("{}.com", vec!["a".repeat(63); 3].join("."));
        assert_eq!(longest.len(), 195);
        let at_limit = format!("{}.{}", "b".repeat(57), longest);
        assert_eq!(at_limit.len(), 253);
        assert!(Origin::parse(&at_limit).is_some());
        assert!(Origin::parse(&format!("https://{at_limit}.")).is_some());
    }

    #[test]
    fn origins_that_are_not_hosts_are_refused() {
        let label_64 = format!("{}.com", "a".repeat(64));
        let name_254 = format!(
            "{}.{}.com",
            "b".repeat(58),
            vec!["a".repeat(63); 3].join(".")
        );
        assert_eq!(name_254.len(), 254);
        for s in [
            // From the review: each passed for localhost or for example.com.
            "http://evil.com\\@localhost",
            "http://evil.com;.localhost",
            "http://evil.com%2f.localhost",
            "http://[::1].evil.com",
            "https://evil.com .example.com",
            // Userinfo, paths, queries, fragments.
            "http://localhost@evil.com",
            "http://evil.com@localhost",
            "http://user:pass@localhost",
            "https://evil.com/localhost",
            "http://[::1]/x",
            "https://app.example.com//",
            "https://app.example.com?x",
            "https://app.example.com#x",
            "localhost/",
            "localhost:3000/",
            "//localhost",
            // Not hosts.
            "",
            "null",
            "NULL",
            "http://",
            "https:///",
            "http://:80",
            "localhost:",
            ":3000",
            ".",
            "example..com",
            "example.com..",
            ".example.com",
            "-a.example.com",
            "a-.example.com",
            "a_b.example.com",
            "ex ample.com",
            " localhost",
            "localhost ",
            "localhost\n",
            "bücher.example",
            "*.example.com",
            label_64.as_str(),
            name_254.as_str(),
            // Numbers that a browser would read as addresses in another spelling.
            "127.1",
            "0x7f.0.0.1",
            "127.0.0.0x1",
            "2130706433",
            "127.000.0.1",
            "256.0.0.1",
            "1.2.3.4.5",
            "evil.127",
            // IPv6 outside brackets with a scheme or port, or not an address.
            "http://::1",
            "::1:8080:",
            "[::1]x",
            "[::1]:",
            "[127.0.0.1]",
            "[::1%25eth0]",
            "fe80::1%eth0",
            "[v1.x]",
            "[::1",
            // Ports.
            "localhost:0",
            "localhost:65536",
            "localhost:123456",
            "localhost:+80",
            "localhost:8O",
            "localhost:80:80",
            // Other schemes and malformed scheme separators.
            "ftp://localhost",
            "file://localhost",
            "ws://localhost",
            "javascript://localhost",
            "https:/app.example.com",
            "https:app.example.com",
            "https://https://app.example.com",
        ] {
            assert_eq!(Origin::parse(s), None, "{s:?} accepted");
        }
    }

    #[test]
    fn localhost_is_loopback_only() {
        for s in [
            "localhost",
            "app.localhost",
            "a.b.localhost",
            "127.0.0.1",
            "127.8.9.10",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]",
            "http://localhost.:3000",
        ] {
            let origin = Origin::parse(s).unwrap_or_else(|| panic!("{s} refused"));
            assert!(origin.host().is_localhost(), "{s}");
        }
        for s in [
            "example.com",
            "localhost.example.com",
            "localhost.evil.com",
            "notlocalhost",
            "10.0.0.1",
            "128.0.0.1",
            "[::2]",
            "::",
        ] {
            let origin = Origin::parse(s).unwrap_or_else(|| panic!("{s} refused"));
            assert!(!origin.host().is_localhost(), "{s}");
        }
    }

    #[test]
    fn domain_patterns_allow_names_and_exact_ipv4_addresses() {
        let host = |s: &str| Origin::parse(s).unwrap().host().clone();
        let exact = DomainPattern::parse("app.example.com").unwrap();
        assert!(exact.allows(&host("https://App.Example.com.:8443")));
        assert!(!exact.allows(&host("https://example.com")));
        let wild = DomainPattern::parse("*.example.com").unwrap();
        assert!(wild.allows(&host("a.b.example.com")));
        assert!(!wild.allows(&host("example.com")));
        let address = DomainPattern::parse("10.0.0.5").unwrap();
        assert!(address.allows(&host("https://10.0.0.5")));
        assert!(!address.allows(&host("https://10.0.0.6")));
        let wild_address = DomainPattern::parse("*.0.0.5").unwrap();
        assert!(!wild_address.allows(&host("10.0.0.5")));
        assert!(!exact.allows(&host("[::1]")));
    }

    #[test]
    fn expirations_are_whole_days() {
        assert_eq!(Expiration::default(), Expiration::Days90);
        assert_eq!(Expiration::Days30.expires_at(0), Some(30 * 86_400_000));
        assert_eq!(Expiration::Never.expires_at(5), None);
    }
}
