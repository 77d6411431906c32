//! The tracker protocol, `/shoal/tracker/1.0.0`: what agents tell a tracker and what it
//! answers. Agents only ask (outbound); a tracker only answers (inbound).
//!
//! ## Shape
//!
//! - [`TrackerRequest::Heartbeat`], every couple of seconds to every tracker: the node's zone,
//!   its counters, changes to the set of digests it holds complete (the whole set, in chunks,
//!   when the tracker asks for a resync: a tracker keeps soft state only), the digests it is
//!   downloading, and the progress of preheat jobs. The answer may ask for a resync and
//!   carries the preheat jobs this node should run.
//! - [`TrackerRequest::Plan`], every half second to three seconds per download (the answer
//!   says when), to the one tracker that
//!   owns the digest (rendezvous hashing over the trackers): which pieces this node holds,
//!   the digests of pieces it fetched from the origin itself (first-hand), whether it is
//!   complete. The answer names the best peers to fetch from, the pieces this node alone
//!   should fetch from the origin now, first-hand digests of pieces it still lacks, and when
//!   to ask again.
//!
//! Agents answer [`TrackerRequest::Plan`] too, under [`COORDINATOR_PROTOCOL`], for the digests
//! they coordinate when the cluster has no tracker (the DHT picks the coordinator: the agent
//! XOR-closest to the digest's key). The planner behind both is the same (`shoal-plan`).
//!
//! ## Limits
//!
//! Same encoding as the piece protocol (bincode standard, whole-stream messages, capped
//! reads, no trailing bytes). Requests and responses are at most [`MAX_TRACKER_MESSAGE_BYTES`];
//! lists are bounded by the constants below and checked by `validate` on both sides, so a
//! tracker never has to trust a count an agent sent.

use serde::{Deserialize, Serialize};

use crate::piece::{decode_capped, encode_capped, ProtocolError};
use crate::types::Digest;

/// The protocol name negotiated on each stream.
pub const TRACKER_PROTOCOL: &str = "/shoal/tracker/1.0.0";
/// The same messages between agents: a downloader's plan requests to the agent that
/// coordinates the digest when no tracker does (only [`TrackerRequest::Plan`] is answered).
/// A name of its own, so identify tells trackers (which answer [`TRACKER_PROTOCOL`]) from
/// agents (which answer this one).
pub const COORDINATOR_PROTOCOL: &str = "/shoal/plan/1.0.0";
/// Largest encoded tracker request or response.
pub const MAX_TRACKER_MESSAGE_BYTES: usize = 256 << 10;
/// Digests in one heartbeat's added or removed list; a larger change goes in several beats.
pub const MAX_HELD_PER_HEARTBEAT: usize = 2048;
/// Digests a node reports as downloading at once.
pub const MAX_DOWNLOADING: usize = 512;
/// Preheat jobs in one heartbeat or one answer.
pub const MAX_PREHEAT_JOBS: usize = 64;
/// Peers in one plan.
pub const MAX_PLAN_PEERS: usize = 32;
/// Addresses per peer in a plan.
pub const MAX_PEER_ADDRS: usize = 8;
/// Origin pieces assigned in one plan.
pub const MAX_ASSIGNED: usize = 256;
/// Piece digests in one plan request (attested) or answer (known).
pub const MAX_PLAN_DIGESTS: usize = 2048;
/// Pieces of one blob the protocol can describe: the piece policy allows at most 2048.
pub const MAX_PIECES: u64 = 1 << 16;
/// Longest zone name, registry host, repository name or error text.
pub const MAX_TEXT_BYTES: usize = 255;

/// What an agent asks a tracker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrackerRequest {
    Heartbeat(Heartbeat),
    Plan(PlanRequest),
}

