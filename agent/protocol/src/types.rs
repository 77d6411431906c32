//! Validated names for what the registry API addresses: content digests, repository names,
//! tags and registry hosts. Parsing happens once, at the edge (`registry/`), so every other
//! module works with values that are known to be well formed.

use std::fmt;
use std::str::FromStr;

/// Why a name, tag or digest was refused. The registry maps these to OCI error codes
/// (`NAME_INVALID`, `DIGEST_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex characters>")]
    Digest(String),
    #[error("unsupported digest algorithm in {0:?}: only sha256 is supported")]
    DigestAlgorithm(String),
    #[error("invalid repository name {0:?}")]
    Name(String),
    #[error("invalid tag {0:?}: expected [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    Tag(String),
    #[error("invalid registry host {0:?}")]
    Registry(String),
}

/// A sha256 content digest (`sha256:<hex>`), the only algorithm registries use in practice.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn from_sha256(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex characters, as used for file names in the store.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the bare 64-character hex form (file names in the store).
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(ParseError::Digest(s.to_string()));
        };
        // OCI digest grammar: algorithm = [a-z0-9]+ ([+._-] [a-z0-9]+)*
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !algorithm_ok {
            return Err(ParseError::Digest(s.to_string()));
        }
        if algorithm != "sha256" {
            return Err(ParseError::DigestAlgorithm(s.to_string()));
        }
        Digest::from_hex(encoded).ok_or_else(|| ParseError::Digest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A repository name per the OCI distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RepoName(String);

/// Longest repository name we accept (distribution's limit).
const MAX_NAME_LEN: usize = 255;

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_name_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+.
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // A separator: ".", "_", "__" or "-+".
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

impl FromStr for RepoName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN || !s.split('/').all(valid_name_component) {
            return Err(ParseError::Name(s.to_string()));
        }
        Ok(RepoName(s.to_string()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..].iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(ParseError::Tag(s.to_string()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag (resolved at the origin) or a digest (content).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

/// A registry host as containerd names it (`docker.io`, `ghcr.io`, `127.0.0.1:5000`,
/// `[::1]:5000`): the key for upstream URLs, credentials and tokens.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Registry(String);

impl Registry {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker's rule for telling a registry host from a repository path component: it
    /// contains a `.` or a `:`, or it is `localhost`.
    pub fn looks_like_host(component: &str) -> bool {
        component.contains('.') || component.contains(':') || component == "localhost"
    }
}

impl FromStr for Registry {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && !s.starts_with(['.', '-', ':'])
            && !s.contains("..")
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
        if ok {
            Ok(Registry(s.to_ascii_lowercase()))
        } else {
            Err(ParseError::Registry(s.to_string()))
        }
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert_eq!(Digest::from_hex(&hex), Some(d));
        for bad in [
            "sha256:zz",
            "sha256:",
            "sha256",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("SHA256:{}", "a".repeat(64)),
        ] {
            assert!(matches!(bad.parse::<Digest>(), Err(ParseError::Digest(_))), "{bad}");
        }
        assert!(matches!(
            format!("sha512:{}", "a".repeat(128)).parse::<Digest>(),
            Err(ParseError::DigestAlgorithm(_))
        ));
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn names() {
        for good in ["a", "library/nginx", "a.b_c__d-e---f/g0", "x/y/z", "0"] {
            assert!(good.parse::<RepoName>().is_ok(), "{good}");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a b", "a:b", "a/../b"] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad}");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn tags_and_references() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_v1.2-rc".parse::<Tag>().is_ok());
        assert!(".x".parse::<Tag>().is_err());
        assert!("a/b".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!(matches!(
            format!("sha256:{}", "0".repeat(64)).parse::<Reference>(),
            Ok(Reference::Digest(_))
        ));
        assert!("sha256:nope".parse::<Reference>().is_err());
    }

    #[test]
    fn registries() {
        assert!("docker.io".parse::<Registry>().is_ok());
        assert!("127.0.0.1:5000".parse::<Registry>().is_ok());
        assert!("[::1]:5000".parse::<Registry>().is_ok());
        assert!("a/b".parse::<Registry>().is_err());
        assert!("..".parse::<Registry>().is_err());
        assert!(Registry::looks_like_host("localhost"));
        assert!(Registry::looks_like_host("ghcr.io"));
        assert!(!Registry::looks_like_host("library"));
    }
}
