//! Everything the tracker knows, and every decision it makes, as one pure data structure.
//!
//! ## Why it is pure
//!
//! The tracker's value is in its decisions: which node fetches which piece from the origin,
//! which peers a node should ask, when an assignee is given up on. Those decisions depend on
//! time (deadness, stalls, load windows), so [`State`] takes `now: Instant` as a parameter
//! and never reads a clock, touches the network or spawns a task. The unit tests below drive
//! it through exact timelines; the server ([`crate::server`]) only locks it, calls a method,
//! and sends the answer. A plain `Mutex` is enough: every call is short and never awaits
//! (mini-redis `db.rs` makes the same argument).
//!
//! ## Soft state
//!
//! Nothing here is persisted. A restarted tracker starts empty, answers the first delta
//! heartbeat of each node with `resync: true` (the node then sends its whole held set), and
//! rebuilds each digest's picture from the next plan requests, which carry the full bitfield
//! every time. Assignments are the only thing lost for good; agents treat the assigned list
//! of every plan as authoritative, so an empty one after a restart is simply re-topped-up.
//!
//! ## Assignment rules (what agents rely on)
//!
//! - A digest's layout (size, piece size) is fixed by its first plan; a plan that disagrees
//!   is refused.
//! - A piece is assigned to at most one node at a time, and only while no live node holds it:
//!   each piece leaves the origin once.
//! - A node has at most [`BATCH`] pieces assigned; each plan tops it up with the lowest-index
//!   pieces nobody holds and nobody is assigned.
//! - Pieces a request says it is fetching from the origin (`fetching`) are its assignments
//!   unless held or assigned to another: a planner that takes a digest over (after a
//!   restart, or as the next coordinator) learns what its predecessor assigned. When the
//!   first request it sees for a digest comes from a download under way (pieces held,
//!   fetched or attested, or a plan followed before: a download that holds nothing yet may
//!   still be one of many another planner was planning), it assigns nothing new for
//!   [`ADOPT_GRACE`], while the other downloaders report.
//! - An assignment is released when its assignee is dead (not seen for [`NODE_DEAD`]) or
//!   stalled (assigned for more than [`STALL`] while its piece count has not grown for
//!   [`STALL`]). The next plan from anyone picks the piece up again.
//! - Only *live* holders count: a piece whose only holder died is fetched from the origin
//!   again rather than waited for.
//! - First-hand piece digests: the first attestation of a piece wins; a conflicting later one
//!   is counted and ignored.
//! - Peers: the best [`MAX_PEERS`] live nodes holding pieces the requester lacks (same zone
//!   first, then most such pieces, then least handed out), chosen among the first
//!   [`ENOUGH_CANDIDATES`] useful ones found by walking the digest's holders (downloaders with
//!   at least one piece, and complete ones) round robin from where the previous plan stopped,
//!   at most [`MAX_SCAN`] of them, then if still short at most [`MAX_SEED_SCAN`] of the nodes
//!   whose heartbeats say they hold it whole. Consecutive plans so hand out different holders:
//!   the load spreads over every holder instead of the few with most pieces.
//!
//! ## Cost
//!
//! A plan costs O(pieces + ENOUGH_CANDIDATES + log N) in the common case, O(pieces +
//! MAX_SCAN + MAX_SEED_SCAN + log N) at worst, never O(N): each digest keeps, per piece, how
//! many live incomplete downloaders hold it (updated from the difference between a
//! downloader's previous and new bitfield, and taken out when its last plan is [`NODE_DEAD`]
//! old, in order of last plan), the list of its holders (swap-removed in O(1)), the set of its
//! complete downloaders, and the index of nodes that hold it (from heartbeats). `plan_cost`
//! in `state/tests.rs` measures it at 100, 1,000 and 10,000 nodes, and the simulator
//! (`shoal-benches sim`) reports the CPU per plan of a whole rollout.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use shoal_protocol::tracker::{
    Heartbeat, NodeCounters, Plan, PlanPeer, PlanRequest, PreheatJob, PreheatProgress, PreheatState,
    TrackerResponse, MAX_PEER_ADDRS, MAX_PIECES, MAX_PLAN_DIGESTS, MAX_PREHEAT_JOBS, MAX_TEXT_BYTES,
};
use shoal_protocol::types::Digest;

