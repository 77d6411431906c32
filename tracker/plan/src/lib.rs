//! # shoal-plan
//!
//! The one planner of Shoal: who fetches which piece from the origin, and which peers each
//! downloader should ask. It is pure ([`State`] takes `now` with every call, reads no clock,
//! opens no socket), so the same code answers plan requests in three places:
//!
//! - the tracker (`shoal-tracker`), for every digest, when a cluster runs one;
//! - an agent, for the digests it *coordinates* when there is no tracker: each digest's
//!   coordinator is the agent whose peer id is XOR-closest to the digest's DHT key
//!   (`shoal_agent::p2p::coordinator`);
//! - the simulator (`shoal-benches sim`), in virtual time.
//!
//! ## Layout
//!
//! - [`state`]: the state and its decisions (assignments, peer ranking, reassignment,
//!   preheat bookkeeping and the views the tracker's dashboard shows), with timeline tests.

pub mod state;

pub use state::State;
