//! Herd control without a tracker: which nodes fetch a digest's pieces from the origin, when
//! no node sees every downloader.
//!
//! ## The problem
//!
//! Rendezvous ownership ([`crate::pieces::origin_owner`]) gives each piece one owner, but only
//! among the nodes a node knows. A node that sees a subset `S` of the `N` downloaders believes
//! it owns piece `k` whenever its own weight beats everyone in `S`; with `|S| = s` that happens
//! to about `N / (s + 1)` nodes per piece. And `s` is bounded: libp2p-kad's `MemoryStore`
//! (libp2p-kad 0.49, the one libp2p 0.57 uses, `record/store/memory.rs`, `add_provider`) keeps
//! at most `max_providers_per_key` (20) providers per key, *the first 20 it heard of*: a record
//! of a known provider is refreshed in place, a new one is dropped silently once the list is
//! full (a Sybil defence), until records expire (our TTL: one hour). `get_providers` returns
//! the local store's providers, then the union of what each contacted store returns (each at
//! most 20, minus the asker itself), as the query walks towards the key; ours collects until
//! the query ends or its lookup timeout. So at 10,000 nodes a node sees 20 to a few hundred
//! downloaders, which ones depends on arrival order at each store, and every node has a
//! different `S`: tens to hundreds of origin fetches per piece.
//!
//! ## The design: a small origin group every node can see whole
//!
//! Origin ownership is restricted to a *group* of nodes that every node can find in full, and
//! the group stays small at any `N`, so no provider list overflows:
//!
//! - Each node has a *level* for each digest: the leading zero bits of
//!   `sha256("shoal-herd" ‖ digest ‖ node id)`, capped at [`MAX_LEVEL`]. About `N / 2^(l+1)`
//!   downloaders have level `l`, whatever `N` is, and no node chooses its own.
//! - A node of level `l >= MIN_LEVEL` announces itself under the level key
//!   [`level_key`]`(digest, l)` (a provider record like any other) when its download starts,
//!   and withdraws it when the download ends. Level-0 nodes (half of them) announce nothing
//!   extra.
//! - Every node looks up all level keys (one `get_providers` each, in parallel) and takes, from
//!   the top level down, levels until they hold at least [`GROUP_MIN`] nodes ([`group`]). The
//!   levels above the cut hold fewer than `GROUP_MIN` nodes in total and the cut level about as
//!   many again, so every list read is far below the 20 a store keeps: every node reads the
//!   same lists whole and computes the same group (about 8 to 16 nodes at any `N`).
//! - Pieces nobody holds are owned by rendezvous over the group; non-members never fetch from
//!   the origin on their own and take pieces from peers. When the levels hold fewer than
//!   [`GROUP_MIN`] nodes in total the swarm is small (about 16 nodes or fewer): [`group`] says
//!   `None` and ownership is over every known downloader, as before, which at that size is
//!   everyone.
//!
//! ## Completion
//!
//! A group member that stalls or dies is taken over as before (see the scheduler's module
//! docs): group members first, after `owner_stall`; a non-member only when no peer it knows
//! made progress for [`takeover_delay`] (2 to 5 times `owner_stall`, spread by a hash of the
//! node and piece so the herd does not take over at once), or after four times that in any
//! case. A blob therefore always completes, at worst from the origin.
//!
//! ## What it costs
//!
//! One extra provider record for half the downloaders, and `MAX_LEVEL - MIN_LEVEL + 1` lookups
//! per download at its start and every [`FETCHERS_POLL`](super::scheduler::FETCHERS_POLL).
//! Disagreement is possible only while announcements propagate (a member not yet visible to
//! some node: that piece is fetched by two members) or when a level list overflows, which
//! needs a level far above its expected size.

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::net::NodeId;
use crate::types::Digest;

/// Lowest level that announces a level key (level 0 is half of all nodes).
pub const MIN_LEVEL: u8 = 1;
/// Highest level; nodes with more leading zero bits count as this level. With 14, a group
/// forms from the top levels alone up to about 130,000 downloaders.
pub const MAX_LEVEL: u8 = 14;
/// Nodes the origin group should hold at least.
pub const GROUP_MIN: usize = 8;

fn level_hash(digest: &Digest, node: &NodeId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"shoal-herd");
    h.update(digest.as_bytes());
    h.update(node.as_bytes());
    h.finalize().into()
}

/// The level of `node` for `digest` (see the module docs).
pub fn level(digest: &Digest, node: &NodeId) -> u8 {
    let h = level_hash(digest, node);
    let mut zeros = 0u32;
    for b in h {
        zeros += b.leading_zeros();
        if b != 0 {
            break;
        }
    }
    zeros.min(u32::from(MAX_LEVEL)) as u8
}