/// When a silent node is dead and a stalled assignee loses its pieces: the timing contract
/// with agents ([`shoal_protocol::timing`]), one definition for both sides.
pub use shoal_protocol::timing::{NODE_DEAD, STALL};
use shoal_protocol::timing::{PLAN_POLL, PLAN_POLL_MAX};
/// Dead nodes stay listed (as not alive) for this long, then are forgotten.
pub const NODE_FORGET: Duration = Duration::from_secs(120);
/// Origin pieces assigned to one node at a time.
pub const BATCH: usize = 4;
/// Peers in one plan.
pub const MAX_PEERS: usize = 16;
/// How far back "how often was this node handed out as a peer" looks.
pub const LOAD_WINDOW: Duration = Duration::from_secs(2);
/// Hand-outs remembered per node within [`LOAD_WINDOW`] (a bound, far above real rates).
const MAX_LOAD_ENTRIES: usize = 4096;
/// A planner whose first plan request for a digest comes from a download already under way
/// (pieces held, fetching or attested) took the digest over from another planner (it
/// restarted, or it is the next coordinator after one died). It assigns no new origin piece
/// for this long, so that every live downloader reports what it holds and fetches first:
/// what the previous planner assigned is learned, not handed out a second time. Several
/// plan polls ([`shoal_protocol::timing::PLAN_POLL`]).
pub const ADOPT_GRACE: Duration = Duration::from_millis(1500);
/// Plan requests per second a planner aims at from one digest's downloaders that it has no
/// origin work for (see [`pace`]).
pub const PLAN_RATE: u32 = 400;
/// Digest states nobody planned for in this long are forgotten.
pub const DIGEST_FORGET: Duration = Duration::from_secs(600);
/// Nodes the tracker keeps at once; beyond that, unknown nodes are refused. A node costs
/// about a kilobyte plus its held set; plans cost no more with more nodes (see "Cost").
pub const MAX_NODES: usize = 100_000;
/// Downloaders of the digest a plan examines as peer candidates, round robin.
pub const MAX_SCAN: usize = 256;
/// Nodes holding the whole digest a plan examines as peer candidates, round robin.
pub const MAX_SEED_SCAN: usize = 64;
/// A plan's scan of holders stops once it found this many useful ones.
pub const ENOUGH_CANDIDATES: usize = 2 * MAX_PEERS;
/// Digests the tracker keeps at once; beyond that, plans for new digests are refused.
pub const MAX_DIGESTS: usize = 20_000;
/// Complete digests remembered per node.
pub const MAX_HELD_PER_NODE: usize = 100_000;
/// Preheat jobs kept (the oldest finished ones are dropped first).
pub const MAX_PREHEAT_JOBS_KEPT: usize = 256;
/// History samples kept: one a second for ten minutes.
pub const HISTORY_SAMPLES: usize = 600;
/// Digests listed by [`State::digests_view`] (the most recently planned first).
pub const MAX_DIGESTS_LISTED: usize = 200;

type DigestBytes = [u8; 32];

/// Counters of decisions since the tracker started, exported as metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub heartbeats: u64,
    pub plans: u64,
    pub refused: u64,
    pub assignments: u64,
    pub reassignments: u64,
    pub attestation_conflicts: u64,
    pub preheat_jobs: u64,
}

struct Node {
    zone: Option<String>,
    addrs: Vec<Multiaddr>,
    last_seen: Instant,
    counters: NodeCounters,
    /// A full heartbeat arrived since this tracker learned of the node: `held` is its truth.
    synced: bool,
    held: HashSet<DigestBytes>,
    downloading: Vec<DigestBytes>,
    /// When this node was handed out as a peer in a plan, within [`LOAD_WINDOW`].
    handed_out: VecDeque<Instant>,
}

impl Node {
    fn new(now: Instant) -> Self {
        Node {
            zone: None,
            addrs: Vec::new(),
            last_seen: now,
            counters: NodeCounters::default(),
            synced: false,
            held: HashSet::new(),
            downloading: Vec::new(),
            handed_out: VecDeque::new(),
        }
    }

    fn alive(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) <= NODE_DEAD
    }

    fn load(&mut self, now: Instant) -> usize {
        while self.handed_out.front().is_some_and(|t| now.saturating_duration_since(*t) > LOAD_WINDOW) {
            self.handed_out.pop_front();
        }
        self.handed_out.len()
    }
}

struct Downloader {
    have: Vec<u8>,
    count: u32,
    /// When `count` last grew.
    last_gain: Instant,
    last_plan: Instant,
    complete: bool,
    /// Its pieces are counted in [`DigestState::holds`]: it is incomplete and planned within
    /// [`NODE_DEAD`].
    counted: bool,
}

impl Downloader {
    /// Whether its pieces are there to be fetched: it finished, or it is still planning.
    fn active(&self, now: Instant) -> bool {
        self.complete || now.saturating_duration_since(self.last_plan) <= NODE_DEAD
    }
}

struct DigestState {
    size: u64,
    piece_size: u32,
    pieces: u32,
    last_plan: Instant,
    /// Hashed, not ordered: looked up for every candidate of every plan; views sort.
    downloaders: HashMap<PeerId, Downloader>,
    assigned: BTreeMap<u32, (PeerId, Instant)>,
    first_hand: BTreeMap<u32, DigestBytes>,
    metainfo_complete: bool,
    /// Per piece: counted downloaders holding it.
    holds: Vec<u32>,
    /// Counted downloaders by their last plan, oldest first.
    by_last_plan: BTreeSet<(Instant, PeerId)>,
    /// Downloaders that verified the whole blob.
    completes: BTreeSet<PeerId>,
    /// Downloaders with pieces to give: counted ones holding at least one, and complete
    /// ones. The peer candidates, examined round robin from `ring_cursor`.
    holders: Vec<PeerId>,
    /// Position of each holder in `holders`.
    holder_pos: HashMap<PeerId, u32>,
    ring_cursor: usize,
    /// Where the next plan's scan of whole holders (from heartbeats) starts.
    seed_cursor: Option<PeerId>,
    /// Until then no new origin piece is assigned: this planner took the digest over
    /// mid-download (see [`ADOPT_GRACE`]).
    adopting_until: Option<Instant>,
}

