//! Repositories that are public by the operator's word (`--public REGISTRY[/REPO-PREFIX]`).
//!
//! Why: while the origin is unreachable the agent cannot ask it whether a repository is
//! public, so it serves only what it saw public itself (see `access`). A node that joins
//! during an outage has seen nothing, and would refuse public images its peers hold. An
//! operator who knows that, say, every repository under `registry.example/base` is public says
//! so here, and during an outage those repositories are served to any client with no check.
//!
//! What it does not do: while the origin answers, it changes nothing (the origin's own
//! anonymous check still decides, and still answers 404 for objects it does not have). It
//! never makes a repository that is not named readable. It names repositories, not objects,
//! and the store and the swarm know content by digest alone: with the origin down nothing
//! says which repository a digest belongs to, so a client that knows the digest of a private
//! blob held in the swarm can read it through a named repository (the README says so). Peer
//! attestation ([`super::attest`]) names repository and object, so content served on a
//! peer's word does not have that gap; `--public` still does, as it asks no one.
//!
//! Matching is by whole path components: `registry.example/base` names `base` and
//! `base/alpine`, not `baseline`. Docker Hub's official images are `docker.io/library/<name>`.

use std::fmt;

use crate::types::{Registry, RepoName};

/// One `--public` entry: a registry, and optionally a repository prefix within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicEntry {
    registry: Registry,
    /// `None`: every repository of the registry.
    prefix: Option<RepoName>,
}

impl PublicEntry {
    fn matches(&self, registry: &Registry, repo: &RepoName) -> bool {
        if &self.registry != registry {
            return false;
        }
        let Some(prefix) = &self.prefix else { return true };
        let (prefix, repo) = (prefix.as_str(), repo.as_str());
        repo.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

impl std::str::FromStr for PublicEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().trim_end_matches('/');
        let (registry, prefix) = match s.split_once('/') {
            Some((registry, prefix)) => (registry, Some(prefix)),
            None => (s, None),
        };
        let registry = registry.parse::<Registry>().map_err(|e| e.to_string())?;
        let prefix = prefix.map(|p| p.parse::<RepoName>().map_err(|e| e.to_string())).transpose()?;
        Ok(PublicEntry { registry, prefix })
    }
}

impl fmt::Display for PublicEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.prefix {
            Some(prefix) => write!(f, "{}/{}", self.registry, prefix.as_str()),
            None => write!(f, "{}", self.registry),
        }
    }
}

/// Every `--public` entry.
#[derive(Clone, Debug, Default)]
pub struct PublicList(Vec<PublicEntry>);

impl PublicList {
    pub fn new(entries: Vec<PublicEntry>) -> Self {
        PublicList(entries)
    }

    /// Whether `repo` of `registry` is public by configuration.
    pub fn contains(&self, registry: &Registry, repo: &RepoName) -> bool {
        self.0.iter().any(|e| e.matches(registry, repo))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(specs: &[&str]) -> PublicList {
        PublicList::new(specs.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn has(list: &PublicList, registry: &str, repo: &str) -> bool {
        list.contains(&registry.parse().unwrap(), &repo.parse().unwrap())
    }

    #[test]
    fn prefixes_match_whole_components() {
        let l = list(&["registry.example/base", "127.0.0.1:5000/d/app"]);
        assert!(has(&l, "registry.example", "base"));
        assert!(has(&l, "registry.example", "base/alpine"));
        assert!(has(&l, "registry.example", "base/tools/jq"));
        assert!(!has(&l, "registry.example", "baseline"));
        assert!(!has(&l, "registry.example", "other/base"));
        assert!(!has(&l, "other.example", "base"));
        assert!(has(&l, "127.0.0.1:5000", "d/app"));
        assert!(!has(&l, "127.0.0.1:5000", "d/apple"));
        assert!(!has(&l, "127.0.0.1:5000", "d"));
    }

    #[test]
    fn a_registry_alone_names_every_repository() {
        let l = list(&["Quay.IO"]);
        assert!(has(&l, "quay.io", "a/b/c"));
        assert!(!has(&l, "ghcr.io", "a"));
        assert!(!has(&PublicList::default(), "quay.io", "a"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["", "/base", "registry.example/Base", "registry.example/a//b", "reg istry"] {
            assert!(bad.parse::<PublicEntry>().is_err(), "{bad:?} was accepted");
        }
        let e: PublicEntry = "registry.example/base/".parse().unwrap();
        assert_eq!(e.to_string(), "registry.example/base");
    }
}