/// The DHT key under which the nodes of `level` announce themselves for `digest`.
pub fn level_key(digest: &Digest, level: u8) -> Digest {
    let mut h = Sha256::new();
    h.update(b"shoal-herd-level");
    h.update(digest.as_bytes());
    h.update([level]);
    Digest::from_sha256(h.finalize().into())
}

/// The levels that announce and are looked up.
pub fn levels() -> std::ops::RangeInclusive<u8> {
    MIN_LEVEL..=MAX_LEVEL
}

/// The origin group of `digest`, from the providers found under each level key (`found`:
/// `(level, providers)`, in any order; `me` counts at its own level whether or not the lookup
/// found it). `None`: the swarm is small, every downloader owns a share. The group is sorted.
pub fn group(digest: &Digest, me: &NodeId, found: &[(u8, Vec<NodeId>)]) -> Option<Vec<NodeId>> {
    let mine = level(digest, me);
    let mut by_level: Vec<Vec<NodeId>> = vec![Vec::new(); usize::from(MAX_LEVEL) + 1];
    for (l, nodes) in found {
        if let Some(slot) = by_level.get_mut(usize::from(*l)) {
            // A node is a member only at its own level: a record under another key is ignored.
            slot.extend(nodes.iter().filter(|n| level(digest, n) == *l).cloned());
        }
    }
    if mine >= MIN_LEVEL {
        by_level[usize::from(mine)].push(me.clone());
    }
    let mut members: Vec<NodeId> = Vec::new();
    for l in levels().rev() {
        members.append(&mut by_level[usize::from(l)]);
        members.sort_unstable();
        members.dedup();
        if members.len() >= GROUP_MIN {
            return Some(members);
        }
    }
    None
}

/// How long a piece nobody holds must have blocked a node's stream before that node takes it
/// from the origin although another node owns it. Group members (and every node of a small
/// swarm) wait `stall`; others between 2 and 5 times `stall`, spread per node and piece.
pub fn takeover_delay(digest: &Digest, index: u32, me: &NodeId, stall: Duration, member: bool) -> Duration {
    if member {
        return stall;
    }
    let mut h = Sha256::new();
    h.update(b"shoal-takeover");
    h.update(digest.as_bytes());
    h.update(index.to_le_bytes());
    h.update(me.as_bytes());
    let r: [u8; 32] = h.finalize().into();
    let frac = u64::from(u16::from_le_bytes([r[0], r[1]])) * 3000 / 65536;
    stall * 2 + stall.mul_f64(frac as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u32) -> NodeId {
        NodeId::new(&i.to_le_bytes())
    }

    /// Every node computes the same group when each sees only the level lists (never more
    /// than 20 entries each), whatever N is; the group stays between GROUP_MIN and a small
    /// bound; small swarms get `None`.
    #[test]
    fn every_node_agrees_on_a_small_group() {
        let d = Digest::of(b"layer");
        for n in [3u32, 16, 100, 1_000, 10_000, 50_000] {
            let nodes: Vec<NodeId> = (0..n).map(node).collect();
            let mut lists: Vec<(u8, Vec<NodeId>)> = levels().map(|l| (l, Vec::new())).collect();
            for x in &nodes {
                let l = level(&d, x);
                if l >= MIN_LEVEL {
                    lists[usize::from(l - MIN_LEVEL)].1.push(x.clone());
                }
            }
            let first = group(&d, &nodes[0], &lists);
            for x in nodes.iter().step_by((n as usize / 50).max(1)) {
                // What a node reads: lists capped at 20, as a provider store keeps.
                let seen: Vec<(u8, Vec<NodeId>)> = lists
                    .iter()
                    .map(|(l, v)| (*l, v.iter().filter(|y| *y != x).take(20).cloned().collect()))
                    .collect();
                assert_eq!(group(&d, x, &seen), first, "n = {n}");
            }
            match first {
                None => assert!(n <= 40, "n = {n}: no group"),
                Some(g) => {
                    assert!(g.len() >= GROUP_MIN && g.len() <= 40, "n = {n}: group of {}", g.len());
                    assert!(lists.iter().all(|(l, v)| v.len() < 20 || g.iter().all(|m| level(&d, m) > *l)));
                }
            }
        }
    }

    #[test]
    fn takeover_delays_are_spread() {
        let d = Digest::of(b"x");
        let stall = Duration::from_secs(30);
        assert_eq!(takeover_delay(&d, 0, &node(1), stall, true), stall);
        let delays: Vec<Duration> = (0..100).map(|i| takeover_delay(&d, 0, &node(i), stall, false)).collect();
        assert!(delays.iter().all(|t| *t >= stall * 2 && *t < stall * 5));
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*max - *min > stall * 2, "spread over most of the range");
    }
}
