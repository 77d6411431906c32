//! What the download task needs from the peer-to-peer network, as a trait: who provides a
//! digest, which pieces a peer holds, and one piece from a peer. The swarm implements it
//! (`swarm::SwarmNetwork`); [`Solo`] is a node with no peers. Keeping "who might have it"
//! apart from "fetch and verify it" lets the scheduler be tested without sockets.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::pieces::Bitfield;
use crate::types::Digest;

/// A peer's stable identity (its libp2p peer id bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<[u8]>);

impl NodeId {
    pub fn new(bytes: &[u8]) -> Self {
        NodeId(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for NodeId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for NodeId {
    /// The last 6 bytes in hex: enough to tell peers apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = &self.0[self.0.len().saturating_sub(6)..];
        write!(f, "peer:{}", hex::encode(tail))
    }
}

/// What a peer says it holds of a digest.
#[derive(Clone, Debug)]
pub struct PeerHave {
    pub size: u64,
    pub piece_size: u32,
    pub have: Bitfield,
    /// Digests of pieces the peer verified, as it attests them.
    pub piece_digests: Vec<(u32, [u8; 32])>,
    pub complete: bool,
    /// Media type, for manifests.
    pub media_type: Option<String>,
}

/// Why a peer request failed. Bad data is not here: the download task detects it by
/// checking the piece against the attested digest, and bans the sender.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("the peer does not hold it")]
    Lacks,
    #[error("the peer is at its upload limit")]
    Busy,
    #[error("the peer is unreachable: {0}")]
    Unreachable(String),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
}

/// A download's report to its planner (a tracker or the digest's coordinator): what it
/// holds, what it fetched from the origin itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanReport {
    pub size: u64,
    pub piece_size: u32,
    pub have: Bitfield,
    /// sha256 of pieces this node fetched from the origin, not reported before.
    pub attest: Vec<(u32, [u8; 32])>,
    pub complete: bool,
    /// Pieces being fetched from the origin now (at most the protocol's `MAX_ASSIGNED`).
    pub fetching: Vec<u32>,
    /// A planner answered this download before.
    pub planned: bool,
}

/// The coordinator's answer: whom to fetch from, and which origin pieces are ours alone.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Best first.
    pub peers: Vec<NodeId>,
    /// Pieces this node should fetch from the origin now (all of them: the list replaces
    /// the previous one).
    pub assigned: Vec<u32>,
    /// First-hand digests (from the node that fetched the piece from the origin).
    pub piece_digests: Vec<(u32, [u8; 32])>,
    /// When the planner wants the next request, after the one this answers (zero: the
    /// default, `PLAN_POLL`; the scheduler clamps it to `PLAN_POLL..=PLAN_POLL_MAX`).
    pub next_ask: Duration,
}

pub trait Network: Send + Sync + 'static {
    fn local_id(&self) -> NodeId;
    /// Starts advertising `digest` (we download or hold it).
    fn announce(&self, digest: Digest);
    /// Stops advertising `digest` (evicted, or the download failed).
    fn withdraw(&self, digest: Digest);
    /// Peers advertising `digest`, found within the network's lookup timeout.
    fn find_providers(&self, digest: Digest) -> BoxFuture<'static, Vec<NodeId>>;
    fn have(&self, peer: NodeId, digest: Digest) -> BoxFuture<'static, Result<PeerHave, PeerError>>;
    fn piece(&self, peer: NodeId, digest: Digest, index: u32)
        -> BoxFuture<'static, Result<Bytes, PeerError>>;
    /// Whether downloads have a planner to ask (a tracker, or the digest's coordinator in the
    /// DHT): they then ask it for plans. A node without peers has none and plans alone.
    fn has_coordinator(&self) -> bool {
        false
    }
    /// Reports a download's progress to the planner of `digest` and asks what to do. `None`
    /// when no planner answered: the download schedules by itself until one does.
    fn plan(&self, _digest: Digest, _report: PlanReport) -> BoxFuture<'static, Option<Plan>> {
        Box::pin(async { None })
    }
}

/// A node without peers: every piece comes from the origin.
pub struct Solo(NodeId);

impl Default for Solo {
    fn default() -> Self {
        Solo(NodeId::new(b"solo"))
    }
}

impl Network for Solo {
    fn local_id(&self) -> NodeId {
        self.0.clone()
    }
    fn announce(&self, _: Digest) {}
    fn withdraw(&self, _: Digest) {}
    fn find_providers(&self, _: Digest) -> BoxFuture<'static, Vec<NodeId>> {
        Box::pin(async { Vec::new() })
    }
    fn have(&self, _: NodeId, _: Digest) -> BoxFuture<'static, Result<PeerHave, PeerError>> {
        Box::pin(async { Err(PeerError::Lacks) })
    }
    fn piece(&self, _: NodeId, _: Digest, _: u32) -> BoxFuture<'static, Result<Bytes, PeerError>> {
        Box::pin(async { Err(PeerError::Lacks) })
    }
}
