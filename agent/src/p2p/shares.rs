//! How a node splits its upload slots among the peers asking it for pieces.
//!
//! A node serves at most `max_uploads` pieces at once. Without a per-peer rule, whoever asks
//! first and most keeps every slot: a peer downloading four layers with four requests each
//! holds all eight, so a node's whole uplink feeds one receiver while the others are told
//! `Busy`. That receiver's own downlink then caps the upload, and the pieces reach one node
//! instead of several that could pass them on: measured in the simulator (10 nodes on 20 mbit
//! links, origin 200 mbit), the rollout took 2.75 × `T_min` without this rule and 1.89 × with
//! it. (`shoal-benches sim --max-uploads` and `benches/README.md` have the figures.)
//!
//! The rule: a peer that asked within the last [`WINDOW`] may hold `max_uploads / askers`
//! slots (at least one), where `askers` counts the distinct peers that asked in that window;
//! a peer alone gets every slot, so one fast peer can still fill a fat link.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How far back "a peer is asking" looks.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Askers remembered at most; beyond this, all are forgotten at once. Far above the
/// peers one node serves at once (each download polls at most 32), it bounds what a flood of
/// identities can make a node keep.
pub const MAX_ASKERS: usize = 4096;

/// Upload slots held and recent askers, per peer.
#[derive(Debug)]
pub struct Shares<K> {
    slots: usize,
    asked: HashMap<K, Instant>,
    held: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> Shares<K> {
    pub fn new(slots: usize) -> Self {
        Shares { slots: slots.max(1), asked: HashMap::new(), held: HashMap::new() }
    }

    /// `who` asks for a piece at `now`: takes a slot for it if it may have one (release it
    /// with [`Shares::release`]), else `false` (answer `Busy`).
    pub fn try_take(&mut self, who: &K, now: Instant) -> bool {
        self.asked.insert(who.clone(), now);
        if self.asked.len() > 64 {
            self.asked.retain(|_, t| now.saturating_duration_since(*t) <= WINDOW);
            if self.asked.len() > MAX_ASKERS {
                // A flood of distinct peers within the window: forget them all (the shares
                // are then computed as if fewer asked, until the window refills).
                self.asked.clear();
                self.asked.insert(who.clone(), now);
            }
        }
        let total: usize = self.held.values().sum();
        if total >= self.slots {
            return false;
        }
        let askers = self.asked.values().filter(|t| now.saturating_duration_since(**t) <= WINDOW).count();
        let share = (self.slots / askers.max(1)).max(1);
        let mine = self.held.entry(who.clone()).or_insert(0);
        if *mine >= share {
            if *mine == 0 {
                self.held.remove(who);
            }
            return false;
        }
        *mine += 1;
        true
    }

    /// An upload for `who` ended.
    pub fn release(&mut self, who: &K) {
        if let Some(n) = self.held.get_mut(who) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(who);
            }
        }
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        self.held.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_alone_gets_every_slot() {
        let t = Instant::now();
        let mut s = Shares::new(8);
        assert!((0..8).all(|_| s.try_take(&1, t)));
        assert!(!s.try_take(&1, t), "all eight are taken");
        s.release(&1);
        assert!(s.try_take(&1, t));
    }

    #[test]
    fn slots_are_split_among_the_peers_asking() {
        let t = Instant::now();
        let mut s = Shares::new(8);
        // Four peers ask: two slots each.
        for p in 1..=4 {
            assert!(s.try_take(&p, t), "peer {p} gets one");
        }
        for p in 1..=4 {
            assert!(s.try_take(&p, t), "peer {p} gets a second");
            assert!(!s.try_take(&p, t), "but not a third");
        }
        assert_eq!(s.in_use(), 8);
        // With 16 askers each may hold one; a peer holding none still gets one when a slot
        // frees.
        for p in 5..=16 {
            assert!(!s.try_take(&p, t), "all slots are in use");
        }
        s.release(&1);
        assert!(s.try_take(&5, t));
        assert!(!s.try_take(&1, t), "peer 1 holds its one");
    }

    #[test]
    fn askers_that_went_quiet_stop_counting() {
        let t = Instant::now();
        let mut s = Shares::new(8);
        for p in 1..=8 {
            assert!(s.try_take(&p, t));
            s.release(&p);
        }
        // Two seconds later only peer 1 asks: it may hold all eight again.
        let later = t + Duration::from_secs(2);
        assert!((0..8).all(|_| s.try_take(&1, later)));
    }

    #[test]
    fn a_flood_of_identities_is_bounded() {
        let t = Instant::now();
        let mut s = Shares::new(8);
        for p in 0..(MAX_ASKERS as u32 + 500) {
            s.try_take(&p, t + Duration::from_micros(u64::from(p)));
        }
        assert!(s.asked.len() <= MAX_ASKERS);
        assert!(s.in_use() <= 8);
    }
}
