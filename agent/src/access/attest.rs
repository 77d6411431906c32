//! Swarm attestation of public objects and tags, for an origin outage.
//!
//! Why: while the origin is unreachable a node cannot ask it whether a repository is public,
//! so on its own it serves only what its own anonymous check found public (see `access`). A
//! node that joins during the outage has checked nothing, and would refuse public images its
//! peers hold. What is public is known in the swarm, though: each node remembers, per
//! registry, repository and object (digest or tag), when its own anonymous check at the origin
//! last found it public (the anonymous decisions `access` keeps anyway), and for such tags the
//! last digest the origin resolved them to. A peer asks for exactly that
//! (`PieceRequest::PublicSeen` / `TagSeen`) and gets the age of the observation, or "not
//! seen".
//!
//! What a node does with the answers (`Access::attested`): while the origin is unreachable,
//! and only if the operator trusts attestations (`--public-attestations`: by default only with
//! `--swarm-key`, whose peers are members), an object that some peer saw public in the same
//! repository within `--public-attestation-window` is served to any client, marked
//! `X-Shoal-Public: attested`, and a tag is answered with the newest mapping seen within the
//! window, marked stale. An attestation names the repository and the object, so a digest
//! attested public in one repository opens nothing in another. Private content keeps its
//! rule: a repository this node itself saw refuse anonymous access stays refused whatever
//! peers say, and credentials are never part of an attestation.
//!
//! Not trusted further than this: what a node attests is its own observation only; what it
//! served on a peer's word it never attests in turn (grants made while the origin is
//! unreachable are not remembered as checks), so an attestation cannot be laundered into a
//! fresher one. The bytes themselves are verified by digest as always; an attestation only
//! decides who may read them.

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::origin::Resolved;
use crate::types::{Digest, Registry, RepoName, Tag};

/// What this node itself saw public at the origin, to answer peers with.
pub trait Attest: Send + Sync {
    /// How long ago this node's own anonymous check found `digest` of `repo` public.
    fn public_seen(&self, registry: &Registry, repo: &RepoName, digest: &Digest) -> Option<Duration>;
    /// The last mapping of `tag` the origin gave this node, with its age, for a tag this node's
    /// own anonymous check found public.
    fn tag_seen(&self, registry: &Registry, repo: &RepoName, tag: &Tag) -> Option<(Resolved, Duration)>;
}

/// Peers of the swarm, asked what they saw (the swarm's implementation is in `p2p`).
pub trait Attestors: Send + Sync {
    /// The ages of the peers' observations of `digest` of `repo` public (one per peer that saw
    /// it; none when nobody did or nobody answered).
    fn public_seen(
        &self,
        registry: &Registry,
        repo: &RepoName,
        digest: &Digest,
    ) -> BoxFuture<'static, Vec<Duration>>;
    /// The peers' last mappings of `tag` (of a tag they saw public), with their ages.
    fn tag_seen(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &Tag,
    ) -> BoxFuture<'static, Vec<(Resolved, Duration)>>;
}

/// The newest observation within `window`, and how long it stays within it.
pub fn newest_within<T>(seen: Vec<(T, Duration)>, window: Duration) -> Option<(T, Duration)> {
    seen.into_iter()
        .filter(|(_, age)| *age <= window)
        .min_by_key(|(_, age)| *age)
        .map(|(what, age)| (what, window.saturating_sub(age)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_observation_within_the_window_wins() {
        let s = Duration::from_secs;
        let seen = vec![("old", s(50)), ("new", s(5)), ("mid", s(20))];
        assert_eq!(newest_within(seen.clone(), s(30)), Some(("new", s(25))));
        assert_eq!(newest_within(vec![("old", s(50))], s(30)), None);
        assert_eq!(newest_within(seen, Duration::MAX).map(|(w, _)| w), Some("new"));
        assert_eq!(newest_within(Vec::<((), Duration)>::new(), s(30)), None);
    }
}
