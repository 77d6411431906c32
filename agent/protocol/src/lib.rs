//! # shoal-protocol
//!
//! What Shoal's agents and trackers agree on, with no network stack inside: the shared
//! types, the piece layout, both wire protocols (messages, their encoding, capped reads) and
//! the timing contract between agents and trackers. Both the agent and the tracker build on
//! it; libp2p plugs the codecs in (`shoal-swarm`).
//!
//! ## Layout
//!
//! - [`types`]: validated digests, repository names, tags and registry hosts.
//! - [`pieces`]: piece size policy, bitfields, rendezvous origin owners.
//! - [`piece`]: the piece protocol `/shoal/piece/1.0.0` between agents.
//! - [`tracker`]: the tracker protocol `/shoal/tracker/1.0.0` from agents to trackers.
//! - [`timing`]: the intervals and timeouts each side relies on the other to keep.
//! - [`sync`]: the one policy for a poisoned mutex (recover the guard), and UTF-8-safe
//!   clipping of texts.

pub mod piece;
pub mod pieces;
pub mod sync;
pub mod timing;
pub mod tracker;
#[cfg(test)]
mod tracker_proptests;
pub mod types;
