//! The decisions of one download as a sans-I/O state machine: which missing piece to ask of
//! which peer, which pieces this node fetches from the origin, when to take over a stalled
//! owner's piece, when to leave a busy peer alone, when a tracker's plan is too old to follow,
//! and how to repair a blob whose whole digest failed.
//!
//! [`Scheduler`] reads no clock, touches no socket, file or task: time comes in as
//! `now: Instant` with every call, results of I/O come in as [`Event`]s, and what to do comes
//! out as [`Action`]s. The agent's download task (`fetch/task.rs`) is the I/O shell around
//! it; the simulator (`shoal-benches sim`) runs the same code for thousands of nodes in
//! virtual time, and the unit tests (`scheduler/tests.rs`) drive it through exact timelines.
//! The shape follows quinn-proto and the tracker's `State`.
//!
//! ## How a driver uses it
//!
//! ```text
//! // Before: find providers, ask them Have, settle the size (the shell's job; the pure
//! // `SizeClaim` rules are in task.rs), re-verify resumed pieces.
//! let mut s = Scheduler::new(config, digest, layout, me, &resumed, now);
//! for (peer, answer) in first_have_answers { s.handle(Event::Have { peer, result: answer }, now); }
//! loop {
//!     while let Some(action) = s.poll_action() { execute(action) }   // start I/O, never block
//!     if s.is_done() { break }
//!     wait until an I/O result arrives or `s.poll_timeout()` passes, then
//!     s.handle(event, now) or s.handle_timeout(now)
//! }
//! ```
//!
//! - `now` must never go backwards between calls. A driver with virtual time passes
//!   `base + elapsed`.
//! - Every [`Action::RequestPiece`] is answered by exactly one of [`Event::Verified`] (the
//!   bytes matched `expected` and were written), [`Event::BadPiece`] (they did not: nothing
//!   written) or [`Event::PeerFailed`]. Every [`Action::FetchOrigin`] by zero or more
//!   [`Event::Verified`] with `from: None` (each piece hashed by the driver, written, then
//!   reported, in order) and then one [`Event::OriginDone`]. [`Action::AskHave`] by one
//!   [`Event::Have`], [`Action::FindProviders`] by one [`Event::Providers`],
//!   [`Action::AskPlan`] by one
//!   [`Event::Plan`] (`None` when no tracker answered), [`Action::CheckWhole`] by one
//!   [`Event::WholeDigest`]. [`Action::Ban`], [`Action::SaveState`] need no answer.
//! - [`Event::Asker`]: a peer asked us `Have` for this digest (it downloads it too).
//! - The driver filters peers it banned for other downloads out of what it reports; the
//!   scheduler remembers the peers it banned itself.
//! - [`Scheduler::map`] is *the* piece map of the download: `Have` answers to peers and piece
//!   serving must read it (and only serve pieces it marks verified), so what peers are told is
//!   what they are served, during a repair too.
//! - The download ends with [`Action::Done`] (every piece verified and the whole digest
//!   matched: commit) or [`Action::Failed`].
//!
//! ## Schedule (what `task.rs` did before, unchanged unless said)
//!
//! 1. Until every piece is verified, each step walks the missing pieces from the watermark (the
//!    first [`WINDOW`] rotated per node, so peers do not all ask the same source for the same
//!    piece at once):
//!    - a piece some peer holds with an attested digest is requested from the least loaded
//!      such peer, bounded per peer and per download; a peer that answered `Busy` is left
//!      alone for [`BUSY_BACKOFF`];
//!    - a piece nobody holds is fetched from the origin by its owner. With a live plan (from
//!      a tracker, or from the digest's coordinator in the DHT: one planner either way), the
//!      owner is whoever the plan assigned it to. Without one (a node with no peers, or a
//!      plan older than [`PLAN_STALE`]: the planner is gone and no other answered yet), the
//!      owner is chosen by rendezvous hashing over every known downloader. Consecutive owned
//!      pieces go in one span (up to [`MAX_SPAN`], or [`SHARED_SPAN`] while others download
//!      it too).
//!    - without a live plan, a piece whose owner made no progress for
//!      [`Config::owner_stall`] (or that waited four times that) is taken over, so a blob
//!      always completes, at worst from the origin.
//!    - the origin owner of a window piece nobody holds is polled as a peer (it is where the
//!      first copy appears), whether or not we met it otherwise.
//!
//!    Work per step is bounded: one pass over the active peers per piece requested, and the
//!    walk stops past the window once peers and origin are at capacity and
//!    `peer_concurrency` known pieces wait.
//! 2. Peers: at most [`MAX_PEERS`] are active (polled, asked for pieces); more wait as spares
//!    ([`MAX_SPARE`]) and take the place of one that fails, or of one that has nothing we lack
//!    after its polls backed off. Each active peer is polled every [`HAVE_POLL`] while its
//!    answers bring pieces we lack, the gap doubling up to [`HAVE_POLL_MAX`] otherwise; while
//!    `peer_concurrency` known pieces wait for capacity, only owners of pieces nobody holds are
//!    polled. Providers are looked up every [`PROVIDER_POLL`] (every
//!    [`PROVIDER_POLL_PLANNED`] while a plan is live: it names the peers), the planner asked every
//!    [`PLAN_POLL`], or as much later as its last answer said, at most [`PLAN_POLL_MAX`] (a
//!    planner with many downloaders paces those it has no origin work for); sooner once every
//!    assigned piece is done or on its way, never closer than [`PLAN_MIN_GAP`]. With a planner no origin piece is fetched before its first answer,
//!    so the first request already follows its assignment.
//! 3. A failed or timed-out origin read is retried, resuming from the verified pieces, after
//!    a back-off that doubles from 250 ms to [`ORIGIN_BACKOFF_MAX`]. Only a definitive
//!    answer fails the download at once ("not found", access refused, another 4xx, a
//!    malformed response: [`OriginFailure::Final`]); otherwise it fails
//!    once no piece arrived from anywhere for [`Config::give_up_after`] (default
//!    [`GIVE_UP_AFTER`]): a node starved of CPU or a slow origin keeps its clients' streams.
//!
//! ## Trust and repair
//!
//! A peer's piece is checked by the driver against the digest this scheduler names in
//! [`Action::RequestPiece`] (the peer's attestation, and only when it agrees with the
//! tracker's first-hand digest if there is one); a mismatch bans the peer. A piece from the
//! origin is attested by us. When every piece is verified the driver checks the whole sha256
//! ([`Action::CheckWhole`]). If it fails and peers supplied pieces, every peer-supplied piece
//! is first *unmarked* in the map (so from that moment no peer is told its old digest nor
//! served it), then fetched again from the origin; a peer whose piece differs is banned; then
//! the whole digest is checked again. Unmarking first is what keeps the map peers read equal to
//! the bytes they are served: the origin's good bytes are never served under the bad digest.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::net::{NodeId, PeerError, PeerHave, Plan, PlanReport};
use super::PieceMap;
use crate::pieces::{self, Bitfield, Layout};
use crate::types::Digest;

