//! The download task of one digest: find who has it, fetch verified pieces from peers and
//! the origin, repair what a lying peer attested, commit.
//!
//! ## Schedule
//!
//! 1. Announce the digest at once, so nodes that start at the same moment see each other,
//!    then ask the network who provides it and what each provider holds.
//! 2. Size: from the providers when they agree, else a HEAD at the origin (no bytes move),
//!    which also bans every provider that named another size. A download that fails on a
//!    size only peers named asks the origin too, and bans them if it disagrees.
//! 3. Until every piece is verified, each round walks the missing pieces from the watermark
//!    (the first window rotated per node, so peers do not all ask the same source for the same
//!    piece at once):
//!    - a piece some peer holds (with an attested digest) is requested from the least loaded
//!      such peer, bounded per peer and per download;
//!    - a piece nobody holds is fetched from the origin by its owner: the node chosen by
//!      rendezvous hashing over the nodes downloading the digest. Consecutive owned pieces go
//!      in one `Range` request. A piece whose owner made no progress for `owner_stall` (or
//!      that waited four times that) is taken over, so a blob always completes, at worst
//!      entirely from the origin.
//! 4. Peers' piece maps are polled every [`HAVE_POLL`], providers every [`PROVIDER_POLL`].
//!
//! ## Trust
//!
//! A peer's piece is checked against the digest that peer attested before it is written; a
//! mismatch bans the peer. A piece from the origin is attested by us (first hand). The whole
//! sha256 is computed while the watermark advances; if it fails, every piece that came from a
//! peer is refetched from the origin, peers whose pieces differ are banned, and the digest is
//! checked again. Only then is the blob committed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::net::{NodeId, PeerError, PeerHave, Plan, PlanReport};
use super::{Download, FetchError, Fetcher, PieceMap, Progress, Shared, Source};
use crate::metrics::METRICS;
use crate::origin::{self, Kind, OriginError};
use crate::pieces::{origin_owner, Bitfield, Layout};
use crate::store::Partial;
use crate::types::Digest;

/// How often peers' piece maps are polled during a download.
const HAVE_POLL: Duration = Duration::from_millis(500);
/// How often the provider set is looked up again during a download.
const PROVIDER_POLL: Duration = Duration::from_secs(2);
/// Pieces near the watermark whose order is rotated per node.
const WINDOW: u32 = 32;
/// Most pieces in one origin `Range` request when no other node downloads the digest.
const MAX_SPAN: u32 = 16;
/// Most pieces in one origin `Range` request while other nodes download it too: short
/// spans commit little to a view of the owner set that may still be incomplete.
const SHARED_SPAN: u32 = 2;
/// Origin failures in a row (without a verified piece in between) before giving up.
const MAX_ORIGIN_FAILURES: u32 = 6;
/// Save the piece map after this many newly verified pieces (and when the download ends).
const SAVE_EVERY: u32 = 8;
/// How long a busy peer is left alone.
const BUSY_BACKOFF: Duration = Duration::from_millis(200);
/// How often a download reports to its tracker and asks for a plan (sooner when it runs
/// out of assigned pieces).
const PLAN_POLL: Duration = Duration::from_millis(500);
/// Shortest gap between two plan requests.
const PLAN_MIN_GAP: Duration = Duration::from_millis(50);
/// A plan older than this no longer decides origin fetches: the tracker is gone, and the
/// download falls back to rendezvous owners. Generous, because a node whose answers are
/// merely late (a starved CPU) must not fetch what the tracker gave to others; the tracker
/// itself gives a silent node's pieces away after 6 s.
const PLAN_STALE: Duration = Duration::from_secs(10);

/// What the jobs of a download report to its loop.
enum Event {
    Verified {
        index: u32,
        digest: [u8; 32],
        from: Option<NodeId>,
    },
    BadPiece {
        index: u32,
        peer: NodeId,
    },
    PeerFailed {
        index: u32,
        peer: NodeId,
        error: PeerError,
    },
    OriginDone {
        unfinished: Vec<u32>,
        error: Option<OriginError>,
    },
    WriteFailed(crate::store::StoreError),
    Have {
        peer: NodeId,
        result: Result<PeerHave, PeerError>,
    },
    Providers(Vec<NodeId>),
    /// A tracker's answer (`None`: no tracker answered), and the attestations it carried.
    Planned {
        plan: Option<Plan>,
        attest: Vec<(u32, [u8; 32])>,
    },
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
    /// A plan request is in flight.
    asking: bool,
    next_ask: Option<Instant>,
    /// Digests of pieces we fetched from the origin, not yet reported.
    unreported: Vec<(u32, [u8; 32])>,
}

impl Coordination {
    /// Whether the tracker's plan decides which origin pieces we fetch.
    fn active(&self, now: Instant) -> bool {
        self.planned_at.is_some_and(|t| now.duration_since(t) < PLAN_STALE)
    }