/// Adds the bits set in `new` and not in `old` to `holds`, subtracts those set in `old` and
/// not in `new` (a missing side counts as all zeros).
fn apply_diff(holds: &mut [u32], old: &[u8], new: &[u8]) {
    let len = old.len().max(new.len());
    for j in 0..len {
        let (o, n) = (old.get(j).copied().unwrap_or(0), new.get(j).copied().unwrap_or(0));
        let diff = o ^ n;
        if diff == 0 {
            continue;
        }
        for b in 0..8 {
            if diff & (1 << b) != 0 {
                if let Some(h) = holds.get_mut(j * 8 + b) {
                    if n & (1 << b) != 0 {
                        *h += 1;
                    } else {
                        *h = h.saturating_sub(1);
                    }
                }
            }
        }
    }
}

impl DigestState {
    /// Stops counting downloaders whose last plan is older than [`NODE_DEAD`].
    fn expire(&mut self, now: Instant) {
        while let Some(&(t, p)) = self.by_last_plan.first() {
            if now.saturating_duration_since(t) <= NODE_DEAD {
                break;
            }
            self.by_last_plan.pop_first();
            if let Some(dl) = self.downloaders.get_mut(&p) {
                if dl.counted {
                    apply_diff(&mut self.holds, &dl.have, &[]);
                    dl.counted = false;
                    let holds = dl.complete;
                    self.set_holder(p, holds);
                }
            }
        }
    }

    /// Keeps `peer` in `holders` exactly when `yes`.
    fn set_holder(&mut self, peer: PeerId, yes: bool) {
        match (yes, self.holder_pos.get(&peer).copied()) {
            (true, None) => {
                self.holder_pos.insert(peer, self.holders.len() as u32);
                self.holders.push(peer);
            }
            (false, Some(pos)) => {
                self.holder_pos.remove(&peer);
                self.holders.swap_remove(pos as usize);
                if let Some(moved) = self.holders.get(pos as usize) {
                    self.holder_pos.insert(*moved, pos);
                }
            }
            _ => {}
        }
    }

    fn remove_downloader(&mut self, peer: &PeerId) {
        if let Some(dl) = self.downloaders.remove(peer) {
            if dl.counted {
                apply_diff(&mut self.holds, &dl.have, &[]);
                self.by_last_plan.remove(&(dl.last_plan, *peer));
            }
        }
        self.completes.remove(peer);
        self.set_holder(*peer, false);
    }
}

/// Up to `max` keys of `map` after `cursor`, wrapping around.
fn round_robin<V>(map: &BTreeMap<PeerId, V>, cursor: Option<PeerId>, max: usize) -> Vec<PeerId> {
    match cursor {
        Some(c) => map
            .range((Bound::Excluded(c), Bound::Unbounded))
            .chain(map.range(..=c))
            .map(|(k, _)| *k)
            .take(max)
            .collect(),
        None => map.keys().take(max).copied().collect(),
    }
}

/// How far one node got with a preheat job.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodePreheat {
    /// `None`: not reported yet (pending).
    progress: Option<PreheatProgress>,
}

impl NodePreheat {
    fn finished(&self) -> bool {
        matches!(&self.progress, Some(p) if p.state != PreheatState::Running)
    }
}

struct PreheatJobState {
    image: String,
    registry: String,
    repository: String,
    manifest: DigestBytes,
    nodes: BTreeMap<PeerId, NodePreheat>,
}

impl PreheatJobState {
    fn finished(&self) -> bool {
        self.nodes.values().all(NodePreheat::finished)
    }
}