/// How often peers' piece maps are polled during a download.
pub const HAVE_POLL: Duration = Duration::from_millis(500);
/// How often the provider set is looked up again during a download.
pub const PROVIDER_POLL: Duration = Duration::from_secs(2);
/// How often the providers are looked up while a plan is live (the plan names peers).
pub const PROVIDER_POLL_PLANNED: Duration = Duration::from_secs(10);
/// The first provider poll after the download started.
pub const FIRST_PROVIDER_POLL: Duration = Duration::from_millis(300);
/// Peers a download polls and requests pieces from at once. Others it learns of (providers,
/// askers, the tracker's peers) wait as spares and replace peers that fail, or that have
/// nothing we lack.
pub const MAX_PEERS: usize = 32;
/// Spare peers remembered beyond [`MAX_PEERS`].
pub const MAX_SPARE: usize = 64;
/// Downloaders remembered (for ownership while no plan decides).
pub const MAX_DOWNLOADERS: usize = 256;
/// Longest gap between two `Have` polls of a peer whose answers brought nothing we lack (the
/// gap doubles from [`HAVE_POLL`] with each such answer, and is back to `HAVE_POLL` after one
/// that did).
pub const HAVE_POLL_MAX: Duration = Duration::from_secs(4);
/// Pieces near the watermark whose order is rotated per node.
pub const WINDOW: u32 = 32;
/// Most pieces in one origin span when no other node downloads the digest.
pub const MAX_SPAN: u32 = 16;
/// Most pieces in one origin span while other nodes download it too: short spans commit
/// little to a view of the owner set that may still be incomplete.
pub const SHARED_SPAN: u32 = 2;
/// Longest wait before retrying the origin after failures in a row.
pub const ORIGIN_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a download may go without a verified piece, while the origin fails, before it
/// gives up (the default of [`Config::give_up_after`]; `--download-give-up`).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// Ask the driver to save the piece map after this many newly verified pieces.
pub const SAVE_EVERY: u32 = 8;
/// How long a busy peer is left alone.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(200);
/// How often a download reports to its tracker and asks for a plan (the timing contract
/// with trackers: [`shoal_protocol::timing`]).
pub use shoal_protocol::timing::{PLAN_POLL, PLAN_POLL_MAX};
/// Shortest gap between two plan requests.
pub const PLAN_MIN_GAP: Duration = Duration::from_millis(50);
/// A plan older than this no longer decides origin fetches: the tracker is gone, and the
/// download falls back to the DHT rules (see [`shoal_protocol::timing`] for why it is not
/// shorter than the tracker's `NODE_DEAD`).
pub use shoal_protocol::timing::PLAN_STALE;

/// Tuning of one download's scheduler.
#[derive(Clone, Debug)]
pub struct Config {
    /// Piece requests to peers in flight at once.
    pub peer_concurrency: usize,
    /// Piece requests to one peer in flight at once.
    pub per_peer_concurrency: usize,
    /// Origin spans in flight at once.
    pub origin_concurrency: usize,
    /// How long a piece owned by another node may block the stream before a group member
    /// takes it from the origin, while no plan decides.
    pub owner_stall: Duration,
    /// A planner (tracker or coordinator) may be asked for plans (see
    /// [`Scheduler::set_tracker`]).
    pub tracker: bool,
    /// With the origin failing, give up after this long without a verified piece.
    pub give_up_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            peer_concurrency: 16,
            per_peer_concurrency: 4,
            origin_concurrency: 4,
            owner_stall: Duration::from_secs(30),
            tracker: false,
            give_up_after: GIVE_UP_AFTER,
        }
    }
}

/// What went wrong at the origin, as far as scheduling cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginFailure {
    /// The origin does not have the object: final.
    NotFound,
    /// An answer a retry will not change: access refused (401/403), another 4xx such as a
    /// range the object does not have, a malformed response. Final.
    Final(String),
    /// Anything else (unreachable, a broken body, a local write error): retried.
    Failed(String),
}

/// Results of I/O, fed to [`Scheduler::handle`].
#[derive(Clone, Debug)]
pub enum Event {
    /// Piece `index` was written and its sha256 is `digest`: from peer `from` (it matched the
    /// `expected` of the request), or from the origin (`from: None`, hashed by the driver).
    Verified { index: u32, digest: [u8; 32], from: Option<NodeId> },
    /// A peer's piece did not match the digest it attested (nothing was written).
    BadPiece { index: u32, peer: NodeId },
    /// A piece request failed.
    PeerFailed { index: u32, peer: NodeId, error: PeerError },
    /// An origin span `first..end` ended; `unfinished` pieces were not delivered.
    OriginDone { first: u32, end: u32, unfinished: Vec<u32>, error: Option<OriginFailure> },
    /// A peer's answer to `Have` (also how the driver hands over the first answers, and how a
    /// peer not seen before is added).
    Have { peer: NodeId, result: Result<PeerHave, PeerError> },
    /// Providers of the digest, as a lookup found them (the driver drops itself and banned
    /// peers).
    Providers(Vec<NodeId>),
    /// A peer asked us what we hold of this digest: it downloads it too.
    Asker(NodeId),
    /// The tracker's answer to the last [`Action::AskPlan`]; `None` when none answered.
    Plan(Option<Plan>),
    /// The whole sha256 of the blob, checked after [`Action::CheckWhole`].
    WholeDigest { matched: bool },
}

/// Why a peer is banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanReason {
    /// A piece did not match the digest the peer attested.
    BadPiece,
    /// The peer attested a piece that the origin contradicts (found by a repair).
    Contradicted,
}

impl BanReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BanReason::BadPiece => "piece did not match its attested digest",
            BanReason::Contradicted => "attested a piece that the origin contradicts",
        }
    }
}

/// Why a download failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The origin said "not found".
    OriginNotFound,
    /// The origin refused access, or kept failing while no piece arrived for
    /// [`Config::give_up_after`]; the last error.
    OriginFailed(String),
    /// The whole digest did not match, after a repair if peers supplied pieces.
    DigestMismatch,
}