/// A node's periodic report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Topology zone (`--zone`), e.g. a Kubernetes zone label.
    pub zone: Option<String>,
    /// `held_added` is this node's whole set of complete digests (or the first chunk of it):
    /// the tracker forgets what it knew of the node's holdings first.
    pub full: bool,
    pub held_added: Vec<[u8; 32]>,
    pub held_removed: Vec<[u8; 32]>,
    /// Digests being downloaded now (the whole list every time).
    pub downloading: Vec<[u8; 32]>,
    pub counters: NodeCounters,
    pub preheat: Vec<PreheatProgress>,
}

/// Cumulative counters of a node since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    /// Content bytes received from the origin.
    pub origin_bytes: u64,
    /// Content bytes received from peers.
    pub peer_bytes: u64,
    /// Piece bytes sent to peers.
    pub sent_bytes: u64,
    /// Bytes in the node's cache.
    pub cache_bytes: u64,
}

/// How far a node got with a preheat job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatProgress {
    pub id: u64,
    pub blobs_done: u32,
    pub blobs_total: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub state: PreheatState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreheatState {
    Running,
    Done,
    Failed(String),
}

/// A job for a node: fetch this manifest (by digest) and the blobs of the platform it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatJob {
    pub id: u64,
    /// Registry host as agents name it, e.g. `docker.io` or `127.0.0.1:5555`.
    pub registry: String,
    pub repository: String,
    pub manifest: [u8; 32],
}

/// A download's report and its question: what should I do next?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRequest {
    pub digest: [u8; 32],
    pub size: u64,
    pub piece_size: u32,
    /// Verified pieces, one bit per piece (LSB first).
    #[serde(with = "serde_bytes")]
    pub have: Vec<u8>,
    /// sha256 of pieces this node fetched from the origin itself, not reported before.
    pub attest: Vec<(u32, [u8; 32])>,
    /// The whole blob matched its digest.
    pub complete: bool,
    /// Pieces this node is fetching from the origin right now (a planner assigned them):
    /// a planner that has just taken over the digest (a restarted tracker, the next
    /// coordinator) learns them as this node's assignments, so it gives them to nobody else.
    pub fetching: Vec<u32>,
    /// This download followed a plan before (from this planner or another). A planner whose
    /// first request for a digest says so is taking the digest over, even when the
    /// requester itself holds and fetches nothing yet: others may be fetching what a
    /// previous planner assigned them.
    pub planned: bool,
}

/// What a tracker answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrackerResponse {
    Heartbeat {
        /// The tracker does not know this node (it restarted): send the full held set.
        resync: bool,
        /// Preheat jobs for this node that it has not reported done.
        preheat: Vec<PreheatJob>,
    },
    Plan(Plan),
    /// The request was understood but refused (e.g. a size that disagrees with what the
    /// tracker knows). A malformed request never gets here: its stream is reset.
    Refused(String),
}

/// The tracker's answer to a [`PlanRequest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Best first: same zone, most pieces the requester lacks, least loaded.
    pub peers: Vec<PlanPeer>,
    /// Pieces this node (and nobody else) should fetch from the origin now.
    pub assigned: Vec<u32>,
    /// First-hand digests of pieces the requester lacks.
    pub piece_digests: Vec<(u32, [u8; 32])>,
    /// When to ask again, in milliseconds after the request: the planner paces downloaders
    /// it has no origin work for, so that its own plan load stays bounded however many
    /// download the digest. 0 means [`crate::timing::PLAN_POLL`]; an agent clamps any value to
    /// [`crate::timing::PLAN_POLL`]..=[`crate::timing::PLAN_POLL_MAX`].
    pub next_ask_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPeer {
    /// libp2p peer id bytes.
    #[serde(with = "serde_bytes")]
    pub peer_id: Vec<u8>,
    /// Multiaddr bytes the tracker saw the peer listen on.
    pub addrs: Vec<serde_bytes::ByteBuf>,
}

impl PlanRequest {
    pub fn digest(&self) -> Digest {
        Digest::from_sha256(self.digest)
    }