/// How many nodes a preheat goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeCount {
    All,
    Count(usize),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreheatError {
    #[error("no alive nodes to preheat on")]
    NoAliveNodes,
    #[error("a preheat needs at least one node")]
    ZeroNodes,
    #[error("{what} is longer than {MAX_TEXT_BYTES} bytes")]
    TooLong { what: &'static str },
}

/// The tracker's soft state. See the module docs.
pub struct State {
    nodes: HashMap<PeerId, Node>,
    digests: HashMap<DigestBytes, DigestState>,
    /// Nodes holding each digest whole, as their heartbeats say (an index of `Node::held`).
    seeders: HashMap<DigestBytes, BTreeMap<PeerId, ()>>,
    preheats: BTreeMap<u64, PreheatJobState>,
    next_preheat: u64,
    /// Bytes counted by nodes that restarted (their counters went back) or were forgotten, so
    /// cluster totals never go backwards.
    retired: (u64, u64),
    history: VecDeque<HistorySample>,
    pub totals: Totals,
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

fn bit(bits: &[u8], i: u32) -> bool {
    bits.get((i / 8) as usize).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

/// How long a downloader with no origin work should wait before its next plan request, when
/// `downloaders` live downloaders report for the digest: [`PLAN_POLL`] while they are few,
/// then as long as keeps their requests near [`PLAN_RATE`] per second, at most
/// [`PLAN_POLL_MAX`]. At 40 downloaders nothing changes (0.5 s); from 1,200 on each waits
/// 3 s, so 10,000 downloaders of one layer send ~3,300 plans per second instead of 20,000.
/// Downloaders with origin work keep [`PLAN_POLL`]: their reports decide stalls and takeovers.
pub fn pace(downloaders: usize) -> Duration {
    let even = Duration::from_millis(downloaders as u64 * 1000 / u64::from(PLAN_RATE));
    even.clamp(PLAN_POLL, PLAN_POLL_MAX)
}

fn count_bits(bits: &[u8]) -> u32 {
    bits.iter().map(|b| b.count_ones()).sum()
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn digest_name(d: &DigestBytes) -> String {
    Digest::from_sha256(*d).to_string()
}

impl State {
    pub fn new() -> Self {
        State {
            nodes: HashMap::new(),
            digests: HashMap::new(),
            seeders: HashMap::new(),
            preheats: BTreeMap::new(),
            next_preheat: 1,
            retired: (0, 0),
            history: VecDeque::new(),
            totals: Totals::default(),
        }
    }

    fn refuse(&mut self, why: String) -> TrackerResponse {
        self.totals.refused += 1;
        TrackerResponse::Refused(truncate(why))
    }

    /// Records that `peer` was seen; false if it is unknown and the tracker is full.
    fn touch(&mut self, peer: PeerId, addrs: &[Multiaddr], now: Instant) -> bool {
        if !self.nodes.contains_key(&peer) && self.nodes.len() >= MAX_NODES {
            return false;
        }
        let node = self.nodes.entry(peer).or_insert_with(|| Node::new(now));
        node.last_seen = now;
        if !addrs.is_empty() {
            node.addrs = addrs.iter().take(MAX_PEER_ADDRS).cloned().collect();
        }
        true
    }

    /// Answers a heartbeat.
    pub fn heartbeat(
        &mut self,
        peer: PeerId,
        addrs: &[Multiaddr],
        beat: &Heartbeat,
        now: Instant,
    ) -> TrackerResponse {
        self.totals.heartbeats += 1;
        if !self.touch(peer, addrs, now) {
            return self.refuse(format!("the tracker already tracks {MAX_NODES} nodes"));
        }
        let node = self.nodes.get_mut(&peer).expect("touched above");
        node.zone = beat.zone.clone().filter(|z| !z.is_empty());
        let old = std::mem::replace(&mut node.counters, beat.counters.clone());
        if beat.counters.origin_bytes < old.origin_bytes || beat.counters.peer_bytes < old.peer_bytes {
            // The node restarted: keep what its previous run counted.
            self.retired.0 += old.origin_bytes;
            self.retired.1 += old.peer_bytes;
        }
        node.downloading = beat.downloading.clone();
        let mut resync = false;
        let mut gone: Vec<DigestBytes> = Vec::new();
        let mut added: Vec<DigestBytes> = Vec::new();
        if beat.full {
            let held: HashSet<DigestBytes> = beat.held_added.iter().copied().collect();
            gone.extend(node.held.difference(&held).copied());
            added.extend(held.difference(&node.held).copied());
            node.held = held;
            node.synced = true;
        } else if !node.synced {
            resync = true;
        } else {
            for d in &beat.held_removed {
                if node.held.remove(d) {
                    gone.push(*d);
                }
            }
            for d in &beat.held_added {
                if node.held.len() >= MAX_HELD_PER_NODE {
                    tracing::warn!(%peer, "node holds more than {MAX_HELD_PER_NODE} digests; ignoring the rest");
                    break;
                }
                if node.held.insert(*d) {
                    added.push(*d);
                }
            }
        }
        for d in &gone {
            if let Some(set) = self.seeders.get_mut(d) {
                set.remove(&peer);
                if set.is_empty() {
                    self.seeders.remove(d);
                }
            }
        }
        for d in &added {
            self.seeders.entry(*d).or_default().insert(peer, ());
        }
        if beat.full {
            // Digests the node finished through plans but no longer holds (evicted).
            let held = &node.held;
            for (d, state) in self.digests.iter_mut() {
                if state.downloaders.get(&peer).is_some_and(|dl| dl.complete) && !held.contains(d) {
                    state.remove_downloader(&peer);
                }
            }
        } else {
            for d in gone {
                if let Some(state) = self.digests.get_mut(&d) {
                    if state.downloaders.get(&peer).is_some_and(|dl| dl.complete) {
                        state.remove_downloader(&peer);
                    }
                }
            }
        }

        for report in &beat.preheat {
            let Some(entry) = self.preheats.get_mut(&report.id).and_then(|job| job.nodes.get_mut(&peer))
            else {
                continue;
            };
            if !entry.finished() {
                entry.progress = Some(report.clone());
            }
        }
        let preheat: Vec<PreheatJob> = self
            .preheats
            .iter()
            .filter(|(_, job)| job.nodes.get(&peer).is_some_and(|n| !n.finished()))
            .take(MAX_PREHEAT_JOBS)
            .map(|(id, job)| PreheatJob {
                id: *id,
                registry: job.registry.clone(),
                repository: job.repository.clone(),
                manifest: job.manifest,
            })
            .collect();
        TrackerResponse::Heartbeat { resync, preheat }
    }

    /// Answers a plan request: records the requester's progress and attestations, releases
    /// dead or stalled assignments, tops the requester up, and lists its best peers.
    pub fn plan(
        &mut self,
        peer: PeerId,
        addrs: &[Multiaddr],
        req: &PlanRequest,
        now: Instant,
    ) -> TrackerResponse {
        self.totals.plans += 1;
        let pieces = req.pieces();
        // The codec validated this already; the state does not rely on it.
        if req.piece_size == 0 || pieces > MAX_PIECES || req.have.len() as u64 != pieces.div_ceil(8) {
            return self.refuse(format!("plan for {}: inconsistent piece layout", req.digest()));
        }
        let pieces = pieces as u32;
        if !self.touch(peer, addrs, now) {
            return self.refuse(format!("the tracker already tracks {MAX_NODES} nodes"));
        }
        if let Some(state) = self.digests.get(&req.digest) {
            if state.size != req.size || state.piece_size != req.piece_size {
                let why = format!(
                    "plan for {}: size disagrees: the tracker knows {} bytes in pieces of {}, the request says {} \
                     bytes in pieces of {}",
                    req.digest(),
                    state.size,
                    state.piece_size,
                    req.size,
                    req.piece_size
                );
                return self.refuse(why);
            }
        } else if self.digests.len() >= MAX_DIGESTS {
            return self.refuse(format!("the tracker already tracks {MAX_DIGESTS} digests"));
        }
        let nodes = &mut self.nodes;
        let totals = &mut self.totals;
        let state = self.digests.entry(req.digest).or_insert_with(|| DigestState {
            size: req.size,
            piece_size: req.piece_size,
            pieces,
            last_plan: now,
            downloaders: HashMap::new(),
            assigned: BTreeMap::new(),
            first_hand: BTreeMap::new(),
            metainfo_complete: false,
            holds: vec![0; pieces as usize],
            by_last_plan: BTreeSet::new(),
            completes: BTreeSet::new(),
            holders: Vec::new(),
            holder_pos: HashMap::new(),
            ring_cursor: 0,
            seed_cursor: None,
            adopting_until: (req.planned
                || req.have.iter().any(|b| *b != 0)
                || !req.fetching.is_empty()
                || !req.attest.is_empty())
            .then(|| now + ADOPT_GRACE),
        });
        state.last_plan = now;
        state.expire(now);

        // The requester's progress.
        let count = count_bits(&req.have);
        let me = state.downloaders.entry(peer).or_insert_with(|| Downloader {
            have: Vec::new(),
            count: 0,
            last_gain: now,
            last_plan: now,
            complete: false,
            counted: false,
        });
        if count > me.count {
            me.last_gain = now;
        }
        let old: &[u8] = if me.counted { &me.have } else { &[] };
        // A node that was complete and asks again without being complete lost its copy
        // (evicted, or quarantined as damaged) and downloads it again: it holds only what its
        // bitfield says from now on.
        let complete = req.complete;
        if me.complete && !complete {
            state.completes.remove(&peer);
        }
        if me.counted {
            state.by_last_plan.remove(&(me.last_plan, peer));
        }
        if complete {
            apply_diff(&mut state.holds, old, &[]);
            state.completes.insert(peer);
        } else {
            apply_diff(&mut state.holds, old, &req.have);
            state.by_last_plan.insert((now, peer));
        }
        me.counted = !complete;
        me.have = req.have.clone();
        me.count = count;
        me.last_plan = now;
        me.complete = complete;
        state.set_holder(peer, complete || count > 0);

        // First-hand piece digests.
        for (piece, sha) in &req.attest {
            match state.first_hand.get(piece) {
                None => {
                    state.first_hand.insert(*piece, *sha);
                }
                Some(known) if known == sha => {}
                Some(_) => {
                    totals.attestation_conflicts += 1;
                    tracing::warn!(%peer, digest = %req.digest(), piece, "conflicting piece digest attested; keeping the first");
                }
            }
        }
        // Complete metainfo: every piece attested first-hand and the whole blob verified by
        // someone (attestations may trail the first completion by a plan or two).
        if state.first_hand.len() as u32 == pieces && !state.completes.is_empty() {
            state.metainfo_complete = true;
        }

        // Which pieces a live node holds: all of them if a live node holds the whole blob,
        // else those some live downloader counts.
        let alive = |id: &PeerId| nodes.get(id).is_some_and(|n| n.alive(now));
        let seeders = self.seeders.get(&req.digest);
        let whole = seeders.is_some_and(|s| s.keys().any(|id| *id != peer && alive(id)))
            || state.completes.iter().any(|id| *id != peer && alive(id));
        let held_any: Vec<bool> = state.holds.iter().map(|&h| whole || h > 0).collect();

        // Assignments: drop what is held now, release the dead and the stalled.
        state.assigned.retain(|piece, _| !held_any[*piece as usize]);
        let downloaders = &state.downloaders;
        state.assigned.retain(|piece, (assignee, since)| {
            let dead = !nodes.get(assignee).is_some_and(|n| n.alive(now));
            let stalled = now.saturating_duration_since(*since) > STALL
                && downloaders
                    .get(assignee)
                    .is_none_or(|dl| now.saturating_duration_since(dl.last_gain) > STALL);
            if dead || stalled {
                totals.reassignments += 1;
                tracing::info!(%assignee, digest = %req.digest(), piece, dead, "origin piece released for reassignment");
            }
            !(dead || stalled)
        });
        // Pieces the requester is fetching from the origin now stay its own (a previous
        // planner assigned them), unless someone else holds or was given them here.
        if !complete {
            for &piece in &req.fetching {
                if piece < pieces && !held_any[piece as usize] {
                    state.assigned.entry(piece).or_insert((peer, now));
                }
            }
        }
        let adopting = state.adopting_until.is_some_and(|t| now < t);
        if !complete && !adopting {
            let mut outstanding = state.assigned.values().filter(|(a, _)| *a == peer).count();
            let mut piece = 0;
            while outstanding < BATCH && piece < pieces {
                if !held_any[piece as usize] && !state.assigned.contains_key(&piece) {
                    state.assigned.insert(piece, (peer, now));
                    totals.assignments += 1;
                    outstanding += 1;
                }
                piece += 1;
            }
        }
        let assigned: Vec<u32> =
            state.assigned.iter().filter(|(_, (a, _))| *a == peer).map(|(piece, _)| *piece).collect();
        // Pacing: a requester with origin work (pieces assigned to it, or pieces that are
        // still nobody's, or a takeover under way) asks again after PLAN_POLL; one without
        // waits longer the more download the digest, see `pace`.
        let held = held_any.iter().filter(|h| **h).count();
        let origin_work =
            complete || adopting || !assigned.is_empty() || held + state.assigned.len() < pieces as usize;
        let next_ask = if origin_work { PLAN_POLL } else { pace(state.by_last_plan.len()) };

        // Peers: live nodes holding pieces the requester lacks.
        let lacking: u32 = pieces - count;
        let my_zone = nodes.get(&peer).and_then(|n| n.zone.clone());
        let mut candidates: Vec<(bool, u32, usize, PeerId)> = Vec::new();
        if lacking > 0 {
            // A bounded sample, round robin over the digest's holders: stop once enough
            // useful ones are found, so consecutive plans hand out different holders.
            let usefulness = |dl: &Downloader| -> u32 {
                if dl.complete {
                    lacking
                } else if dl.active(now) {
                    dl.have.iter().zip(&req.have).map(|(theirs, mine)| (theirs & !mine).count_ones()).sum()
                } else {
                    0
                }
            };
            let n = state.holders.len();
            let start = if n == 0 { 0 } else { state.ring_cursor % n };
            let mut k = 0;
            while k < n.min(MAX_SCAN) && candidates.len() < ENOUGH_CANDIDATES {
                let id = state.holders[(start + k) % n];
                k += 1;
                if id == peer {
                    continue;
                }
                let Some(node) = nodes.get_mut(&id) else { continue };
                if !node.alive(now) {
                    continue;
                }
                let useful = match state.downloaders.get(&id) {
                    Some(dl) => usefulness(dl),
                    None => 0,
                };
                if useful == 0 {
                    continue;
                }
                let same_zone = my_zone.is_some() && node.zone == my_zone;
                candidates.push((same_zone, useful, node.load(now), id));
            }
            state.ring_cursor = if n == 0 { 0 } else { (start + k) % n };
            // Then nodes that hold it whole by their heartbeats and never planned for it.
            if candidates.len() < ENOUGH_CANDIDATES {
                if let Some(seeders) = seeders {
                    let more = round_robin(seeders, state.seed_cursor, MAX_SEED_SCAN);
                    state.seed_cursor = more.last().copied();
                    for id in more {
                        if id == peer || state.holder_pos.contains_key(&id) {
                            continue;
                        }
                        let Some(node) = nodes.get_mut(&id) else { continue };
                        if !node.alive(now) {
                            continue;
                        }
                        let useful = match state.downloaders.get(&id) {
                            Some(dl) => usefulness(dl).max(lacking),
                            None => lacking,
                        };
                        let same_zone = my_zone.is_some() && node.zone == my_zone;
                        candidates.push((same_zone, useful, node.load(now), id));
                    }
                }
            }
        }
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
        candidates.truncate(MAX_PEERS);
        let peers = candidates
            .iter()
            .filter_map(|(_, _, _, id)| {
                let node = nodes.get_mut(id)?;
                if node.handed_out.len() < MAX_LOAD_ENTRIES {
                    node.handed_out.push_back(now);
                }
                Some(PlanPeer {
                    peer_id: id.to_bytes(),
                    addrs: node.addrs.iter().take(MAX_PEER_ADDRS).map(|a| a.to_vec().into()).collect(),
                })
            })
            .collect();

        let piece_digests = state
            .first_hand
            .iter()
            .filter(|(piece, _)| !bit(&req.have, **piece))
            .take(MAX_PLAN_DIGESTS)
            .map(|(piece, sha)| (*piece, *sha))
            .collect();
        let next_ask_ms = next_ask.as_millis() as u32;
        TrackerResponse::Plan(Plan { peers, assigned, piece_digests, next_ask_ms })
    }

    /// Housekeeping, once a second: forgets long-dead nodes and idle digests, finishes the
    /// preheat parts of forgotten nodes, and records a history sample at `unix_ms`.
    pub fn tick(&mut self, now: Instant, unix_ms: u64) {
        let forgotten: Vec<PeerId> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.last_seen) > NODE_DEAD + NODE_FORGET)
            .map(|(id, _)| *id)
            .collect();
        for id in forgotten {
            if let Some(node) = self.nodes.remove(&id) {
                self.retired.0 += node.counters.origin_bytes;
                self.retired.1 += node.counters.peer_bytes;
                for d in &node.held {
                    if let Some(set) = self.seeders.get_mut(d) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.seeders.remove(d);
                        }
                    }
                }
            }
            for state in self.digests.values_mut() {
                state.remove_downloader(&id);
            }
            for job in self.preheats.values_mut() {
                if let Some(entry) = job.nodes.get_mut(&id) {
                    if !entry.finished() {
                        let mut progress = entry.progress.clone().unwrap_or(PreheatProgress {
                            id: 0,
                            blobs_done: 0,
                            blobs_total: 0,
                            bytes_done: 0,
                            bytes_total: 0,
                            state: PreheatState::Running,
                        });
                        progress.state = PreheatState::Failed("the node left the cluster".to_string());
                        entry.progress = Some(progress);
                    }
                }
            }
            tracing::info!(peer = %id, "forgot a node not seen for {:?}", NODE_DEAD + NODE_FORGET);
        }
        self.digests.retain(|_, state| now.saturating_duration_since(state.last_plan) <= DIGEST_FORGET);
        while self.preheats.len() > MAX_PREHEAT_JOBS_KEPT {
            let oldest_finished = self.preheats.iter().find(|(_, job)| job.finished()).map(|(id, _)| *id);
            let victim = oldest_finished.or_else(|| self.preheats.keys().next().copied());
            match victim {
                Some(id) => self.preheats.remove(&id),
                None => break,
            };
        }
        let (origin_bytes, peer_bytes) = self.byte_totals();
        self.history.push_back(HistorySample { unix_ms, origin_bytes, peer_bytes });
        while self.history.len() > HISTORY_SAMPLES {
            self.history.pop_front();
        }
    }

    /// Origin and peer bytes of the whole cluster since the tracker started (as reported).
    fn byte_totals(&self) -> (u64, u64) {
        self.nodes
            .values()
            .fold(self.retired, |(o, p), n| (o + n.counters.origin_bytes, p + n.counters.peer_bytes))
    }

    /// Starts a preheat job of `manifest` on `count` alive nodes (spread over zones) and
    /// returns it. The resolution of the image reference is the caller's.
    pub fn start_preheat(
        &mut self,
        image: &str,
        registry: &str,
        repository: &str,
        manifest: DigestBytes,
        count: NodeCount,
        now: Instant,
    ) -> Result<PreheatView, PreheatError> {
        if count == NodeCount::Count(0) {
            return Err(PreheatError::ZeroNodes);
        }
        if registry.len() > MAX_TEXT_BYTES {
            return Err(PreheatError::TooLong { what: "the registry" });
        }
        if repository.len() > MAX_TEXT_BYTES {
            return Err(PreheatError::TooLong { what: "the repository" });
        }
        // Round-robin over zones (sorted), peers sorted within each, so N nodes spread out.
        let mut by_zone: BTreeMap<Option<&str>, Vec<PeerId>> = BTreeMap::new();
        for (id, node) in &self.nodes {
            if node.alive(now) {
                by_zone.entry(node.zone.as_deref()).or_default().push(*id);
            }
        }
        let alive: usize = by_zone.values().map(Vec::len).sum();
        if alive == 0 {
            return Err(PreheatError::NoAliveNodes);
        }
        let wanted = match count {
            NodeCount::All => alive,
            NodeCount::Count(n) => n.min(alive),
        };
        let mut queues: Vec<VecDeque<PeerId>> = by_zone
            .into_values()
            .map(|mut peers| {
                peers.sort();
                peers.into()
            })
            .collect();
        let mut chosen = BTreeMap::new();
        while chosen.len() < wanted {
            for queue in queues.iter_mut() {
                if chosen.len() < wanted {
                    if let Some(id) = queue.pop_front() {
                        chosen.insert(id, NodePreheat { progress: None });
                    }
                }
            }
        }
        let id = self.next_preheat;
        self.next_preheat += 1;
        self.totals.preheat_jobs += 1;
        self.preheats.insert(
            id,
            PreheatJobState {
                image: image.to_string(),
                registry: registry.to_string(),
                repository: repository.to_string(),
                manifest,
                nodes: chosen,
            },
        );
        Ok(self.preheat_view(id).expect("just inserted"))
    }

    // ----- views for the HTTP API -----

    pub fn nodes_view(&self, now: Instant) -> Vec<NodeView> {
        let mut nodes: Vec<NodeView> = self
            .nodes
            .iter()
            .map(|(id, n)| NodeView {
                peer_id: id.to_string(),
                zone: n.zone.clone(),
                alive: n.alive(now),
                addrs: n.addrs.iter().map(|a| a.to_string()).collect(),
                last_seen_ms: now.saturating_duration_since(n.last_seen).as_millis() as u64,
                held_digests: n.held.len(),
                downloading: n.downloading.iter().map(digest_name).collect(),
                origin_bytes: n.counters.origin_bytes,
                peer_bytes: n.counters.peer_bytes,
                sent_bytes: n.counters.sent_bytes,
                cache_bytes: n.counters.cache_bytes,
            })
            .collect();
        nodes.sort_by(|a, b| a.zone.cmp(&b.zone).then_with(|| a.peer_id.cmp(&b.peer_id)));
        nodes
    }

    pub fn digests_view(&self, now: Instant) -> Vec<DigestView> {
        let mut digests: Vec<(&DigestBytes, &DigestState)> = self.digests.iter().collect();
        digests.sort_by(|a, b| b.1.last_plan.cmp(&a.1.last_plan).then(a.0.cmp(b.0)));
        digests
            .into_iter()
            .take(MAX_DIGESTS_LISTED)
            .map(|(d, state)| {
                let mut nodes: Vec<DigestNodeView> = state
                    .downloaders
                    .iter()
                    .map(|(id, dl)| DigestNodeView {
                        peer_id: id.to_string(),
                        pieces: dl.count,
                        complete: dl.complete,
                        alive: self.nodes.get(id).is_some_and(|n| n.alive(now)),
                        assigned: state.assigned.values().filter(|(a, _)| a == id).count(),
                    })
                    .collect();
                nodes.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let in_flight = state.downloaders.values().any(|dl| !dl.complete && dl.active(now));
                DigestView {
                    digest: digest_name(d),
                    size: state.size,
                    piece_size: state.piece_size,
                    pieces: state.pieces,
                    assigned: state.assigned.len(),
                    attested: state.first_hand.len(),
                    metainfo_complete: state.metainfo_complete,
                    in_flight,
                    last_plan_ms: now.saturating_duration_since(state.last_plan).as_millis() as u64,
                    nodes,
                }
            })
            .collect()
    }

    pub fn summary(&self, now: Instant) -> SummaryView {
        let (origin_bytes, peer_bytes) = self.byte_totals();
        let moved = origin_bytes + peer_bytes;
        SummaryView {
            nodes: self.nodes.len(),
            alive_nodes: self.nodes.values().filter(|n| n.alive(now)).count(),
            digests: self.digests.len(),
            digests_in_flight: self
                .digests
                .values()
                .filter(|s| s.downloaders.values().any(|dl| !dl.complete && dl.active(now)))
                .count(),
            origin_bytes,
            peer_bytes,
            savings: if moved == 0 { 0.0 } else { peer_bytes as f64 / moved as f64 },
        }
    }

    pub fn history(&self) -> Vec<HistorySample> {
        self.history.iter().cloned().collect()
    }

    pub fn preheat_view(&self, id: u64) -> Option<PreheatView> {
        let job = self.preheats.get(&id)?;
        let nodes: Vec<PreheatNodeView> = job
            .nodes
            .iter()
            .map(|(peer, entry)| {
                let p = entry.progress.as_ref();
                let (state, error) = match p.map(|p| &p.state) {
                    None => ("pending", None),
                    Some(PreheatState::Running) => ("running", None),
                    Some(PreheatState::Done) => ("done", None),
                    Some(PreheatState::Failed(why)) => ("failed", Some(why.clone())),
                };
                PreheatNodeView {
                    peer_id: peer.to_string(),
                    state,
                    blobs_done: p.map_or(0, |p| p.blobs_done),
                    blobs_total: p.map_or(0, |p| p.blobs_total),
                    bytes_done: p.map_or(0, |p| p.bytes_done),
                    bytes_total: p.map_or(0, |p| p.bytes_total),
                    error,
                }
            })
            .collect();
        let state = if !job.finished() {
            "running"
        } else if nodes.iter().any(|n| n.state == "failed") {
            "failed"
        } else {
            "done"
        };
        Some(PreheatView { id, image: job.image.clone(), manifest: digest_name(&job.manifest), state, nodes })
    }

    /// Every kept preheat job, the newest first.
    pub fn preheats_view(&self) -> Vec<PreheatView> {
        self.preheats.keys().rev().filter_map(|id| self.preheat_view(*id)).collect()
    }

    /// Numbers for the gauges: (nodes, alive nodes, digests).
    pub fn gauges(&self, now: Instant) -> (usize, usize, usize) {
        (self.nodes.len(), self.nodes.values().filter(|n| n.alive(now)).count(), self.digests.len())
    }

    /// Cluster origin and peer bytes (see [`State::summary`]).
    pub fn bytes(&self) -> (u64, u64) {
        self.byte_totals()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub peer_id: String,
    pub zone: Option<String>,
    pub alive: bool,
    pub addrs: Vec<String>,
    pub last_seen_ms: u64,
    pub held_digests: usize,
    pub downloading: Vec<String>,
    pub origin_bytes: u64,
    pub peer_bytes: u64,
    pub sent_bytes: u64,
    pub cache_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DigestNodeView {
    pub peer_id: String,
    /// Verified pieces the node holds.
    pub pieces: u32,
    pub complete: bool,
    pub alive: bool,
    /// Origin pieces assigned to it now.
    pub assigned: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct DigestView {
    pub digest: String,
    pub size: u64,
    pub piece_size: u32,
    pub pieces: u32,
    /// Origin pieces assigned now (to anyone).
    pub assigned: usize,
    /// Pieces with a first-hand digest.
    pub attested: usize,
    pub metainfo_complete: bool,
    /// Some live node is still downloading it.
    pub in_flight: bool,
    pub last_plan_ms: u64,
    pub nodes: Vec<DigestNodeView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SummaryView {
    pub nodes: usize,
    pub alive_nodes: usize,
    pub digests: usize,
    pub digests_in_flight: usize,
    pub origin_bytes: u64,
    pub peer_bytes: u64,
    /// peer / (origin + peer): the share of bytes the origin did not have to send.
    pub savings: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistorySample {
    pub unix_ms: u64,
    pub origin_bytes: u64,
    pub peer_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PreheatNodeView {
    pub peer_id: String,
    pub state: &'static str,
    pub blobs_done: u32,
    pub blobs_total: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PreheatView {
    pub id: u64,
    pub image: String,
    pub manifest: String,
    /// `running` until every node reported done or failed; then `failed` if any failed.
    pub state: &'static str,
    pub nodes: Vec<PreheatNodeView>,
}

#[cfg(test)]
mod tests;