/// What the driver should do, from [`Scheduler::poll_action`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Request piece `index` from `peer`; accept it only if its sha256 is `expected`.
    RequestPiece { peer: NodeId, index: u32, expected: [u8; 32] },
    /// Fetch pieces `first..end` from the origin in one range request.
    FetchOrigin {
        first: u32,
        end: u32,
        /// Another node owns the first piece: taken over after its owner stalled.
        taken_over: bool,
        /// A tracker is present but did not assign these pieces to us.
        unplanned: bool,
        /// Refetched to check pieces peers supplied (a repair).
        repair: bool,
    },
    /// Ask `peer` what it holds.
    AskHave(NodeId),
    /// Look up the providers of the digest.
    FindProviders,
    /// Report to the tracker and ask for a plan.
    AskPlan(PlanReport),
    /// Ban `peer` (for every download).
    Ban { peer: NodeId, reason: BanReason },
    /// Persist [`Scheduler::map`] (`PieceMap::encode_state`) for a later resume.
    SaveState,
    /// Every piece is verified: check the whole sha256 and answer [`Event::WholeDigest`].
    CheckWhole,
    /// The whole digest matched: commit.
    Done,
    /// Give up.
    Failed(Failure),
}

/// Counters of one download, for logs and the simulator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub from_origin: u32,
    pub from_peers: u32,
    /// Origin pieces fetched although another node owned them.
    pub taken_over: u32,
    /// Origin pieces fetched outside the tracker's plan while a tracker is present.
    pub unplanned: u32,
    /// Pieces refetched from the origin by a repair.
    pub repaired: u32,
    pub bans: u32,
    pub plan_requests: u32,
    pub have_requests: u32,
    pub provider_lookups: u32,
}

/// What a download knows from its tracker.
#[derive(Default)]
struct Coordination {
    /// Origin pieces the tracker gave us (and nobody else).
    assigned: BTreeSet<u32>,
    /// First-hand piece digests the tracker passed on.
    digests: HashMap<u32, [u8; 32]>,
    /// When the last plan arrived.
    planned_at: Option<Instant>,
    /// A plan request is in flight, with these attestations.
    asking: Option<Vec<(u32, [u8; 32])>>,
    /// When the last plan request was sent (`None`: ask at once).
    asked_at: Option<Instant>,
    /// How long after a request to send the next one, as the planner's last answer paced us
    /// ([`PLAN_POLL`]..=[`PLAN_POLL_MAX`]).
    interval: Duration,
    /// A plan arrived, or none did for [`PLAN_STALE`] since the download started: origin
    /// fetches may start. (A failed first request is no answer: under load a planner's
    /// answers come late, and fetching by our own rules meanwhile duplicates what it assigns.)
    answered: bool,
    /// Digests of pieces we fetched from the origin, not yet reported.
    unreported: Vec<(u32, [u8; 32])>,
}

impl Coordination {
    /// Whether the tracker's plan decides which origin pieces we fetch.
    fn active(&self, now: Instant) -> bool {
        self.planned_at.is_some_and(|t| now.saturating_duration_since(t) < PLAN_STALE)
    }

    /// The digest to check piece `i` from `peer` against: what the peer attests, and only
    /// if it agrees with the tracker's first-hand digest when the tracker has one. A
    /// disagreement means one of the two lies; the piece is then not taken from that peer
    /// (the origin settles it) and nobody is banned on the tracker's word.
    fn expected(&self, i: u32, peer: &PeerState) -> Option<[u8; 32]> {
        match (peer.attested.get(&i), self.digests.get(&i)) {
            (Some(p), Some(t)) if p != t => None,
            (Some(p), _) => Some(*p),
            (None, t) => t.copied(),
        }
    }
}

/// What we know of one peer during a download.
struct PeerState {
    have: Bitfield,
    attested: HashMap<u32, [u8; 32]>,
    in_flight: usize,
    /// When it last gained a piece (or was first seen).
    last_gain: Instant,
    busy_until: Option<Instant>,
    polling: bool,
    /// Tie-break among equally loaded holders: from sha256(peer, us), once.
    salt: u64,
    /// Gap to its next `Have` poll, and when that is.
    every: Duration,
    next_poll: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Filling,
    /// Waiting for the whole digest.
    Checking,
    /// Refetching peer-supplied pieces from the origin.
    Repairing,
    Ended,
}

/// The scheduler of one download. See the module docs.
pub struct Scheduler {
    cfg: Config,
    digest: Digest,
    layout: Layout,
    me: NodeId,
    map: PieceMap,
    /// Who supplied each verified piece (`None`: the origin, or resumed).
    suppliers: Vec<Option<NodeId>>,
    in_flight: Vec<bool>,
    waiting_since: Vec<Option<Instant>>,
    /// How many known peers hold each piece.
    avail: Vec<u32>,
    /// The peers we poll and request from (at most [`MAX_PEERS`]).
    peers: HashMap<NodeId, PeerState>,
    /// Peers known beyond those, oldest first (at most [`MAX_SPARE`]).
    spare: VecDeque<NodeId>,
    /// Known downloaders (at most [`MAX_DOWNLOADERS`]).
    downloaders: BTreeSet<NodeId>,
    banned: HashSet<NodeId>,
    peer_jobs: usize,
    origin_jobs: usize,
    /// Pieces being fetched from the origin now (reported with plan requests).
    from_origin: BTreeSet<u32>,
    origin_failures: u32,
    origin_retry_at: Option<Instant>,
    /// When the last piece was verified (or the download started).
    last_progress: Instant,
    /// When the download (this scheduler) started.
    started: Instant,
    unsaved: u32,
    next_have_poll: Instant,
    next_provider_poll: Instant,
    /// The last provider lookup (the driver's, before the scheduler existed, at first).
    last_provider_lookup: Instant,
    providers_polling: bool,
    /// Known pieces that peers hold and we could not request yet (capacity), counted up to
    /// [`Config::peer_concurrency`] by the last step: when that many wait, polling more peers
    /// would teach nothing we could use now.
    backlog: usize,
    /// Origin owners of the window's pieces nobody holds, as of the last step.
    wanted: Vec<NodeId>,
    /// Owners by rendezvous and each piece's owner (an index into it) with its weight and
    /// how many of `owners` it was weighed against. All are recomputed when a downloader
    /// leaves; downloaders that join (`owners_added`, until the next step) are appended, and
    /// a piece's cached owner is only weighed against them when next asked, which picks the
    /// same owner as weighing everyone again.
    owners: Vec<NodeId>,
    owner_of: Vec<u32>,
    owner_weight: Vec<[u8; 32]>,
    owner_upto: Vec<u32>,
    owners_added: Vec<NodeId>,
    owners_dirty: bool,
    rotate: u32,
    coord: Coordination,
    phase: Phase,
    /// Pieces a repair still has to refetch, with what their supplier attested.
    repair: HashMap<u32, (NodeId, [u8; 32])>,
    repaired: bool,
    wake: Option<Instant>,
    /// The `now` of the call being handled.
    clock: Instant,
    actions: VecDeque<Action>,
    stats: Stats,
}

