//! Preheat requests: parsing an image reference and resolving it to one manifest digest at
//! the origin.
//!
//! The tracker resolves the tag itself, once, so every node preheats the same manifest even
//! if the tag moves during the rollout. Nodes then fetch that manifest (an index or a single
//! manifest) by digest and the blobs of the platforms they run; that part is the agent's.

use shoal_origin::{Kind, Origin, OriginError, MANIFEST_MEDIA_TYPES};
use shoal_protocol::types::{Digest, Registry, RepoName, Tag};

/// An image reference: `[registry/]repository(:tag|@sha256:…)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: Registry,
    pub repository: RepoName,
    pub reference: RefKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefKind {
    Tag(Tag),
    Digest(Digest),
}

/// Why a preheat could not start; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid image reference {input:?}: {reason}")]
    Reference { input: String, reason: String },
    #[error("image {image} not found at the origin: {detail}")]
    NotFound { image: String, detail: String },
    #[error("the origin refused access to {image}: {detail}")]
    Denied { image: String, detail: String },
    #[error("the origin of {image} is unreachable: {detail}")]
    Unreachable { image: String, detail: String },
    #[error("the origin answered unexpectedly for {image}: {detail}")]
    Origin { image: String, detail: String },
}

impl ImageRef {
    /// Parses a reference the way `docker pull` reads one: a first component that looks like a
    /// host (has a `.` or `:`, or is `localhost`) is the registry, else `default_registry`;
    /// Docker Hub's single-component names live under `library/`; no tag means `latest`.
    pub fn parse(input: &str, default_registry: &Registry) -> Result<ImageRef, ResolveError> {
        let bad = |reason: String| ResolveError::Reference { input: input.to_string(), reason };
        let input = input.trim();
        if input.is_empty() {
            return Err(bad("empty".to_string()));
        }
        let (name, reference) = match input.split_once('@') {
            Some((name, digest)) => {
                let digest: Digest = digest.parse().map_err(|e| bad(format!("{e}")))?;
                (name, RefKind::Digest(digest))
            }
            None => {
                // A ':' after the last '/' separates the tag (one before it is a port).
                let last_slash = input.rfind('/').map_or(0, |i| i + 1);
                match input[last_slash..].rsplit_once(':') {
                    Some((_, tag)) => {
                        let name = &input[..input.len() - tag.len() - 1];
                        (name, RefKind::Tag(tag.parse().map_err(|e| bad(format!("{e}")))?))
                    }
                    None => (input, RefKind::Tag("latest".parse().expect("a valid tag"))),
                }
            }
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if Registry::looks_like_host(first) => {
                (first.parse::<Registry>().map_err(|e| bad(format!("{e}")))?, rest)
            }
            _ => (default_registry.clone(), name),
        };
        let mut repository: RepoName = repository.parse().map_err(|e| bad(format!("{e}")))?;
        if registry.as_str() == "docker.io" && !repository.as_str().contains('/') {
            repository = format!("library/{repository}").parse().map_err(|e| bad(format!("{e}")))?;
        }
        Ok(ImageRef { registry, repository, reference })
    }

    /// Resolves the reference to a manifest digest at the origin (a HEAD, which registries do
    /// not count against pull limits).
    pub async fn resolve(&self, origin: &Origin) -> Result<Digest, ResolveError> {
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        let result = match &self.reference {
            RefKind::Tag(tag) => origin
                .resolve_tag(&self.registry, &self.repository, tag, &accept)
                .await
                .map(|(resolved, _)| resolved.digest),
            RefKind::Digest(digest) => origin
                .content_info(&self.registry, &self.repository, Kind::Manifest, digest, &accept)
                .await
                .map(|_| *digest),
        };
        let image = self.to_string();
        result.map_err(|e| match e {
            OriginError::NotFound(detail) => ResolveError::NotFound { image, detail },
            OriginError::Denied(detail) => ResolveError::Denied { image, detail },
            OriginError::Unreachable(detail) => ResolveError::Unreachable { image, detail },
            OriginError::Protocol(detail) => ResolveError::Origin { image, detail },
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            RefKind::Tag(tag) => write!(f, "{}/{}:{tag}", self.registry, self.repository),
            RefKind::Digest(digest) => write!(f, "{}/{}@{digest}", self.registry, self.repository),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, String> {
        let default: Registry = "docker.io".parse().unwrap();
        ImageRef::parse(s, &default).map(|r| r.to_string()).map_err(|e| e.to_string())
    }

    #[test]
    fn references() {
        let hex = "a".repeat(64);
        assert_eq!(parse("nginx").unwrap(), "docker.io/library/nginx:latest");
        assert_eq!(parse("nginx:1.25").unwrap(), "docker.io/library/nginx:1.25");
        assert_eq!(parse("bitnami/redis:7").unwrap(), "docker.io/bitnami/redis:7");
        assert_eq!(parse("127.0.0.1:5555/team/app:v1").unwrap(), "127.0.0.1:5555/team/app:v1");
        assert_eq!(parse("127.0.0.1:5555/app").unwrap(), "127.0.0.1:5555/app:latest");
        assert_eq!(parse("localhost/app:x").unwrap(), "localhost/app:x");
        assert_eq!(
            parse(&format!("ghcr.io/o/app@sha256:{hex}")).unwrap(),
            format!("ghcr.io/o/app@sha256:{hex}")
        );
    }

    #[test]
    fn bad_references() {
        for bad in ["", "Upper/case:1", "app:bad tag", "app@sha256:zz", "a//b:1", "app:", "/app", "app:-x"] {
            let e = parse(bad).unwrap_err();
            assert!(e.starts_with("invalid image reference"), "{bad}: {e}");
        }
    }
}