    /// Number of pieces the request describes.
    pub fn pieces(&self) -> u64 {
        crate::piece::HaveInfo::piece_count(self.size, self.piece_size)
    }
}

fn invalid(what: String) -> Result<(), ProtocolError> {
    Err(ProtocolError::Invalid(what))
}

fn check_text(what: &str, text: &str) -> Result<(), ProtocolError> {
    if text.len() > MAX_TEXT_BYTES {
        return invalid(format!("{what} longer than {MAX_TEXT_BYTES} bytes"));
    }
    Ok(())
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), ProtocolError> {
    if len > max {
        return invalid(format!("{len} {what}, at most {max} allowed"));
    }
    Ok(())
}

impl TrackerRequest {
    /// Checks what the type cannot: list lengths, text lengths, piece geometry.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            TrackerRequest::Heartbeat(beat) => {
                if let Some(zone) = &beat.zone {
                    check_text("zone", zone)?;
                }
                check_len("added digests", beat.held_added.len(), MAX_HELD_PER_HEARTBEAT)?;
                check_len("removed digests", beat.held_removed.len(), MAX_HELD_PER_HEARTBEAT)?;
                check_len("downloads", beat.downloading.len(), MAX_DOWNLOADING)?;
                check_len("preheat reports", beat.preheat.len(), MAX_PREHEAT_JOBS)?;
                for p in &beat.preheat {
                    if let PreheatState::Failed(why) = &p.state {
                        check_text("preheat error", why)?;
                    }
                    if p.blobs_done > p.blobs_total {
                        return invalid(format!(
                            "preheat {}: {} of {} blobs",
                            p.id, p.blobs_done, p.blobs_total
                        ));
                    }
                }
                Ok(())
            }
            TrackerRequest::Plan(plan) => {
                let max_piece = crate::piece::MAX_PIECE_BYTES as u32;
                if plan.piece_size == 0 || plan.piece_size > max_piece {
                    return invalid(format!("piece size {} outside 1..={max_piece}", plan.piece_size));
                }
                let pieces = plan.pieces();
                if pieces > MAX_PIECES {
                    return invalid(format!("{pieces} pieces, at most {MAX_PIECES}"));
                }
                if plan.have.len() as u64 != pieces.div_ceil(8) {
                    return invalid(format!("bitfield of {} bytes for {pieces} pieces", plan.have.len()));
                }
                let spare = (8 - pieces % 8) % 8;
                if spare > 0 && plan.have.last().is_some_and(|b| b >> (8 - spare) != 0) {
                    return invalid("bits set past the last piece".to_string());
                }
                check_len("attested digests", plan.attest.len(), MAX_PLAN_DIGESTS)?;
                if let Some((i, _)) = plan.attest.iter().find(|(i, _)| u64::from(*i) >= pieces) {
                    return invalid(format!("digest for piece {i} of {pieces}"));
                }
                check_len("pieces being fetched", plan.fetching.len(), MAX_ASSIGNED)?;
                if let Some(i) = plan.fetching.iter().find(|i| u64::from(**i) >= pieces) {
                    return invalid(format!("fetching piece {i} of {pieces}"));
                }
                let held: u64 = plan.have.iter().map(|b| u64::from(b.count_ones())).sum();
                if plan.complete && held != pieces {
                    return invalid("complete, but not every piece is in the bitfield".to_string());
                }
                Ok(())
            }
        }
    }
}

impl TrackerResponse {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            TrackerResponse::Heartbeat { preheat, .. } => {
                check_len("preheat jobs", preheat.len(), MAX_PREHEAT_JOBS)?;
                for job in preheat {
                    check_text("registry", &job.registry)?;
                    check_text("repository", &job.repository)?;
                }
                Ok(())
            }
            TrackerResponse::Plan(plan) => {
                check_len("peers", plan.peers.len(), MAX_PLAN_PEERS)?;
                for peer in &plan.peers {
                    check_len("peer addresses", peer.addrs.len(), MAX_PEER_ADDRS)?;
                    check_len("peer id bytes", peer.peer_id.len(), 128)?;
                }
                check_len("assigned pieces", plan.assigned.len(), MAX_ASSIGNED)?;
                check_len("piece digests", plan.piece_digests.len(), MAX_PLAN_DIGESTS)
            }
            TrackerResponse::Refused(why) => check_text("refusal", why),
        }
    }
}