    /// Takes in a plan; returns its peers.
    fn apply(&mut self, plan: Plan, pieces: u32) -> Vec<NodeId> {
        self.planned_at = Some(Instant::now());
        self.assigned = plan.assigned.into_iter().filter(|&i| i < pieces).collect();
        for (i, d) in plan.piece_digests {
            if i < pieces {
                self.digests.insert(i, d);
            }
        }
        plan.peers
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

/// What the peers that answered a `Have` say about a blob's size. Only answers whose piece
/// size fits their size under our layout policy count.
#[derive(Debug)]
enum SizeClaim {
    /// Nobody named a size: the origin tells it.
    Unknown,
    /// Every answer that names a size names this one.
    Agreed(PeerHave),
    /// Answers disagree: the origin decides; without it, the size most peers name (ties go to
    /// a peer that holds the whole blob).
    Disputed { majority: PeerHave },
}

impl SizeClaim {
    fn of(answers: &[(NodeId, Result<PeerHave, PeerError>)]) -> SizeClaim {
        let valid: Vec<&PeerHave> = answers
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .filter(|h| Layout::for_size(h.size).piece_size == h.piece_size)
            .collect();
        let Some(first) = valid.first() else { return SizeClaim::Unknown };
        if valid.iter().all(|h| h.size == first.size) {
            return SizeClaim::Agreed((*first).clone());
        }
        let votes = |size: u64| valid.iter().filter(|h| h.size == size).count();
        let majority = valid.iter().max_by_key(|h| (votes(h.size), h.complete)).expect("not empty");
        SizeClaim::Disputed { majority: (*majority).clone() }
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
}

impl PeerState {
    fn new(pieces: u32) -> Self {
        PeerState {
            have: Bitfield::new(pieces),
            attested: HashMap::new(),
            in_flight: 0,
            last_gain: Instant::now(),
            busy_until: None,
            polling: false,
        }
    }

    /// Takes in a `Have` answer; false if it does not fit the blob (the peer is then dropped).
    fn update(&mut self, have: PeerHave, layout: Layout) -> bool {
        if have.size != layout.size
            || have.piece_size != layout.piece_size
            || have.have.len() != layout.pieces()
        {
            return false;
        }
        if have.have.count() > self.have.count() {
            self.last_gain = Instant::now();
        }
        self.have = have.have;
        for (i, d) in have.piece_digests {
            if i < layout.pieces() {
                self.attested.insert(i, d);
            }
        }
        true
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Fetcher {
    pub(super) async fn run(self: Arc<Self>, dl: Arc<Download>, source: Source) {
        METRICS.downloads_in_flight.inc();
        let digest = dl.digest;
        match self.download(&dl, &source).await {
            Ok(()) => tracing::info!(%digest, "download verified and stored"),
            Err(e) => {
                if matches!(e, FetchError::DigestMismatch { .. }) {
                    METRICS.origin_digest_mismatches.inc();
                }
                tracing::warn!(%digest, error = %origin::error_chain(&e), "download failed; nothing kept as complete");
                self.net.withdraw(digest);
                dl.progress.send_replace(Progress::Failed(Arc::new(e)));
            }
        }
        self.in_flight.lock().expect("in-flight lock poisoned").remove(&digest);
        METRICS.downloads_in_flight.dec();
    }

    async fn download(self: &Arc<Self>, dl: &Arc<Download>, source: &Source) -> Result<(), FetchError> {
        let digest = dl.digest;
        self.net.announce(digest);

        // Who has it, and how big is it?
        let providers = self.live_providers(digest).await;
        let mut answers = self.ask_have(providers, digest).await;
        let mut claim = SizeClaim::of(&answers);
        // With a tracker, its plans split the origin fetches from the first one on.
        if matches!(claim, SizeClaim::Unknown)
            && self.net.settle_delay() > Duration::ZERO
            && !self.net.has_coordinator()
        {
            // Nobody holds it yet. Nodes that start at the same moment announce at the same
            // moment: wait for their records, then read the provider set again, so the
            // origin pieces are split among everyone from the first request on.
            tokio::time::sleep(self.net.settle_delay()).await;
            let again = self.live_providers(digest).await;
            let asked: Vec<NodeId> = answers.iter().map(|(p, _)| p.clone()).collect();
            let fresh: Vec<NodeId> = again.into_iter().filter(|p| !asked.contains(p)).collect();
            answers.extend(self.ask_have(fresh, digest).await);
            claim = SizeClaim::of(&answers);
        }
        let head =
            || self.origin.content_info(&source.registry, &source.repo, source.kind, &digest, &source.accept);
        // The peers whose word the size is, when it is only their word: if the download then
        // fails, the origin is asked whether they lied.
        let named = |size: u64| -> Vec<NodeId> {
            answers
                .iter()
                .filter(|(_, a)| a.as_ref().is_ok_and(|h| h.size == size))
                .map(|(p, _)| p.clone())
                .collect()
        };
        let (total, mut media_type, claimed_size) = match claim {
            SizeClaim::Agreed(h) => (h.size, h.media_type, named(h.size)),
            SizeClaim::Unknown => {
                let (size, media_type) = head().await?;
                (size, media_type, Vec::new())
            }
            // A digest has one size: someone lies (or is broken). The origin settles it
            // without sending a byte, and whoever contradicts it is banned.
            SizeClaim::Disputed { majority } => match head().await {
                Ok((size, media_type)) => {
                    for (peer, answer) in &answers {
                        if answer.as_ref().is_ok_and(|h| h.size != size) {
                            self.ban(peer, "claimed a size the origin contradicts");
                        }
                    }
                    (size, media_type, Vec::new())
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, size = majority.size,
                        "peers disagree on the size and the origin cannot settle it: taking the size most name");
                    (majority.size, majority.media_type, named(majority.size))
                }
            },
        };
        if source.kind == Kind::Blob {
            media_type = None;
        }
        let layout = Layout::for_size(total);

        let mut peers: HashMap<NodeId, PeerState> = HashMap::new();
        let mut downloaders: BTreeSet<NodeId> = BTreeSet::new();
        for (peer, result) in answers.drain(..) {
            match result {
                Ok(have) => {
                    let mut state = PeerState::new(layout.pieces());
                    if state.update(have, layout) {
                        downloaders.insert(peer.clone());
                        peers.insert(peer, state);
                    }
                }
                // Announced but no size yet: downloading too.
                Err(PeerError::Lacks) | Err(PeerError::Busy) => {
                    downloaders.insert(peer.clone());
                    peers.insert(peer, PeerState::new(layout.pieces()));
                }
                Err(_) => {}
            }
        }

        // Resume what an earlier run verified, after checking it again.
        let (partial, saved) = self.store.open_partial(&digest).await?;
        let mut map = PieceMap::new(layout);
        if let Some(saved) = saved.and_then(|b| PieceMap::decode_state(&b, layout)) {
            for i in (0..layout.pieces()).filter(|&i| saved.verified.get(i)) {
                let (s, e) = layout.range(i);
                if let Ok(data) = partial.read_at(s, (e - s) as usize).await {
                    if sha256(&data) == saved.digests[i as usize] {
                        map.set(i, saved.digests[i as usize]);
                    }
                }
            }
            tracing::info!(%digest, pieces = map.verified.count(), of = layout.pieces(), "resuming verified pieces");
            METRICS.pieces_resumed.inc_by(u64::from(map.verified.count()));
        }
        if total == 0 {
            map.set(0, sha256(b""));
        }
        *dl.shared.lock().await =
            Some(Shared { partial: partial.clone(), map: map.clone(), media_type: media_type.clone() });
        dl.progress.send_replace(Progress::Running {
            total,
            media_type: media_type.clone(),
            available: map.watermark(),
        });

        let mut suppliers: Vec<Option<NodeId>> = vec![None; layout.pieces() as usize];
        let outcome = async {
            let hasher = tokio::spawn(whole_sha256(dl.clone(), total));
            self.fill(dl, source, &partial, &mut map, &mut suppliers, peers, downloaders).await?;
            let mut actual = hasher.await.map_err(|e| FetchError::Read(std::io::Error::other(e)))??;
            if actual != digest && suppliers.iter().any(Option::is_some) {
                tracing::warn!(%digest, %actual, "whole digest failed: checking peer pieces against the origin");
                self.repair(dl, source, &partial, &mut map, &suppliers).await?;
                actual = whole_sha256(dl.clone(), total).await?;
            }
            if actual != digest {
                return Err(FetchError::DigestMismatch { expected: digest, actual });
            }
            Ok(())
        }
        .await;

        let mut shared = dl.shared.lock().await;
        *shared = None;
        match outcome {
            Ok(()) => {
                if source.kind == Kind::Manifest && media_type.is_none() {
                    media_type = sniff_media_type(&partial, total).await;
                }
                self.store.commit(partial, media_type.as_deref(), Some(map.encode_meta())).await?;
                dl.progress.send_replace(Progress::Complete { total, media_type });
                if self.net.has_coordinator() {
                    // Tell the tracker the whole blob verified: its metainfo is complete.
                    let report = PlanReport {
                        size: layout.size,
                        piece_size: layout.piece_size,
                        have: map.verified.clone(),
                        attest: Vec::new(),
                        complete: true,
                    };
                    tokio::spawn(self.net.plan(digest, report));
                }
                Ok(())
            }
            Err(e) => {
                // A lie about the size that every piece survives (a blob a whole number of
                // pieces long, claimed longer) shows only as a failure: check it, so the next
                // attempt does not believe the same peers.
                if !claimed_size.is_empty() {
                    if let Ok((size, _)) = head().await {
                        if size != total {
                            for peer in &claimed_size {
                                self.ban(peer, "claimed a size the origin contradicts");
                            }
                        }
                    }
                }
                if matches!(e, FetchError::DigestMismatch { .. }) {
                    partial.discard().await;
                } else {
                    // Keep verified pieces for the next attempt.
                    let _ = partial.save_state(map.encode_state()).await;
                }
                Err(e)
            }
        }
    }

    /// Asks each of `peers` (16 at a time) what it holds of `digest`.
    async fn ask_have(
        &self,
        peers: Vec<NodeId>,
        digest: Digest,
    ) -> Vec<(NodeId, Result<PeerHave, PeerError>)> {
        futures_util::stream::iter(peers)
            .map(|p| {
                let net = self.net.clone();
                async move { (p.clone(), net.have(p, digest).await) }
            })
            .buffer_unordered(16)
            .collect()
            .await
    }

    fn plan_report(&self, map: &PieceMap, attest: Vec<(u32, [u8; 32])>) -> PlanReport {
        PlanReport {
            size: map.layout.size,
            piece_size: map.layout.piece_size,
            have: map.verified.clone(),
            attest,
            complete: false,
        }
    }

    /// Providers of `digest` we may ask: not us, not banned.
    async fn live_providers(&self, digest: Digest) -> Vec<NodeId> {
        let me = self.net.local_id();
        let found = self.net.find_providers(digest).await;
        found.into_iter().filter(|p| *p != me && !self.is_banned(p)).collect()
    }

    /// Fetches every missing piece (see the module docs for the schedule).
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        self: &Arc<Self>,
        dl: &Arc<Download>,
        source: &Source,
        partial: &Partial,
        map: &mut PieceMap,
        suppliers: &mut [Option<NodeId>],
        mut peers: HashMap<NodeId, PeerState>,
        mut downloaders: BTreeSet<NodeId>,
    ) -> Result<(), FetchError> {
        let digest = dl.digest;
        let layout = map.layout;
        let n = layout.pieces();
        let me = self.net.local_id();
        let cfg = self.config.clone();
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        let mut jobs = JoinSet::new();
        let mut in_flight = vec![false; n as usize];
        let mut waiting_since: Vec<Option<Instant>> = vec![None; n as usize];
        let (mut peer_jobs, mut origin_jobs) = (0usize, 0usize);
        let mut origin_failures = 0u32;
        let mut origin_retry_at = Instant::now();
        let mut unsaved = 0u32;
        let mut next_have_poll = Instant::now() + HAVE_POLL;
        let mut next_provider_poll = Instant::now() + Duration::from_millis(300);
        let mut providers_polling = false;
        let rotate = u32::from_le_bytes(sha256(me.as_bytes())[..4].try_into().expect("4 bytes")) % WINDOW;
        let mut coord = Coordination::default();
        if self.net.has_coordinator() {
            // Ask before scheduling anything, so the first origin request already follows
            // the tracker's assignment.
            let report = self.plan_report(map, Vec::new());
            if let Some(plan) = self.net.plan(digest, report).await {
                for p in coord.apply(plan, n) {
                    if p != me && !self.is_banned(&p) {
                        peers.entry(p.clone()).or_insert_with(|| PeerState::new(n));
                        downloaders.insert(p);
                    }
                }
            }
        }

        while !map.verified.is_full() {
            let now = Instant::now();
            let askers: Vec<NodeId> = dl.askers.lock().expect("askers lock").drain().collect();
            for p in askers {
                if p != me && !self.is_banned(&p) {
                    if let std::collections::hash_map::Entry::Vacant(slot) = peers.entry(p.clone()) {
                        slot.insert(PeerState::new(n));
                        downloaders.insert(p);
                    }
                }
            }
            // --- schedule pieces ---
            let mut owners: Vec<NodeId> = downloaders.iter().cloned().collect();
            owners.push(me.clone());
            let first = map.verified.first_missing();
            let window_end = (first + WINDOW).min(n);
            // Pieces some peer holds, near the watermark first (rotated per node).
            let order = (0..window_end - first)
                .map(|k| first + (k + rotate) % (window_end - first))
                .chain(window_end..n);
            let mut nobody_holds = Vec::new();
            for i in order {
                if map.verified.get(i) || in_flight[i as usize] {
                    continue;
                }
                let mut holders: Vec<(&NodeId, &PeerState)> =
                    peers.iter().filter(|(_, s)| s.have.get(i) && coord.expected(i, s).is_some()).collect();
                if holders.is_empty() {
                    nobody_holds.push(i);
                    continue;
                }
                if peer_jobs >= cfg.peer_concurrency {
                    continue;
                }
                holders.retain(|(_, s)| {
                    s.in_flight < cfg.per_peer_concurrency && s.busy_until.is_none_or(|t| t <= now)
                });
                let Some((peer, state)) = holders.into_iter().min_by_key(|(p, s)| {
                    (s.in_flight, sha256(&[p.as_bytes(), &i.to_le_bytes(), me.as_bytes()].concat()))
                }) else {
                    continue;
                };
                let (peer, expected) = (peer.clone(), coord.expected(i, state).expect("holders have one"));
                peers.get_mut(&peer).expect("holder is a peer").in_flight += 1;
                peer_jobs += 1;
                in_flight[i as usize] = true;
                jobs.spawn(peer_piece(
                    self.clone(),
                    peer,
                    digest,
                    i,
                    expected,
                    layout,
                    partial.clone(),
                    tx.clone(),
                ));
            }
            // Pieces nobody holds, in order so that consecutive ones share a Range request:
            // the origin owner fetches them.
            nobody_holds.sort_unstable();
            for i in nobody_holds {
                if origin_jobs >= cfg.origin_concurrency || now < origin_retry_at {
                    break;
                }
                if in_flight[i as usize] {
                    continue;
                }
                // A piece waits once it is in the window (it blocks the stream from then on).
                let waited = if i < window_end {
                    now - *waiting_since[i as usize].get_or_insert(now)
                } else {
                    Duration::ZERO
                };
                let coordinated = coord.active(now);
                // With a tracker, its assignment names the one node that fetches a piece;
                // without one, every node computes the same rendezvous owner.
                let mine = |k: u32| {
                    if coordinated {
                        coord.assigned.contains(&k)
                    } else {
                        origin_owner(&digest, k, &owners) == Some(&me)
                    }
                };
                let take = if mine(i) {
                    true
                } else if coordinated {
                    // The tracker gives every piece nobody holds to exactly one node and
                    // reassigns it when that node stalls or dies. A safety valve here would
                    // only duplicate origin traffic on slow links, where waiting is normal.
                    false
                } else {
                    let owner = origin_owner(&digest, i, &owners).expect("owners include us");
                    let owner_stalled = peers.get(owner).is_none_or(|s| now - s.last_gain > cfg.owner_stall);
                    // Take a piece over when its owner makes no progress at all, or (a safety
                    // valve for owners that disagree about who owns what) when it has blocked
                    // the stream for a long time.
                    (waited > cfg.owner_stall && owner_stalled) || waited > cfg.owner_stall * 4
                };
                if !take {
                    continue;
                }
                if !mine(i) {
                    tracing::debug!(%digest, piece = i, "taking over a stalled piece from the origin");
                }
                let unplanned = self.net.has_coordinator() && !(coordinated && mine(i));
                let max_span = if downloaders.is_empty() || coordinated { MAX_SPAN } else { SHARED_SPAN };
                let mut end = i + 1;
                while end < n
                    && end - i < max_span
                    && !map.verified.get(end)
                    && !in_flight[end as usize]
                    && mine(end)
                    && !peers.values().any(|s| s.have.get(end))
                {
                    end += 1;
                }
                if !coordinated && !mine(i) {
                    METRICS.origin_pieces_taken_over.inc_by(u64::from(end - i));
                }
                if unplanned {
                    METRICS.origin_pieces_unplanned.inc_by(u64::from(end - i));
                    tracing::info!(%digest, pieces = ?(i..end), coordinated, ?waited, "origin fetch outside the tracker's plan");
                }
                (i..end).for_each(|k| in_flight[k as usize] = true);
                origin_jobs += 1;
                jobs.spawn(origin_span(
                    self.clone(),
                    source.clone(),
                    digest,
                    layout,
                    (i, end),
                    partial.clone(),
                    tx.clone(),
                ));
            }

            // --- polls ---
            if self.net.has_coordinator() && !coord.asking {
                // Ask again soon when every assigned piece is done or on its way.
                let drained = !coord.assigned.is_empty()
                    && coord.assigned.iter().all(|&k| map.verified.get(k) || in_flight[k as usize]);
                let due = coord.next_ask.is_none_or(|t| now >= t);
                if due || (drained && coord.next_ask.is_some_and(|t| now + PLAN_POLL - PLAN_MIN_GAP >= t)) {
                    coord.asking = true;
                    coord.next_ask = Some(now + PLAN_POLL);
                    let attest = std::mem::take(&mut coord.unreported);
                    let report = self.plan_report(map, attest.clone());
                    let (net, tx) = (self.net.clone(), tx.clone());
                    jobs.spawn(async move {
                        let plan = net.plan(digest, report).await;
                        let _ = tx.send(Event::Planned { plan, attest }).await;
                    });
                }
            }
            if now >= next_have_poll {
                next_have_poll = now + HAVE_POLL;
                for (peer, state) in peers.iter_mut().filter(|(_, s)| !s.polling && !s.have.is_full()) {
                    state.polling = true;
                    let (net, peer, tx) = (self.net.clone(), peer.clone(), tx.clone());
                    jobs.spawn(async move {
                        let result = net.have(peer.clone(), digest).await;
                        let _ = tx.send(Event::Have { peer, result }).await;
                    });
                }
            }
            if now >= next_provider_poll && !providers_polling {
                next_provider_poll = now + PROVIDER_POLL;
                providers_polling = true;
                let (this, tx) = (self.clone(), tx.clone());
                jobs.spawn(async move {
                    let found = this.live_providers(digest).await;
                    let _ = tx.send(Event::Providers(found)).await;
                });
            }

            // --- wait for something to happen ---
            let mut wake = next_have_poll.min(next_provider_poll).min(now + Duration::from_millis(100));
            if let Some(t) = coord.next_ask.filter(|_| !coord.asking) {
                wake = wake.min(t.max(now + PLAN_MIN_GAP));
            }
            let event = tokio::select! {
                ev = rx.recv() => ev,
                _ = tokio::time::sleep_until(wake.into()) => None,
            };
            let Some(event) = event else { continue };
            match event {
                Event::Verified { index, digest: piece_digest, from } => {
                    in_flight[index as usize] = false;
                    let bytes = layout.len(index);
                    match &from {
                        Some(peer) => {
                            if let Some(s) = peers.get_mut(peer) {
                                s.in_flight = s.in_flight.saturating_sub(1);
                            }
                            peer_jobs -= 1;
                            METRICS.received(bytes, "peer");
                        }
                        None => {
                            origin_failures = 0;
                            METRICS.received(bytes, "origin");
                            METRICS.origin_pieces.inc();
                            if self.net.has_coordinator() {
                                coord.unreported.push((index, piece_digest));
                            }
                        }
                    }
                    METRICS.pieces_verified.inc();
                    map.set(index, piece_digest);
                    suppliers[index as usize] = from;
                    if let Some(s) = dl.shared.lock().await.as_mut() {
                        s.map.set(index, piece_digest);
                    }
                    let available = map.watermark();
                    dl.progress.send_modify(|p| {
                        if let Progress::Running { available: a, .. } = p {
                            *a = available;
                        }
                    });
                    unsaved += 1;
                    if unsaved >= SAVE_EVERY {
                        unsaved = 0;
                        partial.save_state(map.encode_state()).await?;
                    }
                }
                Event::BadPiece { index, peer } => {
                    in_flight[index as usize] = false;
                    peer_jobs -= 1;
                    METRICS.pieces_rejected.inc();
                    self.ban(&peer, "piece did not match its attested digest");
                    peers.remove(&peer);
                    downloaders.remove(&peer);
                }
                Event::PeerFailed { index, peer, error } => {
                    in_flight[index as usize] = false;
                    peer_jobs -= 1;
                    tracing::debug!(%digest, piece = index, %peer, %error, "piece request failed");
                    match error {
                        PeerError::Lacks => {
                            if let Some(s) = peers.get_mut(&peer) {
                                s.in_flight = s.in_flight.saturating_sub(1);
                                s.have.unset(index);
                            }
                        }
                        PeerError::Busy => {
                            if let Some(s) = peers.get_mut(&peer) {
                                s.in_flight = s.in_flight.saturating_sub(1);
                                s.busy_until = Some(Instant::now() + BUSY_BACKOFF);
                            }
                        }
                        PeerError::Unreachable(_) | PeerError::Protocol(_) => {
                            peers.remove(&peer);
                            downloaders.remove(&peer);
                        }
                    }
                }
                Event::OriginDone { unfinished, error } => {
                    origin_jobs -= 1;
                    unfinished.iter().for_each(|&i| in_flight[i as usize] = false);
                    if let Some(error) = error {
                        tracing::warn!(%digest, error = %error, pieces = unfinished.len(), "origin range request failed");
                        if matches!(error, OriginError::NotFound(_)) {
                            return Err(error.into());
                        }
                        origin_failures += 1;
                        origin_retry_at =
                            Instant::now() + Duration::from_millis(250 * u64::from(origin_failures));
                        if origin_failures >= MAX_ORIGIN_FAILURES {
                            return Err(FetchError::NoSource(digest, error.to_string()));
                        }
                    }
                }
                Event::WriteFailed(e) => return Err(e.into()),
                Event::Have { peer, result } => {
                    let keep = match (peers.get_mut(&peer), result) {
                        (Some(state), Ok(have)) => {
                            state.polling = false;
                            state.update(have, layout)
                        }
                        (Some(state), Err(PeerError::Lacks | PeerError::Busy)) => {
                            state.polling = false;
                            true
                        }
                        (Some(_), Err(_)) => false,
                        (None, _) => true,
                    };
                    if !keep {
                        peers.remove(&peer);
                        downloaders.remove(&peer);
                    }
                }
                Event::Planned { plan, attest } => {
                    coord.asking = false;
                    match plan {
                        Some(plan) => {
                            for p in coord.apply(plan, n) {
                                if p != me && !self.is_banned(&p) {
                                    peers.entry(p.clone()).or_insert_with(|| PeerState::new(n));
                                    downloaders.insert(p);
                                }
                            }
                        }
                        // Not delivered: report them with the next plan request.
                        None => coord.unreported.extend(attest),
                    }
                }
                Event::Providers(found) => {
                    providers_polling = false;
                    for p in found {
                        if let std::collections::hash_map::Entry::Vacant(slot) = peers.entry(p.clone()) {
                            slot.insert(PeerState::new(n));
                            downloaders.insert(p);
                        }
                    }
                }
            }
        }
        partial.save_state(map.encode_state()).await?;
        if self.net.has_coordinator() && !coord.unreported.is_empty() {
            // The last first-hand digests, so the tracker's metainfo is whole.
            tokio::spawn(self.net.plan(digest, self.plan_report(map, std::mem::take(&mut coord.unreported))));
        }
        let from_origin = suppliers.iter().filter(|s| s.is_none()).count();
        tracing::info!(
            %digest,
            pieces = n,
            from_origin,
            from_peers = n as usize - from_origin,
            downloaders = downloaders.len(),
            "all pieces verified"
        );
        Ok(())
    }

    /// After a whole-digest failure: refetches every piece a peer supplied from the origin,
    /// bans the peers whose pieces differ, and writes the origin's bytes.
    async fn repair(
        &self,
        dl: &Download,
        source: &Source,
        partial: &Partial,
        map: &mut PieceMap,
        suppliers: &[Option<NodeId>],
    ) -> Result<(), FetchError> {
        let layout = map.layout;
        for (i, supplier) in suppliers.iter().enumerate() {
            let Some(peer) = supplier else { continue };
            let i = i as u32;
            let (start, end) = layout.range(i);
            let content = self
                .origin
                .open_content(
                    &source.registry,
                    &source.repo,
                    source.kind,
                    &dl.digest,
                    (start, Some(end)),
                    &source.accept,
                )
                .await?;
            let data = read_span(self, content, start, end).await?;
            METRICS.received(data.len() as u64, "origin");
            let good = sha256(&data);
            if good != map.digests[i as usize] {
                METRICS.pieces_rejected.inc();
                self.ban(peer, "attested a piece that the origin contradicts");
                partial.write_at(start, data).await?;
                map.set(i, good);
            }
        }
        Ok(())
    }
}

/// The body of an origin response as chunks starting at byte `start` of the object: what an
/// origin that ignored `Range` sends before `start` is skipped, the rate limit applied.
fn body_from(
    fetcher: &Fetcher,
    content: origin::Content,
    start: u64,
) -> Result<impl futures_util::Stream<Item = Result<Bytes, FetchError>> + '_, FetchError> {
    if content.offset > start {
        let why = format!("asked for bytes from {start}, got from {}", content.offset);
        return Err(OriginError::Protocol(why).into());
    }
    let mut skip = start - content.offset;
    let positioned = content.body.bytes_stream().map(move |chunk| {
        let mut chunk = chunk.map_err(|e| OriginError::Unreachable(origin::error_chain(&e)))?;
        if skip > 0 {
            let k = skip.min(chunk.len() as u64) as usize;
            let _ = chunk.split_to(k);
            skip -= k as u64;
        }
        Ok::<_, FetchError>(chunk)
    });
    Ok(positioned.then(move |chunk| async move {
        if let Ok(c) = &chunk {
            fetcher.download_limit.acquire(c.len() as u64).await;
        }
        chunk
    }))
}

/// Reads bytes `start..end` from an origin response.
async fn read_span(
    fetcher: &Fetcher,
    content: origin::Content,
    start: u64,
    end: u64,
) -> Result<Bytes, FetchError> {
    let mut out = BytesMut::with_capacity((end - start) as usize);
    let mut body = std::pin::pin!(body_from(fetcher, content, start)?);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        let room = (end - start) as usize - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() as u64 == end - start {
            return Ok(out.freeze());
        }
    }
    Err(OriginError::Unreachable("body ended early".into()).into())
}

/// One piece from a peer, checked against the digest the peer attested, then written.
#[allow(clippy::too_many_arguments)]
async fn peer_piece(
    fetcher: Arc<Fetcher>,
    peer: NodeId,
    digest: Digest,
    index: u32,
    expected: [u8; 32],
    layout: Layout,
    partial: Partial,
    tx: mpsc::Sender<Event>,
) {
    let result = fetcher.net.piece(peer.clone(), digest, index).await;
    if let Ok(data) = &result {
        fetcher.download_limit.acquire(data.len() as u64).await;
    }
    let event = match result {
        Ok(data) if data.len() as u64 == layout.len(index) && sha256(&data) == expected => {
            match partial.write_at(layout.range(index).0, data).await {
                Ok(()) => Event::Verified { index, digest: expected, from: Some(peer) },
                Err(e) => Event::WriteFailed(e),
            }
        }
        Ok(_) => Event::BadPiece { index, peer },
        Err(error) => Event::PeerFailed { index, peer, error },
    };
    let _ = tx.send(event).await;
}

/// Pieces `first..end` from the origin in one `Range` request, each hashed (we attest it)
/// and written as soon as it is whole.
async fn origin_span(
    fetcher: Arc<Fetcher>,
    source: Source,
    digest: Digest,
    layout: Layout,
    (first, end): (u32, u32),
    partial: Partial,
    tx: mpsc::Sender<Event>,
) {
    let (start, stop) = (layout.range(first).0, layout.range(end - 1).1);
    let mut next = first;
    let result: Result<(), FetchError> = async {
        let content = fetcher
            .origin
            .open_content(
                &source.registry,
                &source.repo,
                source.kind,
                &digest,
                (start, Some(stop)),
                &source.accept,
            )
            .await?;
        let mut body = std::pin::pin!(body_from(&fetcher, content, start)?);
        let mut piece = BytesMut::with_capacity(layout.len(next) as usize);
        while next < end {
            let Some(chunk) = body.next().await else {
                return Err(OriginError::Unreachable("body ended early".into()).into());
            };
            let mut chunk = chunk?;
            while !chunk.is_empty() && next < end {
                let want = layout.len(next) as usize - piece.len();
                let take = want.min(chunk.len());
                piece.extend_from_slice(&chunk.split_to(take));
                if piece.len() as u64 == layout.len(next) {
                    let data = piece.split().freeze();
                    let piece_digest = sha256(&data);
                    partial.write_at(layout.range(next).0, data).await?;
                    let _ = tx.send(Event::Verified { index: next, digest: piece_digest, from: None }).await;
                    next += 1;
                    if next < end {
                        piece.reserve(layout.len(next) as usize);
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    let error = match result {
        Ok(()) => None,
        Err(FetchError::Origin(e)) => Some(e),
        Err(FetchError::Store(e)) => {
            let _ = tx.send(Event::WriteFailed(e)).await;
            Some(OriginError::Unreachable("local write failed".into()))
        }
        Err(other) => Some(OriginError::Protocol(other.to_string())),
    };
    let _ = tx.send(Event::OriginDone { unfinished: (next..end).collect(), error }).await;
}

/// The sha256 of the whole blob, computed by following the watermark.
async fn whole_sha256(dl: Arc<Download>, total: u64) -> Result<Digest, FetchError> {
    let Some(stream) = dl.follow(0, total, false).await? else {
        return Err(FetchError::Read(std::io::Error::other("download finished before hashing")));
    };
    let mut hasher = Sha256::new();
    let mut chunks = std::pin::pin!(stream.into_stream());
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(bytes) => hasher.update(&bytes),
            Err(e) => return Err(FetchError::Read(std::io::Error::other(e.to_string()))),
        }
    }
    Ok(Digest::from_sha256(hasher.finalize().into()))
}

/// The `mediaType` field of a manifest, when no source told us its type.
async fn sniff_media_type(partial: &Partial, total: u64) -> Option<String> {
    if total > crate::origin::MAX_MANIFEST_BYTES {
        return None;
    }
    let bytes = partial.read_at(0, total as usize).await.ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("mediaType")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(peer: u8, size: u64, complete: bool) -> (NodeId, Result<PeerHave, PeerError>) {
        let layout = Layout::for_size(size);
        let mut have = Bitfield::new(layout.pieces());
        if complete {
            (0..layout.pieces()).for_each(|i| have.set(i));
        }
        let info = PeerHave {
            size,
            piece_size: layout.piece_size,
            have,
            piece_digests: Vec::new(),
            complete,
            media_type: None,
        };
        (NodeId::new(&[peer]), Ok(info))
    }

    #[test]
    fn size_claims_agree_or_are_disputed() {
        let size = |c: SizeClaim| match c {
            SizeClaim::Unknown => None,
            SizeClaim::Agreed(h) => Some(("agreed", h.size)),
            SizeClaim::Disputed { majority } => Some(("disputed", majority.size)),
        };
        assert_eq!(size(SizeClaim::of(&[])), None);
        let lacks = (NodeId::new(&[9]), Err(PeerError::Lacks));
        assert_eq!(size(SizeClaim::of(std::slice::from_ref(&lacks))), None);
        let agreed = [answer(1, 5 << 20, true), lacks.clone(), answer(2, 5 << 20, false)];
        assert_eq!(size(SizeClaim::of(&agreed)), Some(("agreed", 5 << 20)));
        // A piece size our policy would not pick for that size does not count.
        let mut odd = answer(3, 1 << 30, true);
        if let Ok(h) = &mut odd.1 {
            h.piece_size = 4096;
        }
        assert_eq!(size(SizeClaim::of(&[odd.clone(), answer(1, 7, true)])), Some(("agreed", 7)));
        let two_to_one = [answer(1, 100, true), answer(2, 999, true), answer(3, 999, false)];
        assert_eq!(size(SizeClaim::of(&two_to_one)), Some(("disputed", 999)));
        // A tie goes to the peer holding the whole blob.
        let tie = [answer(1, 100, false), answer(2, 999, true)];
        assert_eq!(size(SizeClaim::of(&tie)), Some(("disputed", 999)));
        let tie = [answer(1, 100, true), answer(2, 999, false)];
        assert_eq!(size(SizeClaim::of(&tie)), Some(("disputed", 100)));
    }

    /// An origin that ignores `Range` answers from byte 0 in several chunks: the reader skips
    /// exactly the bytes before `start`, across chunk boundaries.
    #[tokio::test]
    async fn span_from_an_origin_that_ignores_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 1 << 30).unwrap();
        let origin = Arc::new(crate::origin::Origin::new(Default::default(), Default::default()).unwrap());
        let fetcher =
            Fetcher::new(store, origin, Arc::new(super::super::net::Solo::default()), Default::default());
        let data: Vec<u8> = (0..100u8).collect();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(7).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let resp = reqwest::Response::from(axum::http::Response::new(body));
        let content = origin::Content { total: 100, offset: 0, media_type: None, body: resp };
        let got = read_span(&fetcher, content, 20, 60).await.unwrap();
        assert_eq!(&got[..], &data[20..60]);
    }
}