const NO_OWNER: u32 = u32::MAX;

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// splitmix64's finaliser: a cheap, well-mixed tie-break.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The wait before the next origin attempt after `failures` in a row: 250 ms, doubling, at
/// most [`ORIGIN_BACKOFF_MAX`].
pub fn origin_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (Duration::from_millis(250) * (1u32 << doublings)).min(ORIGIN_BACKOFF_MAX)
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Scheduler {
    /// A download of `digest` with `layout`, by node `me`. `resumed`: pieces an earlier run
    /// verified (the driver checked them again), with their digests.
    pub fn new(
        cfg: Config,
        digest: Digest,
        layout: Layout,
        me: NodeId,
        resumed: &[(u32, [u8; 32])],
        now: Instant,
    ) -> Self {
        let n = layout.pieces();
        let mut map = PieceMap::new(layout);
        for &(i, d) in resumed {
            if i < n {
                map.set(i, d);
            }
        }
        if layout.size == 0 {
            map.set(0, sha256(b""));
        }
        let rotate = u32::from_le_bytes(sha256(me.as_bytes())[..4].try_into().expect("4 bytes")) % WINDOW;
        let tracker = cfg.tracker;
        let mut s = Scheduler {
            cfg,
            digest,
            layout,
            me,
            map,
            suppliers: vec![None; n as usize],
            in_flight: vec![false; n as usize],
            waiting_since: vec![None; n as usize],
            avail: vec![0; n as usize],
            peers: HashMap::new(),
            spare: VecDeque::new(),
            downloaders: BTreeSet::new(),
            banned: HashSet::new(),
            peer_jobs: 0,
            origin_jobs: 0,
            from_origin: BTreeSet::new(),
            origin_failures: 0,
            origin_retry_at: None,
            last_progress: now,
            started: now,
            unsaved: 0,
            next_have_poll: now + HAVE_POLL,
            next_provider_poll: now + FIRST_PROVIDER_POLL,
            last_provider_lookup: now,
            providers_polling: false,
            backlog: 0,
            wanted: Vec::new(),
            owners: Vec::new(),
            owner_of: vec![NO_OWNER; n as usize],
            owner_weight: Vec::new(),
            owner_upto: Vec::new(),
            owners_added: Vec::new(),
            owners_dirty: true,
            rotate,
            coord: Coordination { interval: PLAN_POLL, ..Coordination::default() },
            phase: Phase::Filling,
            repair: HashMap::new(),
            repaired: false,
            wake: None,
            clock: now,
            actions: VecDeque::new(),
            stats: Stats::default(),
        };
        s.coord.answered = !tracker;
        s.step(now);
        s
    }

    /// The piece map of the download: what peers are told and may be served.
    pub fn map(&self) -> &PieceMap {
        &self.map
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Verified contiguous bytes from 0 (may go down during a repair).
    pub fn watermark(&self) -> u64 {
        self.map.watermark()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Nodes known to download (or hold) the digest, not counting us.
    pub fn downloaders(&self) -> usize {
        self.downloaders.len()
    }

    /// Peers polled and requested from (at most [`MAX_PEERS`]).
    pub fn active_peers(&self) -> usize {
        self.peers.len()
    }

    /// Whether the download ended ([`Action::Done`] or [`Action::Failed`] was emitted).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Whether a tracker is there to ask (the agent's view changes as trackers come and go).
    pub fn set_tracker(&mut self, present: bool, now: Instant) {
        if present != self.cfg.tracker {
            self.cfg.tracker = present;
            self.clock = now;
            if present {
                self.coord.asked_at = None;
            } else {
                self.coord.answered = true;
            }
            self.step(now);
        }
    }

    /// The next action to execute.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Scheduler::handle_timeout`] should be called next (`None`: only an event can
    /// move the download on).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake
    }

    /// Time passed: polls, retries, takeovers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = now;
        self.step(now);
    }

    /// Takes in the result of an action.
    pub fn handle(&mut self, event: Event, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        self.clock = now;
        match event {
            Event::Verified { index, digest, from } => self.on_verified(index, digest, from, now),
            Event::BadPiece { index, peer } => {
                self.piece_returned(index, &peer);
                self.ban(peer);
            }
            Event::PeerFailed { index, peer, error } => {
                self.piece_returned(index, &peer);
                match error {
                    PeerError::Lacks => {
                        let mut lost_whole = false;
                        if let Some(s) = self.peers.get_mut(&peer) {
                            // A holder of the whole blob never lacks a piece unless it lost the
                            // blob (quarantined as damaged, evicted): it is no source, and no
                            // origin owner to wait for, any more.
                            lost_whole = s.have.is_full();
                            if s.have.get(index) {
                                s.have.unset(index);
                                self.avail[index as usize] -= 1;
                            }
                        }
                        if lost_whole {
                            self.drop_peer(&peer);
                        }
                    }
                    PeerError::Busy => {
                        if let Some(s) = self.peers.get_mut(&peer) {
                            s.busy_until = Some(now + BUSY_BACKOFF);
                        }
                    }
                    PeerError::Unreachable(_) | PeerError::Protocol(_) => self.drop_peer(&peer),
                }
            }
            Event::OriginDone { first: _, end: _, unfinished, error } => {
                self.origin_jobs = self.origin_jobs.saturating_sub(1);
                for &i in &unfinished {
                    if let Some(f) = self.in_flight.get_mut(i as usize) {
                        *f = false;
                    }
                    self.from_origin.remove(&i);
                }
                match error {
                    None => {}
                    Some(OriginFailure::NotFound) => return self.fail(Failure::OriginNotFound),
                    Some(OriginFailure::Final(why)) => return self.fail(Failure::OriginFailed(why)),
                    Some(OriginFailure::Failed(why)) => {
                        self.origin_failures += 1;
                        if now.saturating_duration_since(self.last_progress) >= self.cfg.give_up_after {
                            return self.fail(Failure::OriginFailed(why));
                        }
                        self.origin_retry_at = Some(now + origin_backoff(self.origin_failures));
                    }
                }
            }
            Event::Have { peer, result } => self.on_have(peer, result, now),
            Event::Providers(found) => {
                self.providers_polling = false;
                for p in found {
                    self.add_peer(p, now, true);
                }
            }
            Event::Asker(p) => {
                // Askers arrive with every `Have` a peer sends: only a new one changes anything.
                if !self.add_peer(p, now, false) {
                    return;
                }
            }
            Event::Plan(plan) => {
                let attest = self.coord.asking.take().unwrap_or_default();
                match plan {
                    Some(plan) => {
                        self.coord.answered = true;
                        self.coord.planned_at = Some(now);
                        // The planner's pace, never faster than PLAN_POLL (so zero, "not
                        // said", is PLAN_POLL) nor slower than the contract lets a live node
                        // be silent.
                        self.coord.interval = plan.next_ask.clamp(PLAN_POLL, PLAN_POLL_MAX);
                        let n = self.layout.pieces();
                        self.coord.assigned = plan.assigned.into_iter().filter(|&i| i < n).collect();
                        for (i, d) in plan.piece_digests {
                            if i < n {
                                self.coord.digests.insert(i, d);
                            }
                        }
                        for p in plan.peers {
                            self.add_peer(p, now, true);
                        }
                    }
                    // Not delivered: report them with the next plan request, at the
                    // default pace (the planner may be gone; the next one may be new).
                    None => {
                        self.coord.unreported.extend(attest);
                        self.coord.interval = PLAN_POLL;
                    }
                }
            }
            Event::WholeDigest { matched } => {
                if self.phase != Phase::Checking {
                    return;
                }
                if matched {
                    self.phase = Phase::Ended;
                    self.actions.push_back(Action::Done);
                } else if !self.repaired && self.suppliers.iter().any(Option::is_some) {
                    self.start_repair();
                } else {
                    self.fail(Failure::DigestMismatch);
                }
            }
        }
        self.step(now);
    }

    // ----- events -----

    fn on_verified(&mut self, index: u32, digest: [u8; 32], from: Option<NodeId>, now: Instant) {
        let i = index as usize;
        if i >= self.in_flight.len() {
            return;
        }
        self.in_flight[i] = false;
        self.last_progress = now;
        match &from {
            Some(peer) => {
                if let Some(s) = self.peers.get_mut(peer) {
                    s.in_flight = s.in_flight.saturating_sub(1);
                }
                self.peer_jobs = self.peer_jobs.saturating_sub(1);
                self.stats.from_peers += 1;
            }
            None => {
                self.from_origin.remove(&index);
                self.origin_failures = 0;
                self.origin_retry_at = None;
                self.stats.from_origin += 1;
                if self.phase == Phase::Repairing {
                    if let Some((peer, attested)) = self.repair.remove(&index) {
                        self.stats.repaired += 1;
                        if attested != digest {
                            self.ban_for(peer, BanReason::Contradicted);
                        }
                    }
                } else if self.cfg.tracker {
                    self.coord.unreported.push((index, digest));
                }
            }
        }
        if self.map.verified.get(index) {
            return;
        }
        self.map.set(index, digest);
        self.suppliers[i] = from;
        self.waiting_since[i] = None;
        self.unsaved += 1;
        if self.unsaved >= SAVE_EVERY {
            self.unsaved = 0;
            self.actions.push_back(Action::SaveState);
        }
        let _ = now;
    }

    /// A peer request ended without a piece.
    fn piece_returned(&mut self, index: u32, peer: &NodeId) {
        if let Some(f) = self.in_flight.get_mut(index as usize) {
            *f = false;
        }
        self.peer_jobs = self.peer_jobs.saturating_sub(1);
        if let Some(s) = self.peers.get_mut(peer) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    fn on_have(&mut self, peer: NodeId, result: Result<PeerHave, PeerError>, now: Instant) {
        if peer == self.me || self.banned.contains(&peer) {
            return;
        }
        let known = self.peers.contains_key(&peer);
        match result {
            Ok(have) => {
                if !known && !self.add_peer(peer.clone(), now, true) && !self.peers.contains_key(&peer) {
                    // No room: it waits as a spare, and this answer is not kept.
                    return;
                }
                self.stop_polling(&peer);
                if !self.update_peer(&peer, have, now) {
                    self.drop_peer(&peer);
                } else {
                    self.rotate_if_useless(&peer, now);
                }
            }
            // Announced, but no size yet: downloading too.
            Err(PeerError::Lacks | PeerError::Busy) => {
                if known {
                    self.stop_polling(&peer);
                } else {
                    self.add_peer(peer, now, false);
                }
            }
            Err(_) => self.drop_peer(&peer),
        }
    }

    fn stop_polling(&mut self, peer: &NodeId) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.polling = false;
        }
    }

    /// Takes in a `Have` answer; false if it does not fit the blob (the peer is then dropped).
    fn update_peer(&mut self, peer: &NodeId, have: PeerHave, now: Instant) -> bool {
        let layout = self.layout;
        if have.size != layout.size
            || have.piece_size != layout.piece_size
            || have.have.len() != layout.pieces()
        {
            return false;
        }
        let Some(s) = self.peers.get_mut(peer) else { return false };
        if have.have.count() > s.have.count() {
            s.last_gain = now;
        }
        let ours = self.map.verified.as_bytes();
        let mut useful = false;
        for (j, (old, new)) in s.have.as_bytes().iter().zip(have.have.as_bytes()).enumerate() {
            let diff = old ^ new;
            if diff == 0 {
                continue;
            }
            useful |= diff & new & !ours[j] != 0;
            for b in 0..8 {
                if diff & (1 << b) != 0 {
                    let i = j * 8 + b;
                    if new & (1 << b) != 0 {
                        self.avail[i] += 1;
                    } else {
                        self.avail[i] -= 1;
                    }
                }
            }
        }
        // Poll a peer that gains what we lack every HAVE_POLL; one that does not, ever less.
        s.every = if useful { HAVE_POLL } else { (s.every * 2).min(HAVE_POLL_MAX) };
        s.next_poll = now + s.every;
        s.have = have.have;
        for (i, d) in have.piece_digests {
            if i < layout.pieces() {
                s.attested.insert(i, d);
            }
        }
        true
    }

    /// A peer we learnt of: polled at once if there is room, else kept as a spare (`evict`: a
    /// source worth room, a provider or the tracker's choice, may replace an active peer that
    /// has nothing we lack). True if it was not known before.
    fn add_peer(&mut self, peer: NodeId, now: Instant, evict: bool) -> bool {
        if peer == self.me || self.banned.contains(&peer) || self.peers.contains_key(&peer) {
            return false;
        }
        let new = self.note_downloader(&peer);
        if self.peers.len() < MAX_PEERS {
            self.spare.retain(|p| *p != peer);
            self.insert_peer(peer, now);
            return true;
        }
        if evict {
            if let Some(out) = self.useless_peer() {
                self.park(&out);
                self.spare.retain(|p| *p != peer);
                self.insert_peer(peer, now);
                return true;
            }
        }
        if !self.spare.contains(&peer) && self.spare.len() < MAX_SPARE {
            self.spare.push_back(peer);
            return true;
        }
        new
    }

    /// Records a downloader; true if it was not known.
    fn note_downloader(&mut self, peer: &NodeId) -> bool {
        if self.downloaders.contains(peer) || self.downloaders.len() >= MAX_DOWNLOADERS {
            return false;
        }
        self.downloaders.insert(peer.clone());
        if !self.owners_dirty {
            self.owners_added.push(peer.clone());
        }
        true
    }

    fn forget_downloader(&mut self, peer: &NodeId) {
        if self.downloaders.remove(peer) {
            self.owners_dirty = true;
            self.owners_added.clear();
        }
    }

    fn insert_peer(&mut self, peer: NodeId, now: Instant) {
        let salt = u64::from_le_bytes(
            sha256(&[peer.as_bytes(), self.me.as_bytes()].concat())[..8].try_into().expect("8 bytes"),
        );
        let state = PeerState {
            have: Bitfield::new(self.layout.pieces()),
            attested: HashMap::new(),
            in_flight: 0,
            last_gain: now,
            busy_until: None,
            polling: false,
            salt,
            every: HAVE_POLL,
            next_poll: now,
        };
        self.note_downloader(&peer);
        self.peers.insert(peer, state);
    }

    /// An active peer with nothing we lack, nothing in flight and not complete (a complete
    /// one costs no polls), other than an origin owner; the smallest such id (deterministic).
    fn useless_peer(&self) -> Option<NodeId> {
        let ours = self.map.verified.as_bytes();
        self.peers
            .iter()
            .filter(|(_, s)| {
                s.in_flight == 0
                    && !s.polling
                    && !s.have.is_full()
                    && s.have.as_bytes().iter().zip(ours).all(|(h, o)| h & !o == 0)
            })
            .map(|(p, _)| p)
            .min()
            .cloned()
    }

    /// Moves an active peer to the spares (it stays a known downloader).
    fn park(&mut self, peer: &NodeId) {
        if let Some(s) = self.peers.remove(peer) {
            self.forget_avail(&s);
            if self.spare.len() >= MAX_SPARE {
                self.spare.pop_front();
            }
            self.spare.push_back(peer.clone());
        }
    }

    /// After a `Have` answer: a peer polled at the longest gap that still has nothing we lack
    /// gives its place to the oldest spare, so a node meets more of the swarm than its first
    /// [`MAX_PEERS`].
    fn rotate_if_useless(&mut self, peer: &NodeId, now: Instant) {
        if self.spare.is_empty() {
            return;
        }
        let ours = self.map.verified.as_bytes();
        let useless = self.peers.get(peer).is_some_and(|s| {
            s.every >= HAVE_POLL_MAX
                && s.in_flight == 0
                && !s.have.is_full()
                && s.have.as_bytes().iter().zip(ours).all(|(h, o)| h & !o == 0)
        });
        if useless {
            let next = self.spare.pop_front().expect("not empty");
            self.park(peer);
            self.insert_peer(next, now);
        }
    }

    fn forget_avail(&mut self, s: &PeerState) {
        for (i, a) in self.avail.iter_mut().enumerate() {
            if s.have.get(i as u32) {
                *a -= 1;
            }
        }
    }

    fn drop_peer(&mut self, peer: &NodeId) {
        if let Some(s) = self.peers.remove(peer) {
            self.forget_avail(&s);
            if let Some(next) = self.spare.pop_front() {
                // In its place, the oldest spare (first seen when it takes the place).
                self.insert_peer(next, self.clock);
            }
        }
        self.spare.retain(|p| p != peer);
        self.forget_downloader(peer);
    }

    fn ban(&mut self, peer: NodeId) {
        self.ban_for(peer, BanReason::BadPiece);
    }

    fn ban_for(&mut self, peer: NodeId, reason: BanReason) {
        self.drop_peer(&peer);
        if self.banned.insert(peer.clone()) {
            self.stats.bans += 1;
            self.actions.push_back(Action::Ban { peer, reason });
        }
    }

    fn fail(&mut self, why: Failure) {
        self.phase = Phase::Ended;
        self.wake = None;
        self.actions.push_back(Action::Failed(why));
    }

    /// Unmarks every peer-supplied piece (see "Trust and repair") and queues it for the origin.
    fn start_repair(&mut self) {
        self.repaired = true;
        self.phase = Phase::Repairing;
        for i in 0..self.layout.pieces() {
            if let Some(peer) = self.suppliers[i as usize].take() {
                let attested = self.map.digests[i as usize];
                self.map.unset(i);
                self.repair.insert(i, (peer, attested));
            }
        }
        self.actions.push_back(Action::SaveState);
    }

    // ----- decisions -----

    fn step(&mut self, now: Instant) {
        self.wake = None;
        match self.phase {
            Phase::Filling => {
                if self.map.verified.is_full() {
                    self.finish_fill();
                    return;
                }
                self.schedule_peers_and_origin(now);
                self.polls(now);
            }
            Phase::Repairing => {
                if self.map.verified.is_full() {
                    self.phase = Phase::Checking;
                    self.actions.push_back(Action::SaveState);
                    self.actions.push_back(Action::CheckWhole);
                    return;
                }
                self.schedule_repair(now);
            }
            Phase::Checking | Phase::Ended => {}
        }
    }

    fn finish_fill(&mut self) {
        self.phase = Phase::Checking;
        self.unsaved = 0;
        self.actions.push_back(Action::SaveState);
        if self.cfg.tracker && !self.coord.unreported.is_empty() && self.coord.asking.is_none() {
            // The last first-hand digests, so the tracker's metainfo is whole.
            let attest = std::mem::take(&mut self.coord.unreported);
            self.actions.push_back(Action::AskPlan(self.report(attest.clone())));
            self.coord.asking = Some(attest);
            self.stats.plan_requests += 1;
        }
        self.actions.push_back(Action::CheckWhole);
    }

    fn report(&self, attest: Vec<(u32, [u8; 32])>) -> PlanReport {
        PlanReport {
            size: self.layout.size,
            piece_size: self.layout.piece_size,
            have: self.map.verified.clone(),
            attest,
            complete: false,
            fetching: self.from_origin.iter().copied().take(shoal_protocol::tracker::MAX_ASSIGNED).collect(),
            planned: self.coord.planned_at.is_some(),
        }
    }

    fn refresh_owners(&mut self) {
        if self.owners_dirty {
            self.owners_dirty = false;
            self.owners_added.clear();
            self.owners = self.downloaders.iter().cloned().chain(std::iter::once(self.me.clone())).collect();
            self.owner_of.fill(NO_OWNER);
            return;
        }
        // Joiners only: appended; `owner` weighs a cached owner against them when asked.
        self.owners.append(&mut self.owners_added);
    }

    /// The origin owner of piece `i` (rendezvous over `owners`, cached per piece): what
    /// `pieces::origin_owner` picks, with its weight kept.
    fn owner(&mut self, i: u32) -> Option<&NodeId> {
        if self.owners.is_empty() {
            return None;
        }
        if self.owner_weight.is_empty() {
            self.owner_weight = vec![[0; 32]; self.owner_of.len()];
            self.owner_upto = vec![0; self.owner_of.len()];
        }
        let i = i as usize;
        let (from, mut best) = match self.owner_of[i] {
            NO_OWNER => (0, None),
            k => (self.owner_upto[i] as usize, Some((k, self.owner_weight[i]))),
        };
        for (k, o) in self.owners.iter().enumerate().skip(from) {
            let w = pieces::weight(&self.digest, i as u32, o.as_ref());
            // `max_by_key` keeps the last of equal maxima (sha256 of distinct inputs: no ties).
            if best.is_none_or(|(_, b)| w >= b) {
                best = Some((k as u32, w));
            }
        }
        let (k, w) = best.expect("not empty");
        (self.owner_of[i], self.owner_weight[i], self.owner_upto[i]) = (k, w, self.owners.len() as u32);
        self.owners.get(k as usize)
    }

    fn mine(&mut self, i: u32, coordinated: bool) -> bool {
        if coordinated {
            return self.coord.assigned.contains(&i);
        }
        let me = self.me.clone();
        self.owner(i) == Some(&me)
    }

    fn schedule_peers_and_origin(&mut self, now: Instant) {
        self.refresh_owners();
        let n = self.layout.pieces();
        let first = self.map.verified.first_missing();
        let window_end = (first + WINDOW).min(n);
        let wlen = window_end - first;
        let mut nobody_holds = Vec::new();
        // The walk stops once peers and origin are at capacity past the window and enough
        // known pieces wait: what lies beyond could not be acted on now.
        let origin_room = self.origin_jobs < self.cfg.origin_concurrency;
        let mut backlog = 0;
        let mut busy_woken = false;
        for k in 0..n - first {
            let i = if k < wlen { first + (k + self.rotate) % wlen } else { first + k };
            if i >= window_end
                && self.peer_jobs >= self.cfg.peer_concurrency
                && !origin_room
                && backlog >= self.cfg.peer_concurrency
            {
                break;
            }
            if self.map.verified.get(i) || self.in_flight[i as usize] {
                continue;
            }
            if self.avail[i as usize] == 0 {
                nobody_holds.push(i);
                continue;
            }
            if self.peer_jobs >= self.cfg.peer_concurrency {
                backlog += 1;
                continue;
            }
            // One pass over the peers: is there a holder whose digest we can check against,
            // and the least loaded one free to ask (ties broken per peer and piece).
            // The digest to check against is looked up only where it can change the answer
            // (a holder that would be the best so far, or the first holder at all): the
            // same choice as checking every holder, at a fraction of the lookups.
            let coord = &self.coord;
            let cfg = &self.cfg;
            let mut has_holder = false;
            let mut best: Option<(&NodeId, (usize, u64), [u8; 32])> = None;
            for (p, st) in &self.peers {
                if !st.have.get(i) {
                    continue;
                }
                if st.in_flight >= cfg.per_peer_concurrency || st.busy_until.is_some_and(|t| t > now) {
                    has_holder = has_holder || coord.expected(i, st).is_some();
                    continue;
                }
                let key = (st.in_flight, mix(st.salt ^ u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
                if best.as_ref().is_none_or(|(_, k, _)| key < *k) {
                    if let Some(expected) = coord.expected(i, st) {
                        has_holder = true;
                        best = Some((p, key, expected));
                    }
                }
            }
            if !has_holder {
                nobody_holds.push(i);
                continue;
            }
            let Some((peer, _, expected)) = best.map(|(p, k, e)| (p.clone(), k, e)) else {
                // Every holder is busy or full: wake when a backoff ends (the same for every
                // such piece of this step: busy peers do not change during it).
                backlog += 1;
                if !busy_woken {
                    busy_woken = true;
                    let t = self.peers.values().filter_map(|s| s.busy_until).filter(|t| *t > now).min();
                    if let Some(t) = t {
                        self.wake = earliest(self.wake, t);
                    }
                }
                continue;
            };
            self.peers.get_mut(&peer).expect("a holder").in_flight += 1;
            self.peer_jobs += 1;
            self.in_flight[i as usize] = true;
            self.actions.push_back(Action::RequestPiece { peer, index: i, expected });
        }
        self.backlog = backlog;

        // Pieces nobody holds, in order so that consecutive ones share a span: the origin
        // owner fetches them.
        nobody_holds.sort_unstable();
        let coordinated = self.coord.active(now);
        if let Some(t) = self.coord.planned_at.filter(|_| coordinated) {
            self.wake = earliest(self.wake, t + PLAN_STALE);
        }
        for &i in &nobody_holds {
            if i < window_end {
                self.waiting_since[i as usize].get_or_insert(now);
            }
        }
        self.meet_owners(&nobody_holds, window_end, coordinated, now);
        // Nothing from the origin before the planner's first answer (the first request
        // already follows it), or before PLAN_STALE without one: then by our own rules.
        if !self.coord.answered {
            let alone_at = self.started + PLAN_STALE;
            if now < alone_at {
                self.wake = earliest(self.wake, alone_at);
                return;
            }
            self.coord.answered = true;
        }
        if let Some(t) = self.origin_retry_at {
            if now < t {
                if !nobody_holds.is_empty() {
                    self.wake = earliest(self.wake, t);
                }
                return;
            }
        }
        let stall = self.cfg.owner_stall;
        for i in nobody_holds {
            if self.origin_jobs >= self.cfg.origin_concurrency {
                break;
            }
            if self.in_flight[i as usize] {
                continue;
            }
            let waited = match self.waiting_since[i as usize] {
                Some(t) if i < window_end => now.saturating_duration_since(t),
                _ => Duration::ZERO,
            };
            let mine = self.mine(i, coordinated);
            let take = if mine {
                true
            } else if coordinated {
                // The tracker gives every piece nobody holds to exactly one node and
                // reassigns it when that node stalls or dies. A safety valve here would only
                // duplicate origin traffic on slow links, where waiting is normal.
                false
            } else if i >= window_end {
                false
            } else {
                let delay = stall;
                let owner = self.owner(i).cloned();
                // An owner we do not poll is stalled.
                let owner_gain = owner.as_ref().and_then(|o| self.peers.get(o)).map(|s| s.last_gain);
                let owner_stalled = owner_gain.is_none_or(|t| now.saturating_duration_since(t) > stall);
                let since = self.waiting_since[i as usize].expect("in the window");
                // Take a piece over when its owner makes no progress at all, or (a safety
                // valve for owners that disagree about who owns what) when it has blocked
                // the stream for a long time.
                let take = (waited > delay && owner_stalled) || waited > delay * 4;
                if !take {
                    let mut t = since + delay * 4 + Duration::from_millis(1);
                    if waited <= delay {
                        t = t.min(since + delay + Duration::from_millis(1));
                    }
                    if let Some(g) = owner_gain {
                        t = t.min((g + stall + Duration::from_millis(1)).max(since + delay));
                    }
                    self.wake = earliest(self.wake, t.max(now + Duration::from_millis(1)));
                }
                take
            };
            if !take {
                continue;
            }
            let unplanned = self.cfg.tracker && !(coordinated && mine);
            let max_span = if self.downloaders.is_empty() || coordinated { MAX_SPAN } else { SHARED_SPAN };
            let mut end = i + 1;
            while end < n
                && end - i < max_span
                && !self.map.verified.get(end)
                && !self.in_flight[end as usize]
                && self.avail[end as usize] == 0
                && self.mine(end, coordinated)
            {
                end += 1;
            }
            let taken_over = !coordinated && !mine;
            if taken_over {
                self.stats.taken_over += end - i;
            }
            if unplanned {
                self.stats.unplanned += end - i;
            }
            (i..end).for_each(|k| self.in_flight[k as usize] = true);
            self.from_origin.extend(i..end);
            self.origin_jobs += 1;
            self.actions.push_back(Action::FetchOrigin {
                first: i,
                end,
                taken_over,
                unplanned,
                repair: false,
            });
        }
    }

    /// The first copy of a piece nobody holds comes from its origin owner: poll the owners of
    /// such pieces in the window (beyond [`MAX_PEERS`] if need be; at most the group), so the
    /// piece reaches us from its owner or we see the owner stall. Without this a node that
    /// met no owner waits for the takeover delay while the piece sits one hop away.
    fn meet_owners(&mut self, nobody_holds: &[u32], window_end: u32, coordinated: bool, now: Instant) {
        self.wanted.clear();
        if coordinated {
            return;
        }
        for &i in nobody_holds.iter().filter(|&&i| i < window_end) {
            let Some(owner) = self.owner(i).cloned() else { continue };
            if owner != self.me && !self.banned.contains(&owner) && !self.wanted.contains(&owner) {
                self.wanted.push(owner);
            }
        }
        for k in 0..self.wanted.len() {
            let owner = self.wanted[k].clone();
            if !self.peers.contains_key(&owner) {
                self.spare.retain(|p| *p != owner);
                self.insert_peer(owner, now);
            }
        }
    }

    fn schedule_repair(&mut self, now: Instant) {
        if let Some(t) = self.origin_retry_at {
            if now < t {
                self.wake = Some(t);
                return;
            }
        }
        let mut todo: Vec<u32> =
            self.repair.keys().copied().filter(|&i| !self.in_flight[i as usize]).collect();
        todo.sort_unstable();
        let mut k = 0;
        while k < todo.len() && self.origin_jobs < self.cfg.origin_concurrency {
            let first = todo[k];
            let mut end = first + 1;
            k += 1;
            while k < todo.len() && todo[k] == end && end - first < MAX_SPAN {
                end += 1;
                k += 1;
            }
            (first..end).for_each(|i| self.in_flight[i as usize] = true);
            self.from_origin.extend(first..end);
            self.origin_jobs += 1;
            self.actions.push_back(Action::FetchOrigin {
                first,
                end,
                taken_over: false,
                unplanned: false,
                repair: true,
            });
        }
    }

    fn polls(&mut self, now: Instant) {
        if self.cfg.tracker && self.coord.asking.is_none() {
            // Ask again soon when every assigned piece is done or on its way.
            let drained = !self.coord.assigned.is_empty()
                && self
                    .coord
                    .assigned
                    .iter()
                    .all(|&k| self.map.verified.get(k) || self.in_flight[k as usize]);
            let next_ask = self.coord.asked_at.map(|t| t + self.coord.interval);
            let due = next_ask.is_none_or(|t| now >= t);
            let early = self.coord.asked_at.map(|t| t + PLAN_MIN_GAP);
            if due || (drained && early.is_some_and(|t| now >= t)) {
                self.coord.asked_at = Some(now);
                let attest = std::mem::take(&mut self.coord.unreported);
                self.actions.push_back(Action::AskPlan(self.report(attest.clone())));
                self.coord.asking = Some(attest);
                self.stats.plan_requests += 1;
            } else if let Some(t) = next_ask {
                self.wake = earliest(self.wake, if drained { early.expect("some") } else { t });
            }
        }
        if now >= self.next_have_poll {
            self.next_have_poll = now + HAVE_POLL;
            // Each peer at its own gap (see HAVE_POLL_MAX). While enough known pieces wait
            // for capacity, only the owners of pieces nobody holds are polled (their progress
            // decides takeovers).
            let saturated = self.backlog >= self.cfg.peer_concurrency;
            let wanted = &self.wanted;
            let mut asked: Vec<NodeId> = Vec::new();
            for (peer, state) in self.peers.iter_mut() {
                if state.polling || state.have.is_full() || now < state.next_poll {
                    continue;
                }
                if saturated && !wanted.contains(peer) {
                    continue;
                }
                state.polling = true;
                state.next_poll = now + state.every;
                asked.push(peer.clone());
            }
            asked.sort_unstable();
            self.stats.have_requests += asked.len() as u32;
            self.actions.extend(asked.into_iter().map(Action::AskHave));
        }
        self.wake = earliest(self.wake, self.next_have_poll);
        if !self.providers_polling {
            // While a plan is live the planner names the peers that hold what we lack: the
            // DHT is asked only every PROVIDER_POLL_PLANNED (for holders the planner does not
            // know, e.g. nodes that pulled long ago).
            if self.cfg.tracker && self.coord.active(now) {
                let due = self.last_provider_lookup + PROVIDER_POLL_PLANNED;
                self.next_provider_poll = self.next_provider_poll.max(due);
            }
            if now >= self.next_provider_poll {
                self.next_provider_poll = now + PROVIDER_POLL;
                self.last_provider_lookup = now;
                self.providers_polling = true;
                self.stats.provider_lookups += 1;
                self.actions.push_back(Action::FindProviders);
            } else {
                self.wake = earliest(self.wake, self.next_provider_poll);
            }
        }
    }
}

#[cfg(test)]
mod tests;