pub fn encode_tracker_request(request: &TrackerRequest) -> Result<Vec<u8>, ProtocolError> {
    request.validate()?;
    encode_capped(request, MAX_TRACKER_MESSAGE_BYTES)
}

pub fn decode_tracker_request(bytes: &[u8]) -> Result<TrackerRequest, ProtocolError> {
    let request: TrackerRequest = decode_capped(bytes, MAX_TRACKER_MESSAGE_BYTES)?;
    request.validate()?;
    Ok(request)
}

pub fn encode_tracker_response(response: &TrackerResponse) -> Result<Vec<u8>, ProtocolError> {
    response.validate()?;
    encode_capped(response, MAX_TRACKER_MESSAGE_BYTES)
}

pub fn decode_tracker_response(bytes: &[u8]) -> Result<TrackerResponse, ProtocolError> {
    let response: TrackerResponse = decode_capped(bytes, MAX_TRACKER_MESSAGE_BYTES)?;
    response.validate()?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_request() -> PlanRequest {
        PlanRequest {
            digest: [7; 32],
            size: 3 << 20,
            piece_size: 1 << 20,
            have: vec![0b101],
            attest: vec![(0, [1; 32])],
            complete: false,
            fetching: vec![2],
            planned: true,
        }
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            TrackerRequest::Plan(plan_request()),
            TrackerRequest::Heartbeat(Heartbeat {
                zone: Some("eu-1a".into()),
                full: true,
                held_added: vec![[3; 32]],
                preheat: vec![PreheatProgress {
                    id: 4,
                    blobs_done: 1,
                    blobs_total: 2,
                    bytes_done: 10,
                    bytes_total: 20,
                    state: PreheatState::Failed("manifest unknown".into()),
                }],
                ..Heartbeat::default()
            }),
        ];
        for request in requests {
            let bytes = encode_tracker_request(&request).unwrap();
            assert_eq!(decode_tracker_request(&bytes).unwrap(), request);
        }
    }

    #[test]
    fn inconsistent_plans_are_rejected() {
        let mut bad = plan_request();
        bad.have = vec![0b1000]; // bit past the third piece
        assert!(decode_tracker_request(&encode_capped(&TrackerRequest::Plan(bad), 1 << 20).unwrap()).is_err());
        let mut bad = plan_request();
        bad.attest = vec![(3, [0; 32])];
        assert!(encode_tracker_request(&TrackerRequest::Plan(bad)).is_err());
        let mut bad = plan_request();
        bad.complete = true;
        assert!(encode_tracker_request(&TrackerRequest::Plan(bad)).is_err());
        let mut bad = plan_request();
        bad.fetching = vec![3];
        assert!(encode_tracker_request(&TrackerRequest::Plan(bad)).is_err());
        let mut bad = plan_request();
        bad.piece_size = 0;
        assert!(encode_tracker_request(&TrackerRequest::Plan(bad)).is_err());
    }

    #[test]
    fn oversized_lists_and_messages_are_rejected() {
        let beat =
            Heartbeat { held_added: vec![[0; 32]; MAX_HELD_PER_HEARTBEAT + 1], ..Heartbeat::default() };
        assert!(encode_tracker_request(&TrackerRequest::Heartbeat(beat)).is_err());
        let huge = vec![0u8; MAX_TRACKER_MESSAGE_BYTES + 1];
        assert!(matches!(decode_tracker_request(&huge), Err(ProtocolError::TooLarge { .. })));
        assert!(decode_tracker_request(&[0xff, 0xff, 0xff]).is_err());
    }
}
