//! The DHT discovery model: provider records kept the way libp2p's Kademlia keeps them.
//!
//! What libp2p 0.57 (libp2p-kad 0.49) does, and what is modelled:
//!
//! - A provider record for a key is stored on the [`REPLICATION`] (K = 20) nodes closest to
//!   the key by XOR distance between sha256 hashes (kad's `Key::new` hashes both peer ids and
//!   record keys with sha256). Here: the 20 nodes whose sha256(peer id) is XOR-closest to
//!   sha256(digest), computed exactly once per key.
//! - `MemoryStore` keeps at most `max_providers_per_key` = [`MAX_PROVIDERS_PER_KEY`] (K = 20)
//!   providers per key. When the list is full a *new* provider is ignored (first come, first
//!   kept: `record/store/memory.rs`, "If the providers list is full, we ignore the new
//!   provider", an anti-Sybil choice); a provider already listed is updated in place. Records
//!   live for the provider TTL (an hour) unless withdrawn: longer than any rollout, so here they
//!   never expire, and a killed node's records stay (as they do in libp2p).
//! - An announcement (`start_providing`) first looks up the closest nodes (≈ log2 N round
//!   trips) and then sends ADD_PROVIDER to each of the 20; each store applies the rule above
//!   when the message arrives, so the arrival order decides who is kept.
//! - A lookup (`get_providers`) walks to the key (≈ log2 N round trips) and collects the
//!   providers every queried node returns: the union of the 20 closest nodes' lists (of the
//!   nodes alive), as they stand when the lookup reaches them (modelled: when it completes).
//!
//! Latency: `hops` round trips of the network RTT per lookup, `--dht-hops` (default
//! ⌈log2 N⌉, the iterative lookup's depth without kad's α = 3 parallel shortcut). Messages
//! are counted per node: a lookup or an announcement sends α·hops + K requests (the iterative
//! walk, then the K closest), and each of the K closest nodes receives one per lookup and per
//! announcement of its key: that hot spot is what the per-node DHT request rate shows.

use sha2::{Digest as _, Sha256};

/// Kademlia's K: replication factor and the default `max_providers_per_key`.
pub const REPLICATION: usize = 20;
pub const MAX_PROVIDERS_PER_KEY: usize = 20;
/// Kademlia's α: parallel requests per step of an iterative lookup.
pub const ALPHA: u64 = 3;

/// One key's records: its closest nodes and what each stores.
pub struct KeyRecords {
    /// The K closest nodes (by XOR distance of sha256 hashes), closest first.
    pub closest: Vec<u32>,
    /// `stores[k]`: providers node `closest[k]` keeps, in arrival order.
    pub stores: Vec<Vec<u32>>,
}

impl KeyRecords {
    /// `node_keys[i]` is sha256 of node i's peer id.
    pub fn new(key: &[u8; 32], node_keys: &[[u8; 32]]) -> KeyRecords {
        let target: [u8; 32] = Sha256::digest(key).into();
        let mut by_distance: Vec<([u8; 32], u32)> = node_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut d = [0u8; 32];
                for b in 0..32 {
                    d[b] = k[b] ^ target[b];
                }
                (d, i as u32)
            })
            .collect();
        let k = REPLICATION.min(by_distance.len());
        if k > 0 && k < by_distance.len() {
            by_distance.select_nth_unstable(k - 1);
        }
        by_distance.truncate(k);
        by_distance.sort_unstable();
        KeyRecords { closest: by_distance.iter().map(|(_, i)| *i).collect(), stores: vec![Vec::new(); k] }
    }

    /// An ADD_PROVIDER for `provider` arrives at store `k` (an index into `closest`).
    pub fn add(&mut self, k: usize, provider: u32) {
        let list = &mut self.stores[k];
        if list.contains(&provider) || list.len() >= MAX_PROVIDERS_PER_KEY {
            return;
        }
        list.push(provider);
    }

    /// What a lookup collects: the union of the lists of the closest nodes that are alive,
    /// sorted (a set, as the agent's lookup returns one).
    pub fn lookup(&self, alive: impl Fn(u32) -> bool) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .closest
            .iter()
            .zip(&self.stores)
            .filter(|(n, _)| alive(**n))
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// ⌈log2 n⌉, at least 1.
pub fn default_hops(n: usize) -> u32 {
    (usize::BITS - n.max(2).saturating_sub(1).leading_zeros()).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_store_ignores_new_providers() {
        let keys: Vec<[u8; 32]> = (0..100u32).map(|i| Sha256::digest(i.to_le_bytes()).into()).collect();
        let mut r = KeyRecords::new(&[7; 32], &keys);
        assert_eq!(r.closest.len(), REPLICATION);
        for p in 0..30 {
            r.add(0, p);
        }
        r.add(0, 3); // already listed: no change
        assert_eq!(r.stores[0], (0..20).collect::<Vec<_>>());
        // A lookup is the union over alive stores.
        r.add(1, 25);
        let all = r.lookup(|_| true);
        assert_eq!(all.len(), 21);
        let without_first = r.lookup(|n| n != r.closest[0]);
        assert_eq!(without_first, vec![25]);
    }

    #[test]
    fn closest_nodes_are_the_xor_closest() {
        let keys: Vec<[u8; 32]> = (0..500u32).map(|i| Sha256::digest(i.to_le_bytes()).into()).collect();
        let r = KeyRecords::new(&[1; 32], &keys);
        let target: [u8; 32] = Sha256::digest([1u8; 32]).into();
        let dist = |i: u32| -> Vec<u8> { keys[i as usize].iter().zip(&target).map(|(a, b)| a ^ b).collect() };
        let worst_kept = r.closest.iter().map(|&i| dist(i)).max().unwrap();
        for i in 0..500u32 {
            if !r.closest.contains(&i) {
                assert!(dist(i) > worst_kept);
            }
        }
        assert_eq!(default_hops(10_000), 14);
        assert_eq!(default_hops(1), 1);
        assert_eq!(default_hops(1024), 10);
    }
}
